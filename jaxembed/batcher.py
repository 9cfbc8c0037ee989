"""The embedding batcher: sequences of every queued embedding request, packed into steps.

It keeps the sequences waiting for a step, plans the next step from them (`scheduler.plan_step`:
the longest sets the row length, short ones fill the gaps), has the runner run it, and writes each
pooled vector to its request, whose future completes with its last sequence. Runs on the engine
thread only.

Steps run one ahead: a step is dispatched, and the previous one's vectors are read back (and
written to their requests) while it computes, so the host's work between steps (reading back,
completing futures, planning) overlaps the device's instead of adding to it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import time
from typing import Any

import numpy as np

from jaxembed.runner import ModelRunner
from jaxembed.scheduler import Buckets, plan_step, plan_token_step
from jaxembed.stats import EngineStats, StatsRecorder
from jaxembed.steps import EmbedStep, TokenStep
from jaxembed.work import EmbeddingWork, Output, PromptScores

log = logging.getLogger("jaxembed.batcher")



@dataclasses.dataclass
class _InFlight:
    """A dispatched step, its requests and its device output, not yet read back."""

    step: EmbedStep | TokenStep
    works: dict[int, EmbeddingWork]
    pooled: Any  # [slots, D] on the device; a TokenStep's outputs for one
    start: float


class EmbeddingBatcher:
    def __init__(self, runner: ModelRunner, buckets: Buckets, stats: StatsRecorder) -> None:
        self.runner, self.buckets, self.stats = runner, buckets, stats
        self._pending: dict[int, tuple[EmbeddingWork, int]] = {}  # id -> (work, its index)
        self._waiting: list[tuple[int, np.ndarray]] = []  # (id, token ids), in arrival order
        self._ids = itertools.count()
        self._inflight: _InFlight | None = None

    @property
    def has_work(self) -> bool:
        return bool(self._waiting) or self._inflight is not None

    def add(self, work: EmbeddingWork) -> None:
        if work.remaining == 0 and not work.future.done():  # no sequences at all
            work.future.set_result(work.out)
        for i, seq in enumerate(work.sequences):
            sid = next(self._ids)
            self._pending[sid] = (work, i)
            self._waiting.append((sid, seq))

    def drop_cancelled(self) -> None:
        """Forget the sequences of requests whose future was cancelled: nobody awaits them."""
        dropped: set[int] = set()
        kept = []
        for sid, seq in self._waiting:
            work = self._pending[sid][0]
            if work.future.cancelled():
                self._pending.pop(sid)
                dropped.add(id(work))
            else:
                kept.append((sid, seq))
        self._waiting = kept
        if dropped:
            self.stats.add(cancelled=len(dropped))

    def fail_all(self, error: Exception) -> None:
        """Fail every request with sequences waiting or in a step (after an error the engine
        loop could not pin on one step)."""
        works = {id(w): w for w, _ in self._pending.values()}
        self._pending.clear()
        self._waiting = []
        self._inflight = None
        for w in works.values():
            if not w.future.done():
                with contextlib.suppress(concurrent.futures.InvalidStateError):
                    w.future.set_exception(error)

    def step(self) -> None:
        """Dispatch a step planned from the waiting sequences (if any), then read back the step
        dispatched before it."""
        previous, self._inflight = self._inflight, None
        if self._waiting:
            # A step gives one kind of output: the oldest waiting sequence's, so none waits
            # behind a stream of another kind.
            kind = self._pending[self._waiting[0][0]][0].output
            batch, skips, pooling = [], {}, {}
            for sid, seq in self._waiting:
                work, i = self._pending[sid]
                if work.output is not kind:
                    continue
                batch.append((sid, seq))
                pooling[sid] = work.pooling
                if work.skip is not None and work.skip[i]:
                    skips[sid] = work.skip[i]
            step: EmbedStep | TokenStep
            if kind is Output.POOLED:
                step, _ = plan_step(batch, self.buckets, skips, pooling)
            else:
                step, _ = plan_token_step(batch, self.buckets, skips, kind is Output.SCORES)
            planned = set(step.sequences)
            self._waiting = [w for w in self._waiting if w[0] not in planned]
            self._inflight = self._dispatch(step)
        if previous is not None:
            self._finish(previous)

    def _dispatch(self, step: EmbedStep | TokenStep) -> _InFlight | None:
        start = time.perf_counter()
        pending = self._pending
        works = {id(pending[s][0]): pending[s][0] for s in step.sequences}
        for w in works.values():
            if w.future.timing.started is None:
                w.future.timing.started = start
        try:
            return _InFlight(step, works, self.runner.run(step), start)
        except Exception as e:  # a failed step fails its requests, never the engine
            self._fail(step, works, e)
            return None

    def _fail(self, step: EmbedStep | TokenStep, works: dict[int, EmbeddingWork],
              e: Exception) -> None:
        log.exception("step %s failed", step.tokens.shape)
        for s in step.sequences:
            self._pending.pop(s, None)
        for w in works.values():
            if not w.future.done():
                w.future.set_exception(e)

    def _finish(self, flight: _InFlight) -> None:
        step, works, start, pending = flight.step, flight.works, flight.start, self._pending
        try:
            results = _results(step, flight.pooled)
        except Exception as e:
            self._fail(step, works, e)
            return
        finished = time.perf_counter()
        completed = 0
        for slot, s in enumerate(step.sequences):
            work, i = pending.pop(s)
            work.out[i] = results[slot]
            work.remaining -= 1
            if work.remaining == 0 and not work.future.done():
                work.future.timing.finished = finished
                with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled now
                    work.future.set_result(work.out)
                    completed += 1

        def count(st: EngineStats) -> None:
            st.steps += 1
            st.sequences += len(step.sequences)
            st.requests += completed
            st.real_tokens += step.real_tokens
            st.padded_tokens += step.padded_tokens
            st.busy_seconds += finished - start
            st.step_sequences.observe(len(step.sequences))
            st.step_requests.observe(len(works))
            st.step_tokens.observe(step.real_tokens)
        self.stats.update(count)


def _results(step: EmbedStep | TokenStep, out: Any) -> Any:
    """A step's device output, read back, as one result a sequence (in slot order)."""
    if isinstance(step, EmbedStep):
        return np.asarray(out)  # [slots, D]: one vector a sequence
    spans = step.spans
    if not step.score:
        hidden = np.asarray(out)
        flat = hidden.reshape(-1, hidden.shape[-1])  # [B * T, D]
        return [flat[a : a + n].copy() for a, n in spans]
    lp, ids, top_lp = (np.asarray(x) for x in out)
    k = ids.shape[-1]
    lp, ids, top_lp = lp.reshape(-1), ids.reshape(-1, k), top_lp.reshape(-1, k)
    return [PromptScores(lp[a : a + n].copy(), ids[a : a + n].copy(), top_lp[a : a + n].copy())
            for a, n in spans]
