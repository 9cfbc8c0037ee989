"""A broken or unsupported checkpoint stops the load with the file, the tensor and the reason."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from jaxembed.config import UnsupportedModelError
from jaxembed.weights.errors import WeightLoadError
from jaxembed.weights.gguf_io import GGUFFile
from jaxembed.weights.loader import (
    NUMPY_DTYPES,
    XLA_CPU_ALIGNMENT,
    aligned_empty,
    load_checkpoint,
)
from jaxembed.weights.safetensors_io import SafetensorsFile

from tiny_models import write_llama_gguf

Q = gguf.GGMLQuantizationType


@pytest.fixture()
def folder(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(tiny_llama_dir, dst)
    return dst


def _rewrite_safetensors(path: Path, edit) -> None:
    """Apply `edit(header) -> header` to a safetensors file, keeping its data bytes."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = edit(json.loads(raw[8 : 8 + n]))
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


def test_truncated_safetensors_names_file_and_tensor(folder):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightLoadError, match=r"model\.safetensors.*tensor '.*'.*truncated") as e:
        load_checkpoint(folder, progress=False)
    assert e.value.tensor


def test_unknown_tensor(folder):
    def rename(h):
        h["model.layers.0.mlp.gate_projX.weight"] = h.pop("model.layers.0.mlp.gate_proj.weight")
        return h

    _rewrite_safetensors(folder / "model.safetensors", rename)
    with pytest.raises(WeightLoadError, match="gate_projX.*unknown tensor"):
        load_checkpoint(folder, progress=False)


def _drop_tensor(path: Path, name: str) -> None:
    """Rewrite a safetensors file without one tensor, its bytes gone too (a well-formed file:
    the ranges of the others still tile the data)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    del header[name]
    meta = header.pop("__metadata__", None)
    out, blobs, at = {}, [], 0
    for key, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        begin, end = entry["data_offsets"]
        blobs.append(data[begin:end])
        out[key] = {**entry, "data_offsets": [at, at + end - begin]}
        at += end - begin
    if meta is not None:
        out["__metadata__"] = meta
    blob = json.dumps(out).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"".join(blobs))


def test_missing_tensor(folder):
    _drop_tensor(folder / "model.safetensors", "model.layers.2.self_attn.k_proj.weight")
    with pytest.raises(WeightLoadError, match=r"model\.layers\.2\.self_attn\.k_proj\.weight.*missing"):
        load_checkpoint(folder, progress=False)


def test_misshaped_tensor(folder):
    def reshape(h):
        entry = h["model.layers.1.mlp.up_proj.weight"]
        entry["shape"] = [entry["shape"][1], entry["shape"][0]]
        return h

    _rewrite_safetensors(folder / "model.safetensors", reshape)
    with pytest.raises(WeightLoadError, match=r"up_proj\.weight.*shape"):
        load_checkpoint(folder, progress=False)


def test_unsupported_architecture_lists_what_is_supported(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "bert"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="'bert'.*supported.*Llama"):
        load_checkpoint(folder, progress=False)


def test_not_a_model():
    with pytest.raises(WeightLoadError, match="no such file"):
        load_checkpoint("does/not/exist.gguf", progress=False)


@pytest.fixture(scope="module")
def gguf_file(tiny_llama_dir: Path, tmp_path_factory) -> Path:
    return write_llama_gguf(tiny_llama_dir, tmp_path_factory.mktemp("g") / "tiny.gguf", Q.Q8_0)


def test_truncated_gguf_names_file_and_tensor(gguf_file, tmp_path):
    broken = tmp_path / "broken.gguf"
    data = gguf_file.read_bytes()
    broken.write_bytes(data[: len(data) - 5000])
    with pytest.raises(WeightLoadError, match=r"broken\.gguf, tensor 'blk\.\d+\..*truncated"):
        load_checkpoint(broken, progress=False)


def test_garbage_gguf(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"GGUF" + np.random.default_rng(0).bytes(500))
    with pytest.raises(WeightLoadError, match="garbage.gguf"):
        load_checkpoint(bad, progress=False)


def test_gguf_unknown_tensor(tiny_llama_dir, tmp_path):
    path = write_llama_gguf(tiny_llama_dir, tmp_path / "renamed.gguf", Q.F32,
                            rename={"blk.1.ffn_up.weight": "blk.1.ffn_upper.weight"})
    with pytest.raises(WeightLoadError, match=r"renamed\.gguf, tensor 'blk\.1\.ffn_upper\.weight'"):
        load_checkpoint(path, progress=False)


def test_gguf_unsupported_quant_type_names_the_tensor(tiny_llama_dir, tmp_path):
    path = tmp_path / "iq.gguf"
    src = write_llama_gguf(tiny_llama_dir, tmp_path / "src.gguf", Q.F32)
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(path), "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        w.add_key_value(field.name, field.contents(), field.types[0],
                        field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        arr = np.array(t.data)
        if t.name == "blk.0.attn_v.weight":
            qt = Q.IQ2_XXS  # a real type this engine does not dequantize
            block, size = gguf.GGML_QUANT_SIZES[qt]
            raw = np.zeros((arr.shape[0], arr.shape[1] // block * size), np.uint8)
            w.add_tensor(t.name, raw, raw_shape=raw.shape, raw_dtype=qt)
        else:
            w.add_tensor(t.name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(WeightLoadError, match=r"iq\.gguf, tensor 'blk\.0\.attn_v\.weight'.*IQ2_XXS"):
        load_checkpoint(path, progress=False)


def test_gguf_unsupported_architecture(tmp_path):
    path = tmp_path / "bert.gguf"
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b"])
    w.add_token_merges([])
    w.add_tensor("token_embd.weight", np.zeros((2, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="'bert'.*supported"):
        load_checkpoint(path, progress=False)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("shape", [(3, 5, 7), (1,), (0, 4), (30, 576, 1536)])
def test_host_buffers_are_aligned_for_zero_copy_placement(shape: tuple[int, ...], dtype: str
                                                           ) -> None:
    a = aligned_empty(shape, NUMPY_DTYPES[dtype])
    assert a.shape == shape and a.dtype == NUMPY_DTYPES[dtype] and a.flags.c_contiguous
    assert a.ctypes.data % XLA_CPU_ALIGNMENT == 0 or a.size == 0  # (no data to align)
    a[...] = 1  # writable, and all of it is there
    assert float(a.astype(np.float32).sum()) == a.size


# ---- hostile files: crafted headers end in WeightLoadError, never in another exception ---------


def _gguf(kvs: bytes = b"", n_kv: int = 0, tensors: bytes = b"", n_tensors: int = 0) -> bytes:
    """A GGUF v3 header by hand: what a writer would refuse to write."""
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kvs + tensors


def _key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


@pytest.mark.parametrize("value", [
    struct.pack("<II", 4, 0),  # u32 0: once a division by zero
    struct.pack("<II", 4, 3),  # not a power of two
    struct.pack("<Ii", 5, -32),  # negative
    struct.pack("<IIQI", 9, 4, 1, 32),  # an array: once a TypeError
], ids=["zero", "three", "negative", "array"])
def test_gguf_alignment_must_be_a_power_of_two(tmp_path, value):
    path = tmp_path / "bad.gguf"
    path.write_bytes(_gguf(_key("general.alignment") + value, n_kv=1))
    with pytest.raises(WeightLoadError, match="alignment"):
        GGUFFile(path)


def test_gguf_deeply_nested_arrays_are_refused(tmp_path):
    depth = 3000  # about 36 KB: once a RecursionError
    value = struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * depth + struct.pack("<IQ", 4, 0)
    path = tmp_path / "nested.gguf"
    path.write_bytes(_gguf(_key("x") + value, n_kv=1))
    with pytest.raises(WeightLoadError, match="nested"):
        GGUFFile(path)


def test_gguf_tensor_of_more_than_four_dims_is_refused(tmp_path):
    info = _key("t") + struct.pack("<I", 5) + struct.pack("<5Q", 1, 1, 1, 1, 1) \
        + struct.pack("<IQ", 0, 0)
    path = tmp_path / "dims.gguf"
    path.write_bytes(_gguf(tensors=info, n_tensors=1) + bytes(64))
    with pytest.raises(WeightLoadError, match="5 dimensions"):
        GGUFFile(path)


def _safetensors(path: Path, header: dict, data_bytes: int) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(data_bytes))
    return path


def _t(begin, end) -> dict:
    return {"dtype": "F32", "shape": [4], "data_offsets": [begin, end]}


@pytest.mark.parametrize("header,data,match", [
    ({"a": _t("0", "16")}, 16, "data_offsets must be two non-negative integers"),
    ({"a": {"dtype": "F32", "shape": ["4"], "data_offsets": [0, 16]}}, 16, "shape must be"),
    ({"a": _t(0, 16), "b": _t(0, 16)}, 32, "overlaps"),
    ({"a": _t(0, 16), "b": _t(32, 48)}, 48, "leaves a gap"),
    ({"a": _t(0, 16), "b": _t(16, 32)}, 40, "holds 40 bytes"),
], ids=["string offsets", "string shape", "overlap", "gap", "trailing bytes"])
def test_safetensors_ranges_must_tile_the_data(tmp_path, header, data, match):
    path = _safetensors(tmp_path / "x.safetensors", header, data)
    with pytest.raises(WeightLoadError, match=match):
        SafetensorsFile(path)


def test_a_well_formed_safetensors_file_still_reads(tmp_path):
    path = _safetensors(tmp_path / "ok.safetensors", {"b": _t(16, 32), "a": _t(0, 16)}, 32)
    assert sorted(SafetensorsFile(path).names()) == ["a", "b"]
