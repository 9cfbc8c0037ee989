"""`jaxembed embed-file`: a corpus into Parquet or .npy, every row's vector the one
`engine.encode` gives it, resumed after a killed run without losing or repeating a row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from jaxembed import Engine, corpus
from jaxembed.cli import main

WORDS = "the cat sat on a warm mat while dogs barked at night and birds sang".split()


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(1, 30))) for _ in range(n)]


def _read(out: Path) -> tuple[list, np.ndarray]:
    table = pq.read_table(out)
    vectors = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(
        table.num_rows, -1)
    return table.column("id").to_pylist(), vectors


def test_a_jsonl_corpus_into_parquet_with_ids(tiny_engine: Engine, tmp_path: Path) -> None:
    texts = _texts(70)
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"doc": f"d{i}", "body": t}) + "\n"
                           for i, t in enumerate(texts)))
    out = tmp_path / "vectors.parquet"
    done = corpus.embed_file(tiny_engine, src, out, column="body", id_column="doc",
                             batch_size=16, progress=False, normalize=True, dimensions=32)
    assert done.rows == 70 and done.tokens == sum(len(t) for t in tiny_engine.tokenize(texts))
    ids, vectors = _read(out)
    assert ids == [f"d{i}" for i in range(70)]
    np.testing.assert_allclose(vectors, tiny_engine.encode(texts, normalize=True, dimensions=32),
                               atol=1e-5)
    assert not (tmp_path / "vectors.parquet.parts").exists()


def test_a_killed_run_resumes_without_losing_or_repeating_a_row(tiny_engine: Engine,
                                                               tmp_path: Path) -> None:
    texts = _texts(100, seed=1)
    src = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": texts}), src, row_group_size=30)
    out = tmp_path / "vectors.parquet"
    first = corpus.embed_file(tiny_engine, src, out, batch_size=16, progress=False,
                              stop_after=2)
    parts = tmp_path / "vectors.parquet.parts"
    assert not out.exists() and 0 < first.rows < 100
    # A write the kill cut short leaves a temporary file: it is never read as a part.
    (parts / ".part-000000000999-000000001999.parquet.tmp").write_bytes(b"garbage")
    second = corpus.embed_file(tiny_engine, src, out, batch_size=16, progress=False)
    assert second.resumed_from == first.rows
    ids, vectors = _read(out)
    assert ids == list(range(100))  # every row, once, in order
    np.testing.assert_allclose(vectors, tiny_engine.encode(texts), atol=1e-5)


def test_a_csv_corpus_into_npy_from_the_command_line(tiny_engine: Engine, tiny_llama_dir: Path,
                                                     tmp_path: Path, capsys) -> None:
    texts = _texts(40, seed=2)
    src = tmp_path / "corpus.csv"
    pacsv.write_csv(pa.table({"n": list(range(40)), "text": texts}), src)
    out = tmp_path / "vectors.npy"
    assert main(["embed-file", str(src), "--out", str(out), "--model", str(tiny_llama_dir),
                 "--dtype", "float32", "--batch-size", "8", "--embedding-type", "last"]) == 0
    assert "40 rows into" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(out), tiny_engine.encode(texts, embedding_type="last"),
                               atol=1e-5)
    # A wrong column: one line naming the file and the columns it has.
    assert main(["embed-file", str(src), "--out", str(tmp_path / "x.npy"), "--model",
                 str(tiny_llama_dir), "--column", "body"]) == 2
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("jaxembed: error:")]
    assert "Traceback" not in err and len(said) == 1
    assert "no column 'body'" in said[0] and "n, text" in said[0]


@pytest.mark.parametrize("name,why", [("corpus.txt", "expected"), ("missing.jsonl", "no such")])
def test_bad_files_are_one_line(tiny_engine: Engine, tmp_path: Path, name: str,
                                why: str) -> None:
    src = tmp_path / name
    if name.endswith(".txt"):
        src.write_text("x\n")
    with pytest.raises(corpus.CorpusError, match=why):
        corpus.embed_file(tiny_engine, src, tmp_path / "out.parquet", progress=False)
