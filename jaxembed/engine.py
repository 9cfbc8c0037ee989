"""The engine: one thread owns the device and runs every step; callers submit work to its queue.

Embeddings are prefill-only tasks (`max_tokens=0`): they run the decoder over packed rows and return
pooled final hidden states instead of logits, and never touch a KV cache. Callers from any thread
(Python, or the HTTP server's event loop through `aembed`) tokenize on their own side and submit
token ids; the engine thread drains the queue between steps, so concurrent work is batched together.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxembed import model
from jaxembed.errors import (
    EngineUnavailableError,
    InvalidRequestError,
    ModelNotFoundError,
)
from jaxembed.protocol import (
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingType,
    Usage,
    encode_vector,
    split_input,
)
from jaxembed.scheduler import Buckets, Step, plan_step
from jaxembed.weights.loader import Checkpoint

log = logging.getLogger("jaxembed.engine")

DEFAULT_MAX_BATCH_TOKENS = 8192
DEFAULT_MAX_MODEL_LEN = 8192
DEFAULT_ALIAS = "default"


def default_dtype() -> str:
    """float32 on the CPU (no fast bf16 matmul there), bfloat16 on accelerators."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


@dataclasses.dataclass
class EngineStats:
    steps: int = 0
    sequences: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    compilations: int = 0
    busy_seconds: float = 0.0

    @property
    def padding_ratio(self) -> float:
        return 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0


@dataclasses.dataclass
class _Work:
    """One submitted batch of sequences and where their vectors go."""

    sequences: list[np.ndarray]
    pooling: EmbeddingType
    future: concurrent.futures.Future
    out: np.ndarray
    remaining: int


@dataclasses.dataclass(frozen=True)
class PreparedInput:
    """Validated token ids for one request."""

    sequences: list[np.ndarray]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


class LLMEngine:
    def __init__(self, checkpoint: Checkpoint, *, max_model_len: int | None = None,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                 served_model_names: Sequence[str] | None = None) -> None:
        self.checkpoint = checkpoint
        self.config = checkpoint.config
        self.params = checkpoint.params
        self.tokenizer = checkpoint.tokenizer.tokenizer
        limit = min(self.config.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
        self.max_model_len = int(max_model_len or limit)
        self.buckets = Buckets.build(self.max_model_len, max_batch_tokens)
        self.served_model_names = list(served_model_names or [checkpoint.name])
        self.stats = EngineStats()

        cfg = self.config

        def pooled(params: Any, *step_arrays: jax.Array) -> tuple[jax.Array, jax.Array]:
            self.stats.compilations += 1  # runs once per trace, i.e. once per new step shape
            return model.pooled(params, *step_arrays, cfg=cfg)

        self._pooled = jax.jit(pooled)
        self._queue: queue.Queue[_Work | None] = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="jaxembed-engine", daemon=True)
        self._thread.start()

    # ---- public API ----------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    @property
    def embedding_size(self) -> int:
        return self.config.hidden_size

    def resolve_model(self, name: str | None) -> str:
        """The served name a request's `model` refers to; `default` aliases the served model."""
        if name is None or name == DEFAULT_ALIAS or name in self.served_model_names:
            return self.model_name
        raise ModelNotFoundError(
            f"the model {name!r} is not served here; use one of "
            f"{[*self.served_model_names, DEFAULT_ALIAS]}", param="model")

    def check_request(self, request: EmbeddingRequest) -> str:
        """Validate what can be checked before tokenizing; return the served model name."""
        name = self.resolve_model(request.model)
        dims = request.dimensions
        if dims is not None and not 1 <= dims <= self.embedding_size:
            raise InvalidRequestError(
                f"'dimensions' must be between 1 and {self.embedding_size} for this model; "
                f"got {dims}", param="dimensions")
        return name

    def embed(self, request: EmbeddingRequest | str | list, **fields: Any) -> EmbeddingResponse:
        """Embed synchronously. Safe from any thread; concurrent calls are batched together."""
        request = _as_request(request, fields)
        name = self.check_request(request)
        prepared = self.prepare(request.input)
        vectors = self.submit(prepared.sequences, request.embedding_type).result()
        return self._response(request, name, prepared, vectors)

    async def aembed(self, request: EmbeddingRequest | str | list, **fields: Any
                     ) -> EmbeddingResponse:
        """Embed from an event loop: tokenization runs in a worker thread, never on the loop."""
        request = _as_request(request, fields)
        name = self.check_request(request)
        prepared = await asyncio.to_thread(self.prepare, request.input)
        vectors = await asyncio.wrap_future(self.submit(prepared.sequences, request.embedding_type))
        return await asyncio.to_thread(self._response, request, name, prepared, vectors)

    def encode(self, texts: str | Sequence[str], embedding_type: EmbeddingType | str = "mean"
               ) -> np.ndarray:
        """Embeddings as a float32 array [len(texts), hidden] (for notebooks)."""
        single = isinstance(texts, str)
        prepared = self.prepare([texts] if single else list(texts))
        out = self.submit(prepared.sequences, EmbeddingType(embedding_type)).result()
        return out[0] if single else out

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids exactly as the embedding path feeds them (special tokens per the model)."""
        return [enc.ids for enc in self.tokenizer.encode_batch(list(texts), add_special_tokens=True)]

    def prepare(self, raw: object) -> PreparedInput:
        """Validate an `input` value and turn it into token-id sequences."""
        texts, seqs = split_input(raw)
        if texts is not None:
            for i, t in enumerate(texts):
                if not t:
                    raise InvalidRequestError(
                        f"input[{i}] is an empty string; send non-empty text", param="input",
                        code="empty_input")
            seqs = self.tokenize(texts)
        assert seqs is not None
        vocab = self.config.vocab_size
        out = []
        for i, ids in enumerate(seqs):
            if not ids:
                raise InvalidRequestError(f"input[{i}] has no tokens; send at least one",
                                          param="input", code="empty_input")
            try:
                arr = np.asarray(ids, dtype=np.int64)
                bad = np.flatnonzero((arr < 0) | (arr >= vocab))
            except OverflowError:  # ids beyond int64 cannot even be compared in numpy
                bad = np.asarray([j for j, t in enumerate(ids) if not 0 <= t < vocab])
            if bad.size:
                j = int(bad[0])
                raise InvalidRequestError(
                    f"input[{i}][{j}] is token id {ids[j]}, outside this model's vocabulary "
                    f"[0, {vocab - 1}]", param="input", code="invalid_token_id")
            if arr.size > self.max_model_len:
                raise InvalidRequestError(
                    f"input[{i}] has {arr.size} tokens, more than this model's limit of "
                    f"{self.max_model_len}; shorten it or split it", param="input",
                    code="context_length_exceeded")
            out.append(arr.astype(np.int32))
        return PreparedInput(out)

    def submit(self, sequences: list[np.ndarray], pooling: EmbeddingType = EmbeddingType.Mean
               ) -> concurrent.futures.Future:
        """Queue validated sequences; the future gives float32 [len(sequences), hidden]."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        work = _Work(list(sequences), EmbeddingType(pooling), fut,
                     np.empty((len(sequences), self.embedding_size), np.float32), len(sequences))
        with self._lock:
            if self._closed:
                raise EngineUnavailableError("the engine is shut down")
            self._queue.put(work)
        return fut

    def warmup(self, shapes: Sequence[tuple[int, int]] | None = None) -> None:
        """Compile step shapes ahead of traffic (default: single rows up to 128 tokens)."""
        if shapes is None:
            shapes = [(1, t) for t in self.buckets.lengths if t <= 128]
        for rows, length in shapes:
            step = Step.empty(rows, length, self.buckets.seq_slots(rows, length))
            jax.block_until_ready(self._run(step))

    def shutdown(self, timeout: float | None = None) -> None:
        """Finish the queued work, then stop the engine thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout)

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- the engine thread ---------------------------------------------------------------

    def _run(self, step: Step) -> tuple[jax.Array, jax.Array]:
        return self._pooled(self.params, step.tokens, step.positions, step.segment_ids,
                            step.seq_index, step.last_index)

    def _loop(self) -> None:
        pending: dict[int, tuple[_Work, int]] = {}
        waiting: list[tuple[int, np.ndarray]] = []
        next_id = 0
        stopping = False
        while True:
            block = not waiting and not stopping
            while True:
                try:
                    work = self._queue.get(block=block)
                except queue.Empty:
                    break
                block = False
                if work is None:
                    stopping = True
                    continue
                if work.remaining == 0:
                    work.future.set_result(work.out)
                for i, seq in enumerate(work.sequences):
                    pending[next_id] = (work, i)
                    waiting.append((next_id, seq))
                    next_id += 1
            if not waiting:
                if stopping:
                    return
                continue
            step, left = plan_step(waiting, self.buckets)
            left_ids = set(left)
            waiting = [w for w in waiting if w[0] in left_ids]
            self._execute(step, pending)

    def _execute(self, step: Step, pending: dict[int, tuple[_Work, int]]) -> None:
        start = time.perf_counter()
        works = {id(pending[s][0]): pending[s][0] for s in step.sequences}
        try:
            mean, last = self._run(step)
            mean, last = np.asarray(mean), np.asarray(last)
        except Exception as e:  # a failed step fails its requests, never the engine
            log.exception("step %s failed", step.tokens.shape)
            for s in step.sequences:
                pending.pop(s, None)
            for w in works.values():
                if not w.future.done():
                    w.future.set_exception(e)
            return
        for slot, s in enumerate(step.sequences):
            work, i = pending.pop(s)
            work.out[i] = mean[slot] if work.pooling == EmbeddingType.Mean else last[slot]
            work.remaining -= 1
            if work.remaining == 0 and not work.future.done():
                work.future.set_result(work.out)
        st = self.stats
        st.steps += 1
        st.sequences += len(step.sequences)
        st.real_tokens += step.real_tokens
        st.padded_tokens += step.padded_tokens
        st.busy_seconds += time.perf_counter() - start

    # ---- responses -----------------------------------------------------------------------

    def _response(self, request: EmbeddingRequest, name: str, prepared: PreparedInput,
                  vectors: np.ndarray) -> EmbeddingResponse:
        if request.dimensions is not None:
            vectors = vectors[:, : request.dimensions]
        data = [EmbeddingData(embedding=encode_vector(v, request.encoding_format), index=i)
                for i, v in enumerate(vectors)]
        n = prepared.prompt_tokens
        return EmbeddingResponse(data=data, model=name,
                                 usage=Usage(prompt_tokens=n, total_tokens=n))


def _as_request(request: EmbeddingRequest | str | list, fields: dict[str, Any]
                ) -> EmbeddingRequest:
    if isinstance(request, EmbeddingRequest):
        return request
    return EmbeddingRequest(input=request, **fields)
