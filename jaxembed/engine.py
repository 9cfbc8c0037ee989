"""The engine: one thread owns the device and runs every step; callers submit work to its queue.

Embeddings are prefill-only tasks (`max_tokens=0`): they run the decoder over packed rows and return
pooled final hidden states instead of logits, and never touch a KV cache. Callers from any thread
(Python, or the HTTP server's event loop through `aembed`) tokenize on their own side and submit
token ids; the engine thread drains the queue between steps, so concurrent work is batched together.

Every device computation is a step of plain data (`_device_step`): on a mesh (`sharding`) its
inputs are placed replicated and XLA partitions the rest; on a multi-host run process 0 sends each
step to the other processes, which run it too (`follow`).

The queue is bounded by `max_queued_requests` (past it `submit` raises `EngineOverloadedError`, so a
burst is refused at once instead of piling up latency), and a request whose future was cancelled
(its caller gave up or went away) is dropped before it is computed.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import concurrent.futures
import contextlib
import copy
import dataclasses
import logging
import operator
import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxembed import kernels, model, multihost, sampling
from jaxembed.errors import (
    EngineOverloadedError,
    EngineUnavailableError,
    InvalidRequestError,
    ModelNotFoundError,
)
from jaxembed.generation import (
    ChatTemplate,
    Delta,
    FinishReason,
    GenerationResult,
    GenerationStream,
    IncrementalDetokenizer,
    StopStrings,
    TokenLogprob,
    normalize_messages,
)
from jaxembed.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingData,
    EmbeddingDefaults,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingType,
    EncodingFormat,
    InputType,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
    encode_vector,
    split_input,
)
from jaxembed.sampling import SamplingParams
from jaxembed.scheduler import Buckets, Step, plan_step
from jaxembed.sharding import ShardingPlan, cache_sharding, replicated
from jaxembed.st_config import SentenceTransformersConfig, read_sentence_transformers
from jaxembed.weights.loader import Checkpoint

log = logging.getLogger("jaxembed.engine")

DEFAULT_MAX_BATCH_TOKENS = 8192
# On a CPU a step's activations should stay in cache: with SmolLM2 on two cores, 1024-token steps
# embed about 20% more tokens/s than 8192-token ones (bench/, interleaved runs), and 512 to 1536
# are level. Accelerators want large steps.
DEFAULT_MAX_BATCH_TOKENS_CPU = 1024
# An embedding step's inputs, in the order the compiled step takes them.
STEP_INPUTS = ("tokens", "positions", "segment_ids", "seq_index", "last_index", "first_index")
DEFAULT_MAX_MODEL_LEN = 8192
# On a CPU every slot of the KV cache costs host memory, and long contexts are slow anyway.
DEFAULT_MAX_MODEL_LEN_CPU = 2048
DEFAULT_MAX_NUM_SEQS = 16
DEFAULT_MAX_NUM_SEQS_ACCELERATOR = 64
DEFAULT_MAX_QUEUED_REQUESTS = 1024
DEFAULT_ALIAS = "default"
# The device steps, as sent to multi-host followers (see `LLMEngine._device_step`).
EMBED, PREFILL, DECODE = "embed", "prefill", "decode"
# While idle, a multi-host leader tells its followers so this often (see `multihost.IDLE`).
IDLE_PING_SECONDS = 30.0

# Instruction templates per family, as the instruction-tuned embedding models of each were trained
# (Qwen3-Embedding; gte-Qwen2 and e5-mistral; EmbeddingGemma). `{instruction}` is the request's
# text and `{text}` the input, which must end the template: what comes before it is the prompt.
INSTRUCTION_TEMPLATES = {
    "qwen3": "Instruct: {instruction}\nQuery:{text}",
    "qwen2": "Instruct: {instruction}\nQuery: {text}",
    "mistral": "Instruct: {instruction}\nQuery: {text}",
    "gemma3": "task: {instruction} | query: {text}",
}
# The names a model's prompts go by for each input type, in order of preference.
INPUT_TYPE_PROMPTS = {
    InputType.Query: ("query",),
    InputType.Document: ("document", "passage", "doc", "corpus"),
}

# Histogram bounds for the per-step metrics: sequences, requests and real tokens in one step.
COUNT_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BOUNDS = (16, 64, 256, 1024, 4096, 16384, 65536)


def default_dtype() -> str:
    """float32 on the CPU (no fast bf16 matmul there), bfloat16 on accelerators."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


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


class EmbeddingFuture(concurrent.futures.Future):
    """The future `submit` returns: float32 [len(sequences), hidden], plus the request's timing.

    Cancelling it before its vectors are computed drops the work from the queue."""

    def __init__(self) -> None:
        super().__init__()
        self.timing = RequestTiming(time.perf_counter())


@dataclasses.dataclass
class _Work:
    """One submitted batch of sequences and where their vectors go."""

    sequences: list[np.ndarray]
    pooling: EmbeddingType
    future: EmbeddingFuture
    out: np.ndarray
    remaining: int
    skip: list[int] | None = None  # leading tokens of each sequence left out of its pooling


@dataclasses.dataclass
class _GenWork:
    """One submitted generation request: a prompt continued `n` times."""

    prompt: np.ndarray
    params: SamplingParams
    stream: GenerationStream
    seeds: list[int]
    stop_ids: frozenset[int]
    open: int  # choices not finished yet


@dataclasses.dataclass
class _Seq:
    """One choice of a generation request, from waiting for a slot to finished."""

    work: _GenWork
    index: int
    seed: int
    detok: IncrementalDetokenizer
    stops: StopStrings
    slot: int = -1
    pos: int = 0  # tokens in its cache rows; the next token is written here
    last: int = 0  # the last token drawn, fed to the next decode step
    out: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class PreparedInput:
    """Validated token ids for one request, the prompt included."""

    sequences: list[np.ndarray]
    skip: list[int] | None = None  # prompt tokens to leave out of each sequence's pooling

    @property
    def prompt_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


@dataclasses.dataclass(frozen=True)
class EmbeddingOptions:
    """A request's settings once validated and merged with the server's defaults."""

    model: str
    pooling: EmbeddingType
    normalize: bool
    truncate: int | None  # keep the last this many tokens; None: refuse over-long inputs
    dimensions: int | None
    encoding_format: EncodingFormat
    prompt: str | None = None  # prepended to each text input


def _narrowing(value: str | None, name: str, checkpoint: Checkpoint) -> Any:
    """The dtype a `*_matmul_dtype` argument asks projections to be multiplied in, or None."""
    if value is None:
        return None
    if value != "bfloat16":
        raise ValueError(f"{name} must be 'bfloat16' (or unset); got {value!r}")
    if checkpoint.dtype != "float32":
        raise ValueError(f"{name} needs float32 weights to narrow; these are "
                         f"{checkpoint.dtype}: load them as float32")
    return jnp.bfloat16


class LLMEngine:
    def __init__(self, checkpoint: Checkpoint, *, max_model_len: int | None = None,
                 max_batch_tokens: int | None = None,
                 served_model_names: Sequence[str] | None = None,
                 max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS,
                 max_request_tokens: int | None = None,
                 defaults: EmbeddingDefaults | None = None,
                 instruction_template: str | None = None,
                 max_num_seqs: int | None = None,
                 embed_matmul_dtype: str | None = None,
                 decode_matmul_dtype: str | None = None,
                 sharding: ShardingPlan | None = None,
                 channel: multihost.StepChannel | None = None) -> None:
        """sharding: the mesh the params were placed on (by that plan); the engine places its
        step inputs and KV cache there too. None: everything on the default device.
        channel: on a multi-host run, where the leader sends each step (see `follow`).
        embed_matmul_dtype: "bfloat16" to run the embedding path's projections (attention and
        MLP weights) in bfloat16 over float32 activations, from a bfloat16 copy of those weights.
        decode_matmul_dtype: the same for decode steps (their projections and the LM head), with
        a bfloat16 KV cache; prefills compute in the weights' own dtype."""
        self.checkpoint = checkpoint
        self.config = checkpoint.config
        self.params = checkpoint.params
        # A CPU with bf16 dot instructions multiplies narrowed projections faster; norms,
        # attention and the residual stream stay float32 (see model.linear).
        embed_dtype = _narrowing(embed_matmul_dtype, "embed_matmul_dtype", checkpoint)
        self._decode_dtype = _narrowing(decode_matmul_dtype, "decode_matmul_dtype", checkpoint)
        # One CPU device: where the kernels run, and where decoding reads per-layer copies.
        self._one_cpu = jax.default_backend() == "cpu" and (sharding is None
                                                            or sharding.mesh.size == 1)
        self._kernels = self._one_cpu and kernels.available()
        # With the kernels, bf16 embedding products run in `kernels.matmul`, from weights packed
        # in its layout: around XLA's own bf16 products it spends as long again converting
        # activations and slicing the stacked weights in bfloat16.
        self._embed_params = self.params if embed_dtype is None else \
            model.with_projection_dtype(self.params, embed_dtype, self._kernels)  # embed steps'
        self.tokenizer = checkpoint.tokenizer.tokenizer
        # A sentence-transformers folder says how the model is meant to be used; its settings
        # are the model's defaults (a plain causal LM has none: mean pooling, no normalization).
        st = read_sentence_transformers(checkpoint.path) if checkpoint.path.is_dir() else None
        self.sentence_transformers: SentenceTransformersConfig | None = st
        self.model_defaults = EmbeddingDefaults(
            embedding_type=st.pooling, normalize=st.normalize,
            prompt_name=st.default_prompt_name) if st else EmbeddingDefaults()
        if st and st.dense and st.dense[0].in_features != self.config.hidden_size:
            raise ValueError(f"the first Dense module takes {st.dense[0].in_features} features, "
                             f"but the model's hidden size is {self.config.hidden_size}")
        if st and st.pooling == EmbeddingType.Cls and self.config.causal:
            raise ValueError("the model's pooling is 'cls', which needs bidirectional attention, "
                             "but the model is causal; serve it with bidirectional attention")
        template = instruction_template or INSTRUCTION_TEMPLATES.get(self.config.family)
        if template is not None and not template.endswith("{text}"):
            raise ValueError(f"an instruction template must end with '{{text}}'; got {template!r}")
        self.instruction_template = template
        accelerated = jax.default_backend() != "cpu"
        limit = min(self.config.max_position_embeddings,
                    DEFAULT_MAX_MODEL_LEN if accelerated else DEFAULT_MAX_MODEL_LEN_CPU)
        if st and st.max_seq_length:
            limit = min(limit, st.max_seq_length)
        self.max_model_len = int(max_model_len or limit)
        self.max_batch_tokens = int(max_batch_tokens or (
            DEFAULT_MAX_BATCH_TOKENS if accelerated else DEFAULT_MAX_BATCH_TOKENS_CPU))
        self.buckets = Buckets.build(self.max_model_len, self.max_batch_tokens)
        self.served_model_names = list(served_model_names or [checkpoint.name])
        if max_queued_requests < 1:
            raise ValueError(f"max_queued_requests must be at least 1; got {max_queued_requests}")
        self.max_queued_requests = int(max_queued_requests)
        self.max_request_tokens = max_request_tokens
        self.defaults = defaults or EmbeddingDefaults()
        self.stats = EngineStats()
        self._special_prefix, self._special_suffix = self._special_tokens()
        self._special_ids = {i for i, t in self.tokenizer.get_added_tokens_decoder().items()
                             if t.special}
        self._prompt_lengths: dict[str, int] = {}
        try:  # the defaults go through the same checks as a request's own values
            self.resolve(EmbeddingRequest(input="x"))
        except InvalidRequestError as e:
            raise ValueError(f"bad server default: {e.message}") from None

        self.sharding = sharding
        self._channel = channel
        # Embedding and prefill steps on one CPU attend in `kernels.attention`: XLA computes
        # every score of a packed row and masks most away (SmolLM2, 1024-token rows of mixed
        # lengths: attention was about half of an embedding step).
        self._cpu_attention = self._kernels and model.cpu_attention_fits(self.config)
        # Every device step (and, on a multi-host leader, the message announcing it) runs under
        # this lock, so that warm-up from a loading thread and the engine thread never interleave.
        self._device_lock = threading.Lock()
        cfg = self.config

        def pooled(params: Any, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                   seq_index: jax.Array, last_index: jax.Array, first_index: jax.Array
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
            with self._stats_lock:
                self.stats.compilations += 1  # runs once per trace, i.e. once per new step shape
            # The first tokens' states ride along as extra "last" indexes: the model gathers both
            # sets at once. Its mean then has twice the segments; the padding slot (N) falls in
            # the second half, which is dropped, so the first N means are unchanged.
            n = last_index.shape[0]
            mean, picked = model.pooled(params, tokens, positions, segment_ids, seq_index,
                                        jnp.concatenate([last_index, first_index]), cfg=cfg,
                                        cpu_attention=self._cpu_attention)
            return self._replicate((mean[:n], picked[:n], picked[n:]))

        self._pooled = jax.jit(pooled)
        self._init_generation(max_num_seqs or (DEFAULT_MAX_NUM_SEQS_ACCELERATOR if accelerated
                                               else DEFAULT_MAX_NUM_SEQS))
        self._queue: queue.Queue[_Work | _GenWork | None] = queue.Queue()
        self._closed = False
        self._outstanding = 0  # requests accepted and not yet finished, cancelled or failed
        self._lock = threading.Lock()
        self._stats_lock = threading.Lock()
        # Set while the engine may run steps; `pause()` clears it. `_step_lock` is held for each
        # step, so `pause()` can wait out a step already running.
        self._running = threading.Event()
        self._running.set()
        self._step_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="jaxembed-engine", daemon=True)
        self._thread.start()

    # ---- public API ----------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    @property
    def hidden_size(self) -> int:
        """The size of the pooled hidden states (what `submit` returns)."""
        return self.config.hidden_size

    @property
    def embedding_size(self) -> int:
        """The size of the vectors served: the hidden size, or the last Dense module's output."""
        st = self.sentence_transformers
        return st.output_size(self.hidden_size) if st else self.hidden_size

    @property
    def is_causal(self) -> bool:
        """Whether each token sees only the tokens before it (decoders); bidirectional models
        (EmbeddingGemma) see the whole input from every token, which makes `cls` meaningful."""
        return bool(self.config.causal)

    @property
    def prompts(self) -> dict[str, str]:
        """The model's named prompts (from its sentence-transformers configuration)."""
        return dict(self.sentence_transformers.prompts) if self.sentence_transformers else {}

    @property
    def ready(self) -> bool:
        """Accepting work: false once shutdown has begun (draining, then stopped)."""
        return not self._closed

    @property
    def queue_depth(self) -> int:
        """Requests accepted and not yet finished (waiting or in a step)."""
        return self._outstanding

    def resolve_model(self, name: str | None) -> str:
        """The served name a request's `model` refers to; `default` aliases the served model."""
        if name is None or name == DEFAULT_ALIAS or name in self.served_model_names:
            return self.model_name
        raise ModelNotFoundError(
            f"the model {name!r} is not served here; use one of "
            f"{[*self.served_model_names, DEFAULT_ALIAS]}", param="model")

    def resolve(self, request: EmbeddingRequest) -> EmbeddingOptions:
        """Validate the request's settings (not its input) and fill in the server's defaults.

        Precedence for each extension: the request's value, then the server's default, then the
        model's (its sentence-transformers configuration), then the built-in one (mean pooling,
        no normalization, no truncation, no prompt)."""
        d, md = self.defaults, self.model_defaults
        name = self.resolve_model(request.model)
        fmt = _enum(EncodingFormat, request.encoding_format, "encoding_format")
        pooling = _enum(EmbeddingType, _first(request.embedding_type, d.embedding_type,
                                              md.embedding_type, EmbeddingType.Mean),
                        "embedding_type")
        if pooling == EmbeddingType.Cls and self.is_causal:
            raise InvalidRequestError(
                f"'embedding_type' 'cls' needs a bidirectional model, and {self.model_name} is a "
                "causal decoder: its first token sees only itself, so its state says nothing "
                "about the rest of the input; use 'mean' or 'last'", param="embedding_type",
                code="unsupported_value")
        normalize = _first(request.normalize, d.normalize, md.normalize, False)
        if not isinstance(normalize, bool):
            raise InvalidRequestError(
                f"'normalize' must be true or false; got {normalize!r}", param="normalize",
                code="invalid_type")
        dims = request.dimensions
        if dims is not None and (not _is_int(dims) or not 1 <= dims <= self.embedding_size):
            raise InvalidRequestError(
                f"'dimensions' must be between 1 and {self.embedding_size} for this model; "
                f"got {dims!r}", param="dimensions")
        supported = self.supported_dimensions
        if dims is not None and supported and dims not in supported:
            raise InvalidRequestError(
                f"'dimensions' {dims} is not a size {self.model_name} was trained to give; use "
                f"one of {list(supported)}", param="dimensions", code="unsupported_value")
        truncate = _first(request.truncate_prompt_tokens, d.truncate_prompt_tokens, None)
        if truncate is not None:
            if not _is_int(truncate) or not (truncate == -1 or 1 <= truncate <= self.max_model_len):
                raise InvalidRequestError(
                    "'truncate_prompt_tokens' must be -1 (this model's limit of "
                    f"{self.max_model_len} tokens) or between 1 and {self.max_model_len}; "
                    f"got {truncate!r}", param="truncate_prompt_tokens")
            truncate = self.max_model_len if truncate == -1 else int(truncate)
        prompt = self._resolve_prompt(request)
        asked = next((f for f in ("instruction", "prompt_name", "input_type")
                      if getattr(request, f) is not None), None)
        if prompt is not None and asked is not None and _is_token_input(request.input):
            raise InvalidRequestError(
                f"'{asked}' adds a prompt to text, but 'input' is token ids, which are fed as "
                f"they are; send the input as text, or tokenize the prompt into the ids yourself "
                f"and leave '{asked}' out", param=asked, code="unsupported_value")
        return EmbeddingOptions(name, pooling, normalize, truncate,
                                None if dims is None else int(dims), fmt, prompt)

    @property
    def supported_dimensions(self) -> tuple[int, ...]:
        """The Matryoshka sizes the model declares (its full size included); empty: any size."""
        st = self.sentence_transformers
        if not st or not st.matryoshka_dimensions:
            return ()
        return tuple(sorted({*st.matryoshka_dimensions, self.embedding_size}))

    def _resolve_prompt(self, request: EmbeddingRequest | TokenizeRequest) -> str | None:
        """The prompt text for a request: its own `instruction`, `prompt_name` or `input_type`
        (at most one), else the server's default, else the model's default prompt."""
        given = [f for f in ("instruction", "prompt_name", "input_type")
                 if getattr(request, f) is not None]
        if len(given) > 1:
            raise InvalidRequestError(
                f"send at most one of 'instruction', 'prompt_name' and 'input_type'; got {given}",
                param=given[1])
        if request.instruction is not None:
            return self._instruction_prompt(request.instruction)
        if request.prompt_name is not None:
            return self._named_prompt(request.prompt_name, "prompt_name")
        if request.input_type is not None:
            return self._input_type_prompt(request.input_type, "input_type")
        d, md = self.defaults, self.model_defaults
        if d.input_type is not None:
            return self._input_type_prompt(d.input_type, "input_type")
        name = _first(d.prompt_name, md.prompt_name)
        return None if name is None else self._named_prompt(name, "prompt_name")

    def _instruction_prompt(self, instruction: object) -> str:
        if not isinstance(instruction, str) or not instruction.strip():
            raise InvalidRequestError("'instruction' must be a non-empty string",
                                      param="instruction", code="invalid_value")
        _check_text(instruction, "instruction")
        if self.instruction_template is None:
            names = f"; use 'prompt_name' with one of {sorted(self.prompts)}" if self.prompts else ""
            raise InvalidRequestError(
                f"{self.model_name} has no known instruction template ({self.config.family} "
                f"models have none), so 'instruction' cannot be placed{names}", param="instruction",
                code="unsupported_value")
        return self.instruction_template[: -len("{text}")].replace("{instruction}", instruction)

    def _named_prompt(self, name: object, param: str) -> str | None:
        if not isinstance(name, str):
            raise InvalidRequestError(f"'{param}' must be a string; got {name!r}", param=param,
                                      code="invalid_type")
        if name == "":  # explicitly none, even where the model has a default prompt
            return None
        if name not in self.prompts:
            known = (f"one of {sorted(self.prompts)}" if self.prompts
                     else "none: this model declares no prompts")
            raise InvalidRequestError(f"'{param}' {name!r} is not one of this model's prompts; "
                                      f"they are {known}", param=param, code="invalid_value")
        return self.prompts[name] or None

    def _input_type_prompt(self, kind: object, param: str) -> str | None:
        """The model's prompt for that kind of input; none if the model has no such prompt
        (documents usually have none)."""
        kind = _enum(InputType, kind, param)
        name = next((n for n in INPUT_TYPE_PROMPTS[kind] if n in self.prompts), None)
        if name is None:
            return None
        return self.prompts[name] or None

    def prompt_length(self, prompt: str) -> int:
        """Tokens of the prompt at the start of a prompted input, as sentence-transformers counts
        them: the prompt tokenized alone, less a special token the tokenizer appends (EOS)."""
        n = self._prompt_lengths.get(prompt)
        if n is None:
            ids = self.tokenize([prompt])[0]
            n = len(ids) - (1 if ids and ids[-1] in self._special_ids else 0)
            self._prompt_lengths[prompt] = n
        return n

    def check_request(self, request: EmbeddingRequest) -> str:
        """Validate what can be checked before tokenizing; return the served model name."""
        return self.resolve(request).model

    def embed(self, request: EmbeddingRequest | str | list, **fields: Any) -> EmbeddingResponse:
        """Embed synchronously. Safe from any thread; concurrent calls are batched together."""
        request = _as_request(request, fields)
        options = self.resolve(request)
        prepared = self.prepare(request.input, options.truncate, options.prompt)
        vectors = self.submit(prepared.sequences, options.pooling, prepared.skip).result()
        return self._response(options, prepared, vectors)

    async def aembed(self, request: EmbeddingRequest | str | list, **fields: Any
                     ) -> EmbeddingResponse:
        """Embed from an event loop: tokenization runs in a worker thread, never on the loop.
        Cancelling the call drops its work if the engine has not computed it yet."""
        response, _ = await self.aembed_timed(request, **fields)
        return response

    async def aembed_timed(self, request: EmbeddingRequest | str | list, **fields: Any
                           ) -> tuple[EmbeddingResponse, RequestTiming]:
        """`aembed`, also returning how long the request waited in the queue and ran."""
        request = _as_request(request, fields)
        options = self.resolve(request)
        if self._closed:  # refuse before tokenizing: the work could not be queued anyway
            raise self._unavailable()
        prepared = await asyncio.to_thread(self.prepare, request.input, options.truncate,
                                           options.prompt)
        future = self.submit(prepared.sequences, options.pooling, prepared.skip)
        vectors = await asyncio.wrap_future(future)
        response = await asyncio.to_thread(self._response, options, prepared, vectors)
        return response, future.timing

    def encode(self, texts: str | Sequence[str], embedding_type: EmbeddingType | str | None = None,
               *, normalize: bool | None = None, truncate_prompt_tokens: int | None = None,
               dimensions: int | None = None, prompt_name: str | None = None,
               instruction: str | None = None, input_type: InputType | str | None = None
               ) -> np.ndarray:
        """Embeddings as a float32 array [len(texts), size] (for notebooks). Unset options take
        the server's defaults, then the model's, as requests do."""
        single = isinstance(texts, str)
        request = EmbeddingRequest(input=[texts] if single else list(texts),
                                   embedding_type=embedding_type,  # type: ignore[arg-type]
                                   normalize=normalize,
                                   truncate_prompt_tokens=truncate_prompt_tokens,
                                   dimensions=dimensions, prompt_name=prompt_name,
                                   instruction=instruction,
                                   input_type=input_type)  # type: ignore[arg-type]
        options = self.resolve(request)
        prepared = self.prepare(request.input, options.truncate, options.prompt)
        vectors = self.submit(prepared.sequences, options.pooling, prepared.skip).result()
        out = self._finish(options, vectors)
        return out[0] if single else out

    def tokenize(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids exactly as the embedding path feeds them (special tokens per the model)."""
        return [enc.ids for enc in
                self.tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def tokenize_request(self, request: TokenizeRequest) -> TokenizeResponse:
        """`/tokenize`: the ids the embedding path would feed for the prompt, untruncated: with
        the instruction or named prompt it would prepend (the request's, else the defaults)."""
        self.resolve_model(request.model)
        if not isinstance(request.prompt, str):
            raise InvalidRequestError(f"'prompt' must be a string; got {type(request.prompt).__name__}",
                                      param="prompt", code="invalid_type")
        _check_text(request.prompt, "prompt")
        prefix = self._resolve_prompt(request)
        text = request.prompt if prefix is None else prefix + request.prompt
        ids = self.tokenize([text], bool(request.add_special_tokens))[0]
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=self.max_model_len)

    def detokenize_request(self, request: DetokenizeRequest) -> DetokenizeResponse:
        """`/detokenize`: the text of token ids, special tokens included."""
        self.resolve_model(request.model)
        ids = request.tokens
        if not isinstance(ids, list | tuple) or not all(_is_int(t) for t in ids):
            raise InvalidRequestError("'tokens' must be a list of token ids (integers)",
                                      param="tokens", code="invalid_type")
        self._check_vocab(ids, "tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode([int(t) for t in ids],
                                                               skip_special_tokens=False))

    def prepare(self, raw: object, truncate: int | None = None, prompt: str | None = None
                ) -> PreparedInput:
        """Validate an `input` value and turn it into token-id sequences, each cut to its last
        `truncate` tokens when given (keeping the special tokens the tokenizer adds).

        A prompt is prepended to text inputs before tokenizing, as sentence-transformers does;
        token-id inputs are fed as they are. Where the model leaves prompts out of its pooling,
        the prompt's tokens still kept after truncation are marked to be skipped."""
        texts, seqs = split_input(raw)
        prompt_tokens = 0
        if texts is not None:
            for i, t in enumerate(texts):
                if not t:
                    raise InvalidRequestError(
                        f"input[{i}] is an empty string; send non-empty text", param="input",
                        code="empty_input")
                _check_text(t, f"input[{i}]")
            if prompt:
                texts = [prompt + t for t in texts]
                prompt_tokens = self.prompt_length(prompt)
            seqs = self.tokenize(texts)
        assert seqs is not None
        st = self.sentence_transformers
        exclude = bool(prompt_tokens) and st is not None and not st.include_prompt
        out, skip = [], []
        for i, ids in enumerate(seqs):
            if not ids:
                raise InvalidRequestError(f"input[{i}] has no tokens; send at least one",
                                          param="input", code="empty_input")
            self._check_vocab(ids, f"input[{i}]")
            left_out = prompt_tokens
            if truncate is not None and len(ids) > truncate:
                head = self._kept_prefix(ids)
                removed = len(ids) - truncate
                ids = self._truncate(ids, truncate)
                # The cut takes the tokens right after the kept special prefix: the prompt's.
                left_out = head + max(0, prompt_tokens - head - removed) if prompt_tokens else 0
            skip.append(left_out)
            if len(ids) > self.max_model_len:
                raise InvalidRequestError(
                    f"input[{i}] has {len(ids)} tokens, more than this model's limit of "
                    f"{self.max_model_len}; shorten it, split it, or send "
                    "'truncate_prompt_tokens' to keep its end", param="input",
                    code="context_length_exceeded")
            out.append(np.asarray(ids, dtype=np.int32))
        prepared = PreparedInput(out, skip if exclude else None)
        if self.max_request_tokens is not None and prepared.prompt_tokens > self.max_request_tokens:
            raise InvalidRequestError(
                f"the input has {prepared.prompt_tokens} tokens in all, more than this server's "
                f"limit of {self.max_request_tokens} per request; split it into several requests",
                param="input", code="request_too_large")
        return prepared

    def submit(self, sequences: list[np.ndarray], pooling: EmbeddingType = EmbeddingType.Mean,
               skip: Sequence[int] | None = None) -> EmbeddingFuture:
        """Queue validated sequences; the future gives float32 [len(sequences), hidden]: the
        pooled hidden states, before the model's Dense modules and normalization.

        `skip`: per sequence, how many leading tokens (a prompt) attend but are left out of its
        pooling. Raises EngineOverloadedError when `max_queued_requests` are already waiting or
        running, and EngineUnavailableError once shutdown has begun."""
        fut = EmbeddingFuture()
        if skip is not None and len(skip) != len(sequences):
            raise ValueError("skip needs one count per sequence")
        work = _Work(list(sequences), EmbeddingType(pooling), fut,
                     np.empty((len(sequences), self.hidden_size), np.float32), len(sequences),
                     None if skip is None or not any(skip) else [int(n) for n in skip])
        self._enqueue(work)
        fut.add_done_callback(self._release)  # runs at once if the work is already done
        return fut

    def warmup(self, shapes: Sequence[tuple[int, int]] | None = None) -> None:
        """Compile step shapes ahead of traffic (default: single rows up to 128 tokens)."""
        if shapes is None:
            shapes = [(1, t) for t in self.buckets.lengths if t <= 128]
        for rows, length in shapes:
            step = Step.empty(rows, length, self.buckets.seq_slots(rows, length))
            if self._channel is not None:  # a multi-host leader: the followers compile as they run
                jax.block_until_ready(self._run(step))
                continue
            # Compiled ahead of time, not run: the compiled step lands in the same caches a call
            # reads, and running it would cost a forward pass per shape (about 0.2 s each for
            # SmolLM2 on a CPU) before the server may answer.
            a = self._put(self._step_arrays(step))
            self._pooled.lower(self._embed_params, *(a[k] for k in STEP_INPUTS)).compile()

    def pause(self) -> None:
        """Hold the engine before its next step; a step already running finishes first. Work can
        still be submitted and queues up (to the bound). A hook for tests and maintenance: it lets
        overload and draining be driven deterministically rather than by timing."""
        self._running.clear()
        with self._step_lock:  # returns once no step is running
            pass

    def resume(self) -> None:
        self._running.set()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def stats_snapshot(self) -> EngineStats:
        """A consistent copy of the statistics (the engine thread updates them under a lock)."""
        with self._stats_lock:
            return copy.deepcopy(self.stats)

    def shutdown(self, timeout: float | None = None) -> None:
        """Refuse new work, finish the queued work, then stop the engine thread. Ends a pause,
        since queued work could not finish otherwise."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self.resume()
        self._thread.join(timeout)

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- generation ----------------------------------------------------------------------

    def _init_generation(self, max_num_seqs: int) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1; got {max_num_seqs}")
        self.max_num_seqs = int(max_num_seqs)
        # Decode shapes: rows in powers of two, and cache lengths from 128 (below that the
        # attention is a sliver of a step that reads every weight), so that a server sees few
        # of them: each compiles in seconds on a CPU.
        self._row_counts = tuple(sorted({*(1 << i for i in range(self.max_num_seqs.bit_length())
                                            if 1 << i <= self.max_num_seqs), self.max_num_seqs}))
        # With the kernels, decode steps multiply in `kernels.matmul` whatever the weights' type
        # (float32 or bfloat16): XLA's CPU dot reads a one-row step's weights at about two
        # thirds of the kernel's rate, and a single bf16 row far slower still (SmolLM2's 30
        # layers of bf16 products: 5.5 ms for one row against XLA's 120).
        self._decode_packed = self._kernels
        # Else narrowed decode weights take two rows at least: XLA's CPU product of a single
        # bf16 row takes a slow path (SmolLM2: 150 ms a step, against 23 ms for two rows).
        least = 2 if self._decode_dtype is not None and not self._decode_packed else 1
        self.decode_rows = tuple(sorted({max(r, least) for r in self._row_counts}))
        self.decode_lengths = tuple(n for n in self.buckets.lengths
                                    if n >= min(128, self.max_model_len))
        bundle = self.checkpoint.tokenizer
        ids = {*bundle.stop_token_ids, bundle.eos_token_id, self.config.eos_token_id}
        self.stop_token_ids = frozenset(i for i in ids if i is not None)
        self.eos_token_ids = frozenset(
            i for i in (bundle.eos_token_id, self.config.eos_token_id) if i is not None)
        self.chat_template: ChatTemplate | None = None
        if bundle.chat_template:
            def text(i: int | None) -> str:
                return "" if i is None else self.tokenizer.id_to_token(i) or ""
            self.chat_template = ChatTemplate(bundle.chat_template, text(bundle.bos_token_id),
                                              text(bundle.eos_token_id))
        # The cache is allocated on the first generation request: an engine that only embeds
        # never holds one.
        self._gen_state: dict[str, Any] | None = None
        self._decode_layers: list[tuple[Any, Any]] | None = None
        self._decode_params: Any = None  # the stacked weights decode steps read
        # The output head decode steps multiply by, narrowed or packed for kernels.matmul (None:
        # the params' own).
        self._decode_head: jax.Array | None = None
        self._free_slots = list(range(self.max_num_seqs))
        self._active: dict[int, _Seq] = {}
        # A decode step dispatched before the last one's tokens were read: (its sequences, in
        # row order; its outputs). See `_may_run_ahead`.
        self._ahead: tuple[list[_Seq], Any] | None = None
        self._run_ahead = True
        self._ahead_steps = 0  # how many steps were dispatched ahead (for tests)
        self._gen_waiting: collections.deque[_Seq] = collections.deque()
        cfg = self.config

        def count_compile() -> None:
            with self._stats_lock:
                self.stats.compilations += 1

        def prefill(params: Any, state: dict[str, Any], tokens: jax.Array, positions: jax.Array,
                    segment_ids: jax.Array, slots: jax.Array, last_col: jax.Array,
                    rows: dict[str, jax.Array]) -> tuple[Any, ...]:
            count_compile()
            kv, hidden = model.prefill(params, state["kv"], tokens, positions, segment_ids, slots,
                                       last_col, cfg, self._cpu_attention)
            scratch = state["counts"].shape[0] - 1
            counts = state["counts"].at[slots].set(0)
            seen = state["seen"].at[slots].set(False)
            seen = seen.at[jnp.where(segment_ids > 0, slots[:, None], scratch), tokens].set(True)
            out = sampling.sample(model.logits(params, hidden, cfg), counts[slots], seen[slots],
                                  rows)
            return {"kv": self._constrain_kv(kv), **self._replicate(
                {"counts": counts, "seen": seen})}, *self._replicate(out)

        def decode(params: Any, layers: Any, head: Any, state: dict[str, Any],
                   tokens: jax.Array, positions: jax.Array, slots: jax.Array,
                   rows: dict[str, jax.Array], kv_len: int) -> tuple[Any, ...]:
            count_compile()
            kv, hidden = model.decode(params, state["kv"], tokens, positions, slots, kv_len, cfg,
                                      layers, self._cpu_attention)
            # The fed token is the one drawn last step: it now counts for the penalties. The
            # scratch row comes along unchanged: a scatter of one row would become a dynamic
            # update, for which XLA copies both whole [S + 1, V] arrays (1.3 ms of a 21 ms step).
            scratch = state["counts"].shape[0] - 1
            at = (jnp.append(slots, scratch), jnp.append(tokens, 0))
            real = jnp.arange(len(slots) + 1) < len(slots)
            counts = state["counts"].at[at].add(real.astype(jnp.int32))
            seen = state["seen"].at[at].max(real)
            out = sampling.sample(model.logits(params, hidden, cfg, head), counts[slots],
                                  seen[slots], rows)
            return {"kv": self._constrain_kv(kv), **self._replicate(
                {"counts": counts, "seen": seen})}, *self._replicate(out)

        # The state is donated: XLA updates the cache in place instead of copying it each step.
        self._prefill = jax.jit(prefill, donate_argnums=(1,))
        self._decode = jax.jit(decode, donate_argnums=(3,), static_argnames=("kv_len",))

    def _ensure_gen_state(self) -> dict[str, Any]:
        # Decoding reads every weight once per step: on a CPU it runs over per-layer copies,
        # which XLA reads in place (see `model.split_layers`). On a mesh of several devices it
        # scans the stacked, sharded weights instead: the copies would need their own layouts,
        # and the trick is about one CPU's memory traffic, not about a mesh.
        if self._decode_params is None:
            split = self._one_cpu
            narrow = self._decode_dtype
            pack = self._decode_packed
            if split:
                self._decode_layers = model.split_layers(self.params, self.config, narrow, pack)
            self._decode_params = self.params if split or narrow is None else \
                model.with_projection_dtype(self.params, narrow)
            head = model.output_head(self.params, self.config)
            kind = narrow or head.dtype
            if pack and kernels.packable(head, kind):  # packed once here, not in every step
                self._decode_head = kernels.pack(head, kind)
            elif narrow is not None:  # transposed once here
                self._decode_head = jnp.asarray(head.astype(narrow))
        if self._gen_state is None:
            cfg, s = self.config, self.max_num_seqs
            # Narrowed decoding keeps the cache in bfloat16 too (as its bits: see
            # model.BF16_BITS): half the bytes each step gathers (SmolLM2, 16 rows: 8% a step).
            dtype = self.params["embed"].dtype if self._decode_dtype is None else model.BF16_BITS
            per_layer = self._decode_layers is not None

            def zeros() -> dict[str, Any]:
                kv = model.init_cache(cfg, s, self.max_model_len, dtype, per_layer=per_layer)
                return {"kv": self._constrain_kv(kv), **self._replicate({
                    "counts": jnp.zeros((s + 1, cfg.vocab_size), jnp.int32),
                    "seen": jnp.zeros((s + 1, cfg.vocab_size), bool)})}

            # On a mesh the zeros are made in place, each device only its share of the cache.
            self._gen_state = zeros() if self.sharding is None else jax.jit(zeros)()
        return self._gen_state

    @property
    def running_sequences(self) -> int:
        """Sequences holding KV cache slots right now."""
        return len(self._active)

    def sampling_params(self, params: SamplingParams | None = None, **fields: Any
                        ) -> SamplingParams:
        """Validated sampling settings: `params` with `fields` replacing some of them."""
        p = dataclasses.replace(params or SamplingParams(), **fields)
        checks = [
            ("max_tokens", _is_int(p.max_tokens) and p.max_tokens >= 1,
             "an integer of at least 1"),
            ("temperature", _is_number(p.temperature) and 0 <= p.temperature <= 100,
             "a number between 0 and 100 (0 is greedy)"),
            ("top_p", _is_number(p.top_p) and 0 < p.top_p <= 1, "a number in (0, 1]"),
            ("top_k", _is_int(p.top_k) and p.top_k >= -1, "-1 or 0 (off), or a positive integer"),
            ("min_p", _is_number(p.min_p) and 0 <= p.min_p <= 1, "a number in [0, 1]"),
            ("presence_penalty", _is_number(p.presence_penalty)
             and -2 <= p.presence_penalty <= 2, "a number between -2 and 2"),
            ("frequency_penalty", _is_number(p.frequency_penalty)
             and -2 <= p.frequency_penalty <= 2, "a number between -2 and 2"),
            ("repetition_penalty", _is_number(p.repetition_penalty)
             and 0 < p.repetition_penalty <= 100, "a number above 0 (1 is off)"),
            ("n", _is_int(p.n) and 1 <= p.n <= self.max_num_seqs,
             f"an integer between 1 and {self.max_num_seqs} (this server's slots)"),
            ("seed", p.seed is None or _is_int(p.seed), "an integer"),
            ("logprobs", p.logprobs is None or (_is_int(p.logprobs)
                                                and 0 <= p.logprobs <= sampling.TOP_LOGPROBS),
             f"an integer between 0 and {sampling.TOP_LOGPROBS}"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise InvalidRequestError(f"'{name}' must be {want}; got {getattr(p, name)!r}",
                                          param=name)
        if len(p.stop) > 16 or not all(isinstance(x, str) and x for x in p.stop):
            raise InvalidRequestError("'stop' must be a non-empty string or a list of at most 16 "
                                      "of them", param="stop")
        self._check_vocab(list(p.stop_token_ids), "stop_token_ids")
        return dataclasses.replace(p, top_k=max(p.top_k, 0), stop=tuple(p.stop),
                                   stop_token_ids=tuple(int(i) for i in p.stop_token_ids))

    def prepare_prompt(self, prompt: str | Sequence[int], add_special_tokens: bool = True,
                       param: str = "prompt") -> np.ndarray:
        """Token ids of a prompt: a text (tokenized with the model's special tokens unless told
        otherwise) or token ids as they are."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError(f"'{param}' is empty; send some text", param=param,
                                          code="empty_input")
            _check_text(prompt, param)
            ids = self.tokenize([prompt], add_special_tokens)[0]
        elif isinstance(prompt, list | tuple | np.ndarray) and all(_is_int(t) for t in prompt):
            ids = [int(t) for t in prompt]
            self._check_vocab(ids, param)
        else:
            raise InvalidRequestError(f"'{param}' must be a string or a list of token ids",
                                      param=param, code="invalid_type")
        if not ids:
            raise InvalidRequestError(f"'{param}' has no tokens; send at least one", param=param,
                                      code="empty_input")
        return np.asarray(ids, np.int32)

    def render_chat(self, messages: object, add_generation_prompt: bool = True,
                    **template_kwargs: Any) -> str:
        """The prompt text of a conversation, by the model's own chat template."""
        if self.chat_template is None:
            raise InvalidRequestError(
                f"{self.model_name} has no chat template (its files carry none), so it cannot "
                "serve chat; send the text to /v1/completions instead", param="messages",
                code="no_chat_template")
        return self.chat_template.render(normalize_messages(messages), add_generation_prompt,
                                         **template_kwargs)

    def chat_prompt(self, messages: object, **template_kwargs: Any) -> np.ndarray:
        """Token ids of a conversation. The template writes the special tokens itself (BOS
        included), so they are not added again."""
        return self.prepare_prompt(self.render_chat(messages, **template_kwargs),
                                   add_special_tokens=False, param="messages")

    def submit_generation(self, prompt: np.ndarray, params: SamplingParams,
                          loop: asyncio.AbstractEventLoop | None = None) -> GenerationStream:
        """Queue a validated prompt; the stream yields its deltas (from a thread, or on `loop`).
        Raises like `submit` when the queue is full or the engine is shutting down."""
        n = len(prompt)
        if n + params.max_tokens > self.max_model_len:
            room = self.max_model_len - n
            raise InvalidRequestError(
                f"the prompt has {n} tokens and 'max_tokens' is {params.max_tokens}: together "
                f"more than this model's context of {self.max_model_len} tokens; "
                + (f"ask for at most {room} tokens" if room > 0 else "shorten the prompt"),
                param="max_tokens" if room > 0 else "prompt", code="context_length_exceeded")
        stream = GenerationStream(params.n, n, loop)
        base = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
        # Each choice has its own stream of random numbers, fixed by the seed and its index.
        seeds = [(int(base) + 0x9E3779B9 * i) & 0xFFFFFFFF for i in range(params.n)]
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.stop_token_ids
        work = _GenWork(prompt, params, stream, seeds, frozenset(stop_ids), params.n)
        self._enqueue(work)
        return stream

    def generate_stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                        **fields: Any) -> GenerationStream:
        """Start generating; iterate the stream for deltas as they come (from any thread)."""
        p = self.sampling_params(params, **fields)
        return self.submit_generation(self.prepare_prompt(prompt), p)

    def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                 **fields: Any) -> GenerationResult:
        """Generate to the end. Safe from any thread; concurrent calls share decode steps."""
        stream = self.generate_stream(prompt, params, **fields)
        return stream.collect(list(stream))

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams | None = None,
             **fields: Any) -> GenerationResult:
        """Continue a conversation (rendered by the model's chat template)."""
        p = self.sampling_params(params, **fields)
        stream = self.submit_generation(self.chat_prompt(messages), p)
        return stream.collect(list(stream))

    async def agenerate_stream(self, prompt: str | Sequence[int] | np.ndarray,
                               params: SamplingParams | None = None, **fields: Any
                               ) -> GenerationStream:
        """`generate_stream` for an event loop: async-iterate the result. Leaving the iteration
        early (or cancelling it) stops the generation and frees its slots."""
        p = self.sampling_params(params, **fields)
        if self._closed:
            raise self._unavailable()
        ids = prompt if isinstance(prompt, np.ndarray) else await asyncio.to_thread(
            self.prepare_prompt, prompt)
        return self.submit_generation(ids, p, asyncio.get_running_loop())

    async def agenerate(self, prompt: str | Sequence[int] | np.ndarray,
                        params: SamplingParams | None = None, **fields: Any) -> GenerationResult:
        stream = await self.agenerate_stream(prompt, params, **fields)
        return stream.collect([d async for d in stream])

    def prefill_rows(self, prompts: int, length: int) -> int:
        """Rows of a prefill step for that many prompts: powers of two, as decode steps, so a
        burst of requests admitted in groups of any size meets shapes that warm-up compiled."""
        cap = self.buckets.max_rows(length)
        return min(next((b for b in self._row_counts if b >= prompts), cap), cap)

    def warmup_generation(self) -> None:
        """Compile every decode shape (slots x KV length) and the prefills of prompts up to 128
        tokens in any group size, so that steady generation never waits for the compiler."""
        for rows in self.decode_rows:
            for kv_len in self.decode_lengths:
                z = np.zeros(rows, np.int32)
                slots = np.full(rows, self.max_num_seqs, np.int32)
                self._device_step(DECODE, {"tokens": z, "positions": z, "slots": slots,
                                           "rows": sampling.row_arrays([None] * rows)},
                                  kv_len=kv_len)
        for length in self.buckets.lengths:
            if length > 128:
                break
            for rows in sorted({self.prefill_rows(n, length) for n in self._row_counts}):
                z = np.zeros((rows, length), np.int32)
                self._device_step(PREFILL, {"tokens": z, "positions": z, "segment_ids": z,
                                            "slots": np.full(rows, self.max_num_seqs, np.int32),
                                            "last_col": np.zeros(rows, np.int32),
                                            "rows": sampling.row_arrays([None] * rows)})
        self._gen_state = jax.block_until_ready(self._gen_state)

    # ---- generation on the engine thread ---------------------------------------------------

    def _take_generation(self, work: _GenWork) -> None:
        skip = work.params.skip_special_tokens
        for i, seed in enumerate(work.seeds):
            self._gen_waiting.append(_Seq(
                work, i, seed, IncrementalDetokenizer(self.tokenizer, work.prompt, skip),
                StopStrings(work.params.stop)))

    def _drop_cancelled_generation(self) -> None:
        kept: collections.deque[_Seq] = collections.deque()
        for seq in self._gen_waiting:
            if seq.work.stream.cancelled:
                self._end_seq(seq, cancelled=True)
            else:
                kept.append(seq)
        self._gen_waiting = kept
        for seq in list(self._active.values()):
            if seq.work.stream.cancelled:
                self._end_seq(seq, cancelled=True)

    def _end_seq(self, seq: _Seq, cancelled: bool = False) -> None:
        """A choice is done: free its slot; the request is done with its last choice."""
        if seq.slot >= 0:
            self._active.pop(seq.slot, None)
            self._free_slots.append(seq.slot)
            seq.slot = -1
        work = seq.work
        work.open -= 1
        if work.open == 0:
            with self._stats_lock:
                if cancelled:
                    self.stats.cancelled += 1
                else:
                    self.stats.generation_requests += 1
            self._release(None)  # type: ignore[arg-type]

    def _fail_seqs(self, seqs: Sequence[_Seq], error: Exception) -> None:
        for seq in seqs:
            if seq.work.open > 0 and not seq.work.stream.cancelled:
                seq.work.stream.fail(error)
                seq.work.stream.cancel()
            self._end_seq(seq, cancelled=True)

    def _prefill_step(self) -> None:
        """Admit waiting prompts into free slots: one prefill step, one prompt per row."""
        batch: list[_Seq] = []
        longest = 0
        for seq in self._gen_waiting:
            n = max(longest, len(seq.work.prompt))
            length = self.buckets.length_for(n)
            if len(batch) == len(self._free_slots) or len(batch) + 1 > self.buckets.max_rows(
                    length):
                break
            batch.append(seq)
            longest = n
        for _ in batch:
            self._gen_waiting.popleft()
        length = self.buckets.length_for(longest)
        rows = self.prefill_rows(len(batch), length)
        tokens = np.zeros((rows, length), np.int32)
        positions = np.zeros((rows, length), np.int32)
        segments = np.zeros((rows, length), np.int32)
        slots = np.full(rows, self.max_num_seqs, np.int32)
        last_col = np.zeros(rows, np.int32)
        for r, seq in enumerate(batch):
            n = len(seq.work.prompt)
            tokens[r, :n] = seq.work.prompt
            positions[r, :n] = np.arange(n)
            segments[r, :n] = 1
            seq.slot = self._free_slots.pop(0)
            self._active[seq.slot] = seq
            seq.pos = n
            slots[r] = seq.slot
            last_col[r] = n - 1
        rows_params = sampling.row_arrays(
            [(s.work.params, s.seed, 0) for s in batch] + [None] * (rows - len(batch)))
        start = time.perf_counter()
        try:
            out = self._device_step(PREFILL, {
                "tokens": tokens, "positions": positions, "segment_ids": segments,
                "slots": slots, "last_col": last_col, "rows": rows_params})
            self._emit_tokens(batch, out)
        except Exception as e:  # a failed step fails its requests, never the engine
            log.exception("prefill step %s failed", tokens.shape)
            self._recover_state()
            self._fail_seqs(batch, e)
            return
        with self._stats_lock:
            self.stats.prefill_steps += 1
            self.stats.busy_seconds += time.perf_counter() - start

    def _decode_step(self) -> None:
        """A token for every running sequence. The step's tokens are read back (and detokenized,
        checked against stops, streamed) while the next step already runs: see `_may_run_ahead`."""
        seqs = [self._active[s] for s in sorted(self._active)]
        ahead, self._ahead = self._ahead, None
        rows = seqs
        start = time.perf_counter()
        try:
            # A step dispatched last time, for the sequences running then (unless all of them
            # have ended since).
            if ahead is not None and any(self._active.get(s.slot) is s for s in ahead[0]):
                rows, out = ahead
            else:
                out = self._dispatch_decode(seqs)
            # The sequences each row is still for: one that stopped or was cancelled since this
            # step was dispatched gets nothing from it; one admitted since gets its token next.
            live = [s if self._active.get(s.slot) is s else None for s in rows]
            same = len(rows) == len(seqs) and all(map(operator.is_, rows, seqs))
            if same and self._may_run_ahead(seqs):
                self._ahead = (seqs, self._dispatch_decode(seqs, fed=out[0]))
                self._ahead_steps += 1
            for seq in live:
                if seq is not None:
                    seq.pos += 1
            self._emit_tokens(live, out)
        except Exception as e:
            log.exception("decode step of %d sequences failed", len(rows))
            self._ahead = None
            self._recover_state()
            self._fail_seqs([s for s in rows if self._active.get(s.slot) is s], e)
            return
        with self._stats_lock:
            self.stats.decode_steps += 1
            self.stats.busy_seconds += time.perf_counter() - start

    def _may_run_ahead(self, seqs: Sequence[_Seq]) -> bool:
        """Whether to dispatch the step after this one before this one's tokens are read.

        Its input tokens are this step's output, on the device: the host's work on a step
        (reading the tokens back, detokenizing, stop checks, streaming, preparing the next
        inputs) overlaps the device's next step instead of adding to it. Whatever the host then
        finds, the step is right for every sequence that goes on: one that stops meanwhile gets
        nothing from it (its slot's cache and counts are reset when the slot is reused), and
        its draw for a sequence that goes on is the one a step dispatched later would make.
        Not when a sequence ends on this step by length (the next step would be wasted, and
        could run past the cache), nor on a multi-host leader, whose followers get host
        arrays."""
        return self._run_ahead and self._channel is None and all(
            len(s.out) + 1 < s.work.params.max_tokens and s.pos + 1 < self.max_model_len
            for s in seqs)

    def _dispatch_decode(self, seqs: Sequence[_Seq], fed: jax.Array | None = None) -> Any:
        """Dispatch a decode step for seqs (their rows in this order); fed: the tokens to feed,
        the output of the step before it that has not been read yet (each sequence then one
        position further on)."""
        ahead = int(fed is not None)
        rows = next(b for b in self.decode_rows if b >= len(seqs))
        tokens = np.zeros(rows, np.int32)
        positions = np.zeros(rows, np.int32)
        slots = np.full(rows, self.max_num_seqs, np.int32)
        for r, seq in enumerate(seqs):
            tokens[r], positions[r], slots[r] = seq.last, seq.pos + ahead, seq.slot
        kv_len = next(n for n in self.decode_lengths if n > int(positions.max()))
        rows_params = sampling.row_arrays(
            [(s.work.params, s.seed, len(s.out) + ahead) for s in seqs]
            + [None] * (rows - len(seqs)))
        return self._device_step(DECODE, {"tokens": tokens if fed is None else fed,
                                          "positions": positions, "slots": slots,
                                          "rows": rows_params}, kv_len=kv_len)

    def _recover_state(self) -> None:
        """After a failed step the donated cache may be gone: start a fresh one (the sequences
        that used it are failed with the step)."""
        state = self._gen_state
        if state is None or any(x.is_deleted() for x in jax.tree.leaves(state)):
            self._ahead = None  # its sequences are failed below
            for seq in list(self._active.values()):
                seq.work.stream.fail(EngineUnavailableError(
                    "the engine lost this request's cache after a failed step; retry it"))
                seq.work.stream.cancel()
            self._gen_state = None

    def _emit_tokens(self, seqs: Sequence[_Seq | None], out: Sequence[jax.Array]) -> None:
        """Stream each row's token to its sequence (None: a row whose sequence ended)."""
        tokens, chosen, top_ids, top_lp = (np.asarray(x) for x in out)
        generated = 0
        for r, seq in enumerate(seqs):
            if seq is None:
                continue
            token = int(tokens[r])
            seq.out.append(token)
            seq.last = token
            generated += 1
            p = seq.work.params
            logprobs: tuple[TokenLogprob, ...] = ()
            if p.logprobs is not None:
                top = tuple((int(i), float(v)) for i, v in
                            zip(top_ids[r, : p.logprobs], top_lp[r, : p.logprobs], strict=True))
                logprobs = (TokenLogprob(token, float(chosen[r]), top),)
            finish, hit, text = None, False, ""
            if token in seq.work.stop_ids:
                finish = FinishReason.STOP
            else:
                text, hit = seq.stops.add(seq.detok.add(token))
                if hit:
                    finish = FinishReason.STOP
            if finish is None and (len(seq.out) >= p.max_tokens or seq.pos >= self.max_model_len):
                finish = FinishReason.LENGTH
            if finish is not None and not hit:  # release what was held back
                tail, hit = seq.stops.add(seq.detok.flush())
                text += tail
                if hit:
                    finish = FinishReason.STOP
                else:
                    text += seq.stops.flush()
            seq.work.stream.push(Delta(seq.index, text, (token,), logprobs, finish))
            if finish is not None:
                self._end_seq(seq)
        with self._stats_lock:
            self.stats.generated_tokens += generated

    # ---- helpers for callers' threads -----------------------------------------------------

    def _unavailable(self) -> EngineUnavailableError:
        return EngineUnavailableError("the engine is shut down or shutting down; retry on "
                                      "another replica or after the restart", code="draining")

    def _enqueue(self, work: _Work | _GenWork) -> None:
        """Admit work to the queue, or refuse it: shut down (503), or the queue full (429)."""
        with self._lock:
            if self._closed:
                raise self._unavailable()
            if self._outstanding >= self.max_queued_requests:
                with self._stats_lock:
                    self.stats.rejected += 1
                raise EngineOverloadedError(
                    f"the server is busy: {self._outstanding} requests are already queued, its "
                    "limit; retry after a short wait")
            self._outstanding += 1
            self._queue.put(work)

    def _release(self, _: concurrent.futures.Future) -> None:
        with self._lock:
            self._outstanding -= 1

    def _check_vocab(self, ids: Sequence[int], where: str) -> None:
        vocab = self.config.vocab_size
        try:
            arr = np.asarray(ids, dtype=np.int64)
            bad = np.flatnonzero((arr < 0) | (arr >= vocab))
        except OverflowError:  # ids beyond int64 cannot even be compared in numpy
            bad = np.asarray([j for j, t in enumerate(ids) if not 0 <= t < vocab])
        if bad.size:
            j = int(bad[0])
            param = where.split("[", 1)[0]
            raise InvalidRequestError(
                f"{where}[{j}] is token id {ids[j]}, outside this model's vocabulary "
                f"[0, {vocab - 1}]", param=param, code="invalid_token_id")

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer puts before and after any text (e.g. BOS), found by comparing a
        probe encoded with and without special tokens; truncation keeps them in place."""
        with_special = self.tokenize(["a"])[0]
        plain = self.tokenize(["a"], add_special_tokens=False)[0]
        n = len(plain)
        for i in range(len(with_special) - n + 1):
            if with_special[i : i + n] == plain:
                return with_special[:i], with_special[i + n :]
        return [], []

    def _kept_prefix(self, ids: list[int]) -> int:
        """How many leading special tokens (BOS) truncation keeps in place."""
        prefix = self._special_prefix
        return len(prefix) if prefix and ids[: len(prefix)] == prefix else 0

    def _truncate(self, ids: list[int], keep: int) -> list[int]:
        prefix, suffix = self._special_prefix, self._special_suffix
        head = len(prefix) if prefix and ids[: len(prefix)] == prefix else 0
        tail = len(suffix) if suffix and ids[len(ids) - len(suffix) :] == suffix else 0
        body = keep - head - tail
        if body < 1:
            raise InvalidRequestError(
                f"'truncate_prompt_tokens' {keep} leaves no room for text beside the {head + tail} "
                f"special tokens this model adds; use at least {head + tail + 1}",
                param="truncate_prompt_tokens")
        end = len(ids) - tail
        return ids[:head] + ids[end - body : end] + ids[end:]

    # ---- device steps ----------------------------------------------------------------------

    def _replicate(self, tree: Any) -> Any:
        """Inside a jitted step: outputs the host reads (and the cache's companions) whole on
        every device, whatever layout the partitioner would have left them in."""
        if self.sharding is None:
            return tree
        return jax.lax.with_sharding_constraint(tree, replicated(self.sharding))

    def _constrain_kv(self, kv: dict[str, Any]) -> dict[str, Any]:
        """Inside a jitted step: the updated cache keeps the layout it came in with (sharded by
        kv heads), so the donated buffers are reused in place step after step."""
        if self.sharding is None:
            return kv
        return {n: jax.lax.with_sharding_constraint(
            c, [cache_sharding(self.sharding, n, True)] * len(c) if isinstance(c, list)
            else cache_sharding(self.sharding, n)) for n, c in kv.items()}

    def _put(self, arrays: dict[str, Any]) -> dict[str, Any]:
        """A step's host inputs, on the mesh (replicated) when there is one; otherwise as they
        are (jit moves them to the default device)."""
        if self.sharding is None:
            return arrays
        return jax.device_put(arrays, replicated(self.sharding))

    def _device_step(self, kind: str, arrays: dict[str, Any], **static: int) -> Any:
        """Run one step on the devices: EMBED (a packed prefill, pooled), PREFILL (prompts into
        cache slots, a token sampled each) or DECODE (a token for each running sequence).

        Every device computation goes through here as plain data (a kind, named host arrays,
        static ints). On a multi-host leader each step is first sent to the followers, which
        run the same one (`follow`): one SPMD program, called by every process in one order."""
        with self._device_lock:
            if self._channel is not None and self._channel.leader:
                self._channel.send(kind, multihost.flatten(arrays), static)
            return self._apply_step(kind, arrays, static)

    def _apply_step(self, kind: str, arrays: dict[str, Any], static: dict[str, int]) -> Any:
        a = self._put(arrays)
        if kind == EMBED:
            return self._pooled(self._embed_params, *(a[k] for k in STEP_INPUTS))
        if kind == PREFILL:
            state, *out = self._prefill(self.params, self._ensure_gen_state(), a["tokens"],
                                        a["positions"], a["segment_ids"], a["slots"],
                                        a["last_col"], a["rows"])
        elif kind == DECODE:
            gen_state = self._ensure_gen_state()  # first: it also makes the per-layer weights
            state, *out = self._decode(self._decode_params, self._decode_layers,
                                       self._decode_head, gen_state,
                                       a["tokens"], a["positions"], a["slots"], a["rows"],
                                       kv_len=static["kv_len"])
        else:
            raise ValueError(f"unknown step kind {kind!r}")
        self._gen_state = state
        return out

    def follow(self) -> None:
        """On a multi-host follower (a process other than 0): run every step the leader sends,
        in its order, until the leader stops. Outputs stay on the devices: only the leader
        answers requests."""
        assert self._channel is not None and not self._channel.leader
        while True:
            kind, arrays, static = self._channel.receive()
            if kind == multihost.STOP:
                return
            if kind == multihost.IDLE:
                continue
            try:
                jax.block_until_ready(self._apply_step(kind, multihost.unflatten(arrays), static))
            except Exception:  # the leader's step failed alike; it fails its requests and goes on
                log.exception("%s step failed", kind)
                self._recover_state()

    def _wait_for_work(self) -> _Work | _GenWork | None:
        """The next queued item, blocking. A multi-host leader wakes up now and then meanwhile
        to tell its followers it is idle (their wait is a collective, which must not last for
        hours)."""
        if self._channel is None or not self._channel.leader:
            return self._queue.get()
        while True:
            try:
                return self._queue.get(timeout=IDLE_PING_SECONDS)
            except queue.Empty:
                with self._device_lock:
                    self._channel.send(multihost.IDLE)

    # ---- the engine thread ---------------------------------------------------------------

    def _run(self, step: Step) -> tuple[jax.Array, jax.Array, jax.Array]:
        return self._device_step(EMBED, self._step_arrays(step))

    @staticmethod
    def _step_arrays(step: Step) -> dict[str, np.ndarray]:
        return {k: getattr(step, k) for k in STEP_INPUTS}

    def _loop(self) -> None:
        try:
            self._steps()
        finally:
            if self._channel is not None and self._channel.leader:
                with self._device_lock:
                    self._channel.send(multihost.STOP)

    def _steps(self) -> None:
        pending: dict[int, tuple[_Work, int]] = {}
        waiting: list[tuple[int, np.ndarray]] = []
        ids = iter(range(1 << 62))
        stopping = False

        def take(item: _Work | _GenWork | None) -> None:
            nonlocal stopping
            if item is None:
                stopping = True
                return
            if isinstance(item, _GenWork):
                self._take_generation(item)
                return
            if item.remaining == 0 and not item.future.done():
                item.future.set_result(item.out)
            for i, seq in enumerate(item.sequences):
                sid = next(ids)
                pending[sid] = (item, i)
                waiting.append((sid, seq))

        while True:
            if not (waiting or self._gen_waiting or self._active) and not stopping:
                take(self._wait_for_work())  # idle: block until work (or shutdown) arrives
            self._running.wait()
            with self._step_lock:
                if not self._running.is_set():  # paused between the wait and the lock
                    continue
                while True:
                    try:
                        take(self._queue.get_nowait())
                    except queue.Empty:
                        break
                waiting = self._drop_cancelled(waiting, pending)
                self._drop_cancelled_generation()
                if not (waiting or self._gen_waiting or self._active):
                    if stopping:
                        return
                    continue
                # One step of each kind that has work, so neither starves the other: new
                # prompts join free slots, an embedding batch runs, then every active
                # sequence gains a token.
                if self._gen_waiting and self._free_slots:
                    self._prefill_step()
                if waiting:
                    skips = {}
                    for sid, _ in waiting:
                        work, i = pending[sid]
                        if work.skip is not None and work.skip[i]:
                            skips[sid] = work.skip[i]
                    step, left = plan_step(waiting, self.buckets, skips)
                    left_ids = set(left)
                    waiting = [w for w in waiting if w[0] in left_ids]
                    self._execute(step, pending)
                if self._active:
                    self._decode_step()

    def _drop_cancelled(self, waiting: list[tuple[int, np.ndarray]],
                        pending: dict[int, tuple[_Work, int]]) -> list[tuple[int, np.ndarray]]:
        """Forget the sequences of requests whose future was cancelled: nobody awaits them."""
        dropped: set[int] = set()
        kept = []
        for sid, seq in waiting:
            work = pending[sid][0]
            if work.future.cancelled():
                pending.pop(sid)
                dropped.add(id(work))
            else:
                kept.append((sid, seq))
        if dropped:
            with self._stats_lock:
                self.stats.cancelled += len(dropped)
        return kept

    def _execute(self, step: Step, pending: dict[int, tuple[_Work, int]]) -> None:
        start = time.perf_counter()
        works = {id(pending[s][0]): pending[s][0] for s in step.sequences}
        for w in works.values():
            if w.future.timing.started is None:
                w.future.timing.started = start
        try:
            pooled = {kind: np.asarray(v) for kind, v in zip(
                (EmbeddingType.Mean, EmbeddingType.Last, EmbeddingType.Cls), self._run(step),
                strict=True)}
        except Exception as e:  # a failed step fails its requests, never the engine
            log.exception("step %s failed", step.tokens.shape)
            for s in step.sequences:
                pending.pop(s, None)
            for w in works.values():
                if not w.future.done():
                    w.future.set_exception(e)
            return
        finished = time.perf_counter()
        completed = 0
        for slot, s in enumerate(step.sequences):
            work, i = pending.pop(s)
            work.out[i] = pooled[work.pooling][slot]
            work.remaining -= 1
            if work.remaining == 0 and not work.future.done():
                work.future.timing.finished = finished
                with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled now
                    work.future.set_result(work.out)
                    completed += 1
        with self._stats_lock:
            st = self.stats
            st.steps += 1
            st.sequences += len(step.sequences)
            st.requests += completed
            st.real_tokens += step.real_tokens
            st.padded_tokens += step.padded_tokens
            st.busy_seconds += finished - start
            st.step_sequences.observe(len(step.sequences))
            st.step_requests.observe(len(works))
            st.step_tokens.observe(step.real_tokens)

    # ---- responses -----------------------------------------------------------------------

    def _finish(self, options: EmbeddingOptions, vectors: np.ndarray) -> np.ndarray:
        """Run the model's Dense modules (float32), cut to `dimensions`, then normalize if asked:
        a cut vector is re-normalized."""
        if self.sentence_transformers is not None:
            vectors = self.sentence_transformers.project(vectors)
        if options.dimensions is not None:
            vectors = vectors[:, : options.dimensions]
        if options.normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, np.finfo(np.float32).tiny)
        return vectors

    def _response(self, options: EmbeddingOptions, prepared: PreparedInput, vectors: np.ndarray
                  ) -> EmbeddingResponse:
        vectors = self._finish(options, vectors)
        data = [EmbeddingData(embedding=encode_vector(v, options.encoding_format), index=i)
                for i, v in enumerate(vectors)]
        n = prepared.prompt_tokens
        return EmbeddingResponse(data=data, model=options.model,
                                 usage=Usage(prompt_tokens=n, total_tokens=n))


def _as_request(request: EmbeddingRequest | str | list, fields: dict[str, Any]
                ) -> EmbeddingRequest:
    if isinstance(request, EmbeddingRequest):
        return request
    return EmbeddingRequest(input=request, **fields)


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _enum(kind: type[EncodingFormat] | type[EmbeddingType], value: object, param: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        allowed = [v.value for v in kind]
        raise InvalidRequestError(f"{param!r} must be one of {allowed}; got {value!r}",
                                  param=param) from None


def _is_int(x: object) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def _is_token_input(raw: object) -> bool:
    """Whether an `input` holds token ids (a list of ids, or of lists of ids), not text."""
    return isinstance(raw, list | tuple) and len(raw) > 0 and (
        _is_int(raw[0]) or isinstance(raw[0], list | tuple))


def _is_number(x: object) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool) \
        and bool(np.isfinite(x))


def _check_text(text: str, where: str) -> None:
    # JSON escapes can spell lone surrogates, which are not text and which tokenizers refuse.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError(
            f"{where} is not valid Unicode: it holds a lone surrogate (an unpaired \\ud800-\\udfff "
            "escape); send well-formed text", param=where.split("[", 1)[0],
            code="invalid_value") from None
