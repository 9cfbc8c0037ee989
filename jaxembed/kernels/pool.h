// Work sharing for the kernels: a job's tasks, claimed one at a time by the calling thread and by
// helpers on XLA's own CPU thread pool.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

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

// Runs job->Run() (which drains job->tasks) on the calling thread and on up to
// `pool.num_threads() - 1` helpers, and returns when every task is done. The caller works too, so
// a pool that never runs the helpers costs only speed; the helpers hold the job, so one that
// starts after the call returned finds it alive, and no task left.
template <typename Job>
void Share(xla::ffi::ThreadPool& pool, const std::shared_ptr<Job>& job) {
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), job->tasks.count) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([job] { job->Run(); });
  job->Run();
  while (job->tasks.done.load(std::memory_order_acquire) < job->tasks.count) _mm_pause();
}

}  // namespace jaxembed
