"""GGUF quantized tensors repacked, once at load, into the layout the engine multiplies in.

A quantized weight [..., N, K] (N output features, K inputs: a GGUF tensor's own row order) stays
quantized in memory. Every GGML type becomes one of a few layouts that share one formula:

    w[n, k] = d[n, k // block] * sc[n, k // group] * q[n, k] - dmin[n, k // block] * m[n, k // group]

- `q`: the quantized values, stored as 4-bit nibbles (`bits=4`: per 64 values, 32 bytes, byte i
  holding value i in its low nibble and value 32 + i in its high one, as Q4_K's own blocks do;
  rows of K a multiple of 64) or as bytes (`bits=8`), unsigned (0..127) or signed;
- `sc`: small integer scales per `group` (16 or 32) values, or 1 (`scales` is None);
- `m`: small integer mins per group, or `min_offset * sc` (`mins` is None): a signed type stored
  unsigned (Q4_0's q - 8, Q6_K's q - 32) keeps its offset here, exactly;
- `d`, `dmin`: float16 per `block` (32, or a K-quant's super-block of 256); `dmin` None means `d`.

Why this shape: it is GGML's own (a K-quant super-block is a float16 scale times small integer
sub-scales), so each type maps onto it exactly, in about its own bytes (Q4_K 148 bytes per 256
values against 144, Q6_K 274 against 210, Q4_0, Q4_1 and Q8_0 exactly theirs); and the integer
sub-scales let the CPU kernel sum a whole super-block in integers (jaxembed/kernels/qmatmul.cc),
as llama.cpp does. Types without a linear form (the IQ2/IQ3/IQ1/TQ families, MXFP4) and float
weights quantized on request are requantized to Q8_0's layout (`quantize_q8`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

Q = GGMLQuantizationType
QK_K = 256
# Blocks per chunk of work: bounds the temporaries of one tensor's repacking.
_CHUNK_BLOCKS = 1 << 15
_IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                       np.int8)


@dataclasses.dataclass(frozen=True)
class QLayout:
    """How one quantized weight is stored (see the module docstring); hashable: jit's static
    data."""

    bits: int  # 4 (nibbles) or 8 (bytes)
    signed: bool  # 8-bit values are int8 (else uint8 of at most 127)
    group: int  # values per integer scale: 16 or 32
    block: int  # values per float16 scale: 32 or 256
    scales: bool  # an int8 scale per group (else 1)
    mins: bool  # an int8 min per group (else min_offset * scale)
    min_offset: int
    dmin: bool  # a float16 dmin per block (else d)
    source: str  # the GGML type it came from, for messages and /info

    def __post_init__(self) -> None:
        assert self.bits in (4, 8) and self.group in (16, 32) and self.block % self.group == 0
        assert not (self.bits == 4 and self.signed)

    def nbytes_per(self, k: int) -> int:
        """Bytes one row of k values takes."""
        n = k * self.bits // 8 + 2 * (k // self.block) * (1 + self.dmin)
        return n + (k // self.group) * (self.scales + self.mins)


@dataclasses.dataclass
class QArrays:
    """A quantized weight's arrays (numpy on the host, or jax arrays on a device: a pytree
    whose static data is the layout): values and scales for [..., N, K], as `layout` says.

    How it is multiplied, as the execution plan decides: `op` "xla" (XLA dequantizes it for
    the product), "cpu" (the CPU kernel `kernels.qmatmul`, over activations quantized in
    `passes` passes, for products of at most `kernel_rows` rows), "gpu" (the Pallas kernel
    `jaxembed.gpu.qmatmul`), or "gpu_interpret" (the same in Pallas's interpret mode: tests)."""

    layout: QLayout
    qs: Any  # uint8 [..., N, K / 2] (4 bits) or uint8/int8 [..., N, K]
    scales: Any | None  # int8 [..., N, K / group]
    mins: Any | None  # int8 [..., N, K / group]
    d: Any  # float16 [..., N, K / block]
    dmin: Any | None  # float16 [..., N, K / block]
    op: str = "xla"
    passes: int = 2
    kernel_rows: int = 0

    @property
    def k(self) -> int:
        return int(self.qs.shape[-1]) * 8 // self.layout.bits

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's [..., N, K]."""
        return (*self.qs.shape[:-1], self.k)

    def arrays(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in ("qs", "scales", "mins", "d", "dmin")
                if getattr(self, n) is not None}

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays().values())

    def map(self, fn: Callable[[Any], Any]) -> QArrays:
        """The same layout with fn applied to each array (row selections, device placement)."""
        return dataclasses.replace(self, **{n: fn(a) for n, a in self.arrays().items()})


jax.tree_util.register_dataclass(QArrays, data_fields=["qs", "scales", "mins", "d", "dmin"],
                                 meta_fields=["layout", "op", "passes", "kernel_rows"])


# ---- layouts of the GGML types ---------------------------------------------------------------


def _layout(source: Q, bits: int, signed: bool = False, group: int = 32, block: int = 32,
            scales: bool = False, mins: bool = False, min_offset: int = 0, dmin: bool = False
            ) -> QLayout:
    return QLayout(bits, signed, group, block, scales, mins, min_offset, dmin, source.name)


LAYOUTS: dict[Q, QLayout] = {
    Q.Q4_0: _layout(Q.Q4_0, 4, min_offset=8),
    Q.Q4_1: _layout(Q.Q4_1, 4, min_offset=1, dmin=True),
    Q.Q5_0: _layout(Q.Q5_0, 8, min_offset=16),
    Q.Q5_1: _layout(Q.Q5_1, 8, min_offset=1, dmin=True),
    Q.Q8_0: _layout(Q.Q8_0, 8, signed=True),
    Q.Q2_K: _layout(Q.Q2_K, 4, group=16, block=QK_K, scales=True, mins=True, dmin=True),
    Q.Q3_K: _layout(Q.Q3_K, 4, group=16, block=QK_K, scales=True, min_offset=4),
    Q.Q4_K: _layout(Q.Q4_K, 4, block=QK_K, scales=True, mins=True, dmin=True),
    Q.Q5_K: _layout(Q.Q5_K, 8, block=QK_K, scales=True, mins=True, dmin=True),
    Q.Q6_K: _layout(Q.Q6_K, 8, group=16, block=QK_K, scales=True, min_offset=32),
    Q.IQ4_NL: _layout(Q.IQ4_NL, 8, signed=True),
    Q.IQ4_XS: _layout(Q.IQ4_XS, 8, signed=True, block=QK_K, scales=True),
}
Q8 = dataclasses.replace(LAYOUTS[Q.Q8_0], source="Q8_0")  # what `quantize_q8` makes


# ---- field helpers ---------------------------------------------------------------------------


def _f16(b: np.ndarray) -> np.ndarray:
    """[n, 2] uint8 -> [n] float16."""
    return np.ascontiguousarray(b).view(np.float16)[:, 0]


def _pack4(u: np.ndarray) -> np.ndarray:
    """[n, 64 j] values 0..15 -> [n, 32 j] bytes: per 64, value i low and value 32 + i high."""
    g = u.reshape(u.shape[0], -1, 2, 32)
    return (g[:, :, 0] | (g[:, :, 1] << np.uint8(4))).reshape(u.shape[0], -1)


def _unpack4(b: np.ndarray) -> np.ndarray:
    """The inverse of `_pack4`: [n, 32 j] bytes -> [n, 64 j] values."""
    g = b.reshape(b.shape[0], -1, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (g & np.uint8(0x0F)).reshape(b.shape[0], -1)


def _nibbles(qs: np.ndarray, width: int) -> np.ndarray:
    """[n, c * width] bytes -> [n, c, 2, width]: each chunk's low nibbles, then its high ones."""
    q = qs.reshape(qs.shape[0], -1, 1, width) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return q & np.uint8(0x0F)


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes of 6-bit scales and mins -> two [n, 8] uint8 (ggml's
    get_scale_min_k4)."""
    s = s.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


# Each: raw blocks [n, type_size] -> {array name: per-block values [n, ...]}; "qs" one byte a
# value (`repack` packs 4-bit ones into nibbles across the row), or PACKED: the nibbles as the
# layout holds them already.
PACKED = "packed"
Repack = Callable[[np.ndarray], dict[str, np.ndarray]]


def _q4_0(b: np.ndarray) -> dict[str, np.ndarray]:
    return {"d": _f16(b[:, :2]), "qs": _nibbles(b[:, 2:], 16).reshape(-1, 32)}


def _q4_1(b: np.ndarray) -> dict[str, np.ndarray]:
    # w = d q + m: the min goes in as dmin = -m (an exact negation).
    return {"d": _f16(b[:, :2]), "dmin": -_f16(b[:, 2:4]),
            "qs": _nibbles(b[:, 4:], 16).reshape(-1, 32)}


def _q5(b: np.ndarray, start: int) -> np.ndarray:
    """Q5_0/Q5_1's 32 values 0..31 from the 4 bytes of high bits at start and the nibbles."""
    qh = np.ascontiguousarray(b[:, start : start + 4]).view(np.uint32)
    high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # [n, 32]
    return _nibbles(b[:, start + 4 :], 16).reshape(-1, 32) | (high << np.uint8(4))


def _q5_0(b: np.ndarray) -> dict[str, np.ndarray]:
    return {"d": _f16(b[:, :2]), "qs": _q5(b, 2)}


def _q5_1(b: np.ndarray) -> dict[str, np.ndarray]:
    return {"d": _f16(b[:, :2]), "dmin": -_f16(b[:, 2:4]), "qs": _q5(b, 4)}


def _q8_0(b: np.ndarray) -> dict[str, np.ndarray]:
    return {"d": _f16(b[:, :2]), "qs": b[:, 2:].view(np.int8)}


def _q2_k(b: np.ndarray) -> dict[str, np.ndarray]:
    sc = b[:, :16]
    q = (b[:, 16:80].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
         ) & np.uint8(3)
    return {"scales": (sc & 0x0F).view(np.int8), "mins": (sc >> 4).view(np.int8),
            "qs": q.reshape(-1, QK_K), "d": _f16(b[:, 80:82]), "dmin": _f16(b[:, 82:84])}


def _q3_k(b: np.ndarray) -> dict[str, np.ndarray]:
    n = b.shape[0]
    hmask, qs, s = b[:, :32], b[:, 32:96], b[:, 96:108]
    low = (s[:, :8].reshape(n, 1, 8) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)).reshape(n, 16)
    high = (s[:, 8:].reshape(n, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)
            ).reshape(n, 16)
    scales = ((low & 0x0F) | ((high & 0x03) << 4)).astype(np.int8) - np.int8(32)
    ql = (qs.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    qh = (hmask.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    # q = ql - 4 where the high bit is clear: stored as q + 4 = ql + 4 * bit, min_offset 4.
    u = ql.reshape(n, QK_K) + (qh.reshape(n, QK_K) << np.uint8(2))
    return {"scales": scales, "qs": u, "d": _f16(b[:, 108:110])}


def _q4_k(b: np.ndarray) -> dict[str, np.ndarray]:
    sc, mn = _k_scales(b[:, 4:16])
    # Q4_K's nibbles are already the layout's: per 64 values, value j low and 32 + j high.
    return {"d": _f16(b[:, :2]), "dmin": _f16(b[:, 2:4]), "scales": sc.view(np.int8),
            "mins": mn.view(np.int8), PACKED: b[:, 16:]}


def _q5_k(b: np.ndarray) -> dict[str, np.ndarray]:
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    qh = (b[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    low = _nibbles(b[:, 48:], 32).reshape(n, 8, 32)
    return {"d": _f16(b[:, :2]), "dmin": _f16(b[:, 2:4]), "scales": sc.view(np.int8),
            "mins": mn.view(np.int8), "qs": (low | (qh << np.uint8(4))).reshape(n, QK_K)}


def _q6_k(b: np.ndarray) -> dict[str, np.ndarray]:
    # Written into one buffer with in-place ops: the broadcast shifts this replaced made five
    # temporaries of the values, and Q6_K was most of a Q4_K_M model's load time.
    n = b.shape[0]
    qs = np.empty((n, 2, 4, 32), np.uint8)  # per half of 128 values, 4 runs of 32
    ql = b[:, :128].reshape(n, 2, 2, 32)  # per half: bytes of runs 0 and 1 (low), 2 and 3 (high)
    qh = b[:, 128:192].reshape(n, 2, 32)  # per half: run r's high bits at bits 2r, 2r + 1
    np.bitwise_and(ql, np.uint8(0x0F), out=qs[:, :, :2])
    np.right_shift(ql, np.uint8(4), out=qs[:, :, 2:])
    for run, shift in enumerate((4, 2, 0)):
        qs[:, :, run] |= (qh << np.uint8(shift)) & np.uint8(0x30)
    qs[:, :, 3] |= (qh >> np.uint8(2)) & np.uint8(0x30)
    # q - 32 stored as q (0..63), min_offset 32.
    return {"qs": qs.reshape(n, QK_K), "scales": b[:, 192:208].view(np.int8),
            "d": _f16(b[:, 208:210])}


def _iq4_nl(b: np.ndarray) -> dict[str, np.ndarray]:
    return {"d": _f16(b[:, :2]), "qs": _IQ4_VALUES[_nibbles(b[:, 2:], 16).reshape(-1, 32)]}


def _iq4_xs(b: np.ndarray) -> dict[str, np.ndarray]:
    n = b.shape[0]
    high = np.ascontiguousarray(b[:, 2:4]).view(np.uint16)  # [n, 1]
    high = ((high >> (2 * np.arange(8, dtype=np.uint16))) & 3).astype(np.uint8)  # [n, 8]
    low = (b[:, 4:8].reshape(n, 4, 1) >> np.array([0, 4], np.uint8).reshape(1, 1, 2)).reshape(n, 8)
    scales = ((low & 0x0F) | (high << 4)).astype(np.int8) - np.int8(32)
    return {"d": _f16(b[:, :2]), "scales": scales,
            "qs": _IQ4_VALUES[_nibbles(b[:, 8:], 16).reshape(n, QK_K)]}


REPACK: dict[Q, Repack] = {
    Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1, Q.Q8_0: _q8_0, Q.Q2_K: _q2_k,
    Q.Q3_K: _q3_k, Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k, Q.IQ4_NL: _iq4_nl,
    Q.IQ4_XS: _iq4_xs,
}
assert REPACK.keys() == LAYOUTS.keys()


# ---- whole tensors ---------------------------------------------------------------------------


def empty(layout: QLayout, shape: tuple[int, ...],
          alloc: Callable[[tuple[int, ...], Any], np.ndarray] = np.empty) -> QArrays:
    """Uninitialized arrays for a [..., N, K] weight of `layout` (alloc: how to allocate)."""
    *lead, k = shape
    lay = layout

    def a(width: int, dtype: Any) -> np.ndarray:
        return alloc((*lead, width), np.dtype(dtype))
    return QArrays(
        lay, a(k * lay.bits // 8, np.int8 if lay.signed else np.uint8),
        a(k // lay.group, np.int8) if lay.scales else None,
        a(k // lay.group, np.int8) if lay.mins else None,
        a(k // lay.block, np.float16), a(k // lay.block, np.float16) if lay.dmin else None)


def repackable(qtype: Q) -> bool:
    return qtype in REPACK


def repack(data: np.ndarray, qtype: Q, shape: tuple[int, ...],
           alloc: Callable[[tuple[int, ...], Any], np.ndarray] = np.empty) -> QArrays:
    """A GGUF tensor's raw blocks (uint8, as in the file) of a [..., N, K] weight of type qtype,
    repacked (see the module docstring); K must be a whole number of blocks. A 4-bit type whose
    rows are not whole 64-value nibble groups keeps a byte a value."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    *lead, k = shape
    if k % block:
        raise ValueError(f"rows of {k} values are not whole {qtype.name} blocks of {block}")
    layout = LAYOUTS[qtype]
    if layout.bits == 4 and k % 64:
        layout = dataclasses.replace(layout, bits=8)
    rows = int(np.prod(lead, dtype=np.int64))
    per_row = k // block
    blocks = np.asarray(data, np.uint8).reshape(rows * per_row, type_size)
    out = empty(layout, (rows, k), alloc)
    flat = {n: a.reshape(rows * per_row, -1) for n, a in out.arrays().items() if n != "qs"}
    fn = REPACK[qtype]
    # Whole rows a chunk, so that nibbles pair values across the row's blocks.
    step = max(1, _CHUNK_BLOCKS // per_row)
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        values = fn(blocks[r0 * per_row : r1 * per_row])
        for name, v in values.items():
            if name == PACKED and layout.bits == 4:
                out.qs[r0:r1] = v.reshape(r1 - r0, k // 2)
            elif name in ("qs", PACKED):
                v = v.reshape(r1 - r0, k // 2) if name == PACKED else v.reshape(r1 - r0, k)
                if name == PACKED:  # nibbles, but the row keeps a byte a value
                    v = _unpack4(v)
                out.qs[r0:r1] = _pack4(v) if layout.bits == 4 else v
            else:
                flat[name][r0 * per_row : r1 * per_row] = v.reshape((r1 - r0) * per_row, -1)
    return out.map(lambda a: a.reshape(*lead, a.shape[-1]))


def quantize_q8(x: np.ndarray,
                alloc: Callable[[tuple[int, ...], Any], np.ndarray] = np.empty) -> QArrays:
    """float [..., N, K] (K a multiple of 32) -> Q8_0's layout, as ggml quantizes: per 32 values
    d = max |x| / 127 (kept as float16), q = x / d rounded half away from zero."""
    *lead, k = x.shape
    if k % 32:
        raise ValueError(f"rows of {k} values are not whole blocks of 32")
    out = empty(Q8, tuple(x.shape), alloc)
    rows = int(np.prod(lead, dtype=np.int64))
    src = x.reshape(rows, k // 32, 32)
    qs, d = out.qs.reshape(rows, k // 32, 32), out.d.reshape(rows, k // 32)
    step = max(1, _CHUNK_BLOCKS // max(1, k // 32))
    for lo in range(0, rows, step):
        blk = src[lo : lo + step].astype(np.float32)
        scale = np.abs(blk).max(axis=-1, keepdims=True) / np.float32(127)
        with np.errstate(divide="ignore"):
            inv = np.where(scale == 0, np.float32(0), np.float32(1) / scale)
        a = np.abs(blk * inv)  # rounded as ggml's roundf (gguf's np_roundf): floor(a + 0.5)
        whole = np.floor(a)  # would round 0.49999997 up in float32
        qs[lo : lo + step] = np.sign(blk) * (whole + np.floor(2 * (a - whole)))
        d[lo : lo + step] = scale[..., 0].astype(np.float16)
    return out


def dequantize(q: QArrays) -> np.ndarray:
    """The float32 [..., N, K] a quantized weight holds (numpy): the reference the engine's
    products are tested against, and what `gguf.quants.dequantize` gives for the source type."""
    lay = q.layout
    *lead, n, _ = q.qs.shape
    k = q.k
    if lay.bits == 4:
        g = q.qs.reshape(*lead, n, k // 64, 1, 32)
        vals = ((g >> np.array([0, 4], np.uint8).reshape(2, 1)) & 0x0F).reshape(*lead, n, k)
    else:
        vals = q.qs
    vals = vals.astype(np.float32).reshape(*lead, n, k // lay.group, lay.group)
    sc = q.scales.astype(np.float32) if q.scales is not None else np.float32(1)
    m = q.mins.astype(np.float32) if q.mins is not None else np.float32(lay.min_offset) * sc
    per = lay.block // lay.group  # groups a block

    def by_group(a: np.ndarray) -> np.ndarray:
        return np.repeat(a.astype(np.float32), per, axis=-1)
    d = by_group(q.d)
    dmin = by_group(q.dmin) if q.dmin is not None else d
    w = (d * sc)[..., None] * vals - (dmin * m)[..., None]
    return w.reshape(*lead, n, k)
