"""jaxembed.weights.dequant against the gguf package's reference (gguf.quants.dequantize)."""

from __future__ import annotations

import gguf.quants as gq
import ml_dtypes
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from jaxembed.weights import dequant
from jaxembed.weights.dequant import (
    DEQUANTIZERS,
    SUPPORTED_TYPES,
    UnsupportedQuantError,
    dequantize,
)

T = GGMLQuantizationType
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
QUANT_TYPES = tuple(t for t in SUPPORTED_TYPES if t not in FLOAT_TYPES)

# Byte offsets of the f16 fields of each block: (scale offsets, min offsets).  Random bytes there
# would often be inf/NaN, so the tests overwrite them with finite values.
F16_FIELDS: dict[GGMLQuantizationType, tuple[tuple[int, ...], tuple[int, ...]]] = {
    T.Q4_0: ((0,), ()),
    T.Q4_1: ((0,), (2,)),
    T.Q5_0: ((0,), ()),
    T.Q5_1: ((0,), (2,)),
    T.Q8_0: ((0,), ()),
    T.Q2_K: ((80,), (82,)),
    T.Q3_K: ((108,), ()),
    T.Q4_K: ((0,), (2,)),
    T.Q5_K: ((0,), (2,)),
    T.Q6_K: ((208,), ()),
    T.IQ4_NL: ((0,), ()),
    T.IQ4_XS: ((0,), ()),
}
K_TYPES = {T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS}

# A byte of quantized values (not a scale) inside each block, for the negative control.
QUANT_BYTE = {
    T.Q4_0: 2, T.Q4_1: 4, T.Q5_0: 6, T.Q5_1: 8, T.Q8_0: 2, T.Q2_K: 16, T.Q3_K: 32,
    T.Q4_K: 16, T.Q5_K: 48, T.Q6_K: 0, T.IQ4_NL: 2, T.IQ4_XS: 8,
}  # fmt: skip


def random_blocks(qtype: GGMLQuantizationType, n_blocks: int, seed: int = 0) -> np.ndarray:
    """[n_blocks, type_size] uint8 of random bytes with finite f16 scale/min fields."""
    rng = np.random.default_rng(seed)
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    scale_offs, min_offs = F16_FIELDS[qtype]
    # Super-block scales multiply 6-8 bit sub-scales, so keep them small like real files do.
    hi = 0.05 if qtype in K_TYPES else 2.0
    for off in scale_offs + min_offs:
        vals = rng.uniform(-hi, hi, size=n_blocks).astype(np.float16)
        blocks[:, off : off + 2] = vals.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def reference(blocks: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    return gq.dequantize(blocks, qtype).reshape(-1)


def assert_matches(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.dtype == np.float32
    assert np.isfinite(ref).all()
    scale = float(np.abs(ref).max()) or 1.0
    np.testing.assert_allclose(ours.reshape(-1), ref.reshape(-1), rtol=1e-6, atol=1e-6 * scale)


def test_registry_matches_gguf_sizes() -> None:
    assert set(SUPPORTED_TYPES) == set(FLOAT_TYPES) | set(F16_FIELDS)
    for qtype, qt in DEQUANTIZERS.items():
        assert qt.qtype == qtype
        assert (qt.block_size, qt.type_size) == GGML_QUANT_SIZES[qtype]


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_random_blocks_match_reference(qtype: GGMLQuantizationType) -> None:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = 384
    blocks = random_blocks(qtype, n_blocks)
    ref = reference(blocks, qtype)

    # Flat [n_blocks * type_size] bytes -> 1-D tensor.
    ours = dequantize(blocks.reshape(-1), qtype, (n_blocks * block_size,))
    assert ours.shape == (n_blocks * block_size,)
    assert_matches(ours, ref)

    # GGUFReader layout: [rows, bytes_per_row] uint8 with a 2-D numpy shape.
    rows = 8
    per_row = n_blocks // rows
    data = blocks.reshape(rows, per_row * type_size)
    ours2 = dequantize(data, qtype, (rows, per_row * block_size))
    assert ours2.shape == (rows, per_row * block_size)
    assert_matches(ours2, ref)

    # Per-block function of the registry, directly.
    per_block = DEQUANTIZERS[qtype].dequantize_blocks(blocks)
    assert per_block.shape == (n_blocks, block_size)
    assert_matches(per_block, ref)
    out = np.full((n_blocks, block_size), np.nan, dtype=np.float32)
    assert DEQUANTIZERS[qtype].dequantize_blocks(blocks, out=out) is not None
    assert_matches(out, ref)


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_chunked_path_matches_reference(
    qtype: GGMLQuantizationType, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tiny chunks and a block count that is not a multiple of the chunk exercise the loop.
    monkeypatch.setattr(dequant, "_CHUNK_ELEMS", 1024)
    block_size, _ = GGML_QUANT_SIZES[qtype]
    n_blocks = 101
    blocks = random_blocks(qtype, n_blocks, seed=1)
    ours = dequantize(blocks, qtype, (n_blocks * block_size,))
    assert_matches(ours, reference(blocks, qtype))


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_negative_control_corruption_changes_output(qtype: GGMLQuantizationType) -> None:
    block_size, _ = GGML_QUANT_SIZES[qtype]
    n_blocks = 16
    blocks = random_blocks(qtype, n_blocks, seed=2)
    shape = (n_blocks * block_size,)
    ref = reference(blocks, qtype)
    assert_matches(dequantize(blocks, qtype, shape), ref)

    victim = 5
    sl = slice(victim * block_size, (victim + 1) * block_size)
    # Corrupt a quantized-value byte, then (separately) the low mantissa byte of the scale,
    # which keeps it finite but changes it.
    for off in (QUANT_BYTE[qtype], F16_FIELDS[qtype][0][0]):
        bad = blocks.copy()
        bad[victim, off] ^= 0x55
        ours = dequantize(bad, qtype, shape)
        assert not np.allclose(ours[sl], ref[sl]), f"corrupting byte {off} had no effect"
        np.testing.assert_array_equal(np.delete(ours, np.r_[sl]), np.delete(ref, np.r_[sl]))
        assert_matches(ours, reference(bad, qtype))  # still agrees with the reference


QUANTIZABLE = tuple(
    t
    for t in SUPPORTED_TYPES
    if t not in FLOAT_TYPES
    and (cls := gq._type_traits.get(t)) is not None
    and "quantize_blocks" in vars(cls)
)


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_gguf_quantized_matrix(qtype: GGMLQuantizationType) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((48, 512)).astype(np.float32)
    data = gq.quantize(x, qtype)  # [48, bytes_per_row] uint8
    ref = gq.dequantize(data, qtype)
    ours = dequantize(data, qtype, x.shape)
    assert ours.shape == x.shape
    assert_matches(ours, ref)
    # Sanity: it is a dequantization of x, not just a match of two broken decoders.
    assert np.abs(ours - x).max() < 0.5


def test_quantizable_types_found() -> None:
    assert {T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0} <= set(QUANTIZABLE)


def test_f32_round_trip() -> None:
    x = np.random.default_rng(4).standard_normal((7, 33)).astype(np.float32)
    for data in (x, x.reshape(-1).view(np.uint8)):
        ours = dequantize(data, T.F32, x.shape)
        assert ours.dtype == np.float32 and ours.shape == x.shape
        np.testing.assert_array_equal(ours, x)


def test_f16_round_trip() -> None:
    x = np.random.default_rng(5).standard_normal((7, 33)).astype(np.float16)
    x[0, :3] = [np.inf, -np.inf, 65504]
    for data in (x, x.view(np.uint8)):
        ours = dequantize(data, T.F16, x.shape)
        assert ours.dtype == np.float32 and ours.shape == x.shape
        np.testing.assert_array_equal(ours, x.astype(np.float32))
    np.testing.assert_array_equal(
        dequantize(x, T.F16, x.shape).reshape(-1), gq.dequantize(x, T.F16).reshape(-1)
    )


def test_bf16_round_trip() -> None:
    x = np.random.default_rng(6).standard_normal((7, 32)).astype(np.float32)
    x[0, :4] = [np.inf, -np.inf, 0.0, -0.0]
    xb = x.astype(ml_dtypes.bfloat16)
    expected = xb.astype(np.float32)
    for data in (xb.view(np.uint8), xb.view(np.uint16), xb.view(np.uint8).reshape(7, 64)):
        ours = dequantize(data, T.BF16, x.shape)
        assert ours.dtype == np.float32 and ours.shape == x.shape
        np.testing.assert_array_equal(ours, expected)
    ref = gq.dequantize(gq.quantize(x, T.BF16), T.BF16)
    np.testing.assert_array_equal(dequantize(gq.quantize(x, T.BF16), T.BF16, x.shape), ref)


@pytest.mark.parametrize("qtype", [T.IQ2_XXS, T.TQ1_0, T.Q8_1], ids=lambda t: t.name)
def test_unsupported_type_raises(qtype: GGMLQuantizationType) -> None:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    data = np.zeros(2 * type_size, dtype=np.uint8)
    with pytest.raises(UnsupportedQuantError, match=qtype.name):
        dequantize(data, qtype, (2 * block_size,))
    assert issubclass(UnsupportedQuantError, ValueError)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_K, T.F16], ids=lambda t: t.name)
def test_wrong_byte_count_raises(qtype: GGMLQuantizationType) -> None:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    data = np.zeros(4 * type_size + 1, dtype=np.uint8)
    with pytest.raises(ValueError, match="bytes"):
        dequantize(data, qtype, (4 * block_size,))
    with pytest.raises(ValueError, match="bytes"):
        dequantize(data[: 3 * type_size], qtype, (4 * block_size,))


def test_row_not_multiple_of_block_raises() -> None:
    with pytest.raises(ValueError, match="block size"):
        dequantize(np.zeros(34, dtype=np.uint8), T.Q8_0, (2, 16))
