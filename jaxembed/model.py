"""The decoder as pure functions over a params pytree.

Params are plain nested dicts of arrays; no module holds state. Layer params are stacked on a leading
`layers` axis and run with `lax.scan`, so compile time does not grow with depth. Every leaf has a
logical axis name per dimension (`param_axes`) for sharding rules to map onto a device mesh.

Shapes: B rows, T tokens per row, D hidden, H query heads, K kv heads, G = H // K, Dh head dim,
F mlp width, V vocab, L layers.

Several sequences may share a row ("packing"). `segment_ids` tells them apart: tokens attend only to
earlier tokens of the same segment, and segment 0 is padding. `positions` restart at 0 for every
sequence, so a packed sequence sees exactly what it would see alone.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxembed.config import ModelConfig, rope_inv_freq

Params = dict[str, Any]


# ---- parameter layout ------------------------------------------------------------------------


def param_shapes(cfg: ModelConfig) -> dict[str, Any]:
    """The expected params tree: every leaf as (shape, logical axes). Matmul weights are [in, out]."""
    n, d, f, v = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    layers = {
        "attn_norm": ((n, d), ("layers", "embed")),
        "wq": ((n, d, cfg.q_size), ("layers", "embed", "heads")),
        "wk": ((n, d, cfg.kv_size), ("layers", "embed", "kv_heads")),
        "wv": ((n, d, cfg.kv_size), ("layers", "embed", "kv_heads")),
        "wo": ((n, cfg.q_size, d), ("layers", "heads", "embed")),
        "mlp_norm": ((n, d), ("layers", "embed")),
        "w_gate": ((n, d, f), ("layers", "embed", "mlp")),
        "w_up": ((n, d, f), ("layers", "embed", "mlp")),
        "w_down": ((n, f, d), ("layers", "mlp", "embed")),
    }
    tree: dict[str, Any] = {
        "embed": ((v, d), ("vocab", "embed")),
        "layers": layers,
        "final_norm": ((d,), ("embed",)),
    }
    if not cfg.tie_word_embeddings:
        tree["lm_head"] = ((d, v), ("embed", "vocab"))
    return tree


def _is_spec(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], tuple)


def param_axes(cfg: ModelConfig) -> dict[str, Any]:
    """Logical axis names for every param leaf, in the same tree structure as the params."""
    return jax.tree.map(lambda s: s[1], param_shapes(cfg), is_leaf=_is_spec)


def init_params(cfg: ModelConfig, seed: int = 0, dtype: Any = jnp.float32) -> Params:
    """Random params of the right shapes (for benchmarks and tests with no checkpoint)."""
    rng = np.random.default_rng(seed)

    def make(path: tuple, spec: tuple) -> jax.Array:
        shape, _ = spec
        if str(path[-1].key).endswith("norm"):
            arr = 1.0 + 0.1 * rng.standard_normal(shape)  # norm weights: around 1, not 1
        else:
            arr = rng.standard_normal(shape) / np.sqrt(shape[-2] if len(shape) > 1 else 1)
        return jnp.asarray(arr, dtype=dtype)

    return jax.tree_util.tree_map_with_path(make, param_shapes(cfg), is_leaf=_is_spec)


# ---- layers ----------------------------------------------------------------------------------


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    # Statistics in float32 whatever the compute dtype: bf16 squares lose precision fast.
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * xf.astype(x.dtype)


def rope_tables(positions: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos, sin: [B, T, Dh] for half-split ("rotate_half") rotary embeddings."""
    inv_freq = jnp.asarray(rope_inv_freq(cfg))  # [Dh/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, T, N, Dh]; cos/sin: [B, T, Dh]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x.astype(jnp.float32) * cos[:, :, None] + rotated.astype(jnp.float32) * sin[:, :, None]
    return out.astype(x.dtype)


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, T, T] bool: causal, within one segment.

    Padding (segment 0) attends to earlier padding, itself included, so no row of scores is all
    masked (which would give NaN); real tokens never see it because the segments differ.
    """
    t = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    return same & causal[None]


def attention(p: Params, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
              cfg: ModelConfig) -> jax.Array:
    b, t, _ = x.shape
    k_heads, dh = cfg.num_kv_heads, cfg.head_dim
    g = cfg.num_heads // k_heads
    q = (x @ p["wq"]).reshape(b, t, cfg.num_heads, dh)  # [B, T, H, Dh]
    k = (x @ p["wk"]).reshape(b, t, k_heads, dh)  # [B, T, K, Dh]
    v = (x @ p["wv"]).reshape(b, t, k_heads, dh)
    q = apply_rope(q, cos, sin).reshape(b, t, k_heads, g, dh)  # [B, T, K, G, Dh]
    k = apply_rope(k, cos, sin)
    # Scores and softmax in float32: bf16 loses the tail of the distribution at long T.
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (dh**-0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # [B, K, G, T, S]
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, cfg.q_size)
    return out @ p["wo"]


def mlp(p: Params, x: jax.Array) -> jax.Array:
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    return (jax.nn.silu(x @ p["w_gate"]) * (x @ p["w_up"])) @ p["w_down"]


def decoder_layer(p: Params, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                  cfg: ModelConfig) -> jax.Array:
    x = x + attention(p, rms_norm(x, p["attn_norm"], cfg.rms_norm_eps), cos, sin, mask, cfg)
    return x + mlp(p, rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps))


# ---- the model -------------------------------------------------------------------------------


def forward(params: Params, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
            cfg: ModelConfig, kv_cache: Any = None) -> jax.Array:
    """Final hidden states [B, T, D] (after the final norm, before the LM head).

    tokens, positions, segment_ids: [B, T] int32. `kv_cache` is reserved for decoding; prefill-only
    work (embeddings) passes None and never touches a cache.
    """
    if kv_cache is not None:
        raise NotImplementedError("decoding with a KV cache is not available yet")
    x = params["embed"][tokens]  # [B, T, D]
    cos, sin = rope_tables(positions, cfg)
    mask = attention_mask(segment_ids)

    def body(h: jax.Array, layer: Params) -> tuple[jax.Array, None]:
        return decoder_layer(layer, h, cos, sin, mask, cfg), None

    x, _ = jax.lax.scan(body, x, params["layers"])
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps)


def pooled(params: Params, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
           seq_index: jax.Array, last_index: jax.Array, cfg: ModelConfig
           ) -> tuple[jax.Array, jax.Array]:
    """Per-sequence mean and last-token hidden states, both float32 [N, D].

    seq_index: [B, T] the sequence each token belongs to, N for padding (dropped);
    last_index: [N] flat index (row * T + col) of each sequence's last token.
    """
    hidden = forward(params, tokens, positions, segment_ids, cfg)
    b, t, d = hidden.shape
    n = last_index.shape[0]
    flat = hidden.reshape(b * t, d).astype(jnp.float32)
    ids = seq_index.reshape(b * t)
    sums = jax.ops.segment_sum(flat, ids, num_segments=n + 1)[:n]  # [N, D]
    counts = jax.ops.segment_sum(jnp.ones_like(ids, jnp.float32), ids, num_segments=n + 1)[:n]
    mean = sums / jnp.maximum(counts, 1.0)[:, None]
    last = flat[last_index]  # [N, D]
    return mean, last
