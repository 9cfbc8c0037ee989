"""Vectorized numpy dequantization of GGUF tensor data.

Every supported GGML type is declared once in ``DEQUANTIZERS``: its block size (elements), its
block byte size, and a function that turns a ``[n_blocks, type_size]`` uint8 view of raw blocks
into ``[n_blocks, block_size]`` float32.  Block layouts follow ggml (``ggml-common.h``) and the
reference implementation in ``gguf.quants``; results are bit-identical to
``gguf.quants.dequantize`` because the float32 arithmetic is done in the same order.

Multi-byte fields are little-endian (as GGUF files are), and f16 scales are decoded by viewing the
two bytes as ``np.float16``.  Quantized integers stay in (u)int8 until the final multiply, which
casts them to float32 inside the ufunc; no float64 intermediates are created.

The common types have hand-written decoders here (several times faster than the reference).  Every
other type that ``gguf.quants`` can dequantize (the IQ1-IQ3 codebook types, TQ1_0, TQ2_0, MXFP4,
...) is registered too, decoded by ``gguf.quants`` itself one chunk at a time (``REFERENCE_TYPES``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import gguf.quants
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

__all__ = [
    "DEQUANTIZERS",
    "REFERENCE_TYPES",
    "SUPPORTED_TYPES",
    "QuantType",
    "UnsupportedQuantError",
    "dequantize",
]

QK_K = 256  # elements per K-quant / IQ4_XS super-block
# Output elements per chunk: big enough to amortize per-call overhead, small enough that the
# uint8/int8 temporaries of one chunk stay in cache.
_CHUNK_ELEMS = 1 << 18

Blocks = np.ndarray  # [n_blocks, type_size] uint8


class DequantFn(Protocol):
    # ``out``, if given, is a C-contiguous [n_blocks, block_size] float32 array to write into;
    # it lets the chunk loop in ``dequantize`` fill the final array without an extra copy.
    def __call__(self, blocks: Blocks, out: np.ndarray | None = None) -> np.ndarray: ...


class UnsupportedQuantError(ValueError):
    """Raised for a GGML tensor type this module cannot dequantize."""


@dataclass(frozen=True, slots=True)
class QuantType:
    qtype: GGMLQuantizationType
    block_size: int  # elements per block
    type_size: int  # bytes per block
    dequantize_blocks: DequantFn  # [n, type_size] uint8 -> [n, block_size] float32


# ---------------------------------------------------------------------------------------------
# Field helpers
# ---------------------------------------------------------------------------------------------


def _dest(out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """float32 destination of ``shape``: a view of ``out`` or a fresh array."""
    if out is None:
        return np.empty(shape, dtype=np.float32)
    if not out.flags.c_contiguous:  # reshape would copy and the result would be lost
        raise ValueError("out must be C-contiguous")
    return out.reshape(shape)


def _f16(blocks: Blocks, offset: int) -> np.ndarray:
    """f16 field at byte ``offset`` of every block -> [n, 1] float32."""
    return blocks[:, offset : offset + 2].view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, ..., k] uint8 -> [n, ..., 2, k] uint8: all low nibbles, then all high nibbles.

    ggml packs element j in the low nibble and element j + k in the high nibble of byte j.
    """
    out = np.empty((*qs.shape[:-1], 2, qs.shape[-1]), dtype=np.uint8)
    np.bitwise_and(qs, 0x0F, out=out[..., 0, :])
    np.right_shift(qs, 4, out=out[..., 1, :])
    return out


_SHIFT_1BIT = np.arange(8, dtype=np.uint8).reshape(8, 1)
_SHIFT_2BIT = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)


def _bits(qh: np.ndarray) -> np.ndarray:
    """[n, ..., k] uint8 -> [n, ..., 8, k] uint8 in {0, 1}; [..., i, l] is bit i of byte l."""
    out = qh[..., None, :] >> _SHIFT_1BIT
    out &= 1
    return out


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """[n, ..., k] uint8 -> [n, ..., 4, k] uint8 2-bit fields; [..., j, l] = bits 2j..2j+1."""
    out = qs[..., None, :] >> _SHIFT_2BIT
    out &= 3
    return out


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 packed bytes of Q4_K/Q5_K -> (scale, min), each [n, 8] uint8 of 6-bit values.

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 do the
    same for the mins; bytes 8-11 hold the low nibbles of scales 4-7 (low) and mins 4-7 (high).
    """
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.empty((scales.shape[0], 8), dtype=np.uint8)
    mn = np.empty_like(sc)
    np.bitwise_and(d, 0x3F, out=sc[:, :4])
    np.bitwise_or(md & 0x0F, (d >> 2) & 0x30, out=sc[:, 4:])
    np.bitwise_and(m, 0x3F, out=mn[:, :4])
    np.bitwise_or(md >> 4, (m >> 2) & 0x30, out=mn[:, 4:])
    return sc, mn


# ---------------------------------------------------------------------------------------------
# Float types (block_size 1)
# ---------------------------------------------------------------------------------------------


def _deq_f32(blocks: Blocks, out: np.ndarray | None = None) -> np.ndarray:
    x = blocks.view(np.float32)  # [n, 1], no copy
    if out is None:
        return x
    dest = _dest(out, x.shape)
    dest[...] = x
    return dest


def _deq_f16(blocks: Blocks, out: np.ndarray | None = None) -> np.ndarray:
    dest = _dest(out, (blocks.shape[0], 1))
    dest[...] = blocks.view(np.float16)
    return dest


def _deq_bf16(blocks: Blocks, out: np.ndarray | None = None) -> np.ndarray:
    # bf16 is the top half of an f32; widening + shift in one ufunc pass keeps NaN payloads.
    dest = _dest(out, (blocks.shape[0], 1))
    np.left_shift(blocks.view(np.uint16), np.uint32(16), out=dest.view(np.uint32), dtype=np.uint32)
    return dest


# ---------------------------------------------------------------------------------------------
# Legacy 32-element blocks
# ---------------------------------------------------------------------------------------------


def _deq_q4_0(blocks: Blocks, out: np.ndarray | None = None) -> np.ndarray:
    # d: f16 | qs: 16 bytes of nibbles; x = d * (q - 8)
    n = blocks.shape[0]
    q = _nibbles(blocks[:, 2:]).reshape(n, 32).view(np.int8)
    q -= 8
    return np.multiply(q, _f16(blocks, 0), out=_dest(out, (n, 32)))


def _deq_q4_1(blocks: Blocks, out: np.ndarray | None = None) -> np.ndarray:
    # d: f16 | m: f16 | qs: 16 bytes of nibbles; x = d * q + m
    n = blocks.shape[0]
    q = _nibbles(blocks[:, 4:]).reshape(n, 32)
    dest = np.multiply(q, _f16(blocks, 0), out=_dest(out, (n, 32)))
    dest += _f16(blocks, 2)
    return dest


def _q5_quants(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    # qh is a little-endian u32 whose bit j is the 5th bit of element j, so the little-endian
    # bit order of its 4 bytes is exactly element order.
    q = _nibbles(qs).reshape(qs.shape[0], 32)
    q |= np.unpackbits(qh, axis=-1, bitorder="little") << 4
    return q  # [n, 32] uint8 in 0..31


def _deq_q5_0(blocks: Blocks, out: np.ndarray | None = None) -> np.ndarray:
    # d: f16 | qh: 4 bytes | qs: 16 bytes; x = d * (q - 16)
    q = _q5_quants(blocks[:, 2:6], blocks[:, 6:]).view(np.int8)
    q -= 16
    return np.multiply(q, _f16(blocks, 0), out=_dest(out, q.shape))


def _deq_q5_1(blocks: Blocks, out: np.ndarray | None = None) -> np.ndarray:
    # d: f16 | m: f16 | qh: 4 bytes | qs: 16 bytes; x = d * q + m
    q = _q5_quants(blocks[:, 4:8], blocks[:, 8:])
    dest = np.multiply(q, _f16(blocks, 0), out=_dest(out, q.shape))
    dest += _f16(blocks, 2)
    return dest


def _deq_q8_0(blocks: Blocks, out: np.ndarray | None = None) -> np.ndarray:
    # d: f16 | qs: 32 int8; x = d * q
    q = blocks[:, 2:].view(np.int8)
    return np.multiply(q, _f16(blocks, 0), out=_dest(out, q.shape))


_IQ4_NL_VALUES = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8
)
# byte -> (codebook[low nibble], codebook[high nibble]); one np.take decodes both nibbles.
_IQ4_NL_PAIRS = np.stack(
    [np.tile(_IQ4_NL_VALUES, 16), np.repeat(_IQ4_NL_VALUES, 16)], axis=-1
)  # [256, 2] int8


def _iq4_codes(qs: np.ndarray) -> np.ndarray:
    """[n, ..., k] packed bytes -> [n, ..., 2, k] int8 codebook values (strided view)."""
    return np.take(_IQ4_NL_PAIRS, qs, axis=0).swapaxes(-1, -2)


def _deq_iq4_nl(blocks: Blocks, out: np.ndarray | None = None) -> np.ndarray:
    # d: f16 | qs: 16 bytes of nibbles indexing a fixed non-linear codebook; x = d * kv[q]
    n = blocks.shape[0]
    q = _iq4_codes(blocks[:, 2:])  # [n, 2, 16]
    d = _f16(blocks, 0).reshape(n, 1, 1)
    return np.multiply(q, d, out=_dest(out, (n, 2, 16))).reshape(n, 32)


# ---------------------------------------------------------------------------------------------
# K-quants and IQ4_XS: 256-element super-blocks
# ---------------------------------------------------------------------------------------------


def _deq_q2_k(blocks: Blocks, out: np.ndarray | None = None) -> np.ndarray:
    # scales: 16 bytes (low nibble scale, high nibble min) | qs: 64 bytes of 2-bit quants
    # | d: f16 | dmin: f16.  Each 128-element half uses 32 qs bytes four times (shift 0,2,4,6);
    # every 16 consecutive outputs share one scale: x = d*sc*q - dmin*m.
    n = blocks.shape[0]
    sc = blocks[:, 0:16]
    d = _f16(blocks, 80)
    dmin = _f16(blocks, 82)
    dl = np.multiply(sc & 0x0F, d).reshape(n, 16, 1)
    ml = np.multiply(sc >> 4, dmin).reshape(n, 16, 1)
    q = _crumbs(blocks[:, 16:80].reshape(n, 2, 32)).reshape(n, 16, 16)  # [n, half*4+shift, 32]
    dest = np.multiply(q, dl, out=_dest(out, (n, 16, 16)))
    dest -= ml
    return dest.reshape(n, QK_K)


def _deq_q3_k(blocks: Blocks, out: np.ndarray | None = None) -> np.ndarray:
    # hmask: 32 bytes (high bit, *set* means no -4 offset) | qs: 64 bytes of 2-bit quants
    # | scales: 12 bytes of 16 packed 6-bit signed scales (bias 32) | d: f16.
    n = blocks.shape[0]
    scales = blocks[:, 96:108]
    # Low 4 bits: bytes 0-7 low nibbles (scales 0-7) then high nibbles (8-15).
    # High 2 bits: bytes 8-11 at shift 0 (scales 0-3), 2 (4-7), 4 (8-11), 6 (12-15).
    s = _nibbles(scales[:, 0:8]).reshape(n, 16)
    s |= _crumbs(scales[:, 8:12]).reshape(n, 16) << 4
    sv = s.view(np.int8)
    sv -= 32
    dl = np.multiply(sv, _f16(blocks, 108)).reshape(n, 16, 1)

    q = _crumbs(blocks[:, 32:96].reshape(n, 2, 32)).reshape(n, 8, 32).view(np.int8)
    # Output sub-block k (of 8 x 32) takes its high bit from bit k of hmask[0..31].
    q -= ((_bits(blocks[:, 0:32]) ^ 1) << 2).view(np.int8)
    return np.multiply(q.reshape(n, 16, 16), dl, out=_dest(out, (n, 16, 16))).reshape(n, QK_K)


def _deq_q4_k(blocks: Blocks, out: np.ndarray | None = None) -> np.ndarray:
    # d: f16 | dmin: f16 | scales: 12 bytes (8 6-bit scales + 8 6-bit mins) | qs: 128 bytes.
    # Each 32-byte chunk of qs yields 64 outputs: 32 low nibbles, then 32 high nibbles.
    n = blocks.shape[0]
    sc, mn = _k_scale_min(blocks[:, 4:16])
    dl = np.multiply(sc, _f16(blocks, 0)).reshape(n, 8, 1)
    ml = np.multiply(mn, _f16(blocks, 2)).reshape(n, 8, 1)
    q = _nibbles(blocks[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32)
    dest = np.multiply(q, dl, out=_dest(out, (n, 8, 32)))
    dest -= ml
    return dest.reshape(n, QK_K)


def _deq_q5_k(blocks: Blocks, out: np.ndarray | None = None) -> np.ndarray:
    # As Q4_K plus qh: 32 bytes before qs; bit k of qh[l] is the 5th bit of sub-block k, elem l.
    n = blocks.shape[0]
    sc, mn = _k_scale_min(blocks[:, 4:16])
    dl = np.multiply(sc, _f16(blocks, 0)).reshape(n, 8, 1)
    ml = np.multiply(mn, _f16(blocks, 2)).reshape(n, 8, 1)
    q = _nibbles(blocks[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
    q |= _bits(blocks[:, 16:48]) << 4
    dest = np.multiply(q, dl, out=_dest(out, (n, 8, 32)))
    dest -= ml
    return dest.reshape(n, QK_K)


def _deq_q6_k(blocks: Blocks, out: np.ndarray | None = None) -> np.ndarray:
    # ql: 128 bytes (low 4 bits) | qh: 64 bytes (high 2 bits) | scales: 16 int8 | d: f16.
    # Per 128-element half: ql[0:32] lo, ql[32:64] lo, ql[0:32] hi, ql[32:64] hi, with high
    # bits from qh[0:32] at shifts 0, 2, 4, 6.  x = d * sc * (q - 32), 16 elements per scale.
    n = blocks.shape[0]
    ql = _nibbles(blocks[:, 0:128].reshape(n, 2, 64))  # [n, half, lo/hi, 64]
    q = ql.reshape(n, 8, 32)
    q |= _crumbs(blocks[:, 128:192].reshape(n, 2, 32)).reshape(n, 8, 32) << 4
    qv = q.view(np.int8)
    qv -= 32
    dl = np.multiply(blocks[:, 192:208].view(np.int8), _f16(blocks, 208)).reshape(n, 16, 1)
    return np.multiply(qv.reshape(n, 16, 16), dl, out=_dest(out, (n, 16, 16))).reshape(n, QK_K)


_SHIFT_IQ4_XS_H = (2 * np.arange(8, dtype=np.uint16)).reshape(1, 8)


def _deq_iq4_xs(blocks: Blocks, out: np.ndarray | None = None) -> np.ndarray:
    # d: f16 | scales_h: u16 (2 bits per sub-block) | scales_l: 4 bytes (nibble per sub-block)
    # | qs: 128 bytes, 16 per 32-element sub-block (lo nibbles, then hi nibbles) into the IQ4_NL
    # codebook.  Sub-block scale = d * ((l | h << 4) - 32).
    n = blocks.shape[0]
    sh = blocks[:, 2:4].view(np.uint16)  # [n, 1]
    ls = _nibbles(blocks[:, 4:8].reshape(n, 4, 1)).reshape(n, 8)  # sub-block 2i, 2i+1 of byte i
    ls |= (((sh >> _SHIFT_IQ4_XS_H) & 3).astype(np.uint8)) << 4
    lsv = ls.view(np.int8)
    lsv -= 32
    dl = np.multiply(lsv, _f16(blocks, 0)).reshape(n, 8, 1, 1)
    q = _iq4_codes(blocks[:, 8:].reshape(n, 8, 16))  # [n, 8, 2, 16]
    return np.multiply(q, dl, out=_dest(out, (n, 8, 2, 16))).reshape(n, QK_K)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def _declare(qtype: GGMLQuantizationType, fn: DequantFn) -> tuple[GGMLQuantizationType, QuantType]:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return qtype, QuantType(qtype, block_size, type_size, fn)


def _gguf_reference(qtype: GGMLQuantizationType) -> DequantFn:
    """A ``DequantFn`` that runs ``gguf.quants.dequantize``: for the types without our own decoder."""

    def dequantize_blocks(blocks: Blocks, out: np.ndarray | None = None) -> np.ndarray:
        n = blocks.shape[0]
        dest = _dest(out, (n, GGML_QUANT_SIZES[qtype][0]))
        if n:
            # As one row: gguf.quants calls its block decoder once per 16 rows, so n rows of one
            # block each would cost n / 16 calls.
            dest[...] = gguf.quants.dequantize(blocks.reshape(1, -1), qtype).reshape(dest.shape)
        return dest

    return dequantize_blocks


def _gguf_dequantizes(qtype: GGMLQuantizationType) -> bool:
    """Whether ``gguf.quants`` decodes ``qtype``. It lists its types nowhere public, so it is
    asked to decode one zero block: about 20 ms for all types, once, mostly spent building the
    IQ types' grids, which their first use would build anyway."""
    if GGML_QUANT_SIZES[qtype][0] == 1:
        return False  # plain numbers: F64 and the integer types are no weights we read
    try:
        gguf.quants.dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
    except Exception:  # NotImplementedError, or a decoder broken in this gguf version: not offered
        return False
    return True


_T = GGMLQuantizationType
_HAND_WRITTEN: dict[GGMLQuantizationType, QuantType] = dict(
    [
        _declare(_T.F32, _deq_f32),
        _declare(_T.F16, _deq_f16),
        _declare(_T.BF16, _deq_bf16),
        _declare(_T.Q4_0, _deq_q4_0),
        _declare(_T.Q4_1, _deq_q4_1),
        _declare(_T.Q5_0, _deq_q5_0),
        _declare(_T.Q5_1, _deq_q5_1),
        _declare(_T.Q8_0, _deq_q8_0),
        _declare(_T.Q2_K, _deq_q2_k),
        _declare(_T.Q3_K, _deq_q3_k),
        _declare(_T.Q4_K, _deq_q4_k),
        _declare(_T.Q5_K, _deq_q5_k),
        _declare(_T.Q6_K, _deq_q6_k),
        _declare(_T.IQ4_NL, _deq_iq4_nl),
        _declare(_T.IQ4_XS, _deq_iq4_xs),
    ]
)
del _T
_REFERENCE: dict[GGMLQuantizationType, QuantType] = dict(
    _declare(t, _gguf_reference(t))
    for t in GGML_QUANT_SIZES
    if t not in _HAND_WRITTEN and _gguf_dequantizes(t)
)
DEQUANTIZERS: dict[GGMLQuantizationType, QuantType] = {**_HAND_WRITTEN, **_REFERENCE}

SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...] = tuple(DEQUANTIZERS)
# The supported types decoded by gguf.quants' reference code rather than our own.
REFERENCE_TYPES: tuple[GGMLQuantizationType, ...] = tuple(_REFERENCE)


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """Dequantize raw GGUF tensor data to a float32 array of numpy ``shape``.

    ``data`` is ``GGUFReader``'s ``tensor.data``: raw uint8 blocks (any shape, e.g.
    [rows, bytes_per_row]) or, for F32/F16, an already-typed array.  ``shape`` is the row-major
    numpy shape (the reversed GGML ``ne``), so the last dim is the one blocks run along.
    For F32 input the result may be a view of ``data`` (no copy).
    """
    qtype = GGMLQuantizationType(qtype)
    qt = DEQUANTIZERS.get(qtype)
    if qt is None:
        raise UnsupportedQuantError(
            f"cannot dequantize GGML type {qtype.name}; supported: "
            + ", ".join(t.name for t in SUPPORTED_TYPES)
        )
    shape = tuple(int(s) for s in shape)
    n_elems = int(np.prod(shape, dtype=np.int64))
    if shape and shape[-1] % qt.block_size:
        raise ValueError(
            f"{qtype.name}: last dim {shape[-1]} of shape {shape} is not a multiple of the "
            f"block size {qt.block_size}"
        )
    n_blocks = n_elems // qt.block_size
    raw = np.ascontiguousarray(data)  # no-op for reader memmaps
    if raw.nbytes != n_blocks * qt.type_size:
        raise ValueError(
            f"{qtype.name}: tensor of shape {shape} needs {n_blocks * qt.type_size} bytes "
            f"({n_blocks} blocks x {qt.type_size}), got {raw.nbytes}"
        )
    blocks = raw.reshape(-1).view(np.uint8).reshape(n_blocks, qt.type_size)

    per_chunk = max(1, _CHUNK_ELEMS // qt.block_size)
    if qt.block_size == 1 or n_blocks <= per_chunk:
        # Float types are a single streaming cast; small tensors need no chunking.
        return qt.dequantize_blocks(blocks).reshape(shape)
    out = np.empty((n_blocks, qt.block_size), dtype=np.float32)
    for start in range(0, n_blocks, per_chunk):
        stop = min(start + per_chunk, n_blocks)
        qt.dequantize_blocks(blocks[start:stop], out=out[start:stop])
    return out.reshape(shape)
