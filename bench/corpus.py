"""The corpus workload: `embed-file` against the engine's own throughput on the same texts.

Short texts (a sentence each) are written to Parquet. The engine's own figure submits the same
batches straight to `Engine.submit`, several in flight, and reads the vectors back; `embed-file`
reads the file, tokenizes, queues, and writes Parquet parts and the joined file. Both run on one
engine, alternated, after an untimed pass that compiles every step shape they use.
"""

from __future__ import annotations

import collections
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

WORDS = ("the a cat dog sat ran on under warm cold mat roof while as birds people sang talked "
         "at in night morning and or quickly slowly near far").split()


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(4, 16))) for _ in range(n)]


def _engine_own(engine: Any, texts: list[str], batch: int) -> tuple[float, int]:
    """Seconds and tokens for the batches straight through the engine, IN_FLIGHT at once."""
    from jaxembed.corpus import IN_FLIGHT

    start, tokens = time.perf_counter(), 0
    queue: collections.deque[Any] = collections.deque()
    for i in range(0, len(texts), batch):
        prepared = engine.prepare(texts[i : i + batch])
        tokens += prepared.prompt_tokens
        queue.append(engine.submit(prepared.sequences))
        while len(queue) >= IN_FLIGHT:
            queue.popleft().result()
    while queue:
        queue.popleft().result()
    return time.perf_counter() - start, tokens


def corpus_benchmark(model: Path, rows: int, batch: int = 256, rounds: int = 2) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jaxembed import EngineBuilder, corpus

    texts = sentences(rows)
    engine = EngineBuilder(model=model, progress=False).build()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "corpus.parquet"
            pq.write_table(pa.table({"text": texts}), src)
            _engine_own(engine, texts, batch)  # compiles every shape both use
            own, files = [], []
            for r in range(rounds):
                own.append(_engine_own(engine, texts, batch))
                out = Path(tmp) / f"out-{r}.parquet"
                done = corpus.embed_file(engine, src, out, batch_size=batch, progress=False)
                files.append((done.seconds, done.tokens))
    finally:
        engine.shutdown()
    own_s = min(s for s, _ in own)
    file_s = min(s for s, _ in files)
    tokens = own[0][1]
    return {"rows": rows, "tokens": tokens, "batch": batch,
            "engine_rows_per_s": rows / own_s, "engine_tokens_per_s": tokens / own_s,
            "embed_file_rows_per_s": rows / file_s, "embed_file_tokens_per_s": tokens / file_s,
            "embed_file_vs_engine": own_s / file_s}
