"""The KV cache: keys and values of every layer for S sequence slots of M positions each.

Each of `k` and `v` is [L, S + 1, K, M, Dh] (stacked), or a list of L buffers [S + 1, K, M, Dh]
(per layer, to go with per-layer decode weights: XLA updates separate buffers in place where it
would copy a stacked one). The extra last slot is scratch: padding rows of a step write there, so a
step's shape never depends on how many slots are busy. The cache knows its layout and storage
dtype; the model asks it, never the arrays' types.

Heads come before positions, so that a decode step's attention (batched over row and kv head)
reads each head's first positions as one contiguous run: in the [slot, M, K, Dh] order XLA made a
transposed copy of both every layer (a traced 16-row SmolLM2 step: 9.8 ms of cache gathers and
scatters then, 7.0 with heads first). Keys once kept positions last ([K, Dh, M], so that XLA's
score product reads them untransposed), but then a token's key is Dh values a row of M apart,
each on a page of its own, and `kernels.decode_attention` spent most of its time writing and
reading keys across pages.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxembed.config import ModelConfig

CACHE_ORDER = (0, 2, 1, 3)  # [S, T, K, Dh] -> the cache's order

# A cache of dtype BF16_BITS holds bfloat16 values as their bit patterns. XLA's CPU backend
# scatters and gathers bfloat16 arrays element by element through conversions, 10-20x slower than
# float32, while 16-bit integers it moves as plain data: half float32's bytes at full speed.
BF16_BITS = jnp.uint16


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: Any  # jax.Array [L, S + 1, K, M, Dh], or a list of L arrays [S + 1, K, M, Dh]
    v: Any
    per_layer: bool = dataclasses.field(default=False, metadata={"static": True})

    @classmethod
    def zeros(cls, cfg: ModelConfig, slots: int, max_len: int, dtype: Any,
              per_layer: bool = False) -> KVCache:
        shape = (slots + 1, cfg.num_kv_heads, max_len, cfg.head_dim)
        if per_layer:
            return cls(*([jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)]
                         for _ in "kv"), per_layer=True)
        return cls(*(jnp.zeros((cfg.num_layers, *shape), dtype) for _ in "kv"))

    @property
    def dtype(self) -> Any:
        """The storage dtype (BF16_BITS for bfloat16 kept as bits)."""
        return (self.k[0] if self.per_layer else self.k).dtype

    @property
    def scratch_slot(self) -> int:
        return (self.k[0].shape[0] if self.per_layer else self.k.shape[1]) - 1

    def map(self, fn: Any) -> KVCache:
        """fn(name, buffer) applied to each buffer ("k" or "v"; each layer's, when per layer)."""
        def each(name: str, c: Any) -> Any:
            return [fn(name, b) for b in c] if self.per_layer else fn(name, c)
        return dataclasses.replace(self, k=each("k", self.k), v=each("v", self.v))

    def write_prompts(self, slots: jax.Array, keys: jax.Array, values: jax.Array) -> KVCache:
        """Every layer's keys and values [L, B, T, K, Dh] of B prompts, into rows `slots` [B]
        from position 0."""
        cols = slice(0, keys.shape[2])
        if self.per_layer:
            return dataclasses.replace(
                self, k=[write(c, slots, cols, keys[i]) for i, c in enumerate(self.k)],
                v=[write(c, slots, cols, values[i]) for i, c in enumerate(self.v)])
        lead = (slice(None),)
        return dataclasses.replace(self, k=write(self.k, slots, cols, keys, lead),
                                   v=write(self.v, slots, cols, values, lead))


def to_cache(x: jax.Array, dtype: Any) -> jax.Array:
    """Values as a cache of `dtype` stores them."""
    if dtype == BF16_BITS:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), BF16_BITS)
    return x.astype(dtype)


def from_cache(x: jax.Array, dtype: Any) -> jax.Array:
    """Values read from a cache, as `dtype`."""
    if x.dtype == BF16_BITS:
        x = jax.lax.bitcast_convert_type(x, jnp.bfloat16)
    return x.astype(dtype)


def write(c: jax.Array, slots: jax.Array, pos: Any, x: jax.Array, lead: tuple = ()
          ) -> jax.Array:
    """c [*lead, S + 1, ...] with x written at (slots [B], positions pos), past the leading
    indices `lead`: pos an int array [B] and x [B, 1, K, Dh]; or pos a slice of T positions and
    x [*lead, B, T, K, Dh]."""
    index = (*lead, slots, slice(None), pos)
    if isinstance(pos, slice):
        n = len(lead)
        order = (*range(n), *(n + o for o in CACHE_ORDER))
        return c.at[index].set(to_cache(x.transpose(order), c.dtype))
    # Index arrays apart from each other put their axis [B] first: x as [B, K, Dh].
    return c.at[index].set(to_cache(x[:, 0], c.dtype))


def read(c: jax.Array, slots: jax.Array, kv_len: int, lead: tuple = ()) -> jax.Array:
    """The first kv_len positions of rows `slots`: [B, K, S, Dh]."""
    return c[(*lead, slots, slice(None), slice(0, kv_len))]
