"""Ray Data over jaxembed: `Embedder` in `Dataset.map_batches` on a local Ray cluster, two
actors each building its own engine; every row's vector is the one `engine.encode` gives it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from jaxembed import Engine


def test_two_actors_embed_a_parquet_dataset(tiny_engine: Engine, tiny_llama_dir: Path,
                                            tmp_path: Path) -> None:
    from jaxembed.ray_data import Embedder

    rng = np.random.default_rng(4)
    words = "the cat sat on a warm mat while dogs barked at night".split()
    texts = [" ".join(rng.choice(words, rng.integers(1, 20))) for _ in range(60)]
    src = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": list(range(60)), "text": texts}), src)
    # Four logical CPUs on this 2-core machine: the two actors take one each, and Ray Data's
    # read and write tasks need their own, or the pipeline waits for a CPU forever.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"JAX_PLATFORMS": "cpu"}})
    try:
        ds = ray.data.read_parquet(str(src)).map_batches(
            Embedder, fn_constructor_kwargs={"model": str(tiny_llama_dir), "dtype": "float32",
                                             "warmup": False, "normalize": True},
            concurrency=2, num_cpus=1, batch_size=16, batch_format="numpy")
        out = tmp_path / "vectors"
        ds.write_parquet(str(out))
    finally:
        ray.shutdown()
    table = pq.read_table(out)
    ids = table.column("id").to_pylist()
    assert sorted(ids) == list(range(60))  # every row once (actors may finish out of order)
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    order = np.argsort(ids)
    np.testing.assert_allclose(vectors[order], tiny_engine.encode(texts, normalize=True),
                               atol=1e-5)
