"""What the engine counts: per-step and per-request statistics, plain data for `/metrics`."""

from __future__ import annotations

import bisect
import copy
import dataclasses
import threading
from collections.abc import Callable, Sequence

# Histogram bounds for the per-step metrics: sequences, requests and real tokens in one step.
COUNT_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BOUNDS = (16, 64, 256, 1024, 4096, 16384, 65536)


@dataclasses.dataclass
class Histogram:
    """Counts of observations per bucket (value <= bound; the last bucket is +Inf), with their sum:
    what Prometheus needs to draw a histogram, without the engine depending on a metrics library."""

    bounds: tuple[float, ...]
    counts: list[int] = dataclasses.field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[int]:
        """Counts at or below each bound, then the total (the +Inf bucket)."""
        out, running = [], 0
        for c in self.counts:
            running += c
            out.append(running)
        return out


@dataclasses.dataclass
class EngineStats:
    steps: int = 0
    sequences: int = 0
    real_tokens: int = 0  # tokens embedded
    padded_tokens: int = 0  # the steps' full size, padding included
    compilations: int = 0
    busy_seconds: float = 0.0
    requests: int = 0  # requests completed
    cancelled: int = 0  # requests dropped before they were computed (their caller gave up)
    rejected: int = 0  # requests refused because the queue was full
    step_sequences: Histogram = dataclasses.field(default_factory=lambda: Histogram(COUNT_BOUNDS))
    step_requests: Histogram = dataclasses.field(default_factory=lambda: Histogram(COUNT_BOUNDS))
    step_tokens: Histogram = dataclasses.field(default_factory=lambda: Histogram(TOKEN_BOUNDS))
    generated_tokens: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0
    generation_requests: int = 0  # generation requests finished (all their choices)

    @property
    def padding_ratio(self) -> float:
        return 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0


@dataclasses.dataclass
class RequestTiming:
    """Where a request's time went: waiting in the queue, then in the steps that computed it."""

    submitted: float
    started: float | None = None  # the start of the first step holding one of its sequences
    finished: float | None = None

    @property
    def queue_seconds(self) -> float:
        end = self.started if self.started is not None else self.finished
        return max(0.0, (end if end is not None else self.submitted) - self.submitted)

    @property
    def inference_seconds(self) -> float:
        if self.started is None or self.finished is None:
            return 0.0
        return self.finished - self.started


def sum_stats(stats: Sequence[EngineStats]) -> EngineStats:
    """Counters and histograms added field by field (the replicas' figures as one engine's)."""
    out = EngineStats()
    for st in stats:
        for f in dataclasses.fields(EngineStats):
            mine, theirs = getattr(out, f.name), getattr(st, f.name)
            if isinstance(mine, Histogram):
                mine.counts = [a + b for a, b in zip(mine.counts, theirs.counts, strict=True)]
                mine.total += theirs.total
                mine.count += theirs.count
            else:
                setattr(out, f.name, mine + theirs)
    return out


class StatsRecorder:
    """The statistics of one core, updated by its thread and read by others under one lock."""

    def __init__(self) -> None:
        self.stats = EngineStats()
        self._lock = threading.Lock()

    def update(self, change: Callable[[EngineStats], None]) -> None:
        with self._lock:
            change(self.stats)

    def add(self, **counts: float) -> None:
        """Add to counters by name: `add(steps=1, busy_seconds=0.2)`."""
        with self._lock:
            for name, n in counts.items():
                setattr(self.stats, name, getattr(self.stats, name) + n)

    def snapshot(self) -> EngineStats:
        """A consistent copy."""
        with self._lock:
            return copy.deepcopy(self.stats)
