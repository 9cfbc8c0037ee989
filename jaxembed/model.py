"""The decoder of every family as pure functions over a params pytree.

Params are plain nested dicts of arrays; no module holds state. Layer params are stacked on a leading
axis and run with `lax.scan`, so compile time does not grow with depth. Where layers differ only in
data (sliding or full attention, local or global rope) the difference rides along the scan as
per-layer values; where they differ in shape (a dense MLP among mixture-of-experts layers) the
layers run as consecutive scans. Every leaf has a logical axis name per dimension (`param_axes`) for
sharding rules to map onto a device mesh.

Shapes: B rows, T tokens per row, D hidden, H query heads, K kv heads, G = H // K, Dh head dim,
R rotary dims, F mlp width, E experts, V vocab, L layers.

Several sequences may share a row ("packing"). `segment_ids` tells them apart: tokens attend only to
earlier tokens of the same segment, and segment 0 is padding. `positions` restart at 0 for every
sequence, so a packed sequence sees exactly what it would see alone.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxembed.config import DENSE, MOE, SLIDING, ModelConfig, rope_inv_freq

Params = dict[str, Any]


# ---- parameter layout ------------------------------------------------------------------------


def param_shapes(cfg: ModelConfig) -> dict[str, Any]:
    """The expected params tree: every leaf as (shape, logical axes). Matmul weights are [in, out].

    `layers` holds what every layer has (attention, norms), stacked over all L layers; `mlp` the
    dense MLPs, stacked over the dense layers only; `moe` the expert MLPs over the MoE layers.
    """
    n, d, v, dh = cfg.num_layers, cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    layers: dict[str, Any] = {
        "attn_norm": ((n, d), ("layers", "embed")),
        "wq": ((n, d, cfg.q_size), ("layers", "embed", "heads")),
        "wk": ((n, d, cfg.kv_size), ("layers", "embed", "kv_heads")),
        "wv": ((n, d, cfg.kv_size), ("layers", "embed", "kv_heads")),
        "wo": ((n, cfg.q_size, d), ("layers", "heads", "embed")),
        "mlp_norm": ((n, d), ("layers", "embed")),
    }
    if cfg.qkv_bias:
        layers["bq"] = ((n, cfg.q_size), ("layers", "heads"))
        layers["bk"] = ((n, cfg.kv_size), ("layers", "kv_heads"))
        layers["bv"] = ((n, cfg.kv_size), ("layers", "kv_heads"))
    if cfg.qk_norm:
        layers["q_norm"] = ((n, dh), ("layers", "head_dim"))
        layers["k_norm"] = ((n, dh), ("layers", "head_dim"))
    if cfg.sandwich_norm:
        layers["post_attn_norm"] = ((n, d), ("layers", "embed"))
        layers["post_mlp_norm"] = ((n, d), ("layers", "embed"))
    tree: dict[str, Any] = {
        "embed": ((v, d), ("vocab", "embed")),
        "layers": layers,
        "final_norm": ((d,), ("embed",)),
    }
    if cfg.n_dense:
        nd, f = cfg.n_dense, cfg.intermediate_size
        tree["mlp"] = {
            "w_gate": ((nd, d, f), ("layers", "embed", "mlp")),
            "w_up": ((nd, d, f), ("layers", "embed", "mlp")),
            "w_down": ((nd, f, d), ("layers", "mlp", "embed")),
        }
    if cfg.n_moe:
        nm, e, f = cfg.n_moe, cfg.num_experts, cfg.moe_intermediate_size
        tree["moe"] = {
            "router": ((nm, d, e), ("layers", "embed", "experts")),
            "w_gate": ((nm, e, d, f), ("layers", "experts", "embed", "mlp")),
            "w_up": ((nm, e, d, f), ("layers", "experts", "embed", "mlp")),
            "w_down": ((nm, e, f, d), ("layers", "experts", "mlp", "embed")),
        }
    if not cfg.tie_word_embeddings:
        tree["lm_head"] = ((d, v), ("embed", "vocab"))
    return tree


def _is_spec(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], tuple)


def param_axes(cfg: ModelConfig) -> dict[str, Any]:
    """Logical axis names for every param leaf, in the same tree structure as the params."""
    return jax.tree.map(lambda s: s[1], param_shapes(cfg), is_leaf=_is_spec)


# ---- layers ----------------------------------------------------------------------------------


def rms_norm(x: jax.Array, w: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
    # Statistics in float32 whatever the compute dtype: bf16 squares lose precision fast.
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if offset:  # gemma scales by (1 + w) in float32, then casts
        return (xf * (offset + w.astype(jnp.float32))).astype(x.dtype)
    return w * xf.astype(x.dtype)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray, cfg: ModelConfig, scale: float = 1.0
                ) -> tuple[jax.Array, jax.Array]:
    """cos, sin: [B, T, R], laid out to match the pairing the family rotates."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, R/2]
    if cfg.rope_interleaved:  # pairs (x0, x1), (x2, x3), ...: each angle twice in a row
        angles = jnp.repeat(angles, 2, axis=-1)
    else:  # halves (x0, x_{R/2}), ...: the angles twice over
        angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, cfg: ModelConfig) -> jax.Array:
    """x: [B, T, N, Dh]; cos/sin: [B, T, R]. Dims past R pass through (partial rotary)."""
    r = cfg.rotary_dim
    xr = x[..., :r].astype(jnp.float32)
    if cfg.rope_interleaved:
        pairs = xr.reshape(*xr.shape[:-1], r // 2, 2)
        rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(xr.shape)
    else:
        rotated = jnp.concatenate([-xr[..., r // 2 :], xr[..., : r // 2]], axis=-1)
    out = (xr * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)
    return out if r == x.shape[-1] else jnp.concatenate([out, x[..., r:]], axis=-1)


def attention_masks(segment_ids: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """[B, T, T] bool, full and sliding: within one segment, causal unless the model is not.

    Padding (segment 0) attends to earlier padding, itself included, so no row of scores is all
    masked (which would give NaN); real tokens never see it because the segments differ.
    """
    t = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    seen = (j <= i) if cfg.causal else np.ones((t, t), bool)
    full = same & jnp.asarray(seen)[None]
    if SLIDING not in cfg.layer_types:
        return full, full
    # Within one segment index distance equals position distance: a window over positions.
    return full, same & jnp.asarray(seen & (np.abs(i - j) < cfg.sliding_window))[None]


def attention(p: Params, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
              cfg: ModelConfig) -> jax.Array:
    b, t, _ = x.shape
    k_heads, dh = cfg.num_kv_heads, cfg.head_dim
    g = cfg.num_heads // k_heads
    q, k, v = x @ p["wq"], x @ p["wk"], x @ p["wv"]  # [B, T, H*Dh], [B, T, K*Dh] x2
    if cfg.qkv_bias:
        q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
    q = q.reshape(b, t, cfg.num_heads, dh)
    k = k.reshape(b, t, k_heads, dh)
    v = v.reshape(b, t, k_heads, dh)
    if cfg.qk_norm:
        q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps, cfg.norm_offset)
        k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps, cfg.norm_offset)
    q = apply_rope(q, cos, sin, cfg).reshape(b, t, k_heads, g, dh)  # [B, T, K, G, Dh]
    k = apply_rope(k, cos, sin, cfg)
    # Queries go in blocks, each against only the keys at or before its end: causal masking
    # makes the rest zero, so this skips nearly half the work, and each block's scores stay
    # small enough to be cache-friendly.
    block = attention_block(t)
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t) if cfg.causal else t
        stop = min(start + block, t)
        outs.append(_attend(q[:, start:stop], k[:, :end], v[:, :end], mask[:, start:stop, :end],
                            cfg))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
    return out.reshape(b, t, cfg.q_size) @ p["wo"]


def attention_block(t: int) -> int:
    """Queries per attention block: 64, or T/16 for long rows (to bound the unrolled blocks)."""
    return max(64, -(-t // 16))


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, cfg: ModelConfig
            ) -> jax.Array:
    """q: [B, C, K, G, Dh] against k, v: [B, S, K, Dh] under mask [B, C, S] -> [B, C, K, G, Dh]."""
    # Scores and softmax in float32: bf16 loses the tail of the distribution at long T.
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * cfg.query_scale
    if cfg.attn_softcap:
        scores = jnp.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # [B, K, G, C, S]
    return jnp.einsum("bkgts,bskd->btkgd", probs, v)


def _act(x: jax.Array, cfg: ModelConfig) -> jax.Array:
    return jax.nn.gelu(x, approximate=True) if cfg.activation == "gelu_tanh" else jax.nn.silu(x)


def mlp(p: Params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Gated MLP: down(act(gate(x)) * up(x))."""
    return (_act(x @ p["w_gate"], cfg) * (x @ p["w_up"])) @ p["w_down"]


def moe(p: Params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Top-k mixture of experts, computed only for the experts each token chose.

    Each (token, choice) pair is sorted by expert so that `ragged_dot` runs every expert over a
    contiguous group of rows; results are weighted and scattered back to their tokens.
    """
    b, t, d = x.shape
    n, k, e = b * t, cfg.num_experts_per_tok, cfg.num_experts
    flat = x.reshape(n, d)
    probs = jax.nn.softmax((flat @ p["router"]).astype(jnp.float32), axis=-1)  # [N, E]
    weights, chosen = jax.lax.top_k(probs, k)  # [N, k]
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdims=True)
    order = jnp.argsort(chosen.reshape(-1), stable=True)  # [N*k]
    token = order // k
    sizes = jnp.bincount(chosen.reshape(-1), length=e).astype(jnp.int32)  # [E]
    rows = flat[token]  # [N*k, D]
    h = _act(jax.lax.ragged_dot(rows, p["w_gate"], sizes), cfg) * jax.lax.ragged_dot(
        rows, p["w_up"], sizes)
    out = jax.lax.ragged_dot(h, p["w_down"], sizes)  # [N*k, D]
    out = out * weights.reshape(-1)[order][:, None].astype(out.dtype)
    return jnp.zeros_like(flat).at[token].add(out).reshape(b, t, d)


def decoder_layer(p: Params, ffn: Params, kind: str, x: jax.Array, cos: jax.Array, sin: jax.Array,
                  mask: jax.Array, cfg: ModelConfig) -> jax.Array:
    eps, off = cfg.rms_norm_eps, cfg.norm_offset
    a = attention(p, rms_norm(x, p["attn_norm"], eps, off), cos, sin, mask, cfg)
    if cfg.sandwich_norm:
        a = rms_norm(a, p["post_attn_norm"], eps, off)
    x = x + a
    h = rms_norm(x, p["mlp_norm"], eps, off)
    m = moe(ffn, h, cfg) if kind == MOE else mlp(ffn, h, cfg)
    if cfg.sandwich_norm:
        m = rms_norm(m, p["post_mlp_norm"], eps, off)
    return x + m


# ---- the model -------------------------------------------------------------------------------


def _rope(positions: jax.Array, segment_ids: jax.Array, cfg: ModelConfig
          ) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """(cos, sin) for global and for sliding layers."""
    rs = cfg.rope_scaling
    if rs.kind == "longrope":
        # Long-rope picks its factors per sequence, by that sequence's own length, so that
        # packing and batching never change a result.
        lengths = (segment_ids[:, :, None] == segment_ids[:, None, :]).sum(-1)  # [B, T]
        long = (lengths > rs.original_max_position_embeddings)[..., None]
        short_t = rope_tables(positions, rope_inv_freq(cfg), cfg, rs.attention_factor)
        long_t = rope_tables(positions, rope_inv_freq(cfg, long=True), cfg, rs.attention_factor)
        glob = (jnp.where(long, long_t[0], short_t[0]), jnp.where(long, long_t[1], short_t[1]))
    else:
        glob = rope_tables(positions, rope_inv_freq(cfg), cfg)
    if cfg.rope_local_theta is None or SLIDING not in cfg.layer_types:
        return glob, glob
    return glob, rope_tables(positions, rope_inv_freq(cfg, theta=cfg.rope_local_theta), cfg)


def _runs(cfg: ModelConfig) -> list[tuple[str, int, int, int]]:
    """Consecutive layers of one MLP kind: (kind, first layer, end layer, first index in kind)."""
    runs, start, seen = [], 0, {DENSE: 0, MOE: 0}
    for kind, group in itertools.groupby(cfg.mlp_layer_kinds):
        n = len(list(group))
        runs.append((kind, start, start + n, seen[kind]))
        start += n
        seen[kind] += n
    return runs


def forward(params: Params, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
            cfg: ModelConfig, kv_cache: Any = None) -> jax.Array:
    """Final hidden states [B, T, D] (after the final norm, before the LM head).

    tokens, positions, segment_ids: [B, T] int32. `kv_cache` is reserved for decoding; prefill-only
    work (embeddings) passes None and never touches a cache.
    """
    if kv_cache is not None:
        raise NotImplementedError("decoding with a KV cache is not available yet")
    x = params["embed"][tokens]  # [B, T, D]
    if cfg.embed_scale:  # the scale is rounded to the compute dtype, as transformers does
        x = x * jnp.asarray(np.sqrt(cfg.hidden_size), dtype=x.dtype)
    (gcos, gsin), (lcos, lsin) = _rope(positions, segment_ids, cfg)
    full_mask, sliding_mask = attention_masks(segment_ids, cfg)
    is_sliding = jnp.asarray([t == SLIDING for t in cfg.layer_types])  # [L]

    for kind, lo, hi, first in _runs(cfg):
        stack = params["moe" if kind == MOE else "mlp"]

        def body(h: jax.Array, xs: tuple, kind: str = kind) -> tuple[jax.Array, None]:
            layer, ffn, sliding = xs
            cos, sin = jnp.where(sliding, lcos, gcos), jnp.where(sliding, lsin, gsin)
            mask = jnp.where(sliding, sliding_mask, full_mask)
            return decoder_layer(layer, ffn, kind, h, cos, sin, mask, cfg), None

        layers = jax.tree.map(lambda a, lo=lo, hi=hi: a[lo:hi], params["layers"])
        ffns = jax.tree.map(lambda a, f=first, n=hi - lo: a[f : f + n], stack)
        x, _ = jax.lax.scan(body, x, (layers, ffns, is_sliding[lo:hi]))
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps, cfg.norm_offset)


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
