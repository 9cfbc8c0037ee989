"""The decoder as a Flax NNX module: `Decoder(cfg)`, whose state is the params pytree the loader
fills.

Its `nnx.Param` leaves are named and nested as the loader's tree (`embed`, `layers.wq`,
`mlp.w_down`, ...: `model.param_shapes`), each carrying its logical axes for sharding rules, so
`nnx.state(decoder)` as a pure dict *is* a checkpoint's params, and a loaded checkpoint becomes a
module with `Decoder.from_params`. The layer math is the pure functions of `jaxembed.model`, which
the module's methods apply to its own state, with the ops the execution plan chose.

NNX, not linen: its modules hold their state as attributes, so the loader's tree maps onto the
module field for field, with no `apply` and no variable collections in between, and a notebook
gets an object it can print and call. The engine never walks the module graph on a step: it
splits an abstract decoder once (`decoder_graph`, no memory allocated) and merges the step's params
into it inside the jitted function (`bind`), so the graph work happens at trace time only and the
compiled programs are those of the pure functions.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxembed import model
from jaxembed.config import ModelConfig
from jaxembed.kv_cache import KVCache
from jaxembed.plan import ExecutionPlan

Params = dict[str, Any]


class Group(nnx.Module):
    """One group of the params tree (`layers`: attention and norms of every layer; `mlp`: the
    dense MLPs; `moe`: the experts), its weights stacked over the layers that have them."""

    def __init__(self, shapes: dict[str, Any], dtype: Any) -> None:
        for name, (shape, axes) in shapes.items():
            setattr(self, name, nnx.Param(jnp.zeros(shape, dtype), logical_axes=axes))


class Decoder(nnx.Module):
    """Every family's decoder, told apart by `config` (data, not subclasses).

    Shapes: B rows, T tokens a row, D hidden, V vocabulary (see `jaxembed.model`)."""

    def __init__(self, config: ModelConfig, plan: ExecutionPlan | None = None,
                 dtype: Any = jnp.float32, shapes: dict[str, Any] | None = None) -> None:
        """Zeros of the config's shapes (`from_params` fills a decoder without making them).
        plan: the ops the decoder runs with (None: XLA's own). shapes: the params' own
        (`model.param_shapes_of`, merged projections included), if not the config's."""
        self.config = config
        self.plan = plan
        for name, spec in (shapes or model.param_shapes(config)).items():
            if model.is_param_spec(spec):
                shape, axes = spec
                setattr(self, name, nnx.Param(jnp.zeros(shape, dtype), logical_axes=axes))
            else:
                setattr(self, name, Group(spec, dtype))

    @classmethod
    def from_params(cls, config: ModelConfig, params: Params,
                    plan: ExecutionPlan | None = None) -> Decoder:
        """The decoder holding a checkpoint's params (shared, not copied)."""
        return bind(decoder_graph(config, plan, _dtype(params),
                                  model.param_shapes_of(config, params)), params)

    def params(self) -> Params:
        """The state as the plain params pytree (the arrays themselves)."""
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """Final hidden states [B, T, D] (after the final norm) of token ids [B, T]: what the
        engine pools. By default each row is one sequence from position 0."""
        tokens = jnp.asarray(tokens)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.ones(tokens.shape, jnp.int32)
        return model.forward(self.params(), tokens, positions, segment_ids, self.config,
                             self.plan)

    def pooled(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               seq_index: jax.Array, pick_index: jax.Array) -> jax.Array:
        """Each packed sequence's pooled state, its mean or one token (see `model.pooled`)."""
        return model.pooled(self.params(), tokens, positions, segment_ids, seq_index,
                            pick_index, self.config, self.plan)

    def token_scores(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                     targets: jax.Array, top: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Each packed token's next-token log-probabilities (see `model.token_scores`)."""
        return model.token_scores(self.params(), tokens, positions, segment_ids, targets,
                                  self.config, top, self.plan)

    def prefill(self, cache: KVCache, tokens: jax.Array, positions: jax.Array,
                segment_ids: jax.Array, slots: jax.Array, last_col: jax.Array
                ) -> tuple[KVCache, jax.Array]:
        """Prompts into cache slots; the last prompt token's state [B, D] (see `model.prefill`)."""
        return model.prefill(self.params(), cache, tokens, positions, segment_ids, slots,
                             last_col, self.config, self.plan)

    def decode(self, cache: KVCache, tokens: jax.Array, positions: jax.Array, slots: jax.Array,
               kv_len: int, layers: list[tuple[Params, Params]] | None = None
               ) -> tuple[KVCache, jax.Array]:
        """One token for each running sequence (see `model.decode`); layers: per-layer copies of
        the weights to read instead of the stacked ones (`model.split_layers`)."""
        return model.decode(self.params(), cache, tokens, positions, slots, kv_len, self.config,
                            layers, self.plan)

    def logits(self, hidden: jax.Array, head: Any = None) -> jax.Array:
        """Next-token logits, float32 [..., V]; head: a copy of the output head laid out for
        decoding (`model.head_with_layout`)."""
        return model.logits(self.params(), hidden, self.config, head)


def _dtype(params: Params) -> Any:
    return model.compute_dtype(params)


def decoder_graph(config: ModelConfig, plan: ExecutionPlan | None = None,
                  dtype: Any = jnp.float32, shapes: dict[str, Any] | None = None
                  ) -> tuple[nnx.GraphDef, nnx.State]:
    """The decoder's structure, and its abstract state, made once without allocating it.
    shapes: as `Decoder`'s."""
    return nnx.split(nnx.eval_shape(lambda: Decoder(config, plan, dtype, shapes)))


def bind(graph: tuple[nnx.GraphDef, nnx.State], params: Params) -> Decoder:
    """The decoder of `graph` holding `params` (any layout of them: narrowed or packed copies
    included). Cheap under `jax.jit`, where it runs once per trace."""
    graphdef, abstract = graph
    state = jax.tree.map(lambda x: x, abstract)  # a fresh State: the abstract one is kept
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)
