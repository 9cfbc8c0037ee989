"""The engine core: one thread owns the devices and runs every step; callers submit work to its
queue.

The loop drains the queue between steps, so work submitted meanwhile from any thread is batched
together, then runs one step of each kind that has work, so neither starves the other: new prompts
join free KV cache slots (a prefill step), an embedding batch runs, then every running sequence
gains a token (a decode step). The schedulers plan the steps; the model runner runs them.

The queue is bounded by `max_queued_requests`: past it `submit` raises `EngineOverloadedError`, so
a burst is refused at once instead of piling up latency. Work whose caller gave up (a cancelled
future or stream) is dropped before it is computed.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Iterator
from typing import Any

from jaxembed import multihost
from jaxembed.batcher import EmbeddingBatcher
from jaxembed.errors import EngineError, EngineOverloadedError, EngineUnavailableError
from jaxembed.gen_scheduler import GenerationScheduler
from jaxembed.runner import ModelRunner
from jaxembed.scheduler import Buckets
from jaxembed.stats import EngineStats, StatsRecorder
from jaxembed.work import EmbeddingWork, GenerationWork, Work

log = logging.getLogger("jaxembed.core")

# While idle, a multi-host leader tells its followers so this often (see `multihost.IDLE`).
IDLE_PING_SECONDS = 30.0


@contextlib.contextmanager
def paused(target: Any) -> Iterator[None]:
    """`target` paused (`pause()`) for the block, then resumed."""
    target.pause()
    try:
        yield
    finally:
        target.resume()


def unavailable() -> EngineUnavailableError:
    return EngineUnavailableError("the engine is shut down or shutting down; retry on another "
                                  "replica or after the restart", code="draining")


class EngineCore:
    def __init__(self, runner: ModelRunner, buckets: Buckets, tokenizer: Any,
                 max_queued_requests: int, recorder: StatsRecorder) -> None:
        """recorder: where the statistics go (the runner counts its compilations there too).
        max_queued_requests: as `EngineOptions.validate` checked it."""
        self.max_queued_requests = int(max_queued_requests)
        self.recorder = recorder
        self.runner = runner
        self.batcher = EmbeddingBatcher(runner, buckets, self.recorder)
        self.scheduler = GenerationScheduler(runner, buckets, tokenizer, self.recorder,
                                              on_done=self._release)
        self._queue: queue.Queue[Work | None] = queue.Queue()
        self._closed = False
        self._outstanding = 0  # requests accepted and not yet finished, cancelled or failed
        self._lock = threading.Lock()
        # Set while the core may run steps; `pause()` clears it. `_step_lock` is held for each
        # step, so `pause()` can wait out a step already running.
        self._running = threading.Event()
        self._running.set()
        self._step_lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, name="jaxembed-engine", daemon=True)
        self.thread.start()

    @property
    def ready(self) -> bool:
        """Accepting work: false once shutdown has begun (draining, then stopped), or if the
        engine thread is gone."""
        return not self._closed and self.thread.is_alive()

    @property
    def queue_depth(self) -> int:
        """Requests accepted and not yet finished (waiting or in a step)."""
        return self._outstanding

    def stats_snapshot(self) -> EngineStats:
        return self.recorder.snapshot()

    # ---- admission (any thread) ------------------------------------------------------------

    def submit(self, work: Work) -> None:
        """Admit work to the queue, or refuse it: shut down (503), or the queue full (429)."""
        with self._lock:
            if self._closed or not self.thread.is_alive():
                raise unavailable()
            if self._outstanding >= self.max_queued_requests:
                self.recorder.add(rejected=1)
                raise EngineOverloadedError(
                    f"the server is busy: {self._outstanding} requests are already queued, its "
                    "limit; retry after a short wait")
            self._outstanding += 1
            self._queue.put(work)
        if isinstance(work, EmbeddingWork):  # runs at once if the work is already done
            work.future.add_done_callback(lambda _: self._release())

    def _release(self) -> None:
        with self._lock:
            self._outstanding -= 1

    # ---- control ---------------------------------------------------------------------------

    def pause(self) -> None:
        """Hold the core before its next step; a step already running finishes first. Work can
        still be submitted and queues up (to the bound). A hook for tests and maintenance: it lets
        overload and draining be driven deterministically rather than by timing."""
        self._running.clear()
        with self._step_lock:  # returns once no step is running
            pass

    def resume(self) -> None:
        self._running.set()

    def paused(self) -> contextlib.AbstractContextManager[None]:
        return paused(self)

    def close(self) -> None:
        """Refuse new work; the thread finishes the queued work, then stops. Ends a pause, since
        queued work could not finish otherwise."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self.resume()

    def shutdown(self, timeout: float | None = None) -> None:
        """`close`, then wait for the thread to stop."""
        self.close()
        self.thread.join(timeout)

    # ---- the loop (the engine thread) ------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._steps()
        finally:
            self.runner.send(multihost.STOP)

    def _steps(self) -> None:
        embeddings, generation = self.batcher, self.scheduler
        stopping = False

        def take(item: Work | None) -> None:
            nonlocal stopping
            if item is None:
                stopping = True
            elif isinstance(item, GenerationWork):
                generation.add(item)
            else:
                embeddings.add(item)

        while True:
            if not (embeddings.has_work or generation.has_work) and not stopping:
                take(self._wait_for_work())  # idle: block until work (or shutdown) arrives
            self._running.wait()
            with self._step_lock:
                if not self._running.is_set():  # paused between the wait and the lock
                    continue
                while True:
                    try:
                        take(self._queue.get_nowait())
                    except queue.Empty:
                        break
                embeddings.drop_cancelled()
                generation.drop_cancelled()
                if not (embeddings.has_work or generation.has_work):
                    if stopping:
                        return
                    continue
                if generation.can_admit:
                    self._guard(generation.prefill_step)
                if embeddings.has_work:
                    self._guard(embeddings.step)
                if generation.running_sequences:
                    self._guard(generation.decode_step)

    def _guard(self, step: Any) -> None:
        """Run one step. A step fails its own requests when it fails; an error outside any
        step's own handling (planning, a bug) fails every request in flight rather than the
        engine thread: a dead thread would leave /health saying ready while every request
        waits for its timeout."""
        try:
            step()
        except Exception as e:
            log.exception("the engine loop failed outside a step; failing the work in flight")
            error = EngineError(f"internal error in the engine ({type(e).__name__}); the request "
                                "was not completed, retry it")
            self.batcher.fail_all(error)
            self.scheduler.fail_all(error)

    def _wait_for_work(self) -> Work | None:
        """The next queued item, blocking. A multi-host leader wakes up now and then meanwhile
        to tell its followers it is idle (their wait is a collective, which must not last for
        hours)."""
        if not self.runner.leader:
            return self._queue.get()
        while True:
            try:
                return self._queue.get(timeout=IDLE_PING_SECONDS)
            except queue.Empty:
                self.runner.send(multihost.IDLE)
