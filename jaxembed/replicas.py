"""Data parallel: several engine replicas on disjoint devices of one host, behind one engine's API.

Each replica is a whole `LLMEngine` (its own thread, queue, params copy and KV cache) on its own
device group; nothing is shared between them but the tokenizer's settings. A request goes to the
replica with the least work at that moment: requests it has accepted and not finished (embedding
and generation alike), plus calls routed to it that have not reached its queue yet (tokenizing),
ties broken in turn. A generation stays on its replica to the end, since its KV cache lives there.

The router answers everything the server and the Python API ask of an engine: the work methods
pick a replica; the model's description (names, limits, tokenizer, validation) is every replica's
and comes from the first; counters and gauges are summed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from jaxembed.engine import EngineStats, Histogram, LLMEngine

# The calls that do work, routed to one replica each; all else is the same on every replica.
ROUTED = ("embed", "encode", "submit", "submit_generation", "generate_stream", "generate", "chat")
ROUTED_ASYNC = ("aembed", "aembed_timed", "agenerate_stream", "agenerate")


class ReplicaRouter:
    def __init__(self, engines: Sequence[LLMEngine]) -> None:
        if not engines:
            raise ValueError("a router needs at least one engine")
        self.replicas = list(engines)
        self._lock = threading.Lock()
        self._routing = [0] * len(self.replicas)  # calls picked for a replica, not yet returned
        self._next = 0  # where the search for the least loaded starts: ties go round in turn

    # ---- routing ---------------------------------------------------------------------------

    def load(self, i: int) -> int:
        return self.replicas[i].queue_depth + self._routing[i]

    @contextlib.contextmanager
    def _route(self) -> Iterator[LLMEngine]:
        n = len(self.replicas)
        with self._lock:
            order = [(self._next + j) % n for j in range(n)]
            i = min(order, key=self.load)  # the first of the least loaded, from `_next` on
            self._next = (i + 1) % n
            self._routing[i] += 1
        try:
            yield self.replicas[i]
        finally:
            with self._lock:
                self._routing[i] -= 1

    def __getattr__(self, name: str) -> Any:
        if name in ROUTED:
            def call(*args: Any, **kwargs: Any) -> Any:
                with self._route() as engine:
                    return getattr(engine, name)(*args, **kwargs)
            return call
        if name in ROUTED_ASYNC:
            async def acall(*args: Any, **kwargs: Any) -> Any:
                with self._route() as engine:
                    return await getattr(engine, name)(*args, **kwargs)
            return acall
        if name.startswith("__") or name == "replicas":
            raise AttributeError(name)
        # What describes the model and validates requests is the same on every replica.
        return getattr(self.replicas[0], name)

    # ---- what is summed or holds for all ---------------------------------------------------

    @property
    def ready(self) -> bool:
        return all(e.ready for e in self.replicas)

    @property
    def queue_depth(self) -> int:
        return sum(e.queue_depth for e in self.replicas)

    @property
    def max_queued_requests(self) -> int:
        return sum(e.max_queued_requests for e in self.replicas)

    @property
    def running_sequences(self) -> int:
        return sum(e.running_sequences for e in self.replicas)

    @property
    def max_num_seqs(self) -> int:
        """KV cache slots of all replicas (one request's `n` is bounded by one replica's)."""
        return sum(e.max_num_seqs for e in self.replicas)

    def stats_snapshot(self) -> EngineStats:
        return sum_stats([e.stats_snapshot() for e in self.replicas])

    def warmup(self, *args: Any, **kwargs: Any) -> None:
        for e in self.replicas:
            e.warmup(*args, **kwargs)

    def pause(self) -> None:
        for e in self.replicas:
            e.pause()

    def resume(self) -> None:
        for e in self.replicas:
            e.resume()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def shutdown(self, timeout: float | None = None) -> None:
        """Each replica finishes its queue and stops, all at once."""
        threads = [threading.Thread(target=e.shutdown, args=(timeout,)) for e in self.replicas]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def __enter__(self) -> ReplicaRouter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def sum_stats(stats: Sequence[EngineStats]) -> EngineStats:
    """Counters and histograms added field by field."""
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
