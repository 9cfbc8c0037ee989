"""Prefill attention over rows that pack several sequences, as one fused Pallas kernel for NVIDIA
GPUs (Triton lowering; tuned for Hopper, H100/H200), with the semantics of the model's XLA path
(`layers.attention_masks` and `layers._attend`) and of the CPU kernel (`kernels.attention`).

The candidates, and what each covers of what the model needs (packed segments, causal and
bidirectional families, a sliding window that is a traced scalar inside the layer scan, grouped
kv heads, gemma2's soft-capping, head sizes 64 to 256, rows of any length):

- `jax.experimental.pallas.ops.gpu.attention.mha` (Triton): segment ids as an equality mask, causal
  or not. No grouped heads (k and v need H heads), no window, no soft-capping; T must be a
  multiple of its blocks; every query block visits every key block (only causal ones stop at the
  diagonal), so packed rows pay for the segments they cannot see.
- `jax.experimental.pallas.ops.gpu.attention_mgpu` (Mosaic GPU, FlashAttention-3 style on
  Hopper): grouped heads and causal masking, the fastest on H100; but no segment ids, no window,
  no soft-capping, blocks and T multiples of 64, and it needs the CUDA runtime to lower at all.
- `jax.nn.dot_product_attention(implementation="cudnn")`: grouped heads, causal, head sizes to
  256 on Hopper; a window only as a static Python int (left of the diagonal, causal), no
  soft-capping, and packed rows only through a dense [B, 1, T, T] mask or bias (the packed
  offsets of the cuDNN call are not in the public API).

None covers the model, so this module has its own kernel, in the shape of `mha`'s (one program
per query block, head and row, an online softmax over key blocks, nothing [T, T] in memory),
with what the model adds:

- The mask is one interval of keys per query, computed in XLA before the kernel (`visible_keys`):
  a query i sees keys j in [lo[i], hi[i]), the intersection of its segment's run, the causal
  half (j <= i) and the window (|i - j| < window when window > 0). The kernel compares column
  indices against two numbers per row: segments, causality, the window and the row's end in one
  test, whatever window the layer has (a traced scalar: no recompilation per layer kind).
- Key blocks outside [min lo, max hi) of a query block are never visited: as lo and hi never
  decrease along a row, a block's keys are those of its first row's lo to its last row's hi.
  Packed rows, causal rows and windows all skip the blocks they cannot see.
- Grouped heads: query head h reads kv head h // (H / K) (the index map; K and V stay [B, T, K,
  Dh], never repeated).
- Soft-capping, tanh(s / cap) * cap, on the scaled scores before the mask, as the model does.
- Rows of any length and head sizes that are not powers of two: every load and store is masked
  (rows past T, dims past Dh read as zeros), since Triton tiles are powers of two and the GPU
  does not bounds-check.

A segment is a contiguous run of equal ids in a row (as the CPU kernel's): two runs of one id do
not see each other, unlike the XLA mask over ids (`seg_i == seg_j`); the scheduler never packs two
runs with one id, so the two agree on every step the engine runs. Padding (segment 0) is a run
like any other: each padding token sees its run (causally, itself at least), so no row is all
masked and no NaN appears; its outputs are never read.

Numerics: scores, the softmax and the accumulator are float32; q.k and p.v products take the
inputs' dtype (bf16 MMA, or float32 with IEEE products, never TF32), p rounded to v's dtype as
`layers._attend` does. The result is in q's dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# A finite "minus infinity" for masked scores: a row whose keys in a block are all masked then
# gets exp2(0) = 1 weights there, wiped by the next block's correction exp2(MASKED - m) = 0,
# where -inf would give NaN (inf - inf). Finite after multiplying by log2(e) too.
MASKED = -0.7 * float(np.finfo(np.float32).max)
LOG2E = math.log2(math.e)
HEAD_DIMS = (64, 80, 96, 128, 256)  # Dh that `supported` takes
DTYPES = ("bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class Blocks:
    """One kernel configuration: query and key rows per tile, and Triton's warps and stages."""

    q: int
    k: int
    warps: int
    stages: int


def supported(head_dim: int, dtype: jnp.dtype | str) -> bool:
    """Whether `attention` runs for this head size and input dtype. Head sizes that are not powers
    of two (80, 96) run padded to the next one (128), at its cost."""
    return head_dim in HEAD_DIMS and jnp.dtype(dtype).name in DTYPES


def blocks_for(head_dim: int, dtype: jnp.dtype | str, seq_len: int) -> Blocks:
    """Tiles for Hopper. bfloat16: the Triton FlashAttention-2 configurations for H100 (128 query
    rows by 64 keys; 64 by 32 at Dh 256, whose accumulator fills the registers first). float32
    runs IEEE products on the CUDA cores (no tensor-core MMA), and needs smaller tiles and 8 warps
    not to spill registers. Clamped to the row, so that short rows do not pay for a whole tile
    (Triton's dots need at least 16 rows). Each configuration compiles for sm_90 without spills
    (Triton 3.9, ptxas): bf16 at 218-252 registers a thread, 64-128 KiB of shared memory."""
    dp = pl.next_power_of_2(head_dim)
    if jnp.dtype(dtype).itemsize > 2:
        b = Blocks(64, 32, 8, 2) if dp <= 128 else Blocks(32, 32, 8, 2)
    elif dp <= 64:
        b = Blocks(128, 64, 4, 3)
    elif dp <= 128:
        b = Blocks(128, 64, 8, 3)
    else:
        b = Blocks(64, 32, 8, 2)
    fit = max(16, pl.next_power_of_2(seq_len))
    return dataclasses.replace(b, q=min(b.q, fit), k=min(b.k, fit))


def visible_keys(segment_ids: jax.Array, window: jax.Array | int, causal: bool
                 ) -> tuple[jax.Array, jax.Array]:
    """lo, hi [B, T] int32: query i of a row sees keys j with lo[i] <= j < hi[i]: those of its own
    run of equal ids, at or before it if causal, within `window` positions if window > 0. Both
    never decrease along a row (what lets the kernel bound a query block's keys by its ends)."""
    t = segment_ids.shape[1]
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    change = segment_ids[:, 1:] != segment_ids[:, :-1]  # [B, T-1]: a run ends at i, another starts
    edge = jnp.ones((segment_ids.shape[0], 1), bool)  # a row's ends end runs (T may be 1)
    first = jnp.concatenate([edge, change], axis=1)
    last = jnp.concatenate([change, edge], axis=1)
    lo = lax.cummax(jnp.where(first, pos, 0), axis=1)
    hi = lax.cummin(jnp.where(last, pos + 1, t), axis=1, reverse=True)
    if causal:
        hi = jnp.minimum(hi, pos + 1)
    w = jnp.asarray(window, jnp.int32)
    lo = jnp.where(w > 0, jnp.maximum(lo, pos - w + 1), lo)
    hi = jnp.where(w > 0, jnp.minimum(hi, pos + w), hi)
    return lo.astype(jnp.int32), hi.astype(jnp.int32)


def key_blocks(lo: jax.Array, hi: jax.Array, block_k: int) -> tuple[jax.Array, jax.Array]:
    """The key blocks [first, stop) that a query block with `visible_keys` lo, hi [..., rows]
    reads: all others are masked for each of its rows."""
    return (lax.div(jnp.min(lo, axis=-1), block_k),
            lax.div(jnp.max(hi, axis=-1) + (block_k - 1), block_k))


def _kernel(q_ref, k_ref, v_ref, lo_ref, hi_ref, o_ref, *, scale: float, softcap: float | None,
            seq_len: int, head_dim: int, block_q: int, block_k: int):
    """One query block of one head of one row. Refs: q, o [block_q, Dp]; k, v [T, Dp] (this
    head's kv head, the whole row); lo, hi [block_q]."""
    dp = q_ref.shape[-1]
    rows = pl.program_id(0) * block_q + jnp.arange(block_q)
    row_ok = rows < seq_len
    dim_ok = jnp.arange(dp) < head_dim
    q = plgpu.load(q_ref, mask=row_ok[:, None] & dim_ok[None, :], other=0)
    # Rows past T see nothing and widen nothing: lo = T, hi = 0.
    lo = plgpu.load(lo_ref, mask=row_ok, other=seq_len)
    hi = plgpu.load(hi_ref, mask=row_ok, other=0)
    first, stop = key_blocks(lo, hi, block_k)
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

    def body(j, carry):
        acc, m, total = carry
        start = j * block_k
        cols = start + jnp.arange(block_k)
        kv_mask = (cols < seq_len)[:, None] & dim_ok[None, :]
        # Keys and values past T read as zeros: garbage there could be NaN, and 0 * NaN is NaN.
        k = plgpu.load(k_ref.at[pl.ds(start, block_k), :], mask=kv_mask, other=0)
        s = plgpu.dot(q, k, trans_b=True, precision=precision) * scale  # [block_q, block_k] f32
        if softcap:
            s = jnp.tanh(s / softcap) * softcap
        seen = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
        s = jnp.where(seen, s * LOG2E, MASKED)  # base 2 from here on: exp2 is the cheap one
        m_next = jnp.maximum(m, jnp.max(s, axis=1))
        correction = jnp.exp2(m - m_next)
        p = jnp.exp2(s - m_next[:, None])
        v = plgpu.load(v_ref.at[pl.ds(start, block_k), :], mask=kv_mask, other=0)
        pv = plgpu.dot(p.astype(v.dtype), v, precision=precision)  # [block_q, Dp]
        return (acc * correction[:, None] + pv, m_next,
                total * correction + jnp.sum(p, axis=1))

    init = (jnp.zeros((block_q, dp), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc, _, total = lax.fori_loop(first, stop, body, init)
    # Every row < T saw its own key, so total >= 1 there; rows past T are not stored.
    out = acc / total[:, None]
    plgpu.store(o_ref, out.astype(o_ref.dtype), mask=row_ok[:, None] & dim_ok[None, :])


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "causal", "interpret"))
def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
              window: jax.Array | int, *, scale: float, softcap: float | None = None,
              causal: bool = True, interpret: bool = False) -> jax.Array:
    """Self-attention of q [B, T, H, Dh] over k, v [B, T, K, Dh] (H a multiple of K), in q's dtype
    [B, T, H, Dh]. A token sees the tokens of its own segment (a contiguous run of equal ids of
    segment_ids [B, T]), at or before it if causal, and within `window` positions if window > 0
    (an int32 scalar, may be traced). Scores are scaled by `scale`, then soft-capped
    (tanh(s / softcap) * softcap) if softcap. Requires `supported(Dh, q.dtype)`.

    interpret: run the kernel in Pallas' interpreter (any backend; for tests)."""
    b, t, h, dh = q.shape
    kv_heads = k.shape[2]
    if h % kv_heads or k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != dh:
        raise ValueError(f"attention takes q [B, T, H, Dh] and k, v [B, T, K, Dh] with K "
                         f"dividing H, not {q.shape}, {k.shape}, {v.shape}")
    if not supported(dh, q.dtype):
        raise ValueError(f"no GPU attention kernel for head size {dh} in {q.dtype}")
    group = h // kv_heads
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    lo, hi = visible_keys(segment_ids.astype(jnp.int32), window, causal)
    blk = blocks_for(dh, q.dtype, t)
    dp = pl.next_power_of_2(dh)
    kernel = functools.partial(_kernel, scale=float(scale), softcap=softcap, seq_len=t,
                               head_dim=dh, block_q=blk.q, block_k=blk.k)
    q_spec = pl.BlockSpec((None, blk.q, None, dp), lambda i, r, j: (r, i, j, 0))
    kv_spec = pl.BlockSpec((None, t, None, dp), lambda i, r, j: (r, 0, j // group, 0))
    row_spec = pl.BlockSpec((None, blk.q), lambda i, r, j: (r, i))
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(t, blk.q), b, h),
        in_specs=[q_spec, kv_spec, kv_spec, row_spec, row_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=blk.warps, num_stages=blk.stages),
        interpret=interpret,
        name="jaxembed_attention",
    )(q, k, v, lo, hi)


def reference_mask(segment_ids: jax.Array, window: jax.Array | int, causal: bool) -> jax.Array:
    """[B, T, T] bool, the model's mask (`layers.attention_masks`): equal ids, causal if causal,
    within `window` positions if window > 0."""
    t = segment_ids.shape[1]
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    mask = segment_ids[:, :, None] == segment_ids[:, None, :]
    if causal:
        mask = mask & jnp.asarray(j <= i)[None]
    w = jnp.asarray(window, jnp.int32)
    return mask & ((w <= 0) | (jnp.abs(jnp.asarray(i - j)) < w))[None]


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                        window: jax.Array | int, *, scale: float, softcap: float | None = None,
                        causal: bool = True) -> jax.Array:
    """`attention` in XLA, the [B, H, T, T] scores materialized and everything in float32: the
    reference the kernel is tested against (segments as equal ids, as the model's XLA path)."""
    b, t, h, dh = q.shape
    kv_heads = k.shape[2]
    f32 = jnp.float32
    hi = lax.Precision.HIGHEST
    qg = q.astype(f32).reshape(b, t, kv_heads, h // kv_heads, dh)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(f32), precision=hi) * scale
    if softcap:
        s = jnp.tanh(s / softcap) * softcap
    mask = reference_mask(segment_ids, window, causal)
    s = jnp.where(mask[:, None, None], s, jnp.finfo(f32).min)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(f32), precision=hi)
    return out.reshape(b, t, h, dh).astype(q.dtype)
