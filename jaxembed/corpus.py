"""Embedding a corpus, not a request: `jaxembed embed-file INPUT --out OUTPUT`.

INPUT is JSON lines, CSV or Parquet, read with pyarrow's datasets in batches (never whole), the
text from `--column`. OUTPUT is Parquet (an id column and a float32 fixed-size-list `embedding`
column) or `.npy` (float32 [rows, size], rows in input order).

It resumes. Finished batches are written as parts, each to a temporary name and then renamed, into
`OUTPUT.parts/`, named by the rows they hold; a killed run leaves only whole parts, and the next
run starts after the last row they hold. When every row is embedded, the parts are joined into
OUTPUT (streamed, part by part) and removed. A row is never lost or written twice: parts are
contiguous and start where the previous one ends, which the join checks.

The engine is kept busy: while it computes a batch, the next ones are tokenized and queued
(`IN_FLIGHT` batches at once), and finished ones are written.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from jaxembed.engine import Engine
from jaxembed.protocol import EmbeddingRequest

IN_FLIGHT = 3  # batches queued on the engine at once: one computing, the next ones ready
PART = re.compile(r"part-(\d{12})-(\d{12})\.(parquet|npy)")
FORMATS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".csv": "csv",
           ".parquet": "parquet"}


class CorpusError(ValueError):
    """A bad input or output: said on one line by the command."""


def _pyarrow() -> Any:
    try:
        import pyarrow  # noqa: F401
        import pyarrow.dataset  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as e:
        raise CorpusError("embed-file reads and writes with pyarrow: pip install "
                          "'jaxembed[files]'") from e
    import pyarrow as pa

    return pa


@dataclasses.dataclass
class Summary:
    rows: int
    tokens: int
    seconds: float
    resumed_from: int

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def embed_file(engine: Engine, source: str | Path, out: str | Path, column: str = "text",
               id_column: str | None = None, batch_size: int = 256, progress: bool = True,
               stop_after: int | None = None, **fields: Any) -> Summary:
    """Embed `column` of every row of `source` into `out` (see the module's docstring).
    `fields`: the embeddings request's settings (embedding_type, normalize, dimensions,
    prompt_name, instruction, input_type, truncate_prompt_tokens, chunked). `stop_after`: stop
    once this many batches are written, as a killed run would (for tests)."""
    pa = _pyarrow()
    import pyarrow.dataset as ds

    source, out = Path(source), Path(out)
    kind = FORMATS.get(source.suffix.lower())
    if kind is None:
        raise CorpusError(f"{source}: expected {', '.join(sorted(FORMATS))}")
    if out.suffix.lower() not in (".parquet", ".npy"):
        raise CorpusError(f"{out}: the output is .parquet or .npy")
    if not source.is_file():
        raise CorpusError(f"{source}: no such file")
    data = ds.dataset(str(source), format=kind)
    names = data.schema.names
    for name in (column, id_column):
        if name is not None and name not in names:
            raise CorpusError(f"{source}: no column {name!r}; it has {', '.join(names)}")
    total = data.count_rows()
    options = engine.resolve(EmbeddingRequest(input="x", **fields))
    parts = out.with_name(out.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    done = _rows_done(parts)
    start, tokens = time.perf_counter(), 0
    bar = tqdm(total=total, initial=done, unit="row", disable=not progress,
               desc=f"embedding {source.name}")
    queue: collections.deque[tuple[int, list[Any], Any, Any]] = collections.deque()
    written = 0

    def finish_one() -> None:
        nonlocal tokens, written
        first, ids, prepared, future = queue.popleft()
        vectors = engine.embedding.finish(
            options, prepared.combine(future.result(), options.pooling))
        _write_part(pa, parts, out.suffix.lower(), first, ids, np.asarray(vectors, np.float32))
        tokens += prepared.prompt_tokens
        written += 1
        bar.update(len(ids))
        bar.set_postfix(tokens_per_s=f"{tokens / (time.perf_counter() - start):,.0f}")

    row = 0
    for batch in data.to_batches(columns=[c for c in (column, id_column) if c] or None,
                                 batch_size=batch_size):
        n = batch.num_rows
        if row + n <= done:  # embedded by an earlier run
            row += n
            continue
        texts = batch.column(column).to_pylist()[max(done - row, 0):]
        ids = (batch.column(id_column).to_pylist()[max(done - row, 0):] if id_column
               else list(range(max(row, done), row + n)))
        first = max(row, done)
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t:
                raise CorpusError(f"{source}: row {first + i} has no text in {column!r}")
        prepared = engine.prepare(texts, options.truncate, options.prompt, options.chunked)
        queue.append((first, ids, prepared,
                      engine.submit(prepared.sequences, options.pooling, prepared.skip)))
        row += n
        while len(queue) >= IN_FLIGHT:
            finish_one()
        if stop_after is not None and written >= stop_after:
            for *_, future in queue:
                future.cancel()
            bar.close()
            return Summary(_rows_done(parts), tokens, time.perf_counter() - start, done)
    while queue:
        finish_one()
    bar.close()
    _join(pa, parts, out, total, engine.embedding_size if options.dimensions is None
          else options.dimensions)
    return Summary(total, tokens, time.perf_counter() - start, done)


def _parts(parts: Path) -> list[tuple[int, int, Path]]:
    found = sorted((int(m[1]), int(m[2]), p) for p in parts.iterdir()
                   if (m := PART.fullmatch(p.name)))
    return found


def _rows_done(parts: Path) -> int:
    """Rows held by the whole parts, which run contiguously from row 0."""
    end = 0
    for first, last, _ in _parts(parts):
        if first != end:
            raise CorpusError(f"{parts}: part {first}-{last} does not follow row {end}; remove "
                              "the folder to start over")
        end = last
    return end


def _write_part(pa: Any, parts: Path, suffix: str, first: int, ids: list[Any],
                vectors: np.ndarray) -> None:
    """Rows [first, first + len(ids)) as one part, written whole or not at all."""
    name = parts / f"part-{first:012d}-{first + len(ids):012d}{suffix}"
    tmp = parts / f".{name.name}.tmp"
    if suffix == ".npy":
        with open(tmp, "wb") as f:
            np.save(f, vectors)
    else:
        import pyarrow.parquet as pq

        pq.write_table(_table(pa, ids, vectors), tmp)
    os.replace(tmp, name)


def _table(pa: Any, ids: list[Any], vectors: np.ndarray) -> Any:
    flat = pa.array(np.ascontiguousarray(vectors, np.float32).reshape(-1))
    embedding = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
    return pa.table({"id": pa.array(ids), "embedding": embedding})


def _join(pa: Any, parts: Path, out: Path, total: int, size: int) -> None:
    """The parts, in row order, into `out` (through a temporary name), then the parts go."""
    found = _parts(parts)
    if _rows_done(parts) != total:
        raise CorpusError(f"{parts}: the parts hold {_rows_done(parts)} of {total} rows")
    tmp = out.with_name(f".{out.name}.tmp")
    if out.suffix.lower() == ".npy":
        target = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                           shape=(total, size))
        for first, last, path in found:
            target[first:last] = np.load(path)
        target.flush()
        del target
    else:
        import pyarrow.parquet as pq

        writer = None
        for _, _, path in found:
            table = pq.read_table(path)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
        if writer is None:  # no rows at all
            writer = pq.ParquetWriter(tmp, _table(pa, [], np.zeros((0, size), np.float32))
                                      .schema)
        writer.close()
    os.replace(tmp, out)
    for _, _, path in found:
        path.unlink()
    for stray in parts.glob(".part-*.tmp"):  # a write a killed run cut short
        stray.unlink()
    parts.rmdir()


def batches(path: str | Path, column: str, batch_size: int) -> Iterator[list[str]]:
    """The texts of a file's column, a batch at a time (for benchmarks)."""
    _pyarrow()
    import pyarrow.dataset as ds

    path = Path(path)
    data = ds.dataset(str(path), format=FORMATS[path.suffix.lower()])
    for batch in data.to_batches(columns=[column], batch_size=batch_size):
        yield batch.column(column).to_pylist()
