"""A broken or unsupported checkpoint stops the load with the file, the tensor and the reason."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tracemalloc
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
            qt = Q.Q8_1  # a real type this engine does not dequantize
            block, size = gguf.GGML_QUANT_SIZES[qt]
            raw = np.zeros((arr.shape[0], arr.shape[1] // block * size), np.uint8)
            w.add_tensor(t.name, raw, raw_shape=raw.shape, raw_dtype=qt)
        else:
            w.add_tensor(t.name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(WeightLoadError, match=r"iq\.gguf, tensor 'blk\.0\.attn_v\.weight'.*Q8_1"):
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


# ---- numeric metadata arrays stay arrays ---------------------------------------------------------


@pytest.mark.parametrize("etype,dtype,count", [(6, "<f4", 1_000_000), (0, "<u1", 4_000_000)],
                         ids=["f32", "u8"])
def test_gguf_numeric_array_is_read_without_a_python_object_per_value(tmp_path, etype, dtype,
                                                                      count):
    values = np.arange(count).astype(dtype)
    path = tmp_path / "array.gguf"
    path.write_bytes(_gguf(_key("big") + struct.pack("<IIQ", 9, etype, count) + values.tobytes(),
                           n_kv=1))
    tracemalloc.start()
    try:
        meta = GGUFFile(path).metadata
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # A list took 8-9 times the array's bytes (a pointer and an object per value).
    assert peak < 2 * values.nbytes, peak
    assert isinstance(meta["big"], np.ndarray) and not meta["big"].flags.writeable
    np.testing.assert_array_equal(meta["big"], values)


# ---- GGUF metadata of the wrong type or size ---------------------------------------------------

V = gguf.GGUFValueType


@pytest.fixture(scope="module")
def f32_gguf(tiny_llama_dir: Path, tmp_path_factory) -> Path:
    return write_llama_gguf(tiny_llama_dir, tmp_path_factory.mktemp("g") / "f32.gguf", Q.F32)


def _rewrite_gguf(src: Path, out: Path, fields: dict[str, tuple | None],
                  tensors: bool = True) -> Path:
    """`src` with metadata replaced: key -> (value, type, element type for arrays), or None to
    drop the key; without its tensors unless `tensors`."""
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(out), "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", *fields):
            continue
        w.add_key_value(field.name, field.contents(), field.types[0],
                        field.types[-1] if field.types[0] == V.ARRAY else None)
    for name, typed in fields.items():
        if typed is not None:
            w.add_key_value(name, *typed)
    for t in reader.tensors if tensors else []:
        w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_gguf_per_layer_kv_head_counts_load(f32_gguf, tmp_path):
    path = _rewrite_gguf(f32_gguf, tmp_path / "per-layer.gguf",
                         {"llama.attention.head_count_kv": ([2, 2, 2], V.ARRAY, V.UINT32)})
    assert load_checkpoint(path, progress=False).config.num_kv_heads == 2


@pytest.mark.parametrize("fields,match", [
    # Once a bare Exception from `tokenizers`.
    ({"tokenizer.ggml.merges": (["Ġ t", "no such"], V.ARRAY, V.STRING)},
     "tokenizer metadata: the vocabulary and merges do not make a BPE model"),
    ({"tokenizer.ggml.merges": (["nospace"], V.ARRAY, V.STRING)}, "not two tokens"),
    # Once TypeErrors.
    ({"tokenizer.ggml.pre": (["a", "b"], V.ARRAY, V.STRING)}, "tokenizer.ggml.pre must be"),
    ({"tokenizer.ggml.model": (["gpt2"], V.ARRAY, V.STRING)}, "unsupported tokenizer.ggml.model"),
    ({"tokenizer.ggml.eos_token_id": (["a"], V.ARRAY, V.STRING)}, "eos_token_id must be"),
    ({"tokenizer.ggml.tokens": ([1, 2], V.ARRAY, V.UINT32), "tokenizer.ggml.token_type": None},
     "tokens must be an array of str"),
    # Once read as numbers by int().
    ({"tokenizer.ggml.token_type": (["1"] * 384, V.ARRAY, V.STRING)}, "array of numbers"),
    # Once a ZeroDivisionError.
    ({"llama.attention.head_count": (0, V.UINT32), "llama.attention.key_length": None},
     "ZeroDivisionError"),
    # Once a MemoryError: buffers for 10**12 layers, or 10**12-wide MLPs, before any tensor.
    ({"llama.block_count": (10**12, V.UINT64)}, "1000000000000 layers, but the checkpoint has"),
    ({"llama.feed_forward_length": (10**12, V.UINT64)}, "the config implies .* values"),
    # Once a ValueError from numpy's reshape (not a WeightLoadError): 32 kv heads of 1 cannot
    # undo the rope permutation of attn_k's 32 rows (each head needs pairs).
    ({"llama.attention.head_count": (64, V.UINT32), "llama.attention.head_count_kv":
      (32, V.UINT32), "llama.attention.key_length": (1, V.UINT32)},
     "attn_k.weight.*does not fit this llama config"),
], ids=["merge of unknown tokens", "merge without a space", "pre array", "model array",
        "id array", "numeric tokens", "string types", "zero heads", "layers", "mlp width",
        "heads"])
def test_gguf_metadata_of_the_wrong_type_or_size(f32_gguf, tmp_path, fields, match):
    path = _rewrite_gguf(f32_gguf, tmp_path / "bad.gguf", fields)
    with pytest.raises(WeightLoadError, match=match) as e:
        load_checkpoint(path, progress=False)
    assert str(path) in str(e.value)


def test_gguf_without_tensors_names_the_whole_path(f32_gguf, tmp_path):
    path = _rewrite_gguf(f32_gguf, tmp_path / "empty.gguf", {"llama.block_count": (0, V.UINT32)},
                         tensors=False)
    with pytest.raises(WeightLoadError, match="token_embd.weight.*missing") as e:
        load_checkpoint(path, progress=False)
    assert str(path) in str(e.value)  # once only its name


# ---- safetensors headers and config.json of the wrong type or size ----------------------------


@pytest.mark.parametrize("header,match", [
    ({"a": {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}}, "unsupported dtype"),
    ({"a": {"dtype": "F32", "shape": [0, 2**62], "data_offsets": [0, 0]}}, "too large"),
], ids=["list dtype", "empty but too large"])
def test_safetensors_entry_of_the_wrong_type(tmp_path, header, match):
    path = _safetensors(tmp_path / "x.safetensors", header, 16 if "4" in str(header) else 0)
    with pytest.raises(WeightLoadError, match=match):
        SafetensorsFile(path)


@pytest.mark.parametrize("blob", [b'{"a": ' + b"1" * 5000 + b"}", b"[" * 100_000 + b"]" * 100_000],
                         ids=["5000 digits", "nested 100000 deep"])
def test_safetensors_header_json_beyond_the_parser(tmp_path, blob):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob)
    with pytest.raises(WeightLoadError, match="not valid JSON"):
        SafetensorsFile(path)


@pytest.mark.parametrize("edit,match", [
    ({"eos_token_id": {}}, "invalid model config: TypeError"),
    ({"num_hidden_layers": 10**12}, "1000000000000 layers, but the checkpoint has"),
    ({"intermediate_size": 10**12}, "the config implies .* values"),
    ({"hidden_size": 64.0}, "sizes must be non-negative integers"),
], ids=["dict id", "layers", "mlp width", "float width"])
def test_config_json_of_the_wrong_type_or_size(folder, edit, match):
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(WeightLoadError, match=match) as e:
        load_checkpoint(folder, progress=False)
    assert str(path) in str(e.value)


def test_config_json_that_is_not_an_object(folder):
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(WeightLoadError, match=r"config\.json: not a JSON object"):
        load_checkpoint(folder, progress=False)


# ---- the command line ----------------------------------------------------------------------------


@pytest.mark.slow
def test_serve_on_a_broken_file_exits_with_one_line(tmp_path):
    """The server binds its port and loads in the background; a broken file stops it with status
    2 and one line naming the file and what is wrong, not a traceback of the loader."""
    path = tmp_path / "broken.gguf"
    path.write_bytes(_gguf(_key("general.alignment") + struct.pack("<II", 4, 3), n_kv=1))
    out = subprocess.run(
        [sys.executable, "-m", "jaxembed.cli", "serve", "--model", str(path), "--port", "0",
         "--log-level", "warning"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert [line for line in out.stderr.splitlines() if str(path) in line] == [
        f"jaxembed: error: the model failed to load: cannot load {path}: general.alignment must "
        "be a positive power of two; got 3"], out.stderr


def test_a_misshaped_classifier_head_names_the_tensor(folder):
    from safetensors.numpy import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    # A classifier head whose rows are not the hidden size (64).
    save_file({**tensors, "score.weight": np.zeros((2, 7), np.float32)}, str(path))
    with pytest.raises(WeightLoadError, match=r"tensor 'score\.weight'.*\[labels, 64\]"):
        load_checkpoint(folder, progress=False)
    save_file({**tensors, "score.weight": np.ones((2, 64), np.float32)}, str(path))
    heads = load_checkpoint(folder, progress=False).heads
    assert heads["score"].shape == (2, 64) and heads["score"].dtype == np.float32
