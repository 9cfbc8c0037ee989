// Work sharing for the kernels: a job's tasks, claimed one at a time by the calling thread and by
// helper threads.
//
// Why helpers of our own: a one-row decode step makes some 200 kernel calls of 5-50 us each, and
// waking a sleeping thread of XLA's pool costs a good part of that. Our helpers spin for a while
// after each job (kSpin), so that the next call of the same step finds them awake; past that they
// sleep, so that an idle engine gets the cores back. Only short jobs use them ("quick": a decode
// step's): after a long one (an embedding step's attention or products) XLA's own ops follow,
// which would share the cores with a spinning helper (embedding throughput 5-10% lower). A call
// that finds them busy with another job (XLA may run independent ops at once) asks XLA's pool
// instead.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace jaxembed {

struct Tasks {
  int64_t count = 0;
  std::atomic<int64_t> next{0}, done{0};

  // Claims tasks until none is left. Any thread may join at any time; late ones find none.
  template <typename F>
  void Run(F&& task) {
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < count;) {
      task(t);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

class Helpers {
 public:
  // How long a helper stays awake after a job: longer than the gaps between the kernel calls
  // of one step, short next to the work XLA's pool does in between (an embedding step's products).
  static constexpr std::chrono::microseconds kSpin{200};

  // The process's helpers, started by the first call: one fewer than XLA's pool has threads.
  static Helpers& Get(int64_t threads) {
    static Helpers* helpers = new Helpers(threads - 1);  // never destroyed: they outlive main
    return *helpers;
  }

  // Runs run(arg) on every helper and on the caller, and returns when every helper that joined
  // has left; false (nothing run) when another job holds the helpers.
  bool Run(void (*run)(void*), void* arg) {
    if (size_ == 0 || busy_.exchange(true, std::memory_order_acquire)) return false;
    const Job job{run, arg};
    job_.store(&job);
    epoch_.fetch_add(1);
    if (sleeping_.load() > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      wake_.notify_all();
    }
    run(arg);
    // A helper counts itself in before it reads the job, so once the job is cleared and none is
    // counted in, none can still be running it.
    job_.store(nullptr);
    while (active_.load() > 0) _mm_pause();
    busy_.store(false, std::memory_order_release);
    return true;
  }

 private:
  struct Job {
    void (*run)(void*);
    void* arg;
  };

  explicit Helpers(int64_t n) : size_(std::max<int64_t>(n, 0)) {
    for (int64_t i = 0; i < size_; ++i) std::thread([this] { Loop(); }).detach();
  }

  void Loop() {
    uint64_t seen = epoch_.load();
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + kSpin;
      for (int spins = 0; epoch_.load() == seen; ++spins) {
        // Yielding, not pausing: a thread of XLA's pool that wants this core meanwhile gets it.
        std::this_thread::yield();
        if ((spins & 15) == 15 && std::chrono::steady_clock::now() > until) {
          std::unique_lock<std::mutex> lock(mutex_);
          sleeping_.fetch_add(1);
          wake_.wait(lock, [&] { return epoch_.load() != seen; });
          sleeping_.fetch_sub(1);
        }
      }
      seen = epoch_.load();
      active_.fetch_add(1);
      if (const Job* job = job_.load()) job->run(job->arg);
      active_.fetch_sub(1);
    }
  }

  const int64_t size_;
  std::atomic<bool> busy_{false};
  std::atomic<const Job*> job_{nullptr};
  std::atomic<uint64_t> epoch_{0};
  std::atomic<int64_t> active_{0}, sleeping_{0};
  std::mutex mutex_;
  std::condition_variable wake_;
};

// Runs job->Run() (which drains job->tasks) on the calling thread and on helpers (ours if quick
// and free, else XLA's pool), and returns when every task is done. The caller works too, so
// helpers that never start cost only speed; XLA's pool helpers hold the job, so one that starts
// after the call returned finds it alive, and no task left.
template <typename Job>
void Share(xla::ffi::ThreadPool& pool, const std::shared_ptr<Job>& job, bool quick) {
  const int64_t threads = std::min<int64_t>(pool.num_threads(), job->tasks.count);
  if (threads > 1 && quick &&
      Helpers::Get(pool.num_threads()).Run([](void* j) { static_cast<Job*>(j)->Run(); },
                                           job.get()))
    return;  // every task is done: each thread that ran ran until none was left
  for (int64_t i = 0; i < threads - 1; ++i) pool.Schedule([job] { job->Run(); });
  job->Run();
  while (job->tasks.done.load(std::memory_order_acquire) < job->tasks.count) _mm_pause();
}

}  // namespace jaxembed
