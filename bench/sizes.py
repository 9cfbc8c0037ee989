"""Sizes: jaxembed against llama.cpp at three sizes of one architecture, each on the same file.

    python -m bench.sizes [--sizes 135m,1.7b,7b] [--sizes-texts N] [--sizes-tokens 32]
                          [--streams 16] [--sizes-baseline EARLIER.json]
    python -m bench.run --workloads sizes [the same flags]

What is fast at 135M can be slow at 1.7B, and what fits at 1.7B may not fit at 7B. This workload
builds random-weight GGUFs of SmolLM2's architecture ("llama") with SmolLM2's own tokenizer, copied
from the embedded model: about 135M and 1.7B (SmolLM2-135M's and SmolLM2-1.7B's shapes) and 7B
(hidden 4096, 32 layers, untied), written as F16 and quantized to Q4_K_M by llama.cpp's own
quantizer. They are built once into `$JAXEMBED_CACHE/bench/sizes/` and reused.

At each size each engine runs in a fresh process of its own, so that its peak resident set
(VmHWM) is its alone: load time; embedding tokens/s on the same corpus; decode tokens/s of one
greedy stream past any end of text (bench/generation.py), and jaxembed's aggregate of `--streams`
at once; the peak. The roofline shares use this machine's rates measured in the same run: for
embeddings, useful FLOP/s over the fp32 matrix-product rate; for a decode stream, the weight bytes
it reads per token x tokens/s over the memory read bandwidth. The 7B model gets memory, load and
one small embedding call only. A process that fails (or is killed for memory) is reported with its
exit status and last lines of output, and the run goes on. Other work on the machine slows
llama.cpp far more than jaxembed (its OpenMP threads spin at every barrier for a thread that is
not running), so the table gives the load average each process ended with.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

GIB = 1 << 30
MIB = 1 << 20
STD = 0.02  # the weights' random normal spread (norms are 1)
CONTEXT = 2048
Q4_K_M = "Q4_K_M"
# jaxembed's context here: room for the corpus's longest texts and for the decode streams, and a
# KV cache of max_num_seqs slots that a 24 GB machine holds at 1.7B (float32: 3.4 GB).
MAX_MODEL_LEN = 512
CHILD_TIMEOUT_S = 1800


@dataclasses.dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    tied: bool
    texts: int = 64  # the embedding corpus: 8 to 512 tokens each (full), else 8 to 64
    vocab: int = 49152
    full: bool = True  # False: memory, load and one small embedding call only

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# Smaller corpora for larger models keep each pass to a minute or two on 2 cores.
SHAPES = {
    "135m": Shape(30, 576, 9, 3, 1536, tied=True),  # SmolLM2-135M
    "1.7b": Shape(24, 2048, 32, 32, 8192, tied=True, texts=32),  # SmolLM2-1.7B
    # Llama 2 7B's shape with SmolLM2's vocabulary.
    "7b": Shape(32, 4096, 32, 32, 11008, tied=False, texts=8, full=False),
}


# ---- the models --------------------------------------------------------------------------------


def tensor_specs(s: Shape) -> list[tuple[str, tuple[int, ...], int]]:
    """(GGUF name, row-major shape, heads of llama.cpp's q/k row permutation or 0) of each
    tensor, in the order llama.cpp's converter writes them."""
    d, dh = s.hidden, s.head_dim
    specs = [("token_embd.weight", (s.vocab, d), 0)]
    for i in range(s.layers):
        b = f"blk.{i}."
        specs += [(b + "attn_norm.weight", (d,), 0),
                  (b + "attn_q.weight", (s.heads * dh, d), s.heads),
                  (b + "attn_k.weight", (s.kv_heads * dh, d), s.kv_heads),
                  (b + "attn_v.weight", (s.kv_heads * dh, d), 0),
                  (b + "attn_output.weight", (d, s.heads * dh), 0),
                  (b + "ffn_norm.weight", (d,), 0),
                  (b + "ffn_gate.weight", (s.ffn, d), 0),
                  (b + "ffn_up.weight", (s.ffn, d), 0),
                  (b + "ffn_down.weight", (d, s.ffn), 0)]
    specs.append(("output_norm.weight", (d,), 0))
    if not s.tied:
        specs.append(("output.weight", (s.vocab, d), 0))
    return specs


def random_tensor(seed: int, index: int, shape: tuple[int, ...]) -> np.ndarray:
    """The index-th tensor in HF's layout: ones for a norm, else N(0, STD) as float16. Seeded by
    (seed, index), so that one tensor can be drawn again without the others."""
    if len(shape) == 1:
        return np.ones(shape, np.float32)
    rng = np.random.default_rng([seed, index])
    return (rng.standard_normal(shape, dtype=np.float32) * STD).astype(np.float16)


def llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter permutation of q/k rows (HF half-split RoPE -> GGML interleaved):
    readers undo it, so a file without it would hold a different network than the one drawn."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def source_fields(source: Path) -> tuple[list[tuple[str, Any, Any, Any]], dict[str, Any]]:
    """The source GGUF's tokenizer.* keys (with the chat template) as (key, value, type, array
    item type), and its rope base and RMS epsilon."""
    import gguf

    reader = gguf.GGUFReader(source)
    tokenizer = []
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            array = field.types[0] == gguf.GGUFValueType.ARRAY
            tokenizer.append((key, field.contents(), field.types[0],
                              field.types[-1] if array else None))
    arch = reader.fields["general.architecture"].contents()
    numbers = {k: reader.fields[f"{arch}.{k}"].contents()
               for k in ("rope.freq_base", "attention.layer_norm_rms_epsilon")}
    return tokenizer, numbers


def write_random_gguf(path: Path, shape: Shape, source: Path, seed: int = 0,
                      name: str = "random") -> Path:
    """A llama-architecture GGUF of `shape` with random F16 matrices and F32 norms, and the
    source GGUF's tokenizer. Written a tensor at a time: a 7B model never sits in memory whole."""
    import gguf

    tokenizer, numbers = source_fields(source)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_block_count(shape.layers)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(shape.hidden)
    w.add_feed_forward_length(shape.ffn)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.kv_heads)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_rope_freq_base(float(numbers["rope.freq_base"]))
    w.add_layer_norm_rms_eps(float(numbers["attention.layer_norm_rms_epsilon"]))
    w.add_vocab_size(shape.vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for key, value, vtype, sub in tokenizer:
        w.add_key_value(key, value, vtype, sub_type=sub)
    specs = tensor_specs(shape)
    for tname, shp, _ in specs:
        dtype = np.dtype(np.float32 if len(shp) == 1 else np.float16)
        w.add_tensor_info(tname, shp, dtype, int(np.prod(shp)) * dtype.itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for i, (_, shp, heads) in enumerate(specs):
        t = random_tensor(seed, i, shp)
        w.write_tensor_data(llama_permute(t, heads) if heads else t)
    w.close()
    return path


def quantize(src: Path, dst: Path, ftype: str = Q4_K_M, threads: int = 2) -> None:
    """llama.cpp's own quantizer (`llama_model_quantize`), through llama-cpp-python."""
    import ctypes
    import logging

    import llama_cpp

    # llama-cpp-python prints llama.cpp's log at this logger's level: errors only, not a line
    # per tensor.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                        ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {src} -> {dst} failed ({rc})")


def model_path(name: str, cache: Path | None = None, seed: int = 0) -> Path:
    from jaxembed.fetch import cache_dir

    return (cache or cache_dir()) / "bench" / "sizes" / f"random-{name}-seed{seed}.{Q4_K_M}.gguf"


def build_model(name: str, shape: Shape, cache: Path | None = None, seed: int = 0,
                threads: int = 2) -> tuple[Path, float | None]:
    """The cached Q4_K_M model `name` of `shape`, built first if missing; and the seconds
    building took (None when cached). Both files are written under temporary names and the
    result renamed into place, so a build that is killed leaves no file that looks finished."""
    from jaxembed.fetch import default_model_path

    out = model_path(name, cache, seed)
    if out.is_file():
        return out, None
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
        f16, part = Path(tmp) / "f16.gguf", Path(tmp) / "q.gguf"
        write_random_gguf(f16, shape, default_model_path(), seed,
                          name=f"random SmolLM2-shaped {name}")
        quantize(f16, part, Q4_K_M, threads)
        f16.unlink()
        part.rename(out)
    return out, time.perf_counter() - start


# ---- one engine at one size, in a process of its own ------------------------------------------


def measure_jaxembed(spec: dict[str, Any]) -> dict[str, Any]:
    from bench.generation import decode_bytes_per_token, jaxembed_aggregate, jaxembed_single_stream
    from bench.memory import _peak_rss
    from jaxembed import EngineBuilder

    texts, decode = spec["texts"], spec["decode"]
    start = time.perf_counter()
    engine = EngineBuilder(model=spec["model"], progress=False, warmup=False,
                           max_model_len=spec["max_model_len"],
                           max_num_seqs=spec["streams"] if decode else 1).build()
    r: dict[str, Any] = {"load_s": time.perf_counter() - start, "peak_rss_after_load": _peak_rss()}
    try:
        plan, cfg = engine.runner.plan, engine.config
        # Keys and values: layers x (slots + a scratch row) x kv heads x positions x head size.
        r["kv_cache_bytes"] = (2 * cfg.num_layers * (plan.max_num_seqs + 1) * cfg.num_kv_heads
                               * plan.max_model_len * cfg.head_dim * plan.kv_itemsize)
        r["kv_cache"] = f"{plan.max_num_seqs} slots x {plan.max_model_len} tokens, {plan.kv_dtype}"
        r["plan"] = plan.summary
        r.update(_embed(lambda: engine.encode(texts),
                        sum(len(t) for t in engine.tokenize(texts)), warm=True))
        r["peak_rss_after_embed"] = _peak_rss()
        if decode:
            r["single"] = jaxembed_single_stream(engine, spec["ids"], spec["tokens"],
                                                 spec["repeat"])
            # Best of `repeat` passes, as the single stream: a pass that meets a new prefill
            # shape (threads admitted in another grouping) compiles within its timing.
            r["aggregate"] = jaxembed_aggregate(engine, spec["tokens"], spec["streams"],
                                                repeat=spec["repeat"])
            r["decode_tokens_per_s"] = r["single"]["decode_tokens_per_s"]
            r["aggregate_tokens_per_s"] = r["aggregate"]["tokens_per_s"]
            r["bytes_per_token"] = decode_bytes_per_token(engine)
        r["kv_cache_allocated"] = engine.runner.state is not None
    finally:
        engine.shutdown()
    r["peak_rss"] = _peak_rss()
    r["load_average"] = os.getloadavg()[0]
    return r


def measure_llamacpp(spec: dict[str, Any]) -> dict[str, Any]:
    from bench.generation import llamacpp_single_stream
    from bench.memory import _peak_rss
    from bench.peers import llamacpp_peer

    model, threads = Path(spec["model"]), spec["threads"]
    peer = llamacpp_peer(model, spec["texts"], threads)  # loads, then embeds a few untimed
    try:
        r: dict[str, Any] = {"load_s": peer.info["load_s"], "threads": threads}
        r.update(_embed(peer.run, peer.info["tokens"], warm=False))
    finally:
        peer.close()
    r["peak_rss_after_embed"] = _peak_rss()
    if spec["decode"]:
        r["single"] = llamacpp_single_stream(model, spec["ids"], spec["tokens"], threads,
                                             spec["repeat"])
        r["decode_tokens_per_s"] = r["single"]["decode_tokens_per_s"]
    r["peak_rss"] = _peak_rss()
    r["load_average"] = os.getloadavg()[0]
    return r


def _embed(run: Any, tokens: int, warm: bool) -> dict[str, Any]:
    """One timed pass over the corpus (at 1.7B on 2 cores a pass takes minutes); with `warm`,
    one untimed pass first (jaxembed compiles the step shapes of this corpus in it)."""
    from bench.peers import timed

    if warm:
        run()
    run_s = timed(run)
    return {"embed_tokens": tokens, "embed_s": run_s, "embed_tokens_per_s": tokens / run_s}


MEASURES = {"jaxembed": measure_jaxembed, "llamacpp": measure_llamacpp}


def run_child(spec: dict[str, Any], timeout: float = CHILD_TIMEOUT_S) -> dict[str, Any]:
    """One measurement in a fresh interpreter; a failure (a crash, the kernel's OOM kill, a
    timeout) is returned as {"failed": ...} with the exit status and the last lines it wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "bench.sizes", "measure", str(spec_path), str(out)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            return {"failed": {"timeout_s": timeout, "tail": _tail(e.stderr)}}
        if done.returncode != 0 or not out.is_file():
            return {"failed": {"returncode": done.returncode,
                               "tail": _tail(done.stderr) or _tail(done.stdout)}}
        return json.loads(out.read_text())


def _tail(text: str | bytes | None, lines: int = 15) -> list[str]:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "").strip().splitlines()[-lines:]


def _read_through(path: Path) -> None:
    """Read a file once, so that each engine loads it from the page cache alike."""
    with path.open("rb") as f:
        while f.read(64 * MIB):
            pass


# ---- the workload ------------------------------------------------------------------------------


def sizes_benchmark(sizes: list[str], texts: int | None = None, tokens: int = 32,
                    streams: int = 16, threads: int | None = None, repeat: int = 2,
                    baseline: Path | None = None, cache: Path | None = None) -> dict[str, Any]:
    """Every figure at every size, both engines, with the targets judged. texts: the corpus
    at every size (default: each shape's own); repeat: timed runs of each decode (the best
    is reported)."""
    from bench.generation import PROMPTS, gguf_bytes_per_token, memory_bandwidth
    from bench.peers import roofline_flops, useful_flops
    from bench.run import make_corpus
    from jaxembed.config import ModelConfig
    from jaxembed.fetch import default_model_path
    from jaxembed.weights.gguf_io import GGUFFile
    from jaxembed.weights.gguf_tokenizer import tokenizer_from_gguf

    unknown = [s for s in sizes if s not in SHAPES]
    if unknown:
        raise ValueError(f"unknown sizes {unknown}; choose from {', '.join(SHAPES)}")
    threads = threads or os.cpu_count() or 1
    # Every size has the embedded model's tokenizer.
    tokenizer = tokenizer_from_gguf(GGUFFile(default_model_path()).metadata).tokenizer
    ids = tokenizer.encode(PROMPTS[0]).ids
    r: dict[str, Any] = {"sizes": sizes, "texts": texts, "tokens": tokens, "streams": streams,
                         "repeat": repeat, "threads": threads, "max_model_len": MAX_MODEL_LEN,
                         "prompt_tokens": len(ids), "roofline_rounds": [],
                         "bandwidth_rounds": [], "results": {}}
    for size in sizes:
        shape = SHAPES[size]
        path, build_s = build_model(size, shape, cache, threads=threads)
        # A model without decode figures embeds a few short texts: "it loads and embeds".
        n = texts or shape.texts
        corpus = make_corpus(tokenizer, n) if shape.full else make_corpus(tokenizer, n, hi=64)
        cfg = ModelConfig.from_gguf(GGUFFile(path).metadata, vocab_size=shape.vocab,
                                    tied=shape.tied)
        lengths = [len(e.ids) for e in tokenizer.encode_batch(corpus)]
        # The machine's rates, measured again at each size: the best of the run is its peak.
        r["roofline_rounds"].append(roofline_flops(repeat=3))
        r["bandwidth_rounds"].append(memory_bandwidth(path, threads=threads))
        one: dict[str, Any] = {
            "shape": dataclasses.asdict(shape), "file": str(path),
            "file_bytes": path.stat().st_size, "build_s": build_s, "texts": len(corpus),
            "useful_flop": useful_flops(cfg, lengths)[0], "corpus_tokens": sum(lengths),
            "gguf_bytes_per_token": gguf_bytes_per_token(path)}
        spec = {"model": str(path), "texts": corpus, "ids": ids, "tokens": tokens,
                "streams": streams, "decode": shape.full, "repeat": repeat, "threads": threads,
                "max_model_len": MAX_MODEL_LEN}
        for engine in ("llamacpp", "jaxembed"):
            print(f"sizes: {size}, {engine}", file=sys.stderr, flush=True)
            _read_through(path)
            one[engine] = run_child({**spec, "engine": engine})
        r["results"][size] = one
    r["roofline_flops"] = max(p["best"] for p in r["roofline_rounds"])
    r["bandwidth_gb_per_s"] = max(b["best_gb_per_s"] for b in r["bandwidth_rounds"])
    for one in r["results"].values():
        add_shares(one, r["roofline_flops"], r["bandwidth_gb_per_s"])
    if baseline is not None:
        r["baseline"] = _baseline_ratio(baseline)
    r["targets"] = targets(r)
    return r


def add_shares(one: dict[str, Any], flops: float, gb_per_s: float) -> None:
    """Each engine's embedding FLOP/s over the matrix-product rate, and a decode stream's weight
    bytes per token x tokens/s over the memory bandwidth."""
    per_token = {"jaxembed": one["jaxembed"].get("bytes_per_token"),
                 "llamacpp": one["gguf_bytes_per_token"]}
    for name in ("jaxembed", "llamacpp"):
        e = one[name]
        if "embed_s" in e:
            e["embed_roofline_share"] = one["useful_flop"] / e["embed_s"] / flops
        if "decode_tokens_per_s" in e and per_token[name]:
            e["decode_bandwidth_share"] = per_token[name] * e["decode_tokens_per_s"] / gb_per_s / 1e9


def _baseline_ratio(path: Path) -> float | None:
    """jaxembed's embedding speed over llama.cpp's at 135m in an earlier run's results."""
    earlier = json.loads(Path(path).read_text())
    one = earlier.get("sizes", earlier).get("results", {}).get("135m", {})
    return _ratio(one, "embed_tokens_per_s")


def _ratio(one: dict[str, Any], key: str, theirs: str | None = None) -> float | None:
    a = one.get("jaxembed", {}).get(key)
    b = one.get("llamacpp", {}).get(theirs or key)
    return a / b if a is not None and b else None


def memory_budget(one: dict[str, Any]) -> int:
    """The memory target: 1.25 x the GGUF file, plus the KV cache (when the run allocated it),
    plus 0.5 GiB."""
    ours = one.get("jaxembed", {})
    kv = ours.get("kv_cache_bytes", 0) if ours.get("kv_cache_allocated") else 0
    return int(1.25 * one["file_bytes"] + kv + GIB // 2)


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue: reached (True/False), or None when not measured, with why."""
    res = r["results"]
    out = []

    def add(name: str, reached: bool | None, detail: str) -> None:
        out.append({"target": name, "reached": reached, "detail": detail})

    for size, one in res.items():
        peak = one.get("jaxembed", {}).get("peak_rss")
        budget = memory_budget(one)
        add(f"memory at {size}: peak resident <= 1.25x file + KV cache + 0.5 GiB",
            None if peak is None else peak <= budget,
            f"{_mib(peak)} of {_mib(budget)} MiB" if peak else "jaxembed failed")
    seven = res.get("7b")
    if seven is None:
        add("7B Q4_K_M loads and embeds", None, "not run (--sizes 7b)")
    else:
        ok = "embed_tokens_per_s" in seven["jaxembed"]
        add("7B Q4_K_M loads and embeds", ok,
            f"load {seven['jaxembed']['load_s']:.1f} s, peak {_mib(seven['jaxembed']['peak_rss'])}"
            f" MiB" if ok else f"failed: {seven['jaxembed'].get('failed')}")
    mid = res.get("1.7b", {})
    for name, ratio, goal in (
            ("decode, 1 stream, >= 1.2x llama.cpp at 1.7b",
             _ratio(mid, "decode_tokens_per_s"), 1.2),
            (f"decode, {r['streams']} streams, >= 3x llama.cpp's single stream at 1.7b",
             _ratio(mid, "aggregate_tokens_per_s", "decode_tokens_per_s"), 3.0),
            ("embeddings >= 2x llama.cpp at 1.7b", _ratio(mid, "embed_tokens_per_s"), 2.0)):
        add(name, None if ratio is None else ratio >= goal,
            f"{ratio:.2f}x" if ratio is not None else "not measured")
    small, before = _ratio(res.get("135m", {}), "embed_tokens_per_s"), r.get("baseline")
    if small is None or before is None:
        add("embeddings at 135m no slower than before", None,
            "needs 135m and --sizes-baseline (an earlier run's results)")
    else:
        add("embeddings at 135m no slower than before", small >= before,
            f"{small:.2f}x llama.cpp, before {before:.2f}x")
    load = _ratio(mid, "load_s")
    add("load within 2x llama.cpp's at 1.7b", None if load is None else load <= 2.0,
        f"{load:.2f}x its time" if load is not None else "not measured")
    return out


# ---- the report --------------------------------------------------------------------------------


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / MIB:.0f}"


ROWS = (  # label, jaxembed's key, llama.cpp's key, format, whether their ratio means anything
    ("peak resident memory, MiB", "peak_rss", "peak_rss", _mib, True),
    ("load, s", "load_s", "load_s", "{:.2f}".format, True),
    ("embedding tokens/s", "embed_tokens_per_s", "embed_tokens_per_s", "{:.0f}".format, True),
    ("decode, 1 stream, tokens/s", "decode_tokens_per_s", "decode_tokens_per_s", "{:.1f}".format,
     True),
    ("decode, {streams} streams, tokens/s (llama.cpp: its 1 stream)", "aggregate_tokens_per_s",
     "decode_tokens_per_s", "{:.1f}".format, True),
    # Quantized weights multiply over int8 activations: past 100% of the fp32 rate is possible.
    ("embedding, share of the fp32 matmul roofline", "embed_roofline_share",
     "embed_roofline_share", "{:.0%}".format, True),
    ("decode, 1 stream, share of the memory bandwidth bound", "decode_bandwidth_share",
     "decode_bandwidth_share", "{:.0%}".format, True),
    ("machine's load average (1 min) as the process ended", "load_average", "load_average",
     "{:.1f}".format, False),
)


def _cell(one: dict[str, Any], ours: str, theirs: str, fmt: Any, ratio: bool = True) -> str:
    """jaxembed's figure / llama.cpp's (their ratio); "failed" for a process that failed, "-"
    for a figure not measured."""
    a, b = one.get("jaxembed", {}), one.get("llamacpp", {})
    left = fmt(a[ours]) if ours in a else ("failed" if "failed" in a else "-")
    right = fmt(b[theirs]) if theirs in b else ("failed" if "failed" in b else "-")
    if left == right == "-":
        return "-"
    shown = f" ({a[ours] / b[theirs]:.2f}x)" if ratio and ours in a and b.get(theirs) else ""
    return f"{left} / {right}{shown}"


def markdown(r: dict[str, Any]) -> list[str]:
    """Lines of the sizes section: one row per figure, a column per size, then the targets."""
    res = r["results"]
    sizes = list(res)
    lines = [f"Sizes: random-weight SmolLM2-shaped GGUFs, {Q4_K_M} by llama.cpp's quantizer; "
             "each engine in a fresh process; embedding corpora of texts of 8-512 tokens "
             "(memory-only sizes: 8-64); "
             f"{r['tokens']}-token greedy decodes from a {r['prompt_tokens']}-token prompt; "
             f"{r['threads']} threads for llama.cpp; jaxembed's context {r['max_model_len']}. "
             f"Roofline {r['roofline_flops'] / 1e9:.0f} GFLOP/s (fp32 matmul), memory "
             f"bandwidth {r['bandwidth_gb_per_s']:.1f} GB/s, best of the run. Cells: jaxembed / "
             "llama.cpp (jaxembed's figure over llama.cpp's).", "",
             "| figure | " + " | ".join(sizes) + " |", "|---|" + "---|" * len(sizes)]
    lines.append("| GGUF file, MiB | " + " | ".join(_mib(res[s]["file_bytes"]) for s in sizes)
                 + " |")
    lines.append("| embedding corpus, texts (tokens) | " + " | ".join(
        f"{res[s]['texts']} ({res[s]['corpus_tokens']})" for s in sizes) + " |")
    for label, ours, theirs, fmt, ratio in ROWS:
        lines.append(f"| {label.format(streams=r['streams'])} | "
                     + " | ".join(_cell(res[s], ours, theirs, fmt, ratio) for s in sizes) + " |")
    kv = [f"{_mib(res[s]['jaxembed']['kv_cache_bytes'])} ({res[s]['jaxembed']['kv_cache']}"
          f"{'' if res[s]['jaxembed'].get('kv_cache_allocated') else ', not allocated'})"
          if "kv_cache_bytes" in res[s]["jaxembed"] else "-" for s in sizes]
    lines.append("| jaxembed KV cache, MiB | " + " | ".join(kv) + " |")
    lines.append("| memory target (1.25x file + KV cache + 0.5 GiB), MiB | "
                 + " | ".join(_mib(memory_budget(res[s])) for s in sizes) + " |")
    lines.append("")
    for t in r["targets"]:
        verdict = {True: "reached", False: "missed", None: "not judged"}[t["reached"]]
        lines.append(f"- {t['target']}: **{verdict}** ({t['detail']})")
    for s in sizes:
        for name in ("jaxembed", "llamacpp"):
            failed = res[s][name].get("failed")
            if failed:
                lines += ["", f"{name} at {s} failed: {failed.get('returncode', failed)}; last "
                          f"lines: {' / '.join(failed.get('tail', [])[-3:])}"]
    return lines


# ---- entry points -------------------------------------------------------------------------------


def measure_main(argv: list[str]) -> int:
    """`python -m bench.sizes measure SPEC.json OUT.json`: one engine's figures, in this process."""
    spec_path, out = argv
    spec = json.loads(Path(spec_path).read_text())
    r = MEASURES[spec["engine"]](spec)
    Path(out).write_text(json.dumps(r, default=float))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["measure"]:
        raise SystemExit(measure_main(sys.argv[2:]))
    from bench.run import main

    raise SystemExit(main(["--workloads", "sizes", *sys.argv[1:]]))
