"""A decode step's attention on an NVIDIA GPU, read from the KV cache where it lies: one query
token per row against the keys and values of the row's cache slot, as one Pallas (Triton) kernel
per layer, with the semantics of `layers.attend_one` over the model's decode mask.

Why a kernel: XLA's decode path first gathers each row's first `kv_len` cached positions
([B, K, kv_len, Dh], `kv_cache.read`) and then multiplies them, so every layer writes and reads a
copy of the cache in use beside reading the cache itself: three times the bytes a decode step
needs, on the step whose cost is its bytes. Here each program loads its slot's keys block by
block straight from the cache buffer and never writes anything but its [G, Dh] output.

- Which rows: `rows` [B] indexes the cache's first axis. A stacked cache [L, S + 1, K, M, Dh] is
  passed flattened to [L * (S + 1), K, M, Dh] (a reshape of a contiguous buffer: no copy) with
  rows = layer * (S + 1) + slot, so the scanned layer's index needs no kernel of its own.
- What a row sees: positions [lo, hi), computed in XLA: hi = position + 1 (the token's own key,
  written before the kernel runs), lo = hi - window for a sliding layer. Blocks outside that
  interval are never read, so a row pays for its own length, not for the step's kv_len.
- Grouped heads: a program takes the G query heads of one kv head (padded to Triton's 16 rows),
  so each key block is read once for the group.
- Split-K (flash decoding): few rows of a long context would leave most of the GPU idle with one
  program per (row, kv head); the positions are split over `splits` programs whose partial
  softmax sums are combined in XLA.

Numerics as `gpu.attention`: scores, the softmax and the accumulator in float32; products take
the query's dtype; the cache's dtype is converted on load.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxembed.gpu.attention import LOG2E, MASKED, supported

__all__ = ["decode_attention", "splits_for", "supported"]

MIN_ROWS = 16  # Triton's dots take at least 16 rows: query heads of a group are padded to it
BLOCK_K = 64  # cached positions per loaded tile (see `block_k`)
TILE_BYTES = 32 * 1024  # the most one key or value tile may take in shared memory


def block_k(head_dim: int, itemsize: int) -> int:
    """Cached positions per tile: BLOCK_K, halved where a tile would pass TILE_BYTES (float32 at
    head size 256: two tiles of 64 KiB, double-buffered, would not fit an H100's 227 KiB of
    shared memory)."""
    dp = pl.next_power_of_2(head_dim)
    return BLOCK_K if BLOCK_K * dp * itemsize <= TILE_BYTES else BLOCK_K // 2
TARGET_PROGRAMS = 256  # about two programs per SM on an H100 (132 SMs)


def splits_for(rows: int, kv_heads: int, kv_len: int) -> int:
    """How many programs share one (row, kv head)'s positions: enough to fill the GPU when rows x
    kv heads do not, never fewer than 4 tiles of BLOCK_K positions each."""
    want = max(1, TARGET_PROGRAMS // max(1, rows * kv_heads))
    return int(max(1, min(want, kv_len // (4 * BLOCK_K))))


def _kernel(q_ref, k_ref, v_ref, rows_ref, lo_ref, hi_ref, o_ref, m_ref, l_ref, *,
            scale: float, softcap: float | None, head_dim: int, splits: int, bk: int):
    """One split of one kv head of one row. Refs: q, o [Gp, Dp]; k, v the whole cache
    [N, K, M, Dh]; rows, lo, hi [1]; m, l [Gp]."""
    kv_head = pl.program_id(1)
    split = pl.program_id(2)
    dp = q_ref.shape[-1]
    dim_ok = jnp.arange(dp) < head_dim
    q = q_ref[...]
    row, lo, hi = rows_ref[0], lo_ref[0], hi_ref[0]
    first, stop = lax.div(lo, bk), lax.div(hi + bk - 1, bk)
    per = lax.div(stop - first + splits - 1, splits)
    start_block = first + split * per
    stop_block = jnp.minimum(start_block + per, stop)
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

    def body(j, carry):
        acc, m, total = carry
        cols = j * bk + jnp.arange(bk)
        seen = (cols >= lo) & (cols < hi)
        # Positions past the row's end are never loaded: they may hold another sequence's keys,
        # or nothing yet, and 0 * NaN is NaN.
        kv_mask = seen[:, None] & dim_ok[None, :]
        at = (row, kv_head, pl.ds(j * bk, bk), pl.ds(0, dp))  # Dh padded, masked
        k = plgpu.load(k_ref.at[at], mask=kv_mask, other=0).astype(q.dtype)
        s = plgpu.dot(q, k, trans_b=True, precision=precision) * scale  # [Gp, bk] f32
        if softcap:
            s = jnp.tanh(s / softcap) * softcap
        s = jnp.where(seen[None, :], s * LOG2E, MASKED)
        m_next = jnp.maximum(m, jnp.max(s, axis=1))
        correction = jnp.exp2(m - m_next)
        p = jnp.exp2(s - m_next[:, None])
        v = plgpu.load(v_ref.at[at], mask=kv_mask, other=0).astype(q.dtype)
        pv = plgpu.dot(p.astype(v.dtype), v, precision=precision)  # [Gp, Dp]
        return acc * correction[:, None] + pv, m_next, total * correction + jnp.sum(p, axis=1)

    gp = q.shape[0]
    init = (jnp.zeros((gp, dp), jnp.float32), jnp.full((gp,), -jnp.inf, jnp.float32),
            jnp.zeros((gp,), jnp.float32))
    acc, m, total = lax.fori_loop(start_block, stop_block, body, init)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = total


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "splits", "interpret"))
def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, rows: jax.Array,
                     positions: jax.Array, window: jax.Array | int, *, scale: float,
                     softcap: float | None = None, splits: int = 1, interpret: bool = False
                     ) -> jax.Array:
    """Attention of one query per row, q [B, H, Dh], over the cache rows `rows` [B] of k_cache,
    v_cache [N, K, M, Dh] (H a multiple of K): row b sees positions up to positions[b], the last
    `window` of them if window > 0 (an int32 scalar, may be traced). Scores are scaled by `scale`,
    then soft-capped if softcap. Returns [B, H, Dh] in q's dtype. The token's own key and value
    must be in the cache already. Requires `supported(Dh, q.dtype)`.

    splits: programs per (row, kv head), see `splits_for`. interpret: run in Pallas' interpreter
    (any backend; for tests)."""
    b, h, dh = q.shape
    n, kv_heads, max_len, cdh = k_cache.shape
    if h % kv_heads or k_cache.shape != v_cache.shape or cdh != dh:
        raise ValueError(f"decode_attention takes q [B, H, Dh] and caches [N, K, M, Dh] with K "
                         f"dividing H, not {q.shape}, {k_cache.shape}, {v_cache.shape}")
    if not supported(dh, q.dtype):
        raise ValueError(f"no GPU decode attention kernel for head size {dh} in {q.dtype}")
    group = h // kv_heads
    gp, dp = max(MIN_ROWS, pl.next_power_of_2(group)), pl.next_power_of_2(dh)
    qg = jnp.pad(q.reshape(b, kv_heads, group, dh), ((0, 0), (0, 0), (0, gp - group),
                                                      (0, dp - dh)))
    positions = positions.astype(jnp.int32)
    hi = positions + 1
    w = jnp.asarray(window, jnp.int32)
    lo = jnp.where(w > 0, jnp.maximum(hi - w, 0), 0)
    itemsize = max(jnp.dtype(q.dtype).itemsize, jnp.dtype(k_cache.dtype).itemsize)
    kernel = functools.partial(_kernel, scale=float(scale), softcap=softcap, head_dim=dh,
                               splits=splits, bk=block_k(dh, itemsize))
    q_spec = pl.BlockSpec((None, None, gp, dp), lambda r, kh, s: (r, kh, 0, 0))
    part_spec = pl.BlockSpec((None, None, None, gp, dp), lambda r, kh, s: (r, kh, s, 0, 0))
    sum_spec = pl.BlockSpec((None, None, None, gp), lambda r, kh, s: (r, kh, s, 0))
    one = pl.BlockSpec((1,), lambda r, kh, s: (r,))
    cache = pl.BlockSpec(memory_space=pl.ANY)  # the whole buffer, indexed in the kernel
    parts, m, total = pl.pallas_call(
        kernel,
        grid=(b, kv_heads, splits),
        in_specs=[q_spec, cache, cache, one, one, one],
        out_specs=[part_spec, sum_spec, sum_spec],
        out_shape=[jax.ShapeDtypeStruct((b, kv_heads, splits, gp, dp), jnp.float32),
                   jax.ShapeDtypeStruct((b, kv_heads, splits, gp), jnp.float32),
                   jax.ShapeDtypeStruct((b, kv_heads, splits, gp), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="jaxembed_decode_attention",
    )(qg, k_cache, v_cache, rows.astype(jnp.int32), lo, hi)
    # The splits' partial sums, each under its own running maximum, on one scale. Every row sees
    # its own key, so some split's maximum is finite and the weights sum to at least 1.
    top = m.max(axis=2, keepdims=True)
    weight = jnp.exp2(m - top)  # [B, K, splits, Gp]
    out = (parts * weight[..., None]).sum(2) / (total * weight).sum(2)[..., None]
    return out[:, :, :group, :dh].reshape(b, h, dh).astype(q.dtype)
