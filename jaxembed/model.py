"""The decoder of every family as pure functions over a params pytree.

Params are plain nested dicts of arrays: the state of `modules.Decoder`, the Flax module that
applies these functions; the layers themselves are in `jaxembed.layers`. Layer params are stacked on a leading
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

import functools
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxembed import kernels, kv_cache, quant
from jaxembed.config import DENSE, MOE, SLIDING, ModelConfig, rope_inv_freq
from jaxembed.kv_cache import KVCache
from jaxembed.layers import (  # noqa: F401 (with_layout, head_with_layout, merge_projections: the model's API too)
    LOADED,
    MERGED,
    MERGED_BIAS,
    attend_one,
    attention,
    attention_masks,
    decoder_layer,
    group_with_layout,
    head_with_layout,
    linear,
    merge_projections,
    output_head,
    project_qkv,
    rms_norm,
    rope_tables,
    with_layout,
)
from jaxembed.plan import CPU_KERNELS, GPU_KERNELS, XLA, ExecutionPlan, WeightLayout

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


def param_shapes_of(cfg: ModelConfig, params: Params) -> dict[str, Any]:
    """`param_shapes(cfg)` as `params` hold them: the projections `merge_projections` merged
    there (one GPU's plan; quantized weights stay apart) as one spec, their last axes summed."""
    tree = param_shapes(cfg)
    merges = {name: parts for group in MERGED.values() for name, parts in group.items()}
    merges.update(MERGED_BIAS.values())
    for group, spec in tree.items():
        held = params.get(group)
        if not (isinstance(spec, dict) and isinstance(held, dict)):
            continue
        spec = dict(spec)
        for name, parts in merges.items():
            if name in held and all(p in spec for p in parts):
                specs = [spec.pop(p) for p in parts]
                shape, axes = specs[0]
                spec[name] = ((*shape[:-1], sum(s[-1] for s, _ in specs)), axes)
        tree[group] = spec
    return tree


def is_param_spec(x: Any) -> bool:
    """Whether x is a leaf of `param_shapes`: (shape, logical axes)."""
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], tuple)


def param_axes(cfg: ModelConfig) -> dict[str, Any]:
    """Logical axis names for every param leaf, in the same tree structure as the params."""
    return jax.tree.map(lambda s: s[1], param_shapes(cfg), is_leaf=is_param_spec)


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


def compute_dtype(params: Params) -> Any:
    """The activations' dtype: the float params' (a quantized embedding table has none)."""
    return params["final_norm"].dtype


def _embed(params: Params, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    table = params["embed"]
    if quant.is_quantized(table):  # only the rows looked up are dequantized
        x = quant.take_rows(table, tokens, compute_dtype(params))  # [B, T, D]
    else:
        x = table[tokens]  # [B, T, D]
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
        # Quantized weights stay whole, indexed by layer inside the body (see `quant`).
        layers, q_layers = quant.split_stacked(params["layers"])
        ffns, q_ffns = quant.split_stacked(params["moe" if kind == MOE else "mlp"])

        def body(c: tuple, xs: tuple, kind: str = kind, q_layers: Any = q_layers,
                 q_ffns: Any = q_ffns, shift: int = first - lo) -> tuple[tuple, Any]:
            h, state = c
            layer, ffn, sliding, i = xs
            layer = {**layer, **quant.at_layer(q_layers, i)}
            ffn = {**ffn, **quant.at_layer(q_ffns, i + shift)}
            h, state, out = layer_fn(layer, ffn, kind, h, state, sliding, i)
            return (h, state), out

        layers = jax.tree.map(lambda a, lo=lo, hi=hi: a[lo:hi], layers)
        ffns = jax.tree.map(lambda a, f=first, n=hi - lo: a[f : f + n], ffns)
        (x, carry), out = jax.lax.scan(body, (x, carry),
                                       (layers, ffns, is_sliding[lo:hi], index[lo:hi]))
        outs.append(out)
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps, cfg.norm_offset), carry, outs


def kernel_attention(plan: ExecutionPlan | None, decode: bool = False) -> bool:
    """Whether the plan attends in the CPU kernels (embedding and prefill steps, or decode)."""
    if plan is None:
        return False
    return (plan.decode_attention if decode else plan.attention) == CPU_KERNELS


def attention_op(plan: ExecutionPlan | None) -> Any:
    """The fused attention over packed rows the plan chose for embedding and prefill steps (the
    CPU kernel or the GPU one, with `kernels.attention`'s signature), or None for XLA's ops."""
    if plan is None or plan.attention == XLA:
        return None
    if plan.attention == CPU_KERNELS:
        return kernels.attention
    from jaxembed.gpu import attention as gpu_attention  # Pallas: only where it runs

    return functools.partial(gpu_attention.attention, interpret=plan.interpret)


def forward_with_kv(params: Params, tokens: jax.Array, positions: jax.Array,
                    segment_ids: jax.Array, cfg: ModelConfig, keep_kv: bool = True,
                    plan: ExecutionPlan | None = None
                    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Final hidden states [B, T, D], and (if keep_kv) every layer's keys and values
    [L, B, T, K, Dh] for a cache. plan: the ops to attend with (None: XLA's)."""
    fused = attention_op(plan)
    x = _embed(params, tokens, cfg)
    lengths = (segment_ids[:, :, None] == segment_ids[:, None, :]).sum(-1)  # [B, T]
    (gcos, gsin), (lcos, lsin) = _rope(positions, lengths, cfg)
    full_mask, sliding_mask = (None, None) if fused is not None else \
        attention_masks(segment_ids, cfg)

    def layer_fn(layer: Params, ffn: Params, kind: str, h: jax.Array, carry: None,
                 sliding: jax.Array, _: jax.Array) -> tuple[jax.Array, None, Any]:
        cos, sin = jnp.where(sliding, lcos, gcos), jnp.where(sliding, lsin, gsin)
        if fused is not None:
            mask, segments = None, (segment_ids, jnp.where(sliding, cfg.sliding_window or 0, 0))
        else:
            mask, segments = jnp.where(sliding, sliding_mask, full_mask), None
        h, kv = decoder_layer(
            layer, ffn, kind, h,
            lambda y: attention(layer, y, cos, sin, mask, cfg, segments, fused), cfg)
        return h, None, kv if keep_kv else None

    hidden, _, outs = _scan_layers(params, x, None, layer_fn, cfg)
    if not keep_kv:
        return hidden, None
    ks = jnp.concatenate([k for k, _ in outs]) if len(outs) > 1 else outs[0][0]
    vs = jnp.concatenate([v for _, v in outs]) if len(outs) > 1 else outs[0][1]
    return hidden, (ks, vs)


def forward(params: Params, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
            cfg: ModelConfig, plan: ExecutionPlan | None = None) -> jax.Array:
    """Final hidden states [B, T, D] (after the final norm, before the LM head).

    tokens, positions, segment_ids: [B, T] int32. Prefill-only work (embeddings) never touches a
    KV cache. plan: see `forward_with_kv`.
    """
    return forward_with_kv(params, tokens, positions, segment_ids, cfg, keep_kv=False,
                           plan=plan)[0]


# ---- decoding with a KV cache (see `jaxembed.kv_cache` for its layout) -----------------------


def prefill(params: Params, cache: KVCache, tokens: jax.Array, positions: jax.Array,
            segment_ids: jax.Array, slots: jax.Array, last_col: jax.Array, cfg: ModelConfig,
            plan: ExecutionPlan | None = None) -> tuple[KVCache, jax.Array]:
    """Run prompts (one per row, [B, T]) and store their keys and values in the cache rows
    `slots` [B] from position 0; returns the cache and the last prompt token's hidden state
    [B, D]. last_col: [B] the column of each row's last token. plan: see `forward_with_kv`."""
    hidden, kv = forward_with_kv(params, tokens, positions, segment_ids, cfg, plan=plan)
    assert kv is not None
    # The row's padding lands past its prompt: decoding overwrites it before anything reads it.
    return cache.write_prompts(slots, *kv), hidden[jnp.arange(hidden.shape[0]), last_col]


def split_layers(params: Params, cfg: ModelConfig, layout: WeightLayout = LOADED
                 ) -> list[tuple[Params, Params]]:
    """Each layer's weights as arrays of their own: (attention and norms, MLP or experts), with
    the projections (`PROJECTIONS`) held as `layout` says.

    For decoding on a CPU. There a layer's slice of a stacked weight is copied before every
    matmul that reads it (XLA's CPU dot takes whole buffers), which triples the bytes a decode
    step moves; with a buffer per layer the matmuls read the weights in place. This costs a
    second copy of the layer weights, so the engine makes it only when it decodes."""
    out = []
    for kind, lo, hi, first in _runs(cfg):
        group = "moe" if kind == MOE else "mlp"
        for j in range(hi - lo):
            layer = _layer_of(params["layers"], lo + j)
            ffn = _layer_of(params[group], first + j)
            out.append((group_with_layout("layers", layer, layout), group_with_layout(group, ffn, layout)))
    return out


def _layer_of(stack: Params, i: int) -> Params:
    """Layer i's weights as arrays of their own (a quantized one's are its own already)."""
    arrays, stacks = quant.split_stacked(stack)
    return {**jax.tree.map(lambda a: jnp.array(a[i]), arrays), **quant.at_layer(stacks, i)}


def decode(params: Params, cache: KVCache, tokens: jax.Array, positions: jax.Array,
           slots: jax.Array, kv_len: int, cfg: ModelConfig,
           layers: list[tuple[Params, Params]] | None = None, plan: ExecutionPlan | None = None
           ) -> tuple[KVCache, jax.Array]:
    """One token for each of B sequences: tokens, positions, slots [B]. Writes the token's keys
    and values at its position, attends over the first `kv_len` (static) cache positions, and
    returns the cache and the final hidden states [B, D].

    `layers` (from `split_layers`): run over per-layer weights, unrolled, instead of scanning
    the stacked ones (the cache then holds a buffer per layer). With them, a plan whose decode
    attention is the CPU kernels writes and attends with `kernels.decode_attention`, which reads
    only the positions in use."""
    per_layer = layers is not None
    assert cache.per_layer == per_layer, "per-layer weights go with a per-layer cache"
    cpu_attention = per_layer and kernel_attention(plan, decode=True)
    gpu_attention = plan is not None and plan.decode_attention == GPU_KERNELS
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
    w_slots = jnp.concatenate([slots, jnp.full((1,), cache.scratch_slot, slots.dtype)])
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
            if cpu_attention:
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
            if per_layer:  # a cache buffer per layer: [S + 1, ...]
                ck = kv_cache.write(kv[0][i], w_slots, w_pos, k)
                cv = kv_cache.write(kv[1][i], w_slots, w_pos, v)
                out_kv = ([*kv[0][:i], ck, *kv[0][i + 1:]], [*kv[1][:i], cv, *kv[1][i + 1:]])
                lead = ()
            else:  # the layers stacked: [L, S + 1, ...]
                lead = (i,)
                ck = kv_cache.write(kv[0], w_slots, w_pos, k, lead=lead)
                cv = kv_cache.write(kv[1], w_slots, w_pos, v, lead=lead)
                out_kv = (ck, cv)
            if gpu_attention:
                out = _gpu_decode_attention(q, ck, cv, slots, positions, lead, sliding, kv_len,
                                            cfg, plan)
                return linear(out.reshape(b, 1, cfg.q_size), layer["wo"]), out_kv
            keys = kv_cache.read(ck, slots, kv_len, lead)  # [B, K, S, Dh]
            values = kv_cache.read(cv, slots, kv_len, lead)
            # Only the cache in use is read: its first kv_len positions.
            out = attend_one(q, kv_cache.from_cache(keys, q.dtype),
                              kv_cache.from_cache(values, q.dtype), mask, cfg)
            return linear(out.reshape(b, 1, cfg.q_size), layer["wo"]), out_kv

        h, kv = decoder_layer(layer, ffn, kind, h, attend, cfg)
        return h, kv, None

    carry = (cache.k, cache.v)
    if layers is None:
        hidden, (k, v), _ = _scan_layers(params, x, carry, layer_fn, cfg)
    else:
        for i, ((layer, ffn), kind, t) in enumerate(zip(layers, cfg.mlp_layer_kinds,
                                                        cfg.layer_types, strict=True)):
            x, carry, _ = layer_fn(layer, ffn, kind, x, carry, t == SLIDING, i)
        hidden = rms_norm(x, params["final_norm"], cfg.rms_norm_eps, cfg.norm_offset)
        k, v = carry
    return KVCache(k, v, per_layer), hidden[:, 0]


def _gpu_decode_attention(q: jax.Array, ck: jax.Array, cv: jax.Array, slots: jax.Array,
                          positions: jax.Array, lead: tuple, sliding: Any, kv_len: int,
                          cfg: ModelConfig, plan: ExecutionPlan) -> jax.Array:
    """`gpu.decode.decode_attention` of q [B, 1, K, G, Dh] over the cache buffers ck, cv, their
    rows' keys read in place: [B, H, Dh]. lead: (), or (layer,) of a stacked cache, whose layers
    the kernel sees as rows of one [L * (S + 1), ...] buffer (a reshape: no copy)."""
    from jaxembed.gpu import decode as gpu_decode  # Pallas: only where it runs

    rows = slots
    if lead:
        rows = lead[0] * ck.shape[1] + slots
        ck, cv = (c.reshape(-1, *c.shape[2:]) for c in (ck, cv))
    b = q.shape[0]
    window = jnp.where(sliding, cfg.sliding_window or 0, 0)
    return gpu_decode.decode_attention(
        q.reshape(b, cfg.num_heads, cfg.head_dim), ck, cv, rows, positions, window,
        scale=cfg.query_scale, softcap=cfg.attn_softcap,
        splits=gpu_decode.splits_for(b, cfg.num_kv_heads, kv_len), interpret=plan.interpret)


def logits(params: Params, hidden: jax.Array, cfg: ModelConfig, head: jax.Array | None = None
           ) -> jax.Array:
    """Next-token logits, float32 [..., V], from final hidden states [..., D]. head: a [D, V]
    copy of `output_head` to use instead (`head_with_layout`: one in bfloat16 is multiplied in
    bfloat16; a packed one by `kernels.matmul`)."""
    head = output_head(params, cfg) if head is None else head
    if isinstance(head, kernels.Packed):
        out = kernels.matmul(hidden, head)
    elif quant.is_quantized(head):  # [V, D] in its blocks
        out = quant.matmul(hidden.astype(jnp.float32), head)
    else:
        out = jnp.dot(hidden.astype(head.dtype), head, preferred_element_type=jnp.float32)
    if cfg.final_softcap:
        out = jnp.tanh(out / cfg.final_softcap) * cfg.final_softcap
    return out


SCORE_CHUNK = 512  # tokens whose logits are held at once: [512, V] float32 is 100 MB at V=49k


def token_scores(params: Params, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 targets: jax.Array, cfg: ModelConfig, top: int,
                 plan: ExecutionPlan | None = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """What the model gives each token's next place: the log-probability of `targets` there,
    float32 [B, T], and the `top` most likely tokens, int32 [B, T, top], with theirs, float32
    [B, T, top]. The model's own distribution (no sampling settings), as a prompt is scored.

    The logits of a step's tokens are made `SCORE_CHUNK` at a time: all of them at once would be
    [B * T, V] float32 (400 MB for 2,048 tokens over a 49k vocabulary)."""
    hidden = forward(params, tokens, positions, segment_ids, cfg, plan)
    b, t, d = hidden.shape
    n = b * t
    c = min(SCORE_CHUNK, n)
    pad = -n % c
    flat = jnp.pad(hidden.reshape(n, d), ((0, pad), (0, 0))).reshape(-1, c, d)
    goal = jnp.pad(targets.reshape(n), (0, pad)).reshape(-1, c)

    def chunk(args: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        h, y = args  # [c, D], [c]
        lp = jax.nn.log_softmax(logits(params, h, cfg), -1)  # [c, V]
        top_lp, top_ids = jax.lax.top_k(lp, min(top, lp.shape[-1]))
        return jnp.take_along_axis(lp, y[:, None], -1)[:, 0], top_ids, top_lp

    lp, ids, top_lp = jax.lax.map(chunk, (flat, goal))
    k = ids.shape[-1]
    return (lp.reshape(-1)[:n].reshape(b, t), ids.reshape(-1, k)[:n].reshape(b, t, k),
            top_lp.reshape(-1, k)[:n].reshape(b, t, k))


def pooled(params: Params, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
           seq_index: jax.Array, pick_index: jax.Array, cfg: ModelConfig,
           plan: ExecutionPlan | None = None) -> jax.Array:
    """Each sequence's pooled hidden state, float32 [N, D]: the mean of its pooled tokens, or
    the one token it picks.

    seq_index: [B, T] the sequence each token is pooled into, N for padding (dropped);
    pick_index: [N] flat index (row * T + col) of the token a sequence is pooled as (its last,
    or its first), or -1 for the mean. Only these [N, D] leave the device.
    plan: see `forward_with_kv`.
    """
    hidden = forward(params, tokens, positions, segment_ids, cfg, plan)
    b, t, d = hidden.shape
    n = pick_index.shape[0]
    flat = hidden.reshape(b * t, d).astype(jnp.float32)
    ids = seq_index.reshape(b * t)
    sums = jax.ops.segment_sum(flat, ids, num_segments=n + 1)[:n]  # [N, D]
    counts = jax.ops.segment_sum(jnp.ones_like(ids, jnp.float32), ids, num_segments=n + 1)[:n]
    mean = sums / jnp.maximum(counts, 1.0)[:, None]
    picked = flat[jnp.maximum(pick_index, 0)]  # [N, D]
    return jnp.where((pick_index >= 0)[:, None], picked, mean)
