"""Products with weights kept in their quantized blocks, as one Pallas kernel for NVIDIA GPUs
(Triton lowering; tiles for Hopper, H100/H200): x [M, K] @ w.T for w a `QArrays` [N, K] in any
layout of `jaxembed.weights.quant` (read its docstring: the formula, the nibble order).

Each program dequantizes tiles of the weight in registers, never the whole weight in memory: it
reads the tile's bytes, integer scales and float16 scales, forms

    w = (d * sc) * q - dmin * m

in float32 exactly as `jaxembed.quant.dequantize` does, rounds it to bfloat16 and multiplies it
with bfloat16 rows of x on the tensor cores, accumulating in float32. The result is float32.

The layouts are read through free reshapes of their arrays, in "chunks" of 32 values (bytes) or 64
(nibbles), so that every tile is a plain strided load and no value is shuffled in registers:

- 8-bit values: a chunk is 32 values; qs [N, K] is read as [N, K/32, 32].
- 4-bit values: a chunk is 64 values in 32 bytes, byte i holding value i (low nibble) and value
  32 + i (high nibble). Rather than interleave the nibbles back into order, the kernel multiplies
  each half on its own: the low nibbles of a tile against x's columns 64c + i, the high ones
  against 64c + 32 + i (x read as [M, K/64, 2, 32], again a free reshape). Two MMAs of half the
  depth, the same work as one.
- Integer scales and mins per group of 32 (one per half chunk) or 16 (two per half chunk), float16
  scales per block of 32 (one per half chunk) or 256 (one per tile: a tile never spans two).

Tiles (Triton's own matmul configurations for H100 and the usual shape of weight-only kernels;
not timed on a GPU yet, but each layout's compiles for sm_90 without spills, Triton 3.9 and
ptxas: up to 186 KiB of shared memory and 255 registers a thread):

- M > 64 (prefill, embeddings): 128 x 128 output tiles, 128 values of K a step, 8 warps, 3
  stages; the MMAs are large and the weight's dequantization is amortized over 128 rows.
- M <= 64 (decode): the product is bound by reading the weight once, so the tile is as short as
  Triton's dots allow (16 rows, or M rounded up to a power of two), 64 outputs wide and 256 values
  of K a step, and K is split across programs (`splits`, partial sums added by XLA after) until
  there are about two programs per SM: a 4096 x 4096 weight is 64 column tiles alone, half of an
  H100's 132 SMs.

Rows, columns and K past the arrays' ends are masked on every load and store: any M and N, and
any K of whole chunks (which every layout's rows are) that is not a whole number of steps.

Neither Pallas nor XLA has this elsewhere: `jax.experimental.pallas.ops.gpu`'s
`hopper_mixed_type_matmul_mgpu` multiplies int8 by bfloat16 without any scales, and XLA's own path
(`jaxembed.quant.matmul` with passes 0) dequantizes the whole weight into memory for each product.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxembed.weights.quant import QArrays, QLayout

SMALL_M = 64  # rows up to which a product is planned as decode's (weight-bound)
TARGET_PROGRAMS = 264  # for decode: about two programs on each of an H100's 132 SMs
LANES = 32  # values (or bytes) a chunk row: the unit every array is read in


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One kernel configuration: output rows and columns per program, K values per step, the
    splits of K across programs, and Triton's warps and stages."""

    m: int
    n: int
    k: int
    splits: int
    warps: int
    stages: int


def supported(layout: QLayout) -> bool:
    """Whether `qmatmul` takes weights of this layout (every layout `weights.quant` makes)."""
    return (layout.bits in (4, 8) and layout.group in (16, 32) and layout.block in (32, 256)
            and layout.block % layout.group == 0 and not (layout.bits == 4 and layout.signed))


def _chunk(layout: QLayout) -> int:
    return 2 * LANES if layout.bits == 4 else LANES


def tiles_for(layout: QLayout, m: int, n: int, k: int) -> Tiles:
    """The tiles for an [M, K] x [N, K]^T product (see the module docstring)."""
    chunk = _chunk(layout)
    if m <= SMALL_M:
        bm, bn, bk, warps, stages = max(16, pl.next_power_of_2(m)), 64, 256, 4, 4
    else:
        bm, bn, bk, warps, stages = 128, 128, 128, 8, 3
    # Short rows of K need no long steps; a step stays a whole number of chunks and (as a power
    # of two up to 256) never spans two K-quant super-blocks.
    bk = max(chunk, min(bk, pl.next_power_of_2(k)))
    steps = pl.cdiv(k, bk)
    splits = 1
    if m <= SMALL_M:
        programs = pl.cdiv(m, bm) * pl.cdiv(n, bn)
        splits = min(steps, max(1, pl.cdiv(TARGET_PROGRAMS, programs)))
        splits = pl.cdiv(steps, pl.cdiv(steps, splits))  # no split left without steps
    return Tiles(bm, bn, bk, splits, warps, stages)


def _load_group(ref, c0, chunks: int, half: int, group: int, rows_ok, chunks_ok):
    """Integer scales (or mins) of `chunks` chunks' half `half`, float32, broadcastable against
    the half's values [bn, chunks, 32]."""
    if group == LANES:  # one per half chunk: ref [bn, C, halves]
        s = plgpu.load(ref.at[:, pl.ds(c0, chunks), half],
                       mask=rows_ok[:, None] & chunks_ok[None, :], other=0)
        return s.astype(jnp.float32)[:, :, None]
    # Two per half chunk: ref [bn, C, halves, 2], each over 16 values.
    s = plgpu.load(ref.at[:, pl.ds(c0, chunks), half, :],
                   mask=(rows_ok[:, None] & chunks_ok[None, :])[:, :, None], other=0)
    bn = s.shape[0]
    s = jnp.broadcast_to(s.astype(jnp.float32)[:, :, :, None], (bn, chunks, 2, LANES // 2))
    return s.reshape(bn, chunks, LANES)


def _kernel(*refs, layout: QLayout, m: int, n: int, k: int, tiles: Tiles):
    """One [bm, bn] output tile over one split of K. Refs (those the layout has): x [bm, K/chunk,
    halves, 32] bf16; qs [bn, K/chunk, 32]; scales, mins [bn, K/chunk, halves(, 2)]; d, dmin
    [bn, K/chunk, halves] (blocks of 32) or [bn, K/256]; out [bm, bn] float32."""
    lay = layout
    it = iter(refs)
    x_ref, q_ref = next(it), next(it)
    sc_ref = next(it) if lay.scales else None
    mn_ref = next(it) if lay.mins else None
    d_ref = next(it)
    dmin_ref = next(it) if lay.dmin else None
    o_ref = next(it)
    halves = 2 if lay.bits == 4 else 1
    chunk = halves * LANES
    chunks = tiles.k // chunk  # chunks a step
    n_chunks = k // chunk
    steps = pl.cdiv(k, tiles.k)
    per_split = pl.cdiv(steps, tiles.splits)
    bm, bn = tiles.m, tiles.n
    rows = pl.program_id(0) * bm + jnp.arange(bm)
    cols = pl.program_id(1) * bn + jnp.arange(bn)
    rows_ok, cols_ok = rows < m, cols < n
    split = pl.program_id(2)
    f32 = jnp.float32

    def scale_of(ref, c0, step, half, chunks_ok):
        """A float16 scale per value of the half, float32, broadcastable to [bn, C, 32]."""
        if lay.block == LANES:  # one per half chunk: ref [bn, K/chunk, halves]
            s = plgpu.load(ref.at[:, pl.ds(c0, chunks), half],
                           mask=cols_ok[:, None] & chunks_ok[None, :], other=0)
            return s.astype(f32)[:, :, None]
        # One per super-block, and a step lies within one: ref [bn, K/block].
        s = plgpu.load(ref.at[:, lax.div(step * tiles.k, lay.block)], mask=cols_ok, other=0)
        return s.astype(f32)[:, None, None]

    def body(step, acc):
        c0 = step * chunks
        chunks_ok = c0 + jnp.arange(chunks) < n_chunks
        ok = cols_ok[:, None, None] & chunks_ok[None, :, None]
        raw = plgpu.load(q_ref.at[:, pl.ds(c0, chunks), :], mask=ok, other=0)  # [bn, C, 32]
        for h in range(halves):
            half = jnp.int32(h)  # a traced index: Pallas' interpreter refuses Python ints
            vals = (raw >> (4 * h)) & 0x0F if lay.bits == 4 else raw
            vals = vals.astype(f32)
            sc = (_load_group(sc_ref, c0, chunks, half, lay.group, cols_ok, chunks_ok)
                  if lay.scales else f32(1))
            mn = (_load_group(mn_ref, c0, chunks, half, lay.group, cols_ok, chunks_ok)
                  if lay.mins else f32(lay.min_offset) * sc)
            d = scale_of(d_ref, c0, step, half, chunks_ok)
            dmin = scale_of(dmin_ref, c0, step, half, chunks_ok) if lay.dmin else d
            # As jaxembed.quant.dequantize rounds it, then to bfloat16 for the MMA.
            w = ((d * sc) * vals - dmin * mn).reshape(bn, chunks * LANES).astype(jnp.bfloat16)
            xs = plgpu.load(x_ref.at[:, pl.ds(c0, chunks), half, :],
                            mask=rows_ok[:, None, None] & chunks_ok[None, :, None], other=0)
            acc = acc + plgpu.dot(xs.reshape(bm, chunks * LANES), w, trans_b=True)
        return acc

    first = split * per_split
    stop = jnp.minimum(first + per_split, steps)
    acc = lax.fori_loop(first, stop, body, jnp.zeros((bm, bn), f32))
    plgpu.store(o_ref, acc, mask=rows_ok[:, None] & cols_ok[None, :])


def _views(x: jax.Array, w: QArrays) -> list[jax.Array]:
    """The kernel's operands: free reshapes of x (as bfloat16) and of the weight's arrays into
    chunks (see the module docstring)."""
    lay = w.layout
    m, k = x.shape
    n = int(w.qs.shape[0])
    halves = 2 if lay.bits == 4 else 1
    c = k // (halves * LANES)
    ops = [x.astype(jnp.bfloat16).reshape(m, c, halves, LANES), w.qs.reshape(n, c, LANES)]
    per_group = (halves,) if lay.group == LANES else (halves, 2)
    ops += [a.reshape(n, c, *per_group) for a in (w.scales, w.mins) if a is not None]
    for a in (w.d, w.dmin):
        if a is not None:
            ops.append(a.reshape(n, c, halves) if lay.block == LANES else a)
    return ops


@functools.partial(jax.jit, static_argnames=("interpret",))
def qmatmul(x: jax.Array, w: QArrays, *, interpret: bool = False) -> jax.Array:
    """x [M, K] (bfloat16 or float32) @ w.T for w a quantized [N, K] weight (`QArrays` of jax
    arrays): float32 [M, N], from bfloat16 products of x and the dequantized weight summed in
    float32. Requires `supported(w.layout)`.

    interpret: run the kernel in Pallas' interpreter (any backend; for tests)."""
    lay = w.layout
    m, k = x.shape
    if w.qs.ndim != 2 or w.k != k:
        raise ValueError(f"qmatmul takes x [M, K] and a weight [N, K], not {list(x.shape)} and "
                         f"{list(w.shape)}")
    if not supported(lay):
        raise ValueError(f"no GPU kernel for quantized weights of layout {lay}")
    n = int(w.qs.shape[0])
    tiles = tiles_for(lay, m, n, k)
    ops = _views(x, w)
    grid = (pl.cdiv(m, tiles.m), pl.cdiv(n, tiles.n), tiles.splits)
    # x by tiles of rows, each weight array by tiles of output columns; K whole (a step loads
    # its own slice of it).
    in_specs = [_row_tiles(ops[0], tiles.m, 0)] + [_row_tiles(a, tiles.n, 1) for a in ops[1:]]
    kernel = functools.partial(_kernel, layout=lay, m=m, n=n, k=k, tiles=tiles)
    partials = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, tiles.m, tiles.n), lambda i, j, s: (s, i, j)),
        out_shape=jax.ShapeDtypeStruct((tiles.splits, m, n), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=tiles.warps, num_stages=tiles.stages),
        interpret=interpret,
        name="jaxembed_qmatmul",
    )(*ops)
    return partials[0] if tiles.splits == 1 else partials.sum(axis=0)


def _row_tiles(a: jax.Array, rows: int, axis: int) -> pl.BlockSpec:
    """Tiles of `rows` rows of a (all of its other dims), the grid's `axis` choosing the tile."""
    rest = (0,) * (a.ndim - 1)
    return pl.BlockSpec((rows, *a.shape[1:]), lambda i, j, s: ((i, j)[axis], *rest))
