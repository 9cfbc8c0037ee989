"""`Engine`: the public face of the engine, for Python callers and the HTTP server alike.

It puts the layers together: the front ends turn requests into token ids and validated settings
(`embed_front`, `generate_front`, over `inputs`), the cores queue the work and run its steps
(`core`: one thread each, with its schedulers and model runner), and the front ends turn results
into responses. Embeddings are prefill-only tasks: packed rows run through the decoder and pooled,
never touching a KV cache. With data parallelism there are several cores, each a replica of the
model on its own devices: each request goes to the least loaded, and a generation stays on its
replica to the end, since its KV cache lives there.

Every call is safe from any thread; concurrent calls are batched together in the cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxembed import memory, multihost
from jaxembed.classify import build_classifier
from jaxembed.config import UnsupportedModelError
from jaxembed.core import EngineCore, paused, unavailable
from jaxembed.embed_front import DEFAULT_ALIAS, EmbeddingFrontend, EmbeddingOptions, PreparedInput
from jaxembed.errors import InvalidRequestError
from jaxembed.generate_front import GenerationFrontend
from jaxembed.generation import GenerationResult, GenerationStream, TokenLogprob
from jaxembed.inputs import InputProcessor
from jaxembed.model import logits as model_logits
from jaxembed.model import merge_projections
from jaxembed.options import EngineOptions
from jaxembed.plan import ExecutionPlan
from jaxembed.protocol import (
    ClassifyRequest,
    ClassifyResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingType,
    InputType,
    RerankRequest,
    RerankResponse,
    ScoreRequest,
    ScoreResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from jaxembed.runner import ModelRunner, copies_bytes
from jaxembed.sampling import TOP_LOGPROBS, SamplingParams
from jaxembed.scheduler import Buckets
from jaxembed.score_front import ScoringFrontend, ScoringWork
from jaxembed.sharding import ShardingPlan
from jaxembed.st_config import read_sentence_transformers
from jaxembed.stats import EngineStats, RequestTiming, StatsRecorder, sum_stats
from jaxembed.steps import TokenStep
from jaxembed.weights.loader import Checkpoint
from jaxembed.work import EmbeddingFuture, EmbeddingWork

log = logging.getLogger("jaxembed.engine")

__all__ = ["DEFAULT_ALIAS", "Engine", "EngineStats", "LLMEngine", "ModelInfo"]


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the engine serves, as plain data (the server's /info is made from it)."""

    model: str
    served_model_names: tuple[str, ...]
    family: str
    format: str
    dtype: str
    backend: str
    max_model_len: int
    causal: bool
    embedding_size: int
    embedding_type: str  # the pooling a request gets when it names none
    normalize: bool
    dimensions: tuple[int, ...]  # the Matryoshka sizes; empty: any size
    prompts: tuple[str, ...]
    chat_template: bool
    max_num_seqs: int
    quantized: tuple[str, ...] = ()  # the GGML types of the weights kept in their blocks


class Engine:
    def __init__(self, checkpoint: Checkpoint, options: EngineOptions | None = None, *,
                 sharding: ShardingPlan | None = None,
                 channel: multihost.StepChannel | None = None,
                 replicas: Sequence[tuple[Any, ShardingPlan]] = (),
                 buckets: str | None = None, **fields: Any) -> None:
        """options (or its fields as keywords): the settings; only those the engine reads
        matter here (the rest are `EngineBuilder`'s). sharding: the mesh the params were placed
        on (by that plan); None: everything on the default device. channel: on a multi-host
        run, where the leader sends each step. replicas: (params, sharding) of further replicas
        of the model, each on its own devices (data parallelism). buckets: the step shapes'
        ladder, "fine" or "coarse" (`Buckets`); None: coarse on an accelerator, fine on a
        CPU."""
        options = dataclasses.replace(options or EngineOptions(), **fields)
        options.validate()
        self.options, self.checkpoint, self.config = options, checkpoint, checkpoint.config
        st = read_sentence_transformers(checkpoint.path) if checkpoint.path.is_dir() else None
        devices = sharding.mesh.size if sharding is not None else 1
        plan = ExecutionPlan.decide(self.config, checkpoint.dtype, options, devices,
                                    model_len_cap=st.max_seq_length if st else None)
        if plan.merged_projections:  # in place of the loaded ones, which it frees
            checkpoint = dataclasses.replace(
                checkpoint, params=merge_projections(checkpoint.params, consume=True))
            self.checkpoint = checkpoint
            replicas = [(merge_projections(p, consume=True), m) for p, m in replicas]
        # Sized after the merge, whose parts are freed: the budget sees the weights as held.
        if devices == 1:  # a mesh's cache is split across its devices; sized by the flags
            plan = plan.sized(self.config, options, memory.budget(plan.backend),
                              extra=copies_bytes(checkpoint.params, self.config, plan))
        self.plan = plan
        log.info("execution plan: %s", self.plan.summary)
        plan = self.plan
        self.inputs = InputProcessor(checkpoint.tokenizer.tokenizer, self.config.vocab_size)
        self.embedding = EmbeddingFrontend(
            self.inputs, self.config, model_name=checkpoint.name,
            max_model_len=plan.max_model_len, served_model_names=options.served_model_names,
            sentence_transformers=st, defaults=options.defaults,
            instruction_template=options.instruction_template,
            max_request_tokens=options.max_request_tokens, chunk_overlap=options.chunk_overlap)
        self.generation = GenerationFrontend(
            self.inputs, checkpoint.tokenizer, self.config.eos_token_id,
            model_name=self.embedding.model_name, max_model_len=plan.max_model_len,
            max_num_seqs=plan.max_num_seqs)
        self.classifier = build_classifier(
            checkpoint.heads, checkpoint.raw_config,
            checkpoint.path if checkpoint.path.is_dir() else None, self.config.family,
            self.inputs.tokenizer, options.classifier_from_tokens, self._head_rows)
        self.scoring = ScoringFrontend(self.inputs, self.embedding, self.classifier,
                                       max_model_len=plan.max_model_len,
                                       refuse_long=options.score_refuse_long)
        self.buckets = Buckets.for_plan(plan, buckets)
        log.info("step shapes: %s ladder, %d embedding shapes (%s)",
                 "coarse" if self.buckets.is_coarse else "fine", len(self.buckets.shapes()),
                 "all compiled at start-up" if self.buckets.is_coarse else "compiled on use")
        self.cores: list[EngineCore] = []
        self._route_lock = threading.Lock()
        self._next = 0  # where the search for the least loaded replica starts
        for params, mesh in [(checkpoint.params, sharding), *replicas]:
            recorder = StatsRecorder()
            runner = ModelRunner(params, self.config, plan, mesh, channel,
                                 on_compile=lambda r=recorder: r.add(compilations=1))
            self.cores.append(EngineCore(runner, self.buckets, self.inputs.tokenizer,
                                         options.max_queued_requests, recorder))

    def _head_rows(self, ids: Sequence[int]) -> np.ndarray:
        """Rows `ids` of the LM head as float32 [len(ids), hidden], however the head is held
        (tied, quantized): the logits of the identity's rows, 256 at a time."""
        cfg = self.config
        if cfg.final_softcap:
            raise UnsupportedModelError(
                f"a {cfg.family} model soft-caps its logits, so two tokens' logits are no linear "
                "head; --classifier-from-tokens cannot score with them")
        if not (cfg.tie_word_embeddings or "lm_head" in self.checkpoint.params):
            raise UnsupportedModelError("--classifier-from-tokens needs an LM head, and this "
                                        "checkpoint has none")
        want = jnp.asarray(list(ids), jnp.int32)
        head = jax.jit(lambda p, x: model_logits(p, x, cfg)[:, want])
        d = cfg.hidden_size
        cols = [np.asarray(head(self.checkpoint.params, jnp.eye(d, dtype=jnp.float32)[a:a + 256]))
                for a in range(0, d, 256)]
        return np.concatenate(cols).T  # [len(ids), hidden]

    # ---- what is served ------------------------------------------------------------------

    @property
    def tasks(self) -> tuple[str, ...]:
        """What the served model can do, in vLLM's task names: embed (and token_embed) always;
        generate where it has an LM head (a base checkpoint, as many embedding models are
        saved, has none); score and rerank always (with no classifier: the cosine of
        embeddings); classify with a classification head."""
        out = ["embed", "token_embed"]
        if self.config.tie_word_embeddings or "lm_head" in self.checkpoint.params:
            out.append("generate")
        out += ["score", "rerank"]
        if self.classifier is not None:
            out.append("classify")
        return tuple(out)

    def require(self, task: str, param: str = "model") -> None:
        """A 400 naming the tasks the model supports, for a task it does not."""
        if task not in self.tasks:
            raise InvalidRequestError(
                f"{self.model_name} does not support {task!r}; it supports "
                f"{', '.join(self.tasks)}", param=param, code="unsupported_model")

    @property
    def model_name(self) -> str:
        return self.embedding.model_name

    @property
    def served_model_names(self) -> list[str]:
        return self.embedding.served_model_names

    @property
    def tokenizer(self) -> Any:
        return self.inputs.tokenizer

    @property
    def params(self) -> Any:
        """The loaded params (the first replica's)."""
        return self.runner.params

    @property
    def runner(self) -> ModelRunner:
        """The first replica's model runner (every replica's runs the same plan)."""
        return self.cores[0].runner

    @property
    def sharding(self) -> ShardingPlan | None:
        return self.runner.sharding

    @property
    def max_model_len(self) -> int:
        return self.plan.max_model_len

    @property
    def hidden_size(self) -> int:
        """The size of the pooled hidden states (what `submit` returns)."""
        return self.config.hidden_size

    @property
    def embedding_size(self) -> int:
        return self.embedding.embedding_size

    @property
    def is_causal(self) -> bool:
        return self.embedding.is_causal

    @property
    def max_num_seqs(self) -> int:
        """KV cache slots of all replicas (one request's `n` is bounded by one replica's)."""
        return self.plan.max_num_seqs * len(self.cores)

    @property
    def max_queued_requests(self) -> int:
        return sum(c.max_queued_requests for c in self.cores)

    def describe(self) -> ModelInfo:
        """The served model, its limits and its defaults (resolved as for an empty request, so
        server flags, the model's configuration and built-in defaults combine as for requests)."""
        options = self.embedding.resolve(EmbeddingRequest(input="x"))
        return ModelInfo(
            model=self.model_name, served_model_names=tuple(self.served_model_names),
            family=self.config.family, format=self.checkpoint.format,
            dtype=self.checkpoint.dtype, backend=self.plan.backend,
            max_model_len=self.max_model_len, causal=self.is_causal,
            embedding_size=self.embedding_size, embedding_type=options.pooling.value,
            normalize=options.normalize, dimensions=self.embedding.supported_dimensions,
            prompts=tuple(sorted(self.embedding.prompts)),
            chat_template=self.generation.chat_template is not None,
            max_num_seqs=self.max_num_seqs, quantized=self.checkpoint.quantized)

    # ---- state -----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Accepting work: false once shutdown has begun (draining, then stopped)."""
        return all(c.ready for c in self.cores)

    @property
    def queue_depth(self) -> int:
        """Requests accepted and not yet finished (waiting or in a step)."""
        return sum(c.queue_depth for c in self.cores)

    @property
    def running_sequences(self) -> int:
        """Sequences holding KV cache slots right now."""
        return sum(c.scheduler.running_sequences for c in self.cores)

    def stats_snapshot(self) -> EngineStats:
        """A consistent copy of the statistics, summed over the replicas."""
        stats = [c.stats_snapshot() for c in self.cores]
        return stats[0] if len(stats) == 1 else sum_stats(stats)

    @property
    def stats(self) -> EngineStats:
        return self.stats_snapshot()

    def _core(self) -> EngineCore:
        """The replica for a new request: the one with the least work (requests it accepted and
        has not finished, embedding and generation alike), ties taken in turn."""
        if len(self.cores) == 1:
            return self.cores[0]
        with self._route_lock:
            i = least_loaded([c.queue_depth for c in self.cores], self._next)
            self._next = (i + 1) % len(self.cores)
        return self.cores[i]

    # ---- embeddings ----------------------------------------------------------------------

    def resolve_model(self, name: str | None) -> str:
        """The served name a request's `model` refers to; `default` aliases the served model."""
        return self.embedding.resolve_model(name)

    def resolve(self, request: EmbeddingRequest) -> EmbeddingOptions:
        """Validate a request's settings (not its input) and fill in the defaults."""
        return self.embedding.resolve(request)

    def prepare(self, raw: object, truncate: int | None = None, prompt: str | None = None,
                chunked: bool = False) -> PreparedInput:
        """Validate an `input` value and turn it into token-id sequences."""
        return self.embedding.prepare(raw, truncate, prompt, chunked)

    def tokenize(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids exactly as the embedding path feeds them (special tokens per the model; a
        sentence-transformers folder's texts through its chat template where it says so)."""
        return self.embedding.token_ids(texts, None, add_special_tokens)

    def tokenize_request(self, request: TokenizeRequest) -> TokenizeResponse:
        return self.embedding.tokenize_request(request)

    def detokenize_request(self, request: DetokenizeRequest) -> DetokenizeResponse:
        return self.embedding.detokenize_request(request)

    def submit(self, sequences: list[np.ndarray], pooling: EmbeddingType = EmbeddingType.Mean,
               skip: Sequence[int] | None = None) -> EmbeddingFuture:
        """Queue validated sequences; the future gives float32 [len(sequences), hidden]: the
        pooled hidden states, before the model's Dense modules and normalization.

        `skip`: per sequence, how many leading tokens (a prompt) attend but are left out of its
        pooling. Raises EngineOverloadedError when `max_queued_requests` are already waiting or
        running, and EngineUnavailableError once shutdown has begun."""
        if skip is not None and len(skip) != len(sequences):
            raise ValueError("skip needs one count per sequence")
        pooling = EmbeddingType(pooling)
        fut = EmbeddingFuture()
        out: np.ndarray | list[Any] = (
            [None] * len(sequences) if pooling == EmbeddingType.None_
            else np.empty((len(sequences), self.hidden_size), np.float32))
        work = EmbeddingWork(list(sequences), pooling, fut, out, len(sequences),
                             None if skip is None or not any(skip) else [int(n) for n in skip])
        self._core().submit(work)
        return fut

    def submit_scores(self, sequences: list[np.ndarray]) -> EmbeddingFuture:
        """Queue token-id sequences to be scored, as a prompt is for `echo` with `logprobs`: the
        future gives a `PromptScores` a sequence (each token's log-probability given those
        before it, and the likeliest tokens at its place). Prefill-only, in the embedding steps;
        raises as `submit` does."""
        self.require("generate", "logprobs")  # the LM head scores a prompt
        fut = EmbeddingFuture()
        work = EmbeddingWork(list(sequences), EmbeddingType.Mean, fut, [None] * len(sequences),
                             len(sequences), scores=True)
        self._core().submit(work)
        return fut

    def prompt_logprobs(self, prompt: str | Sequence[int], top: int = TOP_LOGPROBS
                        ) -> list[TokenLogprob | None]:
        """Each prompt token's log-probability given those before it, with the `top` likeliest
        tokens at its place; None for the first token, which nothing comes before. The prompt
        is tokenized as a completion's is."""
        ids = self.prepare_prompt(prompt)
        return [None, *self.submit_scores([ids]).result()[0].entries(ids, top)]

    def embed(self, request: EmbeddingRequest | str | list, **fields: Any) -> EmbeddingResponse:
        """Embed synchronously."""
        request = _as_request(request, fields)
        options = self.resolve(request)
        prepared = self.prepare(request.input, options.truncate, options.prompt, options.chunked)
        vectors = self.submit(prepared.sequences, options.pooling, prepared.skip).result()
        return self.embedding.response(options, prepared, vectors)

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
        if not self.ready:  # refuse before tokenizing: the work could not be queued anyway
            raise unavailable()
        prepared = await asyncio.to_thread(self.prepare, request.input, options.truncate,
                                           options.prompt, options.chunked)
        future = self.submit(prepared.sequences, options.pooling, prepared.skip)
        vectors = await asyncio.wrap_future(future)
        response = await asyncio.to_thread(self.embedding.response, options, prepared, vectors)
        return response, future.timing

    def encode(self, texts: str | Sequence[str], embedding_type: EmbeddingType | str | None = None,
               *, pooling: EmbeddingType | str | None = "default", normalize: bool | None = None,
               truncate_prompt_tokens: int | None = None, dimensions: int | None = None,
               prompt_name: str | None = None, instruction: str | None = None,
               input_type: InputType | str | None = None) -> np.ndarray | list[np.ndarray]:
        """Embeddings as a float32 array [len(texts), size] (for notebooks). Unset options take
        the server's defaults, then the model's, as requests do.

        `pooling=None` (or `embedding_type="none"`): no pooling, every token's final hidden state
        instead, a float32 [tokens, hidden] array a text (one array for one text), for late
        interaction and analysis. `pooling` otherwise names an embedding type too."""
        if pooling != "default":
            embedding_type = EmbeddingType.None_ if pooling is None else pooling
        single = isinstance(texts, str)
        request = EmbeddingRequest(input=[texts] if single else list(texts),
                                   embedding_type=embedding_type,  # type: ignore[arg-type]
                                   normalize=normalize,
                                   truncate_prompt_tokens=truncate_prompt_tokens,
                                   dimensions=dimensions, prompt_name=prompt_name,
                                   instruction=instruction,
                                   input_type=input_type)  # type: ignore[arg-type]
        options = self.resolve(request)
        prepared = self.prepare(request.input, options.truncate, options.prompt, options.chunked)
        vectors = self.submit(prepared.sequences, options.pooling, prepared.skip).result()
        out = self.embedding.finish(options, prepared.combine(vectors, options.pooling))
        return out[0] if single else out

    # ---- rerank, score, classify ---------------------------------------------------------

    def _run_scoring(self, work: ScoringWork) -> EmbeddingFuture:
        return self.submit(work.sequences, work.pooling, work.skip)

    def rerank(self, query: str, documents: Sequence[str], top_n: int | None = None,
               instruction: str | None = None) -> list[tuple[int, float]]:
        """(index, relevance score) of each document against the query, best first (the best
        `top_n`): the model's classifier, or the cosine of embeddings for a model without one."""
        response = self._rerank(RerankRequest(query=query, documents=list(documents),
                                              top_n=top_n, instruction=instruction))
        return [(r.index, r.relevance_score) for r in response.results]

    def _rerank(self, request: RerankRequest) -> RerankResponse:
        work, texts = self.scoring.rerank_work(request)
        scores = work.finish(self._run_scoring(work).result())
        return self.scoring.rerank_response(request, texts, work, scores, self.model_name)

    async def arerank(self, request: RerankRequest) -> RerankResponse:
        if not self.ready:
            raise unavailable()
        work, texts = await asyncio.to_thread(self.scoring.rerank_work, request)
        states = await asyncio.wrap_future(self._run_scoring(work))
        scores = await asyncio.to_thread(work.finish, states)
        return self.scoring.rerank_response(request, texts, work, scores,
                                            self.resolve_model(request.model))

    def score(self, text_1: str | Sequence[str], text_2: str | Sequence[str],
              instruction: str | None = None) -> np.ndarray:
        """Relevance scores, float32: text_1 against each text_2, or pairwise."""
        work = self.scoring.score_work(ScoreRequest(
            text_1=text_1 if isinstance(text_1, str) else list(text_1),
            text_2=text_2 if isinstance(text_2, str) else list(text_2), instruction=instruction))
        return work.finish(self._run_scoring(work).result())

    async def ascore(self, request: ScoreRequest) -> ScoreResponse:
        if not self.ready:
            raise unavailable()
        work = await asyncio.to_thread(self.scoring.score_work, request)
        states = await asyncio.wrap_future(self._run_scoring(work))
        scores = await asyncio.to_thread(work.finish, states)
        return self.scoring.score_response(work, scores, self.resolve_model(request.model))

    def classify(self, texts: str | Sequence[str]) -> np.ndarray:
        """Label probabilities, float32 [len(texts), labels] (labels: `classifier.labels`)."""
        work = self.scoring.classify_work(ClassifyRequest(
            input=texts if isinstance(texts, str) else list(texts)))
        return work.finish(self._run_scoring(work).result())

    async def aclassify(self, request: ClassifyRequest) -> ClassifyResponse:
        if not self.ready:
            raise unavailable()
        work = await asyncio.to_thread(self.scoring.classify_work, request)
        states = await asyncio.wrap_future(self._run_scoring(work))
        probs = await asyncio.to_thread(work.finish, states)
        return self.scoring.classify_response(work, probs, self.resolve_model(request.model))

    def warmup(self, shapes: Sequence[tuple[int, int]] | None = None) -> None:
        """Compile embedding step shapes ahead of traffic (default: single rows up to 128
        tokens), on every replica."""
        if shapes is None:
            shapes = [(1, t) for t in self.buckets.lengths if t <= 128]
        for core in self.cores:
            for rows, length in shapes:
                core.runner.compile_embed(rows, length, self.buckets.seq_slots(rows, length))

    def warmup_all(self) -> None:
        """Compile every program steady serving runs, in every shape its buckets allow, on
        every replica: embedding steps (pooled; every token's state; a prompt's scores where
        the model has an LM head), and where it can generate, every prefill and decode step,
        those under a grammar too. For the coarse ladder (`Buckets.coarse`), whose shapes are
        few: the fine one's are too many to compile ahead. Token and generation steps are run
        on padding (there is no compile-only path for them), a forward pass each."""
        start, before = time.perf_counter(), self.stats_snapshot().compilations
        shapes = self.buckets.shapes()
        self.warmup(shapes)
        scores = "generate" in self.tasks
        for core in self.cores:
            out = []
            for rows, length in shapes:
                out.append(core.runner.run(TokenStep.empty(rows, length, 0)))
                if scores:
                    out.append(core.runner.run(TokenStep.empty(rows, length, 1)))
                jax.block_until_ready(out)  # one step's output at a time in memory
                out.clear()
        if scores:
            self.warmup_generation(structured=True)
        log.info("warm-up compiled %d step programs in %.1fs",
                 self.stats_snapshot().compilations - before, time.perf_counter() - start)

    # ---- generation ----------------------------------------------------------------------

    @property
    def chat_template(self) -> Any:
        return self.generation.chat_template

    @property
    def stop_token_ids(self) -> frozenset[int]:
        return self.generation.stop_token_ids

    def sampling_params(self, params: SamplingParams | None = None, **fields: Any
                        ) -> SamplingParams:
        """Validated sampling settings: `params` with `fields` replacing some of them."""
        return self.generation.sampling_params(params, **fields)

    def prepare_prompt(self, prompt: str | Sequence[int], add_special_tokens: bool = True,
                       param: str = "prompt") -> np.ndarray:
        return self.generation.prompt(prompt, add_special_tokens, param)

    def render_chat(self, messages: object, add_generation_prompt: bool = True,
                    template_kwargs: Mapping[str, Any] | None = None, **more: Any) -> str:
        """The prompt text of a conversation, by the model's chat template; template_kwargs
        (and more keywords): further names for the template, such as `enable_thinking`."""
        return self.generation.render_chat(messages, add_generation_prompt,
                                           {**(template_kwargs or {}), **more})

    def chat_prompt(self, messages: object, add_generation_prompt: bool = True,
                    template_kwargs: Mapping[str, Any] | None = None,
                    tools: list[dict[str, Any]] | None = None, **more: Any) -> np.ndarray:
        """Token ids of a conversation; tools: OpenAI's function tools, rendered by the
        template (`tools.check_tools` checks them)."""
        return self.generation.chat_prompt(messages, add_generation_prompt,
                                           {**(template_kwargs or {}), **more}, tools)

    def submit_generation(self, prompt: np.ndarray, params: SamplingParams,
                          loop: asyncio.AbstractEventLoop | None = None) -> GenerationStream:
        """Queue a validated prompt; the stream yields its deltas (from a thread, or on `loop`).
        Raises like `submit` when the queue is full or the engine is shutting down."""
        self.require("generate")
        work = self.generation.request(prompt, params, loop)
        self._core().submit(work)
        return work.stream

    def generate_stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                        **fields: Any) -> GenerationStream:
        """Start generating; iterate the stream for deltas as they come (from any thread)."""
        p = self.sampling_params(params, **fields)
        return self.submit_generation(self.prepare_prompt(prompt), p)

    def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                 **fields: Any) -> GenerationResult:
        """Generate to the end; concurrent calls share decode steps."""
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
        if not self.ready:
            raise unavailable()
        ids = prompt if isinstance(prompt, np.ndarray) else await asyncio.to_thread(
            self.prepare_prompt, prompt)
        return self.submit_generation(ids, p, asyncio.get_running_loop())

    async def agenerate(self, prompt: str | Sequence[int] | np.ndarray,
                        params: SamplingParams | None = None, **fields: Any) -> GenerationResult:
        stream = await self.agenerate_stream(prompt, params, **fields)
        return stream.collect([d async for d in stream])

    def warmup_generation(self, structured: bool = False) -> None:
        """Compile every decode shape and the prefills of short prompts, on every replica, so
        that steady generation never waits for the compiler; structured: the decode programs
        of steps under a grammar (structured outputs, required tool calls) too."""
        for core in self.cores:
            core.scheduler.warmup(structured)

    # ---- control ---------------------------------------------------------------------------

    def follow(self) -> None:
        """On a multi-host follower: run the leader's steps until it stops."""
        self.runner.follow()

    def pause(self) -> None:
        """Hold every replica before its next step (a step already running finishes first)."""
        for c in self.cores:
            c.pause()

    def resume(self) -> None:
        for c in self.cores:
            c.resume()

    def paused(self) -> contextlib.AbstractContextManager[None]:
        """Every replica held for the block (see `pause`), then resumed."""
        return paused(self)

    def shutdown(self, timeout: float | None = None) -> None:
        """Refuse new work, finish the queued work, then stop; every replica at once."""
        for c in self.cores:
            c.close()
        for c in self.cores:
            c.shutdown(timeout)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


LLMEngine = Engine  # the name of earlier releases


def least_loaded(loads: Sequence[int], start: int) -> int:
    """The index of the first of the least loaded, searching from `start` round: ties go to
    each in turn as `start` moves past the last one chosen."""
    n = len(loads)
    return min(((start + j) % n for j in range(n)), key=lambda i: loads[i])


def _as_request(request: EmbeddingRequest | str | list, fields: dict[str, Any]
                ) -> EmbeddingRequest:
    if isinstance(request, EmbeddingRequest):
        return request
    return EmbeddingRequest(input=request, **fields)
