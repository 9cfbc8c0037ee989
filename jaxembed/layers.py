"""The layers every family's decoder is made of, as pure functions of their params and inputs:
norms, rope, attention over packed rows (XLA's, or `kernels.attention` as the plan says), the gated
MLP, the mixture of experts, one decoder block; and how projection weights are held for each
path (`WeightLayout`: narrowed, or packed for `kernels.matmul` as `kernels.Packed`).

Shapes: B rows, T tokens per row, D hidden, H query heads, K kv heads, G = H // K, Dh head dim,
R rotary dims, F mlp width, E experts, V vocab.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxembed import kernels, quant
from jaxembed.config import MOE, SLIDING, ModelConfig
from jaxembed.plan import WeightLayout

Params = dict[str, Any]

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


LOADED = WeightLayout()  # the params as loaded

# The weights `linear` multiplies (attention projections and dense MLPs), by params group.
PROJECTIONS = {"layers": ("wq", "wk", "wv", "wqkv", "wo"),
               "mlp": ("w_gate", "w_up", "w_gate_up", "w_down")}

# Products that read the same input, merged into one where the plan says
# (`ExecutionPlan.merged_projections`): group -> {merged name: its parts, concatenated on the
# output axis}. One product reads x once and launches once where three (two) did, and its wider
# N fills a GPU's tiles better, which matters most for decode steps' few rows.
MERGED = {"layers": {"wqkv": ("wq", "wk", "wv")}, "mlp": {"w_gate_up": ("w_gate", "w_up")}}
MERGED_BIAS = {"wqkv": ("bqkv", ("bq", "bk", "bv"))}  # merged with their weights, if present


def merge_projections(params: Params, consume: bool = False) -> Params:
    """params with the projections of `MERGED` (and their biases) concatenated, their parts
    dropped (so that only one copy is held). Weights kept quantized stay apart, biases with
    them: their blocks are per tensor.

    consume: free each merged weight's parts on their device as soon as it is made, so that
    merging a GPU's weights holds one stacked weight twice at a time, never the whole model;
    `params` is then no longer usable (the engine's load-time merge)."""
    out = dict(params)

    def merged(tree: Params, parts: tuple[str, ...]) -> jax.Array:
        arrays = [tree.pop(n) for n in parts]
        whole = jnp.concatenate(arrays, axis=-1)
        if consume:
            for a in arrays:
                a.delete()
        return whole

    for group, merges in MERGED.items():
        if group not in params:
            continue
        tree = dict(params[group])
        for name, parts in merges.items():
            if not all(n in tree and not quant.is_quantized(tree[n]) for n in parts):
                continue
            tree[name] = merged(tree, parts)
            bias, bias_parts = MERGED_BIAS.get(name, (None, ()))
            if bias_parts and all(n in tree for n in bias_parts):
                tree[bias] = merged(tree, bias_parts)
        out[group] = tree
    return out


def group_with_layout(group: str, tree: Params, layout: WeightLayout) -> Params:
    """One params group with its projection weights held as `layout` says: cast to its dtype,
    and packed for `kernels.matmul` (`kernels.Packed`) where their shape and type allow."""
    if layout.plain:
        return tree
    names = PROJECTIONS.get(group, ())

    def held(a: jax.Array) -> Any:
        if quant.is_quantized(a):  # kept in its blocks on every path
            return a
        kind = layout.dtype or a.dtype
        if layout.packed and kernels.packable(a, kind):
            return kernels.Packed.of(a, kind)
        return a.astype(kind)
    return {n: held(a) if n in names else a for n, a in tree.items()}


def with_layout(params: Params, layout: WeightLayout) -> Params:
    """params with the projection weights held as `layout` says (see `group_with_layout`); every other
    array is shared as is."""
    return {g: group_with_layout(g, tree, layout) if g in PROJECTIONS else tree
            for g, tree in params.items()}


def head_with_layout(params: Params, cfg: ModelConfig, layout: WeightLayout) -> Any:
    """The output head [D, V] as `layout` holds decode steps' weights, made once (not in every
    step): packed, or narrowed (and so transposed once); None: the params' own."""
    if layout.plain:
        return None
    head = output_head(params, cfg)
    if quant.is_quantized(head):
        return None
    kind = layout.dtype or head.dtype
    if layout.packed and kernels.packable(head, kind):
        return kernels.Packed.of(head, kind)
    return jnp.asarray(head.astype(kind)) if layout.dtype is not None else None


def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., D] @ w [D, N]. A weight kept in a narrower type than the activations (bfloat16
    under float32) is multiplied in its type and accumulated in the activations': a CPU with
    bf16 dot instructions runs those products at twice the fp32 rate, while norms, attention and
    the residual stream stay in fp32."""
    if isinstance(w, kernels.Packed):
        return kernels.matmul(x, w).astype(x.dtype)
    if quant.is_quantized(w):  # [N, K] in its blocks
        return quant.matmul(x, w)
    if w.dtype == x.dtype:
        return x @ w
    return jnp.dot(x.astype(w.dtype), w, preferred_element_type=x.dtype)


def project_qkv(p: Params, x: jax.Array, cos: jax.Array, sin: jax.Array, cfg: ModelConfig
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries [B, T, K, G, Dh] and keys, values [B, T, K, Dh], rope applied."""
    b, t, _ = x.shape
    k_heads, dh = cfg.num_kv_heads, cfg.head_dim
    g = cfg.num_heads // k_heads
    if "wqkv" in p:  # merged (`merge_projections`)
        qkv = linear(x, p["wqkv"])  # [B, T, (H + 2K) * Dh]
        if cfg.qkv_bias:
            qkv = qkv + p["bqkv"]
        q, k, v = jnp.split(qkv, [cfg.q_size, cfg.q_size + cfg.kv_size], axis=-1)
    else:
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
              cfg: ModelConfig, segments: tuple[jax.Array, jax.Array] | None = None,
              fused: Any = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Self-attention over the rows [B, T, D]; also returns the keys and values (for a cache).

    segments: (segment ids [B, T], window: an int32 scalar, 0 for none) to run it in `fused`
    instead (`kernels.attention` or the GPU's, with its signature), which computes only the
    scores the mask would keep."""
    b, t, _ = x.shape
    q, k, v = project_qkv(p, x, cos, sin, cfg)
    if segments is not None:
        out = (fused or kernels.attention)(
            q.reshape(b, t, cfg.num_heads, cfg.head_dim), k, v, *segments,
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


def attend_one(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, cfg: ModelConfig
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
    if "w_gate_up" in p:  # merged (`merge_projections`)
        gate, up = jnp.split(linear(x, p["w_gate_up"]), 2, axis=-1)
        return linear(_act(gate, cfg) * up, p["w_down"])
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
    w_gate, w_up, w_down = (_experts(p[n], x.dtype) for n in ("w_gate", "w_up", "w_down"))
    h = _act(jax.lax.ragged_dot(rows, w_gate, sizes), cfg) * jax.lax.ragged_dot(rows, w_up, sizes)
    out = jax.lax.ragged_dot(h, w_down, sizes)  # [N*k, D]
    out = out * weights.reshape(-1)[order][:, None].astype(out.dtype)
    return jnp.zeros_like(flat).at[token].add(out).reshape(b, t, d)


def _experts(w: Any, dtype: Any) -> jax.Array:
    """Experts' weights [E, in, out]: quantized ones ([E, out, in] in blocks) dequantized for the
    step, which `ragged_dot` needs whole."""
    if quant.is_quantized(w):
        return quant.dequantized(w, dtype).swapaxes(-1, -2)
    return w


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


def output_head(params: Params, cfg: ModelConfig) -> Any:
    """The output projection: [D, V] (the LM head, or the embedding table's transpose), or a
    quantized [V, D] (`linear` and `model.logits` take either)."""
    head = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]
    if quant.is_quantized(head):
        return head
    return head.T if cfg.tie_word_embeddings else head
