"""`EngineBuilder`: from a model name or path to a running, warmed-up `LLMEngine`."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence

import jax

from jaxembed.engine import (
    DEFAULT_MAX_BATCH_TOKENS,
    DEFAULT_MAX_QUEUED_REQUESTS,
    LLMEngine,
    default_dtype,
)
from jaxembed.fetch import cache_dir, resolve_model
from jaxembed.protocol import EmbeddingDefaults
from jaxembed.weights.loader import load_checkpoint

log = logging.getLogger("jaxembed")

ATTENTION_MODES = ("causal", "bidirectional")


@dataclasses.dataclass
class EngineBuilder:
    """Everything needed to start an engine. `build()` loads the weights and starts its thread.

    model: a GGUF file, an HF folder, an HF repo id, or None for the embedded default model.
    dtype: "float32", "bfloat16" or "float16"; None picks float32 on CPU, bfloat16 on accelerators.
    max_queued_requests: requests waiting or running at once; past it, submissions are refused.
    max_request_tokens: the most tokens one request may hold in all (None: no limit).
    defaults: server-wide values for the request fields a request leaves unset.
    attention: "causal" or "bidirectional" to override what the model's config says.
    instruction_template: how `instruction` is placed, e.g. "Instruct: {instruction}\\nQuery:{text}"
        (ending with `{text}`); None: the family's known template, if any.
    max_num_seqs: sequences generated at once, each with its own KV cache rows (None: 16 on a
        CPU, 64 on an accelerator).
    """

    model: str | os.PathLike | None = None
    dtype: str | None = None
    max_model_len: int | None = None
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    served_model_names: Sequence[str] | None = None
    max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS
    max_request_tokens: int | None = None
    defaults: EmbeddingDefaults | None = None
    attention: str | None = None
    instruction_template: str | None = None
    max_num_seqs: int | None = None
    warmup: bool = True
    progress: bool = True
    compilation_cache: bool = True

    def build(self) -> LLMEngine:
        if self.compilation_cache:
            enable_compilation_cache()
        path = resolve_model(self.model)
        checkpoint = load_checkpoint(path, self.dtype or default_dtype(), progress=self.progress)
        log.info("loaded %s (%s, %s) in %.2fs", path, checkpoint.format, checkpoint.dtype,
                 checkpoint.load_seconds)
        if self.attention is not None:
            if self.attention not in ATTENTION_MODES:
                raise ValueError(f"attention must be one of {ATTENTION_MODES}; got "
                                 f"{self.attention!r}")
            causal = self.attention == "causal"
            checkpoint = dataclasses.replace(
                checkpoint, config=dataclasses.replace(checkpoint.config, causal=causal))
        engine = LLMEngine(checkpoint, max_model_len=self.max_model_len,
                           max_batch_tokens=self.max_batch_tokens,
                           served_model_names=self.served_model_names,
                           max_queued_requests=self.max_queued_requests,
                           max_request_tokens=self.max_request_tokens, defaults=self.defaults,
                           instruction_template=self.instruction_template,
                           max_num_seqs=self.max_num_seqs)
        if self.warmup:
            engine.warmup()
        return engine


def enable_compilation_cache() -> None:
    """Persist compiled steps across restarts, under the jaxembed cache folder."""
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
