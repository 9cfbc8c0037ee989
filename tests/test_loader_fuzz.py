"""Whatever the bytes of a model file, loading it ends in a model or in `WeightLoadError`.

Real tiny checkpoints (a GGUF with Q8_0 and F32 tensors and a byte-level BPE vocabulary, a GGUF
with a SentencePiece vocabulary, an HF safetensors folder) are mutated by hypothesis: flipped
bits (mostly in the header, where the counts and offsets are), truncation, and rewritten header
fields (counts, offsets, lengths, type ids, dims; for safetensors the JSON header's offsets,
dtypes and shapes, its length prefix, and config.json's values). Each mutated file goes through
`load_checkpoint`, which builds the config, the tokenizer and every param, up to the placement on
devices (kept on the host here: placing is not reading the file).

Each load runs in a worker process, for two bounds that an in-process load could not keep:
* time: a load that does not answer within `LOAD_SECONDS` is a failure (the worker is killed);
* memory: the worker's address space is capped (`RLIMIT_AS`, `ADDRESS_SPACE_MARGIN` over what it
  holds after its imports), so a runaway allocation fails there as a MemoryError, which the test
  reports, instead of taking the machine's memory; and the peak that `tracemalloc` sees (Python
  objects and numpy buffers, what lying counts in a header inflate) must stay under
  `TRACED_PEAK_LIMIT`, far above what the unmutated files take and far below what a count
  taken on trust would ask for.

The examples are derandomized (a fixed seed) and bounded; `JAXEMBED_FUZZ_EXAMPLES=5000` runs more
by hand. Outcomes are tallied per test and printed at the end of the module (`pytest -s`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiny_models import write_llama_gguf

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/status").exists(),
                       reason="the memory bound reads /proc (Linux)"),
]

EXAMPLES = int(os.environ.get("JAXEMBED_FUZZ_EXAMPLES", "400"))
LOAD_SECONDS = 30.0  # a tiny model loads in about 20 ms; this is slack for a loaded machine
ADDRESS_SPACE_MARGIN = 1 << 30
TRACED_PEAK_LIMIT = 64 << 20  # the unmutated files peak near 2 MB
ALLOWED = ("loaded", "WeightLoadError", "UnsupportedModelError")

FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---- the worker --------------------------------------------------------------------------------

WORKER = textwrap.dedent("""
    import json, resource, sys, time, traceback, tracemalloc
    from jaxembed.weights.loader import load_checkpoint

    def on_host(cfg):
        return lambda key, array: array

    def chain(e):
        while e is not None:
            yield e
            e = e.__cause__ or e.__context__

    status = open("/proc/self/status").read()
    vm = int(status.split("VmSize:")[1].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + int(sys.argv[1]), resource.RLIM_INFINITY))
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        tracemalloc.start()
        start = time.perf_counter()
        try:
            load_checkpoint(line.rstrip("\\n"), progress=False, placement=on_host)
            out = {"outcome": "loaded"}
        except Exception as e:
            out = {"outcome": type(e).__name__, "message": str(e)[:4000],
                   "memory_error": any(isinstance(c, MemoryError) for c in chain(e)),
                   "traceback": traceback.format_exc()[-6000:]}
        out["seconds"] = time.perf_counter() - start
        out["peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(json.dumps(out), flush=True)
""")


class LoadWorker:
    """A process that loads the paths it is sent, one at a time, under the bounds above."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def _start(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}
        with self.log.open("ab") as err:
            proc = subprocess.Popen([sys.executable, "-c", WORKER, str(ADDRESS_SPACE_MARGIN)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                    env=env)
        self.proc = proc
        assert self._reply(120.0) == {"ready": True}
        return proc

    def _reply(self, timeout: float) -> dict[str, Any] | None:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        return json.loads(line) if line else None

    def load(self, path: Path) -> dict[str, Any]:
        proc = self.proc if self.proc is not None and self.proc.poll() is None else self._start()
        assert proc.stdin is not None
        proc.stdin.write(f"{path}\n".encode())
        proc.stdin.flush()
        reply = self._reply(LOAD_SECONDS)
        if reply is None:  # too slow, or the process died: either way a failure
            status = proc.poll()
            self.close()
            tail = self.log.read_text(errors="replace")[-3000:]
            what = "still running" if status is None else f"exit status {status}"
            return {"outcome": f"no answer within {LOAD_SECONDS} s ({what})",
                    "message": "", "traceback": tail, "seconds": LOAD_SECONDS, "peak": 0}
        return reply

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


TALLY: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadWorker]:
    w = LoadWorker(tmp_path_factory.mktemp("fuzz-worker") / "stderr.log")
    yield w
    w.close()
    for test, counts in TALLY.items():
        print(f"\n{test}: {sum(counts.values())} loads: {dict(counts.most_common())}")


def check_outcome(test: str, result: dict[str, Any], named: Path) -> None:
    """Loaded, or refused with the file named; never another exception, a hang or a blow-up."""
    outcome = result["outcome"]
    TALLY[test][outcome] += 1
    assert outcome in ALLOWED, f"{outcome}: {result['message']}\n{result['traceback']}"
    assert result["peak"] <= TRACED_PEAK_LIMIT, f"traced peak {result['peak']} bytes: {result}"
    if outcome != "loaded":
        assert not result["memory_error"], result["traceback"]
        assert str(named) in result["message"], result["message"]


def replace_file(path: Path, data: bytes) -> None:
    """Write through a new inode: the worker may still map the previous file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ---- unsigned values worth trying in a field -----------------------------------------------------


def field_values(original: int, size: int) -> st.SearchStrategy[int]:
    top = (1 << (8 * size)) - 1
    edges = [0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 16, 31, 32, 33, 255, 256, 65535, 1 << 16,
             (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, (1 << 63) - 1, 1 << 63, top]
    return st.one_of(
        st.sampled_from([v for v in edges if v <= top]),
        st.integers(-8, 8).map(lambda d: (original + d) & top),
        st.sampled_from([2, 3, 1000, 1 << 20]).map(lambda k: (original * k) & top),
        st.integers(0, top),
    )


# ---- GGUF ----------------------------------------------------------------------------------------

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


@dataclasses.dataclass(frozen=True)
class Sample:
    """A file's bytes under a short name: hypothesis prints the arguments of its strategies."""

    name: str
    data: bytes = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class Field:
    """An unsigned little-endian integer of `size` bytes at `offset` in the file's header."""

    kind: str
    offset: int
    size: int


def gguf_fields(data: bytes) -> tuple[dict[str, list[Field]], int]:
    """The header's integer fields by kind, and where the header ends (walked independently of
    the reader under test, from the format's description)."""
    fields: dict[str, list[Field]] = collections.defaultdict(list)
    pos = 24

    def add(kind: str, size: int) -> int:
        nonlocal pos
        fields[kind].append(Field(kind, pos, size))
        value = int.from_bytes(data[pos : pos + size], "little")
        pos += size
        return value

    def string() -> None:
        nonlocal pos
        length = add("string_length", 8)
        pos += length

    def value(vtype: int) -> None:
        nonlocal pos
        if vtype == 8:
            string()
        elif vtype == 9:
            etype, count = add("array_type", 4), add("array_count", 8)
            if etype in _SCALAR_SIZES:
                size = count * _SCALAR_SIZES[etype]
                pos += size
            else:
                for _ in range(count):
                    value(etype)
        else:
            add("scalar", _SCALAR_SIZES[vtype])

    for kind, offset, size in (("version", 4, 4), ("tensor_count", 8, 8), ("kv_count", 16, 8)):
        fields[kind].append(Field(kind, offset, size))
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    for _ in range(n_kv):
        string()
        value(add("value_type", 4))
    for _ in range(n_tensors):
        string()
        for _ in range(add("n_dims", 4)):
            add("dim", 8)
        add("tensor_type", 4)
        add("tensor_offset", 8)
    return dict(fields), pos


@st.composite
def gguf_mutations(draw: st.DrawFn, sample: Sample) -> list[tuple[Any, ...]]:
    data = sample.data
    fields, header_end = gguf_fields(data)
    kinds = sorted(fields)
    out: list[tuple[Any, ...]] = []
    if draw(st.integers(0, 3)) == 0:  # another family's code paths, on the same tensors
        out.append(("architecture", draw(st.sampled_from(SAME_LENGTH_ARCHITECTURES))))
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["field", "field", "field", "flip", "flip", "truncate"]))
        if what == "field":
            kind = draw(st.sampled_from(kinds))
            field = draw(st.sampled_from(fields[kind]))
            original = int.from_bytes(data[field.offset : field.offset + field.size], "little")
            out.append(("set", field, draw(field_values(original, field.size))))
        elif what == "flip":
            end = draw(st.sampled_from([header_end, header_end, len(data)]))
            out.append(("flip", draw(st.integers(0, end - 1)), draw(st.integers(0, 7))))
        else:
            end = draw(st.sampled_from([header_end, len(data)]))
            out.append(("truncate", draw(st.integers(0, end))))
    return out


# Architectures spelled in as many bytes as "llama": renaming one in place (the value of
# general.architecture and the prefix of the model's keys) moves no offset.
SAME_LENGTH_ARCHITECTURES = ("qwen2", "qwen3", "gemma")
_ARCHITECTURE_VALUE = (struct.pack("<Q", 20) + b"general.architecture"
                       + struct.pack("<IQ", 8, 5) + b"llama")


def mutate_gguf(data: bytes, mutations: list[tuple[Any, ...]]) -> bytes:
    buf = bytearray(data)
    cut = len(buf)
    for m in mutations:
        if m[0] == "architecture":
            new = m[1].encode()
            at = buf.find(_ARCHITECTURE_VALUE)
            assert at >= 0
            buf[at + len(_ARCHITECTURE_VALUE) - 5 : at + len(_ARCHITECTURE_VALUE)] = new
            buf[:] = buf.replace(b"llama.", new + b".")  # the keys; no token spells it
        elif m[0] == "set":
            field, value = m[1], m[2]
            buf[field.offset : field.offset + field.size] = value.to_bytes(field.size, "little")
        elif m[0] == "flip":
            buf[m[1]] ^= 1 << m[2]
        else:
            cut = min(cut, m[1])
    return bytes(buf[:cut])


def _sentencepiece_gguf(src: Path, out: Path) -> Path:
    """`src` with its vocabulary described as SentencePiece ("llama"): scores (f32) and token
    types, no merges, so the numeric-array readers are exercised too."""
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(out), "llama")
    n_tokens = 0
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in (
                "general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.merges",
                "tokenizer.ggml.pre"):
            continue
        if field.name == "tokenizer.ggml.tokens":
            n_tokens = len(field.data)
        w.add_key_value(field.name, field.contents(), field.types[0],
                        field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    w.add_tokenizer_model("llama")
    w.add_token_scores([-float(i) for i in range(n_tokens)])
    w.add_bos_token_id(1)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_shape=np.array(t.data).shape,
                     raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def gguf_bases(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("fuzz-gguf-bases")
    q8 = write_llama_gguf(tiny_llama_dir, folder / "q8_0.gguf", gguf.GGMLQuantizationType.Q8_0)
    f32 = write_llama_gguf(tiny_llama_dir, folder / "f32.gguf", gguf.GGMLQuantizationType.F32)
    spm = _sentencepiece_gguf(f32, folder / "spm.gguf")
    return {"bpe-q8_0": q8.read_bytes(), "spm-f32": spm.read_bytes()}


GGUF_BASES = ("bpe-q8_0", "spm-f32")


@pytest.mark.parametrize("base", GGUF_BASES)
def test_unmutated_gguf_loads(base, gguf_bases, worker, tmp_path):
    """The inputs are real models: without mutations, they load."""
    path = tmp_path / f"{base}.gguf"
    replace_file(path, gguf_bases[base])
    assert worker.load(path)["outcome"] == "loaded"


@pytest.mark.parametrize("base", GGUF_BASES)
def test_mutated_gguf_loads_or_is_refused(base, gguf_bases, worker, tmp_path_factory):
    data = gguf_bases[base]
    path = tmp_path_factory.mktemp("fuzz-gguf") / f"{base}.gguf"

    @FUZZ
    @given(gguf_mutations(Sample(base, data)))
    def run(mutations: list[tuple[Any, ...]]) -> None:
        replace_file(path, mutate_gguf(data, mutations))
        check_outcome(f"gguf {base}", worker.load(path), path)

    run()


# ---- safetensors ---------------------------------------------------------------------------------

JSON_JUNK = st.sampled_from([None, True, -1, 1.5, 1e300, "4", "", [], {}, [1, 2], {"a": 1},
                             1 << 64, 1 << 70, -(1 << 63)])


def json_ints(original: int) -> st.SearchStrategy[Any]:
    return st.one_of(field_values(original, 8), st.integers(-(1 << 70), 1 << 70), JSON_JUNK)


@st.composite
def header_edit(draw: st.DrawFn, names: list[str]) -> tuple[Any, ...]:
    name = draw(st.sampled_from(names))
    what = draw(st.sampled_from(["offset", "offset", "dtype", "shape", "shape", "entry", "key",
                                 "drop", "rename", "duplicate", "metadata", "header"]))
    if what == "offset":
        return ("offset", name, draw(st.integers(0, 1)), draw(json_ints(0)))
    if what == "dtype":
        dtype = draw(st.one_of(st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I32", "I16",
                                                "I8", "U8", "BOOL", "F8_E4M3", "Q4", "f32"]),
                               JSON_JUNK))
        return ("dtype", name, dtype)
    if what == "shape":
        how = draw(st.sampled_from(["set", "drop", "add", "swap", "junk"]))
        return ("shape", name, how, draw(st.integers(0, 3)), draw(json_ints(1)))
    if what == "entry":
        return ("entry", name, draw(JSON_JUNK))
    if what == "key":
        return ("key", name, draw(st.sampled_from(["dtype", "shape", "data_offsets"])))
    if what == "metadata":
        return ("metadata", draw(JSON_JUNK))
    if what == "header":
        return ("header", draw(st.sampled_from([[], 1, "x", None])))
    return (what, name)


def edit_header(header: dict[str, Any], edit: tuple[Any, ...]) -> Any:
    kind, *args = edit
    if kind == "header":
        return args[0]
    if kind == "metadata":
        header["__metadata__"] = args[0]
        return header
    name = args[0]
    entry = header[name]
    if kind == "offset":
        if isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2:
            entry["data_offsets"][args[1]] = args[2]
    elif kind == "dtype":
        entry["dtype"] = args[1]
    elif kind == "shape":
        how, i, value = args[1:]
        shape = entry.get("shape")
        if not isinstance(shape, list):
            entry["shape"] = value
        elif how == "set" and shape:
            shape[i % len(shape)] = value
        elif how == "drop" and shape:
            del shape[i % len(shape)]
        elif how == "add":
            shape.insert(i % (len(shape) + 1), value)
        elif how == "swap":
            shape.reverse()
        else:
            entry["shape"] = value
    elif kind == "entry":
        header[name] = args[1]
    elif kind == "key":
        entry.pop(args[1], None)
    elif kind == "drop":
        del header[name]
    elif kind == "rename":
        header[name + "X"] = header.pop(name)
    elif kind == "duplicate":
        header[name + ".copy"] = json.loads(json.dumps(entry))
    return header


@st.composite
def safetensors_mutations(draw: st.DrawFn, sample: Sample, names: list[str],
                          config_keys: list[str]) -> tuple[list[Any], list[Any], list[Any]]:
    """Edits of the JSON header, then of the file's bytes, then of config.json."""
    data = sample.data
    header_len = struct.unpack_from("<Q", data)[0]
    edits = draw(st.lists(header_edit(names), max_size=2))
    raw: list[tuple[Any, ...]] = []
    for _ in range(draw(st.integers(0 if edits else 1, 2))):
        what = draw(st.sampled_from(["length", "flip", "flip", "truncate"]))
        if what == "length":
            raw.append(("length", draw(field_values(header_len, 8))))
        elif what == "flip":
            end = draw(st.sampled_from([8 + header_len, len(data)]))
            raw.append(("flip", draw(st.integers(0, end - 1)), draw(st.integers(0, 7))))
        else:
            raw.append(("truncate", draw(st.integers(0, len(data)))))
    config: list[tuple[Any, ...]] = []
    if draw(st.integers(0, 4)) == 0:
        key = draw(st.sampled_from(config_keys))
        value = draw(st.one_of(json_ints(1), st.just("<delete>")))
        config.append((key, value))
    return edits, raw, config


def mutate_safetensors(data: bytes, edits: list[Any], raw: list[Any]) -> bytes:
    header_len = struct.unpack_from("<Q", data)[0]
    header = json.loads(data[8 : 8 + header_len])
    for edit in edits:
        if isinstance(header, dict) and (len(edit) < 2 or edit[0] in ("header", "metadata")
                                         or isinstance(header.get(edit[1]), dict)):
            header = edit_header(header, edit)
    blob = json.dumps(header).encode() if edits else data[8 : 8 + header_len]
    buf = bytearray(struct.pack("<Q", len(blob)) + blob + data[8 + header_len :])
    cut = len(buf)
    for m in raw:
        if m[0] == "length":
            buf[:8] = m[1].to_bytes(8, "little")
        elif m[0] == "flip":
            buf[m[1] % len(buf)] ^= 1 << m[2]
        else:
            cut = min(cut, m[1])
    return bytes(buf[:cut])


def mutate_config(config: dict[str, Any], edits: list[Any]) -> dict[str, Any]:
    config = json.loads(json.dumps(config))
    for key, value in edits:
        if value == "<delete>":
            config.pop(key, None)
        else:
            config[key] = value
    return config


def test_unmutated_folder_loads(tiny_llama_dir, worker):
    assert worker.load(tiny_llama_dir)["outcome"] == "loaded"


def test_mutated_safetensors_folder_loads_or_is_refused(tiny_llama_dir, worker,
                                                        tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-st") / "tiny"
    shutil.copytree(tiny_llama_dir, folder)
    data = (tiny_llama_dir / "model.safetensors").read_bytes()
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    header = json.loads(data[8 : 8 + struct.unpack_from("<Q", data)[0]])
    names = sorted(k for k in header if k != "__metadata__")

    @FUZZ
    @given(safetensors_mutations(Sample("model.safetensors", data), names, sorted(config)))
    def run(mutations: tuple[list[Any], list[Any], list[Any]]) -> None:
        edits, raw, config_edits = mutations
        replace_file(folder / "model.safetensors", mutate_safetensors(data, edits, raw))
        replace_file(folder / "config.json",
                     json.dumps(mutate_config(config, config_edits)).encode())
        check_outcome("safetensors", worker.load(folder), folder)

    run()
