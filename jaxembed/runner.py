"""The model runner: runs the three kinds of step on the devices, and owns what they need there.

It holds the params and the variants of them each path reads (as the execution plan lays them
out), the jitted step programs, the generation state (the KV cache and the penalty counts), and the
placement on a mesh. Its interface is small: `run(step)` for an embedding, prefill or decode step,
`compile_embed` for warm-up, `follow` for a multi-host follower, `recover` after a failed step.

On a mesh (`sharding`) step inputs are placed replicated and XLA partitions the rest. On a
multi-host run the leader sends each step to the other processes first, which run it too
(`follow`): one SPMD program, called by every process in one order.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxembed import memory, model, modules, multihost, quant, sampling
from jaxembed.config import ModelConfig
from jaxembed.kv_cache import KVCache
from jaxembed.layers import PROJECTIONS
from jaxembed.plan import PER_LAYER, ExecutionPlan
from jaxembed.sharding import ShardingPlan, cache_sharding, replicated
from jaxembed.steps import DecodeStep, EmbedStep, PrefillStep, Step, TokenStep, from_message

log = logging.getLogger("jaxembed.runner")


@dataclasses.dataclass
class GenerationState:
    """What decode steps carry from one to the next, donated to each: the KV cache, and per slot
    (plus the scratch slot) how often each token was drawn and whether the prompt held it."""

    kv: KVCache
    counts: jax.Array  # int32 [S + 1, V]
    seen: jax.Array  # bool [S + 1, V]


jax.tree_util.register_dataclass(GenerationState, data_fields=["kv", "counts", "seen"],
                                 meta_fields=[])


@dataclasses.dataclass
class DecodeWeights:
    """The weights decode steps read, laid out as the plan says: per-layer copies (or the
    stacked params, narrowed), and the output head (None: the params' own)."""

    params: Any
    layers: list[tuple[Any, Any]] | None
    head: Any
    nbytes: int  # what a step reads: the layers, the head and the final norm




@dataclasses.dataclass(frozen=True)
class Pending:
    """A decode step's forward, dispatched and not yet sampled: device arrays [B, V]."""

    logits: jax.Array
    counts: jax.Array
    seen: jax.Array


def _nbytes(tree: Any) -> int:
    return sum(int(a.nbytes) for a in jax.tree.leaves(tree))


def copies_bytes(params: Any, cfg: ModelConfig, plan: ExecutionPlan) -> int:
    """About what the runner allocates beside the loaded params, as the plan lays them out: the
    embedding steps' narrowed or packed projections (made at start), and the decode steps'
    per-layer or narrowed copies and output head (made on the first generation request).
    Quantized weights are never copied."""
    def floats(tree: Any) -> int:
        return sum(int(a.nbytes) for g, names in PROJECTIONS.items()
                   for n, a in tree.get(g, {}).items()
                   if n in names and not quant.is_quantized(a))

    def ratio(dtype: str | None) -> float:
        loaded = model.compute_dtype(params)
        return jnp.dtype(dtype or loaded).itemsize / jnp.dtype(loaded).itemsize

    projections = floats(params)
    out = 0
    if not plan.embed_weights.plain:
        out += int(projections * ratio(plan.embed_weights.dtype))
    if plan.decode_layers == PER_LAYER or not plan.decode_weights.plain:
        out += int(projections * ratio(plan.decode_weights.dtype))
        has_head = cfg.tie_word_embeddings or "lm_head" in params  # base models have none
        head = model.output_head(params, cfg) if has_head else None
        if head is not None and not plan.decode_weights.plain and not quant.is_quantized(head):
            out += int(head.nbytes * ratio(plan.decode_weights.dtype))
    return out


class ModelRunner:
    def __init__(self, params: Any, cfg: ModelConfig, plan: ExecutionPlan,
                 sharding: ShardingPlan | None = None,
                 channel: multihost.StepChannel | None = None,
                 on_compile: Callable[[], None] = lambda: None) -> None:
        """sharding: the mesh the params were placed on (by that plan); step inputs and the KV
        cache go there too. None: everything on the default device. channel: on a multi-host
        run, where the leader sends each step. on_compile: called once per trace (a new step
        shape)."""
        # Quantized weights multiply where the plan says (a kernel, or XLA's ops), each path at
        # its precision: the two trees share every array.
        self.params, self.config, self.plan = params, cfg, plan
        self.sharding, self.channel = sharding, channel
        op, rows = plan.quant_op, plan.quant_kernel_rows
        self.embed_params = quant.with_op(model.with_layout(params, plan.embed_weights), op,
                                          plan.embed_passes, rows)
        params = self.params = quant.with_op(params, op, plan.generate_passes, rows)
        # The decoder module's structure, split once; each jitted step merges its params in.
        self._graph = modules.decoder_graph(cfg, plan, model.compute_dtype(params),
                                            model.param_shapes_of(cfg, params))
        self._decode_weights: DecodeWeights | None = None  # made when generation starts
        self.state: GenerationState | None = None  # allocated on the first generation step
        # Every device step (and, on a multi-host leader, the message announcing it) runs under
        # this lock, so that warm-up from a loading thread and the engine thread never interleave.
        self._lock = threading.Lock()
        self._on_compile_cb = on_compile
        self._compiled = False  # a step traced (so compiled) a new program since the last trim
        self._pooled = jax.jit(self._pooled_fn)
        self._hidden = jax.jit(self._hidden_fn)
        self._scores = jax.jit(self._scores_fn)
        # The state is donated: XLA updates the cache in place instead of copying it each step.
        # greedy (static): every row of the step greedy, as the host finds it on a plan that
        # samples without conditionals (`sampling.sample`); always False elsewhere.
        self._prefill = jax.jit(self._prefill_fn, donate_argnums=(1,),
                                static_argnames=("greedy",))
        self._decode = jax.jit(self._decode_fn, donate_argnums=(3,),
                               static_argnames=("kv_len", "greedy"))
        # A decode step in two programs, for steps under a grammar: the host builds the masks
        # while the device runs the forward (`forward`, `sample`).
        self._forward = jax.jit(self._forward_fn, donate_argnums=(3,),
                                static_argnames=("kv_len",))
        self._sample = jax.jit(self._sample_fn, static_argnames=("greedy",))
        self._apply: dict[type, Callable[[Any], Any]] = {
            EmbedStep: self._run_embed, TokenStep: self._run_tokens,
            PrefillStep: self._run_prefill,
            DecodeStep: self._run_decode}

    def _on_compile(self) -> None:
        self._compiled = True
        self._on_compile_cb()

    def _trim_after_compile(self) -> None:
        """What a compilation freed goes back to the OS (`memory.release_freed`): otherwise
        each new program's compile leaves tens of MB resident for good."""
        if self._compiled:
            self._compiled = False
            memory.release_freed()

    @property
    def scratch_slot(self) -> int:
        """The cache slot padding rows write to: one past the last real slot."""
        return self.plan.max_num_seqs

    @property
    def leader(self) -> bool:
        return self.channel is not None and self.channel.leader

    # ---- the interface -------------------------------------------------------------------

    def run(self, step: Step) -> Any:
        """Run one step: an EmbedStep gives each sequence's pooled state [slots, D] (as its
        request pools it); a TokenStep every token's state or scores (see `TokenStep`); a
        prefill or decode step (token, its logprob, top ids, top logprobs) per row: device arrays the caller reads when it needs them."""
        with self._lock:
            if self.leader:
                kind, arrays, static = step.message()
                self.channel.send(kind, multihost.flatten(arrays), static)  # type: ignore
            out = self._apply[type(step)](step)
            self._trim_after_compile()
            return out

    def forward(self, step: DecodeStep) -> Pending:
        """The first half of a decode step: its forward, dispatched; `sample` draws the tokens
        from what it returns, with rows (and masks) the host may build meanwhile. One process
        only: a multi-host leader runs whole steps, masks in their rows."""
        assert self.channel is None, "a multi-host run decodes in whole steps"
        weights = self.decode_weights
        tokens = step.tokens if isinstance(step.tokens, jax.Array) else self._put(step.tokens)
        positions, slots = self._put((step.positions, step.slots))
        with self._lock:
            self.state, *out = self._forward(weights.params, weights.layers, weights.head,
                                             self._ensure_state(), tokens, positions, slots,
                                             kv_len=step.kv_len)
            self._trim_after_compile()
        return Pending(*out)

    def sample(self, pending: Pending, rows: dict[str, Any]) -> Any:
        """The second half: the tokens drawn from a dispatched forward, as `run` gives a decode
        step's (token, its logprob, top ids, top logprobs)."""
        with self._lock:
            out = self._sample(pending.logits, pending.counts, pending.seen, self._put(rows),
                               greedy=self._greedy(rows))
            self._trim_after_compile()
            return out

    def compile_embed(self, rows: int, length: int, slots: int) -> None:
        """Compile an embedding step's shape ahead of traffic, without running it: the compiled
        step lands in the caches a call reads, and running it would cost a forward pass per shape
        (about 0.2 s each for SmolLM2 on a CPU) before a server may answer. A multi-host leader
        runs it instead: its followers compile as they run."""
        step = EmbedStep.empty(rows, length, slots)
        if self.channel is not None:
            jax.block_until_ready(self.run(step))
            return
        self._pooled.lower(self.embed_params, *self._put(step.inputs())).compile()
        self._trim_after_compile()

    def follow(self) -> None:
        """On a multi-host follower: run every step the leader sends, in its order, until the
        leader stops. Outputs stay on the devices: only the leader answers requests."""
        assert self.channel is not None and not self.channel.leader
        while True:
            kind, arrays, static = self.channel.receive()
            if kind == multihost.STOP:
                return
            if kind == multihost.IDLE:
                continue
            step = from_message(kind, multihost.unflatten(arrays), static)
            try:
                jax.block_until_ready(self._apply[type(step)](step))
            except Exception:  # the leader's step failed alike; it fails its requests and goes on
                log.exception("%s step failed", kind)
                self.recover()

    def send(self, kind: str) -> None:
        """A multi-host leader's control message (idle, stop) to its followers."""
        if self.leader:
            with self._lock:
                self.channel.send(kind)  # type: ignore[union-attr]

    def recover(self) -> bool:
        """After a failed step the donated state may be gone: drop it (a fresh one is made on
        the next generation step). True if it was lost, and with it every running sequence."""
        state = self.state
        if state is not None and not any(x.is_deleted() for x in jax.tree.leaves(state)):
            return False
        self.state = None
        return True

    def sync(self) -> None:
        """Wait for the generation state to be computed (after warm-up)."""
        self.state = jax.block_until_ready(self.state)

    @property
    def decode_weights(self) -> DecodeWeights:
        """The weights decode steps read, made on first use: an engine that only embeds never
        holds a second copy."""
        if self._decode_weights is None:
            cfg, layout = self.config, self.plan.decode_weights
            layers = model.split_layers(self.params, cfg, layout) \
                if self.plan.decode_layers == PER_LAYER else None
            stacked = self.params if layers is not None else model.with_layout(
                self.params, dataclasses.replace(layout, packed=False))
            head = model.head_with_layout(self.params, cfg, layout)
            # The embedding rows a step gathers are a sliver of what it reads.
            read = _nbytes(stacked) if layers is None else (
                _nbytes(layers) + _nbytes(model.output_head(self.params, cfg) if head is None
                                          else head) + int(self.params["final_norm"].nbytes))
            self._decode_weights = DecodeWeights(stacked, layers, head, read)
        return self._decode_weights

    # ---- the jitted programs -----------------------------------------------------------------

    def _pooled_fn(self, params: Any, tokens: jax.Array, positions: jax.Array,
                   segment_ids: jax.Array, seq_index: jax.Array, pick_index: jax.Array
                   ) -> jax.Array:
        self._on_compile()  # runs once per trace, i.e. once per new step shape
        decoder = modules.bind(self._graph, params)
        return self._replicate(decoder.pooled(tokens, positions, segment_ids, seq_index,
                                              pick_index))

    def _hidden_fn(self, params: Any, tokens: jax.Array, positions: jax.Array,
                   segment_ids: jax.Array) -> jax.Array:
        self._on_compile()
        decoder = modules.bind(self._graph, params)
        return self._replicate(decoder(tokens, positions, segment_ids).astype(jnp.float32))

    def _scores_fn(self, params: Any, tokens: jax.Array, positions: jax.Array,
                   segment_ids: jax.Array, targets: jax.Array) -> tuple[jax.Array, ...]:
        self._on_compile()
        decoder = modules.bind(self._graph, params)
        return self._replicate(decoder.token_scores(tokens, positions, segment_ids, targets,
                                                    sampling.TOP_LOGPROBS))

    def _prefill_fn(self, params: Any, state: GenerationState, tokens: jax.Array,
                    positions: jax.Array, segment_ids: jax.Array, slots: jax.Array,
                    last_col: jax.Array, rows: dict[str, jax.Array], greedy: bool = False
                    ) -> tuple[Any, ...]:
        self._on_compile()
        decoder = modules.bind(self._graph, params)
        kv, hidden = decoder.prefill(state.kv, tokens, positions, segment_ids, slots, last_col)
        scratch = state.counts.shape[0] - 1
        counts = state.counts.at[slots].set(0)
        seen = state.seen.at[slots].set(False)
        seen = seen.at[jnp.where(segment_ids > 0, slots[:, None], scratch), tokens].set(True)
        out = sampling.sample(decoder.logits(hidden), counts[slots], seen[slots], rows,
                              self.plan.branchless_sampling, greedy)
        return self._new_state(kv, counts, seen), *self._replicate(out)

    def _forward_body(self, params: Any, layers: Any, head: Any, state: GenerationState,
                      tokens: jax.Array, positions: jax.Array, slots: jax.Array, kv_len: int
                      ) -> tuple[Any, ...]:
        """A decode step's forward: the new state, and the rows' logits [B, V] with their
        slots' counts and seen flags [B, V], what sampling reads."""
        decoder = modules.bind(self._graph, params)
        kv, hidden = decoder.decode(state.kv, tokens, positions, slots, kv_len, layers)
        # The fed token is the one drawn last step: it now counts for the penalties. The scratch
        # row comes along unchanged: a scatter of one row would become a dynamic update, for
        # which XLA copies both whole [S + 1, V] arrays (1.3 ms of a 21 ms step).
        scratch = state.counts.shape[0] - 1
        at = (jnp.append(slots, scratch), jnp.append(tokens, 0))
        real = jnp.arange(len(slots) + 1) < len(slots)
        counts = state.counts.at[at].add(real.astype(jnp.int32))
        seen = state.seen.at[at].max(real)
        return (self._new_state(kv, counts, seen), decoder.logits(hidden, head), counts[slots],
                seen[slots])

    def _decode_fn(self, params: Any, layers: Any, head: Any, state: GenerationState,
                   tokens: jax.Array, positions: jax.Array, slots: jax.Array,
                   rows: dict[str, jax.Array], kv_len: int, greedy: bool = False
                   ) -> tuple[Any, ...]:
        self._on_compile()
        state, logits, counts, seen = self._forward_body(params, layers, head, state, tokens,
                                                         positions, slots, kv_len)
        return state, *self._replicate(sampling.sample(logits, counts, seen, rows,
                                                      self.plan.branchless_sampling, greedy))

    def _forward_fn(self, params: Any, layers: Any, head: Any, state: GenerationState,
                    tokens: jax.Array, positions: jax.Array, slots: jax.Array, kv_len: int
                    ) -> tuple[Any, ...]:
        self._on_compile()
        return self._forward_body(params, layers, head, state, tokens, positions, slots, kv_len)

    def _sample_fn(self, logits: jax.Array, counts: jax.Array, seen: jax.Array,
                   rows: dict[str, jax.Array], greedy: bool = False) -> tuple[jax.Array, ...]:
        self._on_compile()
        return self._replicate(sampling.sample(logits, counts, seen, rows,
                                               self.plan.branchless_sampling, greedy))

    # ---- running steps -----------------------------------------------------------------------

    def _run_embed(self, step: EmbedStep) -> Any:
        return self._pooled(self.embed_params, *self._put(step.inputs()))

    def _run_tokens(self, step: TokenStep) -> Any:
        # Hidden states are an embedding's, read through the embedding path's weights; scores
        # are generation's, read through the weights a prefill reads, so that a prompt's
        # log-probabilities are the ones its generation would give.
        if step.score:
            return self._scores(self.params, *self._put(step.inputs()))
        return self._hidden(self.embed_params, *self._put(step.inputs()[:3]))

    def _run_prefill(self, step: PrefillStep) -> Any:
        a = self._put((step.tokens, step.positions, step.segment_ids, step.slots, step.last_col,
                       step.rows))
        self.state, *out = self._prefill(self.params, self._ensure_state(), *a,
                                         greedy=self._greedy(step.rows))
        return out

    def _run_decode(self, step: DecodeStep) -> Any:
        weights = self.decode_weights
        tokens = step.tokens if isinstance(step.tokens, jax.Array) else self._put(step.tokens)
        positions, slots, rows = self._put((step.positions, step.slots, step.rows))
        self.state, *out = self._decode(weights.params, weights.layers, weights.head,
                                        self._ensure_state(), tokens, positions, slots, rows,
                                        kv_len=step.kv_len, greedy=self._greedy(step.rows))
        return out

    def _greedy(self, rows: dict[str, Any]) -> bool:
        """The step's sampling variant: greedy where the plan samples without conditionals and
        every row is greedy (decided from the host's rows, so a follower decides alike)."""
        return self.plan.branchless_sampling and sampling.greedy_only(rows)

    def _ensure_state(self) -> GenerationState:
        if self.state is None:
            cfg, plan = self.config, self.plan
            s = plan.max_num_seqs

            def zeros() -> GenerationState:
                kv = KVCache.zeros(cfg, s, plan.max_model_len, plan.kv_storage,
                                   per_layer=plan.kv_per_layer)
                return self._new_state(kv, jnp.zeros((s + 1, cfg.vocab_size), jnp.int32),
                                       jnp.zeros((s + 1, cfg.vocab_size), bool))

            # On a mesh the zeros are made in place, each device only its share of the cache.
            self.state = zeros() if self.sharding is None else jax.jit(zeros)()
        return self.state

    # ---- placement -------------------------------------------------------------------------

    def _new_state(self, kv: KVCache, counts: jax.Array, seen: jax.Array) -> GenerationState:
        """Inside a jitted step (or making the zeros): the cache keeps the layout it came in
        with (sharded by kv heads), so the donated buffers are reused in place step after step;
        the counts are replicated."""
        if self.sharding is not None:
            sp = self.sharding
            kv = kv.map(lambda name, c: jax.lax.with_sharding_constraint(
                c, cache_sharding(sp, name, kv.per_layer)))
            counts, seen = self._replicate((counts, seen))
        return GenerationState(kv, counts, seen)

    def _replicate(self, tree: Any) -> Any:
        """Inside a jitted step: outputs the host reads whole on every device, whatever layout
        the partitioner would have left them in."""
        if self.sharding is None:
            return tree
        return jax.lax.with_sharding_constraint(tree, replicated(self.sharding))

    def _put(self, arrays: Any) -> Any:
        """A step's host inputs, on the mesh (replicated) when there is one; otherwise as they
        are (jit moves them to the default device)."""
        if self.sharding is None:
            return arrays
        return jax.device_put(arrays, replicated(self.sharding))
