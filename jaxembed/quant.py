"""Quantized weights in the model: products, embedding rows, and per-layer stacks.

A quantized weight is a `QArrays` (jaxembed.weights.quant): [..., N, K] in its blocks, N outputs
by K inputs. `matmul(x, w)` is x @ w^T, in the CPU kernel (`kernels.qmatmul`, where the plan put
`passes`: 1 for int8 activations as llama.cpp's, 2 for nearly float32's precision; products of
few rows, where reading the weights is the cost), a GPU's Pallas kernel (`jaxembed.gpu.qmatmul`,
which dequantizes tiles in registers into bf16 products), or XLA over the weight dequantized for
the step (any backend: the fallback; on a CPU the faster for products of many rows).

Layers' quantized weights are not stacked into [L, ...] arrays as float ones are: a model's
layers may hold one weight in several types (llama.cpp's Q4_K_M keeps some layers' attn_v and
ffn_down in Q6_K), and a product over a slice of a stacked array would copy the slice first (a
decode step would move its weights twice). A `QStack` holds each layer's own arrays; the scanned
layer body gets a `QRef` (the stack and the traced layer index), whose product is a `lax.switch`
over the layers: each branch multiplies by its layer's arrays in place.

Shapes: M rows, N outputs, K inputs, L layers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxembed import kernels
from jaxembed.weights.quant import QArrays, QLayout


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QStack:
    """One quantized weight of every layer of a stack (their layouts may differ)."""

    slices: tuple[QArrays, ...]

    def __len__(self) -> int:
        return len(self.slices)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.slices)


@dataclasses.dataclass(frozen=True)
class QRef:
    """Layer `index` (traced, inside a scan) of a `QStack`: what a layer body multiplies by."""

    stack: QStack
    index: jax.Array


def is_quantized(w: Any) -> bool:
    return isinstance(w, QArrays | QStack | QRef)


def dequantize(w: QArrays, dtype: Any = jnp.float32) -> jax.Array:
    """The [..., N, K] weight in dtype, computed in float32 as `weights.quant.dequantize`."""
    lay: QLayout = w.layout
    *lead, n, _ = w.qs.shape
    k = w.k
    if lay.bits == 4:
        g = w.qs.reshape(*lead, n, k // 64, 32)
        vals = jnp.concatenate([g & 0x0F, g >> 4], axis=-1)  # per 64: the low nibbles first
    else:
        vals = w.qs
    vals = vals.reshape(*lead, n, k // lay.group, lay.group).astype(jnp.float32)
    f32 = jnp.float32
    sc = w.scales.astype(f32) if w.scales is not None else f32(1)
    m = w.mins.astype(f32) if w.mins is not None else f32(lay.min_offset) * sc
    per = lay.block // lay.group
    d = jnp.repeat(w.d.astype(f32), per, axis=-1)
    dmin = jnp.repeat(w.dmin.astype(f32), per, axis=-1) if w.dmin is not None else d
    out = (d * sc)[..., None] * vals - (dmin * m)[..., None]
    return out.reshape(*lead, n, k).astype(dtype)


def matmul(x: jax.Array, w: QArrays | QRef) -> jax.Array:
    """x [..., K] @ w^T -> [..., N] in x's dtype (float32 accumulation)."""
    if isinstance(w, QRef):
        branches = [lambda x, s=s: matmul(x, s) for s in w.stack.slices]
        return jax.lax.switch(w.index, branches, x)
    rows = math.prod(x.shape[:-1])  # static: the choice is made per compiled shape
    if w.op in ("gpu", "gpu_interpret"):
        from jaxembed.gpu import qmatmul as gpu_qmatmul  # Pallas: only where it runs

        out = gpu_qmatmul.qmatmul(x.reshape(rows, x.shape[-1]), w,
                                  interpret=w.op == "gpu_interpret")
        return out.reshape(*x.shape[:-1], out.shape[-1]).astype(x.dtype)
    if w.op == "cpu" and rows <= w.kernel_rows:
        return kernels.qmatmul(x, w, w.passes).astype(x.dtype)
    return _dequantized_product(x, w)


# The most bytes of a weight that XLA's path dequantizes at once.
DEQUANTIZED_CHUNK_BYTES = 16 << 20


def _chunks(n: int, k: int, itemsize: int) -> int:
    """Into how many equal parts a [n, k] weight's rows are dequantized: the fewest that keep a
    part within DEQUANTIZED_CHUNK_BYTES, if one divides n into parts of 64 rows or more."""
    need = -(-n * k * itemsize // DEQUANTIZED_CHUNK_BYTES)
    return next((c for c in range(need, n // 64 + 1) if n % c == 0), 1) if need > 1 else 1


def _dequantized_product(x: jax.Array, w: QArrays) -> jax.Array:
    """x [..., K] @ w^T over the weight dequantized within the step, a part of its rows at a
    time (a loop: one part's floats live at once). Within a step XLA's dequantization costs
    little next to the product it feeds; the whole weight at once cost its size in float32 (at
    1.7B, 64 MB for an MLP weight and 400 MB for the head) on top of a prefill's peak, while a
    part of 16 MB multiplies at the same rate."""
    *lead, n, k = w.shape
    rows = math.prod(x.shape[:-1])
    # Parts stack their outputs, then move them into place (a second [rows, n]): worth it only
    # where the weight's floats outweigh the output's. Measured on SmolLM2-135M's head (k = 576),
    # 1,024 rows in parts took 783 ms and 206 MB of temp, against 618 ms and 108 MB whole.
    split = not lead and rows < k
    parts = _chunks(n, k, jnp.dtype(x.dtype).itemsize) if split else 1

    def product(part: QArrays) -> jax.Array:  # [..., K] @ [n / parts, K]^T
        return jnp.einsum("...k,nk->...n", x, dequantize(part, x.dtype),
                          preferred_element_type=jnp.float32).astype(x.dtype)
    if parts == 1:
        return product(w)
    pieces = w.map(lambda a: a.reshape(parts, n // parts, a.shape[-1]))
    out = jax.lax.map(product, pieces)  # [parts, ..., n / parts]
    return jnp.moveaxis(out, 0, -2).reshape(*x.shape[:-1], n)


def dequantized(w: QArrays | QRef, dtype: Any) -> jax.Array:
    """The whole weight [..., N, K] in dtype (experts, which `ragged_dot` multiplies)."""
    if isinstance(w, QRef):
        branches = [lambda s=s: dequantize(s, dtype) for s in w.stack.slices]
        return jax.lax.switch(w.index, branches)
    return dequantize(w, dtype)


def take_rows(w: QArrays, ids: jax.Array, dtype: Any) -> jax.Array:
    """Rows `ids` [...] of a [N, K] weight (an embedding table), dequantized: [..., K]."""
    return dequantize(w.map(lambda a: a[ids]), dtype)


def at_layer(tree: dict[str, Any], index: Any) -> dict[str, Any]:
    """A layer's view of a stack's params: each `QStack` as layer `index` of it (a `QRef` for a
    traced index, the layer's own arrays for a static one)."""
    if isinstance(index, int):
        return {n: v.slices[index] if isinstance(v, QStack) else v for n, v in tree.items()}
    return {n: QRef(v, index) if isinstance(v, QStack) else v for n, v in tree.items()}


def split_stacked(tree: dict[str, Any]) -> tuple[dict[str, Any], dict[str, QStack]]:
    """A stack's params as (arrays stacked over layers, per-layer `QStack`s)."""
    return ({n: v for n, v in tree.items() if not isinstance(v, QStack)},
            {n: v for n, v in tree.items() if isinstance(v, QStack)})


def with_op(tree: Any, op: str, passes: int = 2, kernel_rows: int = 1 << 30) -> Any:
    """params with every quantized weight set to multiply by `op` (see `QArrays`): the CPU
    kernel over activations quantized in `passes` passes for products of at most `kernel_rows`
    rows, where the weight's rows are whole 64-value pairs of chunks (as the kernel reads them);
    a GPU kernel where it takes the layout; else XLA."""
    gpu = op.startswith("gpu")
    if gpu:  # Pallas takes seconds to import: only where it runs
        from jaxembed.gpu import qmatmul as gpu_qmatmul

    def one(x: Any) -> Any:
        if not isinstance(x, QArrays):
            return x
        fits = (len(x.shape) == 2 and gpu_qmatmul.supported(x.layout)) if gpu else \
            (op != "cpu" or x.k % 64 == 0)
        return dataclasses.replace(x, op=op if fits else "xla", passes=passes,
                                   kernel_rows=kernel_rows)
    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, QArrays))
