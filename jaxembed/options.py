"""`EngineOptions`: every setting of an engine, listed once.

The command line's flags, `EngineBuilder`'s fields and what the engine reads are this one dataclass:
each field carries its flag's help (and argparse settings) as metadata, `add_arguments` turns the
fields into flags, and `from_args` reads them back. A new setting is one field here.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from jaxembed.protocol import EmbeddingDefaults

DEFAULT_MAX_QUEUED_REQUESTS = 1024
ATTENTION_MODES = ("causal", "bidirectional")
MATMUL_DTYPES = ("bfloat16",)  # what a `*_matmul_dtype` may narrow float32 projections to
QUANTIZE = ("none", "int8")  # what --quantize takes
KV_CACHE_DTYPES = ("float32", "bfloat16")


def _flag(help: str, **argparse_kwargs: Any) -> dict[str, Any]:
    return {"help": help, "argparse": argparse_kwargs}


@dataclasses.dataclass
class EngineOptions:
    """model: a GGUF file, an HF folder, an HF repo id, or None for the embedded default model.

    Every other field is documented by its flag's help below (`jaxembed serve --help`); None
    means the default the help names, most of them decided by the execution plan
    (`jaxembed.plan`) from the backend."""

    model: str | os.PathLike | None = dataclasses.field(default=None, metadata=_flag(
        "a GGUF file, an HF model folder, or an HF repo id (local hub cache first), with "
        "':QUANT' for a GGUF repo's file of that quant type (org/name:Q4_K_M); default: the "
        "embedded SmolLM2-135M-Instruct Q4_1"))
    dtype: str | None = dataclasses.field(default=None, metadata=_flag(
        "compute dtype (default: float32 on CPU, bfloat16 on GPU)",
        choices=["float32", "bfloat16", "float16"]))
    max_model_len: int | None = dataclasses.field(default=None, metadata=_flag(
        "longest input, and longest prompt plus answer, in tokens (default: the model's "
        "context, at most 2048 on a CPU and 8192 on an accelerator)", type=int))
    max_batch_tokens: int | None = dataclasses.field(default=None, metadata=_flag(
        "token budget of one batched step (default: 1024 on a CPU, where smaller steps stay in "
        "cache, and 16384 on an accelerator)", type=int))
    max_num_seqs: int | None = dataclasses.field(default=None, metadata=_flag(
        "sequences generated at once, each with KV cache rows of --max-model-len tokens, "
        "allocated on the first generation request (default: 16 on a CPU, 64 on an "
        "accelerator)", type=int))
    kv_cache_dtype: str | None = dataclasses.field(default=None, metadata=_flag(
        "the KV cache's storage (default: bfloat16 where decoding narrows to it, or on an "
        "accelerator; else float32); bfloat16 holds twice the tokens",
        choices=list(KV_CACHE_DTYPES)))
    memory_utilization: float = dataclasses.field(default=0.9, metadata=_flag(
        "fraction of the memory the engine runs in (the host's on a CPU, the device's on an "
        "accelerator) it may use: the KV cache gets what is left of it after the weights, as "
        "many --max-num-seqs slots as fit; one that cannot fit a single sequence is an error at "
        "start-up (default: 0.9)", type=float))
    embed_matmul_dtype: str | None = dataclasses.field(default=None, metadata=_flag(
        "run embeddings' projections in bfloat16 over float32 activations (about 1.3x on a CPU "
        "with bf16 dot instructions)", choices=list(MATMUL_DTYPES)))
    decode_matmul_dtype: str | None = dataclasses.field(default=None, metadata=_flag(
        "run generation's decode steps' projections and LM head, and keep the KV cache, in "
        "bfloat16 (about 1.25x for 16 streams on such a CPU; greedy text may differ from "
        "float32's at near ties)", choices=list(MATMUL_DTYPES)))
    quantize: str | None = dataclasses.field(default=None, metadata=_flag(
        "how projection weights are held: by default a GGUF file's quantized tensors stay in "
        "their blocks (products over int8 activations, or the weights dequantized step by "
        "step) and float weights stay float; 'none' dequantizes every weight at load into "
        "--dtype (the reference path); 'int8' also quantizes float weights at load (Q8_0's "
        "layout: a scale per 32 values), for the memory", choices=list(QUANTIZE)))
    attention: str | None = dataclasses.field(default=None, metadata=_flag(
        "override the model's attention (default: what its config says)",
        choices=list(ATTENTION_MODES)))
    kernels: bool = dataclasses.field(default=True, metadata=_flag(
        "run every op in XLA: no CPU kernels, no GPU (Pallas) kernels; the reference the kernels "
        "are tested against, and the way round a kernel a machine cannot compile",
        flag="--no-kernels", action="store_false"))
    instruction_template: str | None = dataclasses.field(default=None, metadata=_flag(
        "how a request's 'instruction' is placed before the input, ending with '{text}', e.g. "
        "'Instruct: {instruction}\\nQuery:{text}' (default: the model family's known template, "
        "if any)"))
    chunk_overlap: int = dataclasses.field(default=0, metadata=_flag(
        "with chunked processing (a request's 'chunked', or --default-chunked), each window of "
        "an over-long input after the first starts N tokens before the previous one ends, "
        "those tokens attending as context but pooled once only (default: 0, vLLM's)",
        type=int, metavar="N"))
    classifier_from_tokens: Sequence[str] | None = dataclasses.field(default=None, metadata=_flag(
        "score (query, document) pairs with the LM head's logits of these tokens at the last "
        "position, 'false,true' (the true token's log-odds: Qwen3-Reranker's 'no,yes') or one "
        "token (its logit), through the model family's rerank prompt when it has one; as "
        "vLLM's classifier_from_token", type=lambda s: tuple(t for t in s.split(",") if t),
        metavar="FALSE,TRUE"))
    score_refuse_long: bool = dataclasses.field(default=False, metadata=_flag(
        "refuse a (query, document) pair or a text to classify that is past the model's limit "
        "(default: cut the document, or the text, to fit)", action="store_true"))
    tensor_parallel: int = dataclasses.field(default=1, metadata=_flag(
        "shard the model over N devices (attention heads, MLP width and experts split across "
        "them); across hosts, all devices of all processes (default: 1)", type=int,
        metavar="N"))
    data_parallel: int = dataclasses.field(default=1, metadata=_flag(
        "run N replicas, each on its own --tensor-parallel devices of this host, each request "
        "going to the least loaded (default: 1)", type=int, metavar="N"))
    # What the server admits; the CLI sets them for `serve` only.
    served_model_names: Sequence[str] | None = dataclasses.field(default=None, metadata=_flag(
        "a name clients use for the model (repeatable; default: the file or folder name); "
        "'default' always works too", flag="--served-model-name", action="append"))
    max_queued_requests: int = dataclasses.field(
        default=DEFAULT_MAX_QUEUED_REQUESTS, metadata=_flag(
            "requests queued or running at once; past it, 429 with Retry-After (default: "
            f"{DEFAULT_MAX_QUEUED_REQUESTS})", type=int))
    max_request_tokens: int | None = dataclasses.field(default=None, metadata=_flag(
        "most tokens in one request, all inputs together (default: no limit)", type=int))
    # Server-wide values for the fields a request leaves unset (the CLI's --default-* flags).
    defaults: EmbeddingDefaults | None = None
    # How `EngineBuilder.build` goes about it; no flags.
    warmup: bool = True
    progress: bool = True
    compilation_cache: bool = True

    def validate(self) -> None:
        """Refuse settings that no engine could take, before anything loads."""
        for name in ("tensor_parallel", "data_parallel", "max_queued_requests"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"{name} must be an integer of at least 1; got {value!r}")
        if self.attention is not None and self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}; got "
                             f"{self.attention!r}")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {QUANTIZE} (or unset); got "
                             f"{self.quantize!r}")
        for name in ("embed_matmul_dtype", "decode_matmul_dtype"):
            value = getattr(self, name)
            if value is not None and value not in MATMUL_DTYPES:
                raise ValueError(f"{name} must be 'bfloat16' (or unset); got {value!r}")
        if self.kv_cache_dtype is not None and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES} (or unset); got "
                             f"{self.kv_cache_dtype!r}")
        u = self.memory_utilization
        if isinstance(u, bool) or not isinstance(u, int | float) or not 0 < u <= 1:
            raise ValueError(f"memory_utilization must be a fraction in (0, 1]; got {u!r}")
        tokens = self.classifier_from_tokens
        if tokens is not None and (isinstance(tokens, str) or not 1 <= len(tokens) <= 2):
            raise ValueError("classifier_from_tokens takes one or two tokens (false, true); got "
                             f"{tokens!r}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1; got {self.max_num_seqs}")


# The flags every command that loads a model takes, and those only `serve` adds.
MODEL_FLAGS = ("model", "dtype", "quantize", "max_model_len", "max_batch_tokens",
               "max_num_seqs", "kv_cache_dtype", "memory_utilization", "embed_matmul_dtype",
               "decode_matmul_dtype", "attention", "kernels", "instruction_template",
               "chunk_overlap", "classifier_from_tokens", "score_refuse_long", "tensor_parallel",
               "data_parallel")
SERVE_FLAGS = ("served_model_names", "max_queued_requests", "max_request_tokens")
_FIELDS = {f.name: f for f in dataclasses.fields(EngineOptions)}


def add_arguments(parser: argparse.ArgumentParser, names: Sequence[str] = MODEL_FLAGS) -> None:
    """A flag for each named field, from its metadata (`--max-model-len` for max_model_len)."""
    for name in names:
        field = _FIELDS[name]
        kwargs = dict(field.metadata["argparse"])
        flag = kwargs.pop("flag", "--" + name.replace("_", "-"))
        default = field.default if field.default is not dataclasses.MISSING else None
        if kwargs.get("action") == "append":
            default = []
        parser.add_argument(flag, dest=name, default=default, help=field.metadata["help"],
                            **kwargs)


def from_args(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """The fields `add_arguments` added, read back from parsed args (plus `extra`), as keyword
    arguments for `EngineOptions` or `EngineBuilder`."""
    fields = {n: getattr(args, n) for n in _FIELDS if hasattr(args, n)}
    if fields.get("instruction_template") is not None:  # a shell passes "\n" literally
        fields["instruction_template"] = fields["instruction_template"].replace("\\n", "\n")
    if "served_model_names" in fields:
        fields["served_model_names"] = fields["served_model_names"] or None
    return {**fields, **extra}
