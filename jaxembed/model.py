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

from jaxembed import kernels
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


# The weights `linear` multiplies (attention projections and dense MLPs), by params group.
PROJECTIONS = {"layers": ("wq", "wk", "wv", "wo"), "mlp": ("w_gate", "w_up", "w_down")}


def _narrow(group: str, tree: Params, dtype: Any, pack: bool = False) -> Params:
    """One params group with its projection weights cast to dtype (None: kept in their own).
    pack: in `kernels.pack`'s layout for that type instead, where their shape and type allow,
    for `kernels.matmul`."""
    if dtype is None and not pack:
        return tree
    names = PROJECTIONS.get(group, ())

    def narrow(a: jax.Array) -> jax.Array:
        kind = dtype or a.dtype
        return kernels.pack(a, kind) if pack and kernels.packable(a, kind) else a.astype(kind)
    return {n: narrow(a) if n in names else a for n, a in tree.items()}


def with_projection_dtype(params: Params, dtype: Any, pack: bool = False) -> Params:
    """params with the projection weights cast to dtype (or packed: see `_narrow`); every other
    array is shared as is."""
    return {g: _narrow(g, tree, dtype, pack) if g in PROJECTIONS else tree
            for g, tree in params.items()}


def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., D] @ w [D, N]. A weight kept in a narrower type than the activations (bfloat16
    under float32) is multiplied in its type and accumulated in the activations': a CPU with
    bf16 dot instructions runs those products at twice the fp32 rate, while norms, attention and
    the residual stream stay in fp32."""
    if kernels.is_packed(w):  # [N / 16, D / 2, ...]
        return kernels.matmul(x, w).astype(x.dtype)
    if w.dtype == x.dtype:
        return x @ w
    return jnp.dot(x.astype(w.dtype), w, preferred_element_type=x.dtype)


def project_qkv(p: Params, x: jax.Array, cos: jax.Array, sin: jax.Array, cfg: ModelConfig
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries [B, T, K, G, Dh] and keys, values [B, T, K, Dh], rope applied."""
    b, t, _ = x.shape
    k_heads, dh = cfg.num_kv_heads, cfg.head_dim
    g = cfg.num_heads // k_heads
    q, k, v = linear(x, p["wq"]), linear(x, p["wk"]), linear(x, p["wv"])  # [B,T,H*Dh], [B,T,K*Dh]
    if cfg.qkv_bias:
        q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
    q = q.reshape(b, t, cfg.num_heads, dh)
    k = k.reshape(b, t, k_heads, dh)
    v = v.reshape(b, t, k_heads, dh)
    if cfg.qk_norm:
        q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps, cfg.norm_offset)
        k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps, cfg.norm_offset)
    q = apply_rope(q, cos, sin, cfg).reshape(b, t, k_heads, g, dh)
    return q, apply_rope(k, cos, sin, cfg), v


def attention(p: Params, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array | None,
              cfg: ModelConfig, segments: tuple[jax.Array, jax.Array] | None = None
              ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Self-attention over the rows [B, T, D]; also returns the keys and values (for a cache).

    segments: (segment ids [B, T], window: an int32 scalar, 0 for none) to run it in
    `kernels.attention` instead, which computes only the scores the mask would keep."""
    b, t, _ = x.shape
    q, k, v = project_qkv(p, x, cos, sin, cfg)
    if segments is not None:
        out = kernels.attention(q.reshape(b, t, cfg.num_heads, cfg.head_dim), k, v, *segments,
                                scale=cfg.query_scale, softcap=cfg.attn_softcap,
                                causal=cfg.causal).astype(q.dtype)  # [B, T, H, Dh]
        return linear(out.reshape(b, t, cfg.q_size), p["wo"]), (k, v)
    assert mask is not None
    # Head-major layouts, so that each (row, kv head) product reads contiguous [T, Dh] slabs:
    # on the CPU this alone makes attention about a quarter faster than the token-major einsums.
    qh = q.transpose(0, 2, 3, 1, 4)  # [B, K, G, T, Dh]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, Dh]
    # Queries go in blocks, each against only the keys at or before its end: causal masking
    # makes the rest zero, so this skips nearly half the work, and each block's scores stay
    # small enough to be cache-friendly.
    block = attention_block(t)
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t) if cfg.causal else t
        stop = min(start + block, t)
        outs.append(_attend(qh[:, :, :, start:stop], kh[:, :, :end], vh[:, :, :end],
                            mask[:, start:stop, :end], cfg))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)  # [B, K, G, T, Dh]
    return linear(out.transpose(0, 3, 1, 2, 4).reshape(b, t, cfg.q_size), p["wo"]), (k, v)


def attention_block(t: int) -> int:
    """Queries per attention block: 64, or T/16 for long rows (to bound the unrolled blocks)."""
    return max(64, -(-t // 16))


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, cfg: ModelConfig
            ) -> jax.Array:
    """q: [B, K, G, C, Dh] against k, v: [B, K, S, Dh] under mask [B, C, S] -> [B, K, G, C, Dh]."""
    # Scores and softmax in float32: bf16 loses the tail of the distribution at long T.
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * cfg.query_scale
    if cfg.attn_softcap:
        scores = jnp.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    # The softmax's division is applied to the [C, Dh] output rather than the [C, S] weights:
    # one pass fewer over the largest array here.
    e = jnp.exp(scores - scores.max(axis=-1, keepdims=True))  # [B, K, G, C, S]
    out = jnp.einsum("bkgts,bksd->bkgtd", e.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return (out / e.sum(axis=-1, keepdims=True)).astype(v.dtype)


def _attend_one(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, cfg: ModelConfig
                ) -> jax.Array:
    """One query per row: q [B, 1, K, G, Dh] against the cache's keys and values [B, K, S, Dh]
    under mask [B, 1, S] -> [B, 1, K, G, Dh].

    As batched products over (row, kv head), each [G, Dh] x [S, Dh]^T then [G, S] x [S, Dh]:
    small as they are, on a CPU they beat a fused multiply-reduce over the cache (SmolLM2: 2-3x
    for one row at KV length 256 to 1024, 1.3x for 16 rows at 256)."""
    scores = jnp.einsum("bkgd,bksd->bkgs", q[:, 0], k,
                        preferred_element_type=jnp.float32) * cfg.query_scale  # [B, K, G, S]
    if cfg.attn_softcap:
        scores = jnp.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
    scores = jnp.where(mask[:, 0, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)  # over S
    out = jnp.einsum("bkgs,bksd->bkgd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)  # [B, K, G, Dh]
    return out[:, None].astype(q.dtype)


def _act(x: jax.Array, cfg: ModelConfig) -> jax.Array:
    return jax.nn.gelu(x, approximate=True) if cfg.activation == "gelu_tanh" else jax.nn.silu(x)


def mlp(p: Params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Gated MLP: down(act(gate(x)) * up(x))."""
    return linear(_act(linear(x, p["w_gate"]), cfg) * linear(x, p["w_up"]), p["w_down"])


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


def decoder_layer(p: Params, ffn: Params, kind: str, x: jax.Array, attend: Any,
                  cfg: ModelConfig) -> tuple[jax.Array, Any]:
    """One block; `attend(normed x)` is the attention (over the row, or over a KV cache), which
    returns its output and whatever it wants carried out (keys and values, or the cache)."""
    eps, off = cfg.rms_norm_eps, cfg.norm_offset
    a, extra = attend(rms_norm(x, p["attn_norm"], eps, off))
    if cfg.sandwich_norm:
        a = rms_norm(a, p["post_attn_norm"], eps, off)
    x = x + a
    h = rms_norm(x, p["mlp_norm"], eps, off)
    m = moe(ffn, h, cfg) if kind == MOE else mlp(ffn, h, cfg)
    if cfg.sandwich_norm:
        m = rms_norm(m, p["post_mlp_norm"], eps, off)
    return x + m, extra


# ---- the model -------------------------------------------------------------------------------


def _rope(positions: jax.Array, lengths: jax.Array, cfg: ModelConfig
          ) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """(cos, sin) for global and for sliding layers. lengths: [B, T] each token's sequence length
    (only long-rope reads it)."""
    rs = cfg.rope_scaling
    if rs.kind == "longrope":
        # Long-rope picks its factors per sequence, by that sequence's own length, so that
        # packing and batching never change a result.
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


def _embed(params: Params, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    x = params["embed"][tokens]  # [B, T, D]
    if cfg.embed_scale:  # the scale is rounded to the compute dtype, as transformers does
        x = x * jnp.asarray(np.sqrt(cfg.hidden_size), dtype=x.dtype)
    return x


def _scan_layers(params: Params, x: jax.Array, carry: Any, layer_fn: Any, cfg: ModelConfig
                 ) -> tuple[jax.Array, Any, list[Any]]:
    """Run every layer over x. `layer_fn(layer, ffn, kind, x, carry, sliding, index)` returns
    (x, carry, out); the outs of each run of layers come back stacked, one entry per run."""
    is_sliding = jnp.asarray([t == SLIDING for t in cfg.layer_types])  # [L]
    index = jnp.arange(cfg.num_layers)
    outs = []
    for kind, lo, hi, first in _runs(cfg):
        stack = params["moe" if kind == MOE else "mlp"]

        def body(c: tuple, xs: tuple, kind: str = kind) -> tuple[tuple, Any]:
            h, state = c
            layer, ffn, sliding, i = xs
            h, state, out = layer_fn(layer, ffn, kind, h, state, sliding, i)
            return (h, state), out

        layers = jax.tree.map(lambda a, lo=lo, hi=hi: a[lo:hi], params["layers"])
        ffns = jax.tree.map(lambda a, f=first, n=hi - lo: a[f : f + n], stack)
        (x, carry), out = jax.lax.scan(body, (x, carry),
                                       (layers, ffns, is_sliding[lo:hi], index[lo:hi]))
        outs.append(out)
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps, cfg.norm_offset), carry, outs


def cpu_attention_fits(cfg: ModelConfig) -> bool:
    """Whether `kernels.attention` takes this model's heads (given `kernels.available()`)."""
    return cfg.head_dim % 16 == 0 and cfg.num_heads % cfg.num_kv_heads == 0


def forward_with_kv(params: Params, tokens: jax.Array, positions: jax.Array,
                    segment_ids: jax.Array, cfg: ModelConfig, keep_kv: bool = True,
                    cpu_attention: bool = False
                    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Final hidden states [B, T, D], and (if keep_kv) every layer's keys and values
    [L, B, T, K, Dh] for a cache. cpu_attention: attend with `kernels.attention` (which needs
    `kernels.available()` and `cpu_attention_fits`)."""
    x = _embed(params, tokens, cfg)
    lengths = (segment_ids[:, :, None] == segment_ids[:, None, :]).sum(-1)  # [B, T]
    (gcos, gsin), (lcos, lsin) = _rope(positions, lengths, cfg)
    full_mask, sliding_mask = (None, None) if cpu_attention else \
        attention_masks(segment_ids, cfg)

    def layer_fn(layer: Params, ffn: Params, kind: str, h: jax.Array, carry: None,
                 sliding: jax.Array, _: jax.Array) -> tuple[jax.Array, None, Any]:
        cos, sin = jnp.where(sliding, lcos, gcos), jnp.where(sliding, lsin, gsin)
        if cpu_attention:
            mask, segments = None, (segment_ids, jnp.where(sliding, cfg.sliding_window or 0, 0))
        else:
            mask, segments = jnp.where(sliding, sliding_mask, full_mask), None
        h, kv = decoder_layer(layer, ffn, kind, h,
                              lambda y: attention(layer, y, cos, sin, mask, cfg, segments), cfg)
        return h, None, kv if keep_kv else None

    hidden, _, outs = _scan_layers(params, x, None, layer_fn, cfg)
    if not keep_kv:
        return hidden, None
    ks = jnp.concatenate([k for k, _ in outs]) if len(outs) > 1 else outs[0][0]
    vs = jnp.concatenate([v for _, v in outs]) if len(outs) > 1 else outs[0][1]
    return hidden, (ks, vs)


def forward(params: Params, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
            cfg: ModelConfig, cpu_attention: bool = False) -> jax.Array:
    """Final hidden states [B, T, D] (after the final norm, before the LM head).

    tokens, positions, segment_ids: [B, T] int32. Prefill-only work (embeddings) never touches a
    KV cache. cpu_attention: see `forward_with_kv`.
    """
    return forward_with_kv(params, tokens, positions, segment_ids, cfg, keep_kv=False,
                           cpu_attention=cpu_attention)[0]


# ---- decoding with a KV cache ----------------------------------------------------------------
#
# The cache is {"k", "v"}: keys and values [L, S + 1, K, M, Dh] for S sequence slots of M tokens
# each. The extra last slot is scratch: padding rows of a step write there, so a step's shape
# never depends on how many slots are busy.
#
# Heads come before positions, so that a decode step's attention (batched over row and kv head)
# reads each head's first positions as one contiguous run: in the [slot, M, K, Dh] order XLA made
# a transposed copy of both every layer (a traced 16-row SmolLM2 step: 9.8 ms of cache gathers
# and scatters then, 7.0 with heads first). Keys once kept positions last ([K, Dh, M], so that
# XLA's score product reads them untransposed), but then a token's key is Dh values a row of M
# apart, each on a page of its own, and `kernels.decode_attention` spent most of its time writing
# and reading keys across pages.
CACHE_ORDER = (0, 2, 1, 3)  # [S, T, K, Dh] -> the cache's order


def init_cache(cfg: ModelConfig, slots: int, max_len: int, dtype: Any, per_layer: bool = False
               ) -> dict[str, Any]:
    """Zeros; `per_layer`: a list of L buffers [S + 1, ...] each (to go with `split_layers`: XLA
    updates separate buffers in place where it would copy a stacked one)."""
    shape = (slots + 1, cfg.num_kv_heads, max_len, cfg.head_dim)
    if per_layer:
        return {n: [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)] for n in ("k", "v")}
    return {n: jnp.zeros((cfg.num_layers, *shape), dtype) for n in ("k", "v")}


# A cache of dtype BF16_BITS holds bfloat16 values as their bit patterns. XLA's CPU backend
# scatters and gathers bfloat16 arrays element by element through conversions, 10-20x slower than
# float32, while 16-bit integers it moves as plain data: half float32's bytes at full speed.
BF16_BITS = jnp.uint16


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


def _cache_write(c: jax.Array, slots: jax.Array, pos: Any, x: jax.Array, lead: tuple = ()
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


def _cache_read(c: jax.Array, slots: jax.Array, kv_len: int, lead: tuple = ()) -> jax.Array:
    """The first kv_len positions of rows `slots`: [B, K, S, Dh]."""
    return c[(*lead, slots, slice(None), slice(0, kv_len))]


def prefill(params: Params, cache: dict[str, Any], tokens: jax.Array, positions: jax.Array,
            segment_ids: jax.Array, slots: jax.Array, last_col: jax.Array, cfg: ModelConfig,
            cpu_attention: bool = False) -> tuple[dict[str, Any], jax.Array]:
    """Run prompts (one per row, [B, T]) and store their keys and values in the cache rows
    `slots` [B] from position 0; returns the cache and the last prompt token's hidden state
    [B, D]. last_col: [B] the column of each row's last token. cpu_attention: see
    `forward_with_kv`."""
    hidden, kv = forward_with_kv(params, tokens, positions, segment_ids, cfg,
                                 cpu_attention=cpu_attention)
    assert kv is not None
    t = tokens.shape[1]
    # The row's padding lands past its prompt: decoding overwrites it before anything reads it.
    cols = slice(0, t)
    if isinstance(cache["k"], list):
        cache = {n: [_cache_write(c, slots, cols, x[i]) for i, c in enumerate(cache[n])]
                 for n, x in (("k", kv[0]), ("v", kv[1]))}
    else:
        cache = {n: _cache_write(cache[n], slots, cols, x, lead=(slice(None),))
                 for n, x in (("k", kv[0]), ("v", kv[1]))}
    return cache, hidden[jnp.arange(hidden.shape[0]), last_col]


def split_layers(params: Params, cfg: ModelConfig, projection_dtype: Any = None,
                 pack: bool = False) -> list[tuple[Params, Params]]:
    """Each layer's weights as arrays of their own: (attention and norms, MLP or experts), with
    the projections (`PROJECTIONS`) cast to projection_dtype if given, and packed for
    `kernels.matmul` if pack (in projection_dtype, or in their own type).

    For decoding on a CPU. There a layer's slice of a stacked weight is copied before every
    matmul that reads it (XLA's CPU dot takes whole buffers), which triples the bytes a decode
    step moves; with a buffer per layer the matmuls read the weights in place. This costs a
    second copy of the layer weights, so the engine makes it only when it decodes."""
    out = []
    for kind, lo, hi, first in _runs(cfg):
        group = "moe" if kind == MOE else "mlp"
        for j in range(hi - lo):
            layer = jax.tree.map(lambda a, i=lo + j: jnp.array(a[i]), params["layers"])
            ffn = jax.tree.map(lambda a, i=first + j: jnp.array(a[i]), params[group])
            out.append((_narrow("layers", layer, projection_dtype, pack),
                        _narrow(group, ffn, projection_dtype, pack)))
    return out


def decode(params: Params, cache: dict[str, Any], tokens: jax.Array, positions: jax.Array,
           slots: jax.Array, kv_len: int, cfg: ModelConfig,
           layers: list[tuple[Params, Params]] | None = None, cpu_attention: bool = False
           ) -> tuple[dict[str, Any], jax.Array]:
    """One token for each of B sequences: tokens, positions, slots [B]. Writes the token's keys
    and values at its position, attends over the first `kv_len` (static) cache positions, and
    returns the cache and the final hidden states [B, D].

    `layers` (from `split_layers`): run over per-layer weights, unrolled, instead of scanning
    the stacked ones. With them, cpu_attention: write and attend with
    `kernels.decode_attention`, which reads only the positions in use (see `forward_with_kv`
    for what it needs)."""
    x = _embed(params, tokens[:, None], cfg)  # [B, 1, D]
    pos = positions[:, None]  # [B, 1]
    (gcos, gsin), (lcos, lsin) = _rope(pos, pos + 1, cfg)
    j = jnp.arange(kv_len)[None, None, :]  # [1, 1, S]
    full_mask = j <= pos[:, :, None]  # [B, 1, S]
    sliding_mask = full_mask
    if cfg.sliding_window:
        sliding_mask = full_mask & (pos[:, :, None] - j < cfg.sliding_window)
    # Writes go to the rows' slots plus the scratch slot: a write of a single row would become a
    # dynamic-update-slice, which XLA does by copying the whole cache buffer; a scatter of two
    # or more rows it does in place.
    scratch = cache["k"][0].shape[0] - 1 if isinstance(cache["k"], list) else \
        cache["k"].shape[1] - 1
    w_slots = jnp.concatenate([slots, jnp.full((1,), scratch, slots.dtype)])
    w_pos = jnp.concatenate([positions, jnp.zeros((1,), positions.dtype)])

    def _with_scratch_row(x: jax.Array) -> jax.Array:
        return jnp.concatenate([x, jnp.zeros_like(x[:1])])

    def layer_fn(layer: Params, ffn: Params, kind: str, h: jax.Array, kv: tuple,
                 sliding: Any, i: Any) -> tuple[jax.Array, tuple, None]:
        cos, sin = jnp.where(sliding, lcos, gcos), jnp.where(sliding, lsin, gsin)
        mask = jnp.where(sliding, sliding_mask, full_mask)

        def attend(y: jax.Array) -> tuple[jax.Array, tuple]:
            q, k, v = project_qkv(layer, y, cos, sin, cfg)
            b = q.shape[0]
            if cpu_attention and isinstance(kv[0], list):
                # One call per layer in place of XLA's dozen small ops; it updates the cache in
                # place, a single row included, so no scratch row is needed.
                window = cfg.sliding_window if sliding and cfg.sliding_window else 0
                out, ck, cv = kernels.decode_attention(
                    q.reshape(b, cfg.num_heads, cfg.head_dim), k[:, 0], v[:, 0], kv[0][i],
                    kv[1][i], slots, positions, window, scale=cfg.query_scale,
                    softcap=cfg.attn_softcap)
                out_kv = ([*kv[0][:i], ck, *kv[0][i + 1:]], [*kv[1][:i], cv, *kv[1][i + 1:]])
                return linear(out.reshape(b, 1, cfg.q_size).astype(q.dtype), layer["wo"]), out_kv
            k, v = _with_scratch_row(k), _with_scratch_row(v)  # [B + 1, 1, K, Dh]
            if isinstance(kv[0], list):  # a cache buffer per layer: [S + 1, ...]
                ck = _cache_write(kv[0][i], w_slots, w_pos, k)
                cv = _cache_write(kv[1][i], w_slots, w_pos, v)
                out_kv = ([*kv[0][:i], ck, *kv[0][i + 1:]], [*kv[1][:i], cv, *kv[1][i + 1:]])
                lead = ()
            else:  # the layers stacked: [L, S + 1, ...]
                lead = (i,)
                ck = _cache_write(kv[0], w_slots, w_pos, k, lead=lead)
                cv = _cache_write(kv[1], w_slots, w_pos, v, lead=lead)
                out_kv = (ck, cv)
            keys = _cache_read(ck, slots, kv_len, lead)  # [B, K, S, Dh]
            values = _cache_read(cv, slots, kv_len, lead)
            # Only the cache in use is read: its first kv_len positions.
            out = _attend_one(q, from_cache(keys, q.dtype), from_cache(values, q.dtype), mask,
                              cfg)
            return linear(out.reshape(b, 1, cfg.q_size), layer["wo"]), out_kv

        h, kv = decoder_layer(layer, ffn, kind, h, attend, cfg)
        return h, kv, None

    carry = (cache["k"], cache["v"])
    if layers is None:
        hidden, (k, v), _ = _scan_layers(params, x, carry, layer_fn, cfg)
    else:
        for i, ((layer, ffn), kind, t) in enumerate(zip(layers, cfg.mlp_layer_kinds,
                                                        cfg.layer_types, strict=True)):
            x, carry, _ = layer_fn(layer, ffn, kind, x, carry, t == SLIDING, i)
        hidden = rms_norm(x, params["final_norm"], cfg.rms_norm_eps, cfg.norm_offset)
        k, v = carry
    return {"k": k, "v": v}, hidden[:, 0]


def output_head(params: Params, cfg: ModelConfig) -> jax.Array:
    """The output projection [D, V]: the LM head, or the embedding table's transpose."""
    return params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]


def logits(params: Params, hidden: jax.Array, cfg: ModelConfig, head: jax.Array | None = None
           ) -> jax.Array:
    """Next-token logits, float32 [..., V], from final hidden states [..., D]. head: a [D, V]
    copy of `output_head` to use instead (one in bfloat16 is multiplied in bfloat16; a packed
    one by `kernels.matmul`)."""
    head = output_head(params, cfg) if head is None else head
    if kernels.is_packed(head):
        out = kernels.matmul(hidden, head)
    else:
        out = jnp.dot(hidden.astype(head.dtype), head, preferred_element_type=jnp.float32)
    if cfg.final_softcap:
        out = jnp.tanh(out / cfg.final_softcap) * cfg.final_softcap
    return out


def pooled(params: Params, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
           seq_index: jax.Array, last_index: jax.Array, cfg: ModelConfig,
           cpu_attention: bool = False) -> tuple[jax.Array, jax.Array]:
    """Per-sequence mean and last-token hidden states, both float32 [N, D].

    seq_index: [B, T] the sequence each token belongs to, N for padding (dropped);
    last_index: [N] flat index (row * T + col) of each sequence's last token.
    cpu_attention: see `forward_with_kv`.
    """
    hidden = forward(params, tokens, positions, segment_ids, cfg, cpu_attention)
    b, t, d = hidden.shape
    n = last_index.shape[0]
    flat = hidden.reshape(b * t, d).astype(jnp.float32)
    ids = seq_index.reshape(b * t)
    sums = jax.ops.segment_sum(flat, ids, num_segments=n + 1)[:n]  # [N, D]
    counts = jax.ops.segment_sum(jnp.ones_like(ids, jnp.float32), ids, num_segments=n + 1)[:n]
    mean = sums / jnp.maximum(counts, 1.0)[:, None]
    last = flat[last_index]  # [N, D]
    return mean, last
