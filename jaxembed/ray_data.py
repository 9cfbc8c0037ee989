"""Embedding a dataset on many machines with Ray Data: one engine per actor.

`Embedder` is a callable class for `ray.data.Dataset.map_batches`. Ray builds one per actor
(`concurrency` actors, each with the `num_gpus` and `num_cpus` it asks for, as Ray users set
them), so each actor loads the model once and embeds every batch it is handed; a batch comes back
with an `embedding` column ([rows, size] float32) beside its own.

    import ray
    from jaxembed.ray_data import Embedder

    ds = ray.data.read_parquet("corpus.parquet")
    ds = ds.map_batches(Embedder, fn_constructor_kwargs={"model": "model.gguf",
                                                        "normalize": True},
                        concurrency=4, num_gpus=1, batch_size=256, batch_format="numpy")
    ds.write_parquet("vectors/")

Install with `pip install 'jaxembed[ray]'`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxembed.builder import EngineBuilder
from jaxembed.protocol import EmbeddingRequest

# The embeddings request's settings an Embedder takes; every other keyword goes to the engine.
REQUEST_FIELDS = ("embedding_type", "normalize", "dimensions", "prompt_name", "instruction",
                  "input_type", "truncate_prompt_tokens", "chunked")


class Embedder:
    def __init__(self, model: str, column: str = "text", output_column: str = "embedding",
                 **options: Any) -> None:
        """model: as `EngineBuilder`'s; column: the text column; options: the request's
        settings (`REQUEST_FIELDS`) and `EngineBuilder`'s."""
        fields = {k: options.pop(k) for k in REQUEST_FIELDS if k in options}
        options.setdefault("progress", False)
        self.engine = EngineBuilder(model=model, **options).build()
        self.options = self.engine.resolve(EmbeddingRequest(input="x", **fields))
        self.column, self.output_column = column, output_column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch[self.column]]
        if not texts:
            return {**batch, self.output_column: np.zeros((0, self.size), np.float32)}
        o = self.options
        prepared = self.engine.prepare(texts, o.truncate, o.prompt, o.chunked)
        states = self.engine.submit(prepared.sequences, o.pooling, prepared.skip).result()
        vectors = self.engine.embedding.finish(o, prepared.combine(states, o.pooling))
        return {**batch, self.output_column: np.asarray(vectors, np.float32)}

    @property
    def size(self) -> int:
        return self.options.dimensions or self.engine.embedding_size

    def __del__(self) -> None:  # an actor ends: its engine's thread goes with it
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
