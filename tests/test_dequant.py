"""jaxembed.weights.dequant against the gguf package's reference (gguf.quants.dequantize)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import gguf.quants as gq
import jax
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
from jaxembed.weights.loader import load_checkpoint

from tiny_models import LLAMA_BASE, train_tokenizer, write_llama_gguf

T = GGMLQuantizationType
FLOAT_TYPES = (T.F32, T.F16, T.BF16)

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
# The types with a decoder of our own.
QUANT_TYPES = tuple(F16_FIELDS)
HAND_WRITTEN = {*FLOAT_TYPES, *QUANT_TYPES}
# Every other type gguf.quants decodes: decoded by gguf.quants itself, through our entry point.
GGUF_DEQUANTIZES = {t for t, cls in gq._type_traits.items() if "dequantize_blocks" in vars(cls)}
REFERENCE_TYPES = tuple(t for t in GGML_QUANT_SIZES if t in GGUF_DEQUANTIZES - HAND_WRITTEN)

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
    assert set(SUPPORTED_TYPES) == HAND_WRITTEN | set(REFERENCE_TYPES)
    assert set(dequant.REFERENCE_TYPES) == set(REFERENCE_TYPES)
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


# How far a dequantized standard normal may be from the original: ternary types keep -d, 0, d.
# By name: MXFP4 is new in gguf 0.18.
MAX_ERROR = {"TQ1_0": 2.5, "TQ2_0": 2.5, "MXFP4": 1.0}


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
    assert np.abs(ours - x).max() < MAX_ERROR.get(qtype.name, 0.5)
    assert np.corrcoef(ours.reshape(-1), x.reshape(-1))[0, 1] > 0.65


def test_quantizable_types_found() -> None:
    assert {T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.TQ1_0, T.TQ2_0} <= set(QUANTIZABLE)


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


@pytest.mark.parametrize("qtype", [T.Q8_1, T.Q8_K], ids=lambda t: t.name)
def test_unsupported_type_raises(qtype: GGMLQuantizationType) -> None:
    # gguf.quants decodes neither (they are llama.cpp's intermediate types for dot products).
    assert qtype not in GGUF_DEQUANTIZES
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    data = np.zeros(2 * type_size, dtype=np.uint8)
    with pytest.raises(UnsupportedQuantError, match=qtype.name) as e:
        dequantize(data, qtype, (2 * block_size,))
    listed = str(e.value).split("supported: ")[1].split(", ")
    assert listed == [t.name for t in SUPPORTED_TYPES] and "IQ2_XXS" in listed
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


# ---- the types gguf.quants decodes for us ---------------------------------------------------


def _f16_scale_at(offset: int):
    def fix(blocks: np.ndarray, rng: np.random.Generator) -> None:
        d = rng.uniform(-0.05, 0.05, blocks.shape[0]).astype(np.float16)
        blocks[:, offset : offset + 2] = d.view(np.uint8).reshape(-1, 2)

    return fix


def _iq1_m_scale(blocks: np.ndarray, rng: np.random.Generator) -> None:
    # IQ1_M's f16 scale is spread over the top nibbles of its four u16 sub-scales (bytes 48-55):
    # nibble k of the scale is the high nibble of byte 49 + 2k.
    bits = rng.uniform(-0.05, 0.05, blocks.shape[0]).astype(np.float16).view(np.uint16)
    for k in range(4):
        nibble = ((bits >> (4 * k)) & 0xF).astype(np.uint8)
        blocks[:, 49 + 2 * k] = (blocks[:, 49 + 2 * k] & 0x0F) | (nibble << 4)


def _mxfp4_exponent(blocks: np.ndarray, rng: np.random.Generator) -> None:
    # Byte 0 is a shared e8m0 exponent: kept near 2^0 so that no value overflows float32.
    blocks[:, 0] = rng.integers(110, 146, blocks.shape[0])


# How to make random blocks of each type valid (a finite scale). Every other byte may be anything:
# grid and codebook indices cover their whole range. By name: gguf 0.18 and 0.19 added types.
REFERENCE_SCALES = {
    "IQ2_XXS": _f16_scale_at(0),
    "IQ2_XS": _f16_scale_at(0),
    "IQ2_S": _f16_scale_at(0),
    "IQ3_XXS": _f16_scale_at(0),
    "IQ3_S": _f16_scale_at(0),
    "IQ1_S": _f16_scale_at(0),
    "IQ1_M": _iq1_m_scale,
    "TQ1_0": _f16_scale_at(52),
    "TQ2_0": _f16_scale_at(64),
    "MXFP4": _mxfp4_exponent,
    "NVFP4": lambda blocks, rng: None,  # four ue4m3 scales: finite for every byte
}


def valid_blocks(qtype: GGMLQuantizationType, n_blocks: int, seed: int = 0) -> np.ndarray:
    """[n_blocks, type_size] random uint8 blocks of a reference-decoded type, scales finite."""
    assert qtype.name in REFERENCE_SCALES, f"describe {qtype.name}'s scale in REFERENCE_SCALES"
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n_blocks, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    REFERENCE_SCALES[qtype.name](blocks, rng)
    return blocks


def test_every_type_gguf_dequantizes_is_supported() -> None:
    since_0_17 = {T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.TQ1_0,
                  T.TQ2_0}  # fmt: skip
    assert since_0_17 <= set(REFERENCE_TYPES)
    assert GGUF_DEQUANTIZES.issubset(SUPPORTED_TYPES)
    # The hand-written decoders stay in use where they exist.
    for qtype in QUANT_TYPES:
        assert DEQUANTIZERS[qtype].dequantize_blocks.__name__ == f"_deq_{qtype.name.lower()}"


@pytest.mark.parametrize("qtype", REFERENCE_TYPES, ids=lambda t: t.name)
def test_reference_types_match_gguf(qtype: GGMLQuantizationType, monkeypatch) -> None:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = 101  # not a multiple of the chunk below
    blocks = valid_blocks(qtype, n_blocks)
    ref = reference(blocks, qtype)
    assert np.isfinite(ref).all() and np.abs(ref).max() > 0

    ours = dequantize(blocks.reshape(-1), qtype, (n_blocks * block_size,))
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)

    # GGUFReader's layout, a read-only memory map's view of [rows, bytes_per_row].
    data = np.tile(blocks, (2, 1)).reshape(2, n_blocks * type_size)
    data.flags.writeable = False
    ours2 = dequantize(data, qtype, (2, n_blocks * block_size))
    np.testing.assert_array_equal(ours2, np.tile(ref, 2).reshape(2, -1))

    # Chunked: memory stays bounded by the chunk, and each chunk lands in its place.
    monkeypatch.setattr(dequant, "_CHUNK_ELEMS", 4 * block_size)
    np.testing.assert_array_equal(dequantize(blocks, qtype, (n_blocks * block_size,)), ref)

    out = np.full((n_blocks, block_size), np.nan, dtype=np.float32)
    assert DEQUANTIZERS[qtype].dequantize_blocks(blocks, out=out) is not None
    np.testing.assert_array_equal(out.reshape(-1), ref)
    assert DEQUANTIZERS[qtype].dequantize_blocks(blocks[:0]).shape == (0, block_size)


def _rewrite_gguf(src: Path, dst: Path, tensors: dict[str, tuple[np.ndarray, T]]) -> Path:
    """Copy the GGUF file `src` to `dst` with some tensors replaced by (raw blocks, type)."""
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(dst), "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        w.add_key_value(
            field.name,
            field.contents(),
            field.types[0],
            field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None,
        )
    for t in reader.tensors:
        if t.name in tensors:
            raw, qtype = tensors[t.name]
            w.add_tensor(t.name, raw, raw_shape=raw.shape, raw_dtype=qtype)
        else:
            w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def random_llama_folder(folder: Path, hidden: int, layers: int) -> Path:
    """An HF folder of a tiny random Llama, made with numpy alone (no transformers to import):
    only its loading is under test, not its outputs."""
    from safetensors.numpy import save_file

    tok = train_tokenizer()
    cfg = {**LLAMA_BASE, "vocab_size": tok.get_vocab_size(), "hidden_size": hidden,
           "intermediate_size": hidden, "num_hidden_layers": layers, "model_type": "llama"}  # fmt: skip
    v, h, q, kv = cfg["vocab_size"], hidden, 4 * 16, 2 * 16  # 4 heads, 2 kv heads of 16
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,),
              "lm_head.weight": (v, h)}  # fmt: skip
    for i in range(layers):
        layer = {"input_layernorm": (h,), "post_attention_layernorm": (h,),
                 "self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h),
                 "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, q), "mlp.gate_proj": (h, h),
                 "mlp.up_proj": (h, h), "mlp.down_proj": (h, h)}  # fmt: skip
        shapes |= {f"model.layers.{i}.{name}.weight": shape for name, shape in layer.items()}
    rng = np.random.default_rng(7)
    folder.mkdir()
    save_file({k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()},
              str(folder / "model.safetensors"))  # fmt: skip
    (folder / "config.json").write_text(json.dumps(cfg))
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_gguf_model_with_every_reference_type_loads(tmp_path) -> None:
    """A tiny Llama whose matrices hold every reference-decoded type loads, with the weights that
    gguf.quants decodes from them (compared with the same model written as F32)."""
    # 256 wide, so that most matrices' rows are whole 256-element super-blocks.
    folder = random_llama_folder(tmp_path / "llama", hidden=256, layers=2)
    src = write_llama_gguf(folder, tmp_path / "f32.gguf", T.F32)
    matrices = [
        t
        for t in gguf.GGUFReader(src).tensors
        if len(t.data.shape) == 2 and t.data.shape[1] % 256 == 0
    ]
    assert len(matrices) >= len(REFERENCE_TYPES)

    quantized, decoded = {}, {}
    for i, (qtype, t) in enumerate(zip(REFERENCE_TYPES, matrices, strict=False)):
        x = np.array(t.data, dtype=np.float32)
        if qtype in QUANTIZABLE:
            raw = gq.quantize(x, qtype)
        else:  # gguf.quants cannot quantize it: random blocks of the same size
            block_size, type_size = GGML_QUANT_SIZES[qtype]
            raw = valid_blocks(qtype, x.size // block_size, seed=i)
            raw = raw.reshape(x.shape[0], x.shape[1] // block_size * type_size)
        quantized[t.name] = (raw, qtype)
        decoded[t.name] = (gq.dequantize(raw, qtype).reshape(x.shape), T.F32)
    assert {q for _, q in quantized.values()} == set(REFERENCE_TYPES)

    # Dequantized at load (the reference path), so that each weight compares as a float array.
    ck = load_checkpoint(_rewrite_gguf(src, tmp_path / "quants.gguf", quantized), progress=False,
                         quantize="none")
    want = load_checkpoint(_rewrite_gguf(src, tmp_path / "decoded.gguf", decoded), progress=False)
    leaves, want_leaves = jax.tree.leaves(ck.params), jax.tree.leaves(want.params)
    assert len(leaves) == len(want_leaves)
    for a, b in zip(leaves, want_leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
