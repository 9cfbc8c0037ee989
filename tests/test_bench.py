"""The benchmark harness keeps working where it is not run every day: the accelerator workload
(here on its tiny preset, on the CPU) and the report's table and plot."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bench import gpu, run

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_smoke_runs_the_device_check_end_to_end(tmp_path: Path) -> None:
    """`python -m bench.gpu --smoke`: the device check's own code, as a GPU host runs it, on the
    CPU with a tiny model, so that the script cannot rot where no GPU runs it."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "bench.gpu", "--smoke", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    (path,) = tmp_path.glob("gpu-*.json")
    r = json.loads(path.read_text())
    # The start-up compiled every program of the coarse ladder, and nothing after it did.
    assert r["jaxembed"]["startup_compilations"] > 0
    assert r["jaxembed"]["recompilations_after_warmup"] == 0
    # Every op in XLA (--no-kernels) pools what the kernels pool.
    xla = r["xla_ops"]
    assert xla["tokens_per_s"] > 0 and xla["cosine_vs_kernels_min"] > 0.9999
    assert r["jaxembed"]["speedup_vs_xla_ops"] == pytest.approx(
        xla["run_s"] / r["jaxembed"]["run_s"])
    # Same random weights, same token ids: the two engines' pooled vectors agree, and in float32
    # their per-token hidden states too.
    assert r["transformers"]["cosine_vs_jaxembed_min"] > 0.9999
    assert r["parity"]["passed"] and r["parity"]["jaxembed_error"] < 1e-4
    # The API level: every text went through the HTTP server (the responses counted all the
    # corpus's tokens) and came back as the engine level pooled it.
    api = r["api"]
    assert api["requests"] == 4 and api["clients"] == 2 and api["usage_tokens"] == r["tokens"]
    assert api["tokens_per_s"] > 0 and 0 < api["p50_ms"] <= api["p99_ms"]
    assert api["cosine_vs_jaxembed_min"] > 0.9999
    # torch.compile (dynamo's capture alone, on the CPU) works here: a peer like the sdpa one.
    compiled = r["transformers_compile"]
    assert compiled["available"], compiled.get("reason")
    assert compiled["backend"] == "eager" and compiled["cosine_vs_jaxembed_min"] > 0.9999
    for peer in (r["transformers"], compiled):
        assert peer["tokens_per_s"] > 0 and peer["best_batch"] in gpu.PEER_BATCHES
        assert peer["api_speedup"] == pytest.approx(api["tokens_per_s"] / peer["tokens_per_s"])
    assert {"api_at_least_2x_transformers", "api_at_least_1.2x_transformers_compile"} <= set(
        r["targets"])
    gen = r["generation"]
    assert all(gen[f"{who}_{n}"] > 0 for who in ("jaxembed", "transformers") for n in (1, 4))
    text = gpu.markdown(r)
    assert text in done.stdout
    assert "| jaxembed (512-token steps) |" in text and "| 4 streams x 8 tokens |" in text
    assert "| jaxembed API (POST /v1/embeddings, 2 clients x 4 texts) |" in text
    assert "| transformers + torch.compile (eager, dynamic shapes), best batch" in text


def test_torch_compile_that_fails_is_reported_unavailable(tmp_path: Path) -> None:
    """Where torch.compile does not work, its peer is reported with the reason, and the target
    against it is neither met nor missed."""
    pytest.importorskip("torch")
    from transformers import AutoModel

    net = AutoModel.from_pretrained(gpu.build_model(tmp_path / "tiny", "tiny", "float32")).eval()
    ids = gpu.make_ids(4, 512, hi=32)
    r = gpu.compiled_run(net, ids, [0, 1, 2, 3], "cpu", backend="no-such-backend")
    assert not r["available"] and "no-such-backend" in r["reason"]
    assert gpu.peer_row("transformers + torch.compile", r) == (
        f"| transformers + torch.compile | unavailable: {r['reason']} | |")
    assert gpu.target(None) == "n/a" and gpu.target(False) == "NO"


def test_a_failed_parity_gate_is_reported() -> None:
    r = {"jaxembed_error": 3e-2, "transformers_error": 1e-3}
    assert gpu.gate(**r) == {**r, "bound": 2e-3, "passed": False}
    assert gpu.gate(jaxembed_error=1e-3, transformers_error=1e-3)["passed"]


def test_the_benchmarks_run_from_a_checkout_never_installed(tmp_path: Path) -> None:
    """A copy of the checkout's folders, as a GPU host gets them: `jaxembed.weights` and
    `jaxembed.server` come from `weights/` and `server/`, and a brought wheel is importable."""
    copy = tmp_path / "checkout"
    for folder in ("jaxembed", "weights", "server", "bench"):
        shutil.copytree(ROOT / folder, copy / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "results", "wheels"))
    (copy / "bench" / "wheels").mkdir()
    with zipfile.ZipFile(copy / "bench" / "wheels" / "brought-1.0-py3-none-any.whl", "w") as z:
        z.writestr("brought/__init__.py", "VALUE = 7\n")
    code = ("from bench.checkout import use_checkout; use_checkout(force=True)\n"
            "import brought, jaxembed, jaxembed.server.info as info, jaxembed.weights.gguf_io as io\n"
            "print(jaxembed.__file__, info.__file__, io.__file__, brought.VALUE)")
    done = subprocess.run([sys.executable, "-c", code], cwd=copy, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    *files, value = done.stdout.split()
    assert value == "7"
    assert [Path(f).resolve().relative_to(copy.resolve()).parts[0] for f in files] == [
        "jaxembed", "server", "weights"]


def test_the_wheel_list_names_what_the_engine_imports_beyond_a_gpu_host() -> None:
    listed = {line.split("=")[0].split(">")[0].split("<")[0].strip().lower().replace("_", "-")
              for line in (ROOT / "bench" / "gpu-wheels.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    assert {"msgspec", "gguf", "flax"} <= listed
    assert {"litestar", "uvicorn", "multipart", "multidict"} <= listed  # the API level's server
    assert not listed & {"jax", "jaxlib", "torch", "transformers", "numpy"}


RESULT = {
    "date": "2026-12-02 00:00:00", "model": "m.gguf", "texts": 4,
    "machine": {"cpus": 2, "backend": "cpu", "devices": ["cpu"]},
    "http": {"clients": 32, "requests_per_s": 30.0, "p50_ms": 900.0, "p99_ms": 1500.0},
    "http_llamacpp": {"requests_per_s": 6.0, "p50_ms": 5000.0, "p99_ms": 6000.0,
                      "jaxembed_throughput_ratio": 5.0},
    "memory": {"peak_rss": 1536 * 2**20, "weights_bytes": 512 * 2**20,
               "over_weights": 1024 * 2**20, "max_model_len": 2048},
}


def test_report_names_the_http_peer_and_peak_memory(tmp_path: Path) -> None:
    text = run.markdown(RESULT)
    assert "llama-cpp-python server: 6.0 req/s, p50 5000 ms, p99 6000 ms; jaxembed 5.0x" in text
    assert "1536 MiB = float32 weights 512 MiB + 1024 MiB" in text
    pytest.importorskip("matplotlib")
    run.plot(RESULT, tmp_path / "perf.png")
    assert (tmp_path / "perf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interleaved_passes_alternate_and_pair_by_round() -> None:
    from bench.peers import Prepared, interleave, round_ratios

    order: list[str] = []

    def peer(name: str, max_passes: int | None = None) -> Prepared:
        return Prepared({"tokens": 100}, run=lambda: order.append(name),
                        finish=lambda: {"finished": name}, max_passes=max_passes)

    probes: list[int] = []
    out, seen = interleave({"a": peer("a"), "b": peer("b"), "c": peer("c", max_passes=1)},
                           rounds=3, probe=lambda: probes.append(1) or len(probes), pause_s=0)
    # Round order a b c, then reversed (c has had its one pass), then a b again.
    assert order == ["a", "b", "c", "b", "a", "a", "b"]
    assert seen == [1, 2, 3]
    assert len(out["a"]["run_s_passes"]) == 3 and len(out["c"]["run_s_passes"]) == 1
    assert out["a"]["finished"] == "a" and out["a"]["tokens_per_s"] == 100 / out["a"]["run_s"]
    assert round_ratios([1.0, 2.0, 4.0], [2.0, 2.0]) == [2.0, 1.0]


def _sizes_result() -> dict:
    """A hand-made sizes result: 1.7b meets some targets and misses others; 7b's jaxembed died."""
    from bench import sizes

    def engine(peak_mib: float, load: float, embed: float, decode: float | None = None,
               **more: float) -> dict:
        r = {"peak_rss": peak_mib * 2**20, "load_s": load, "embed_tokens_per_s": embed,
             "embed_roofline_share": embed / 1e4, **more}
        if decode is not None:
            r["decode_tokens_per_s"] = decode
            r["decode_bandwidth_share"] = decode / 100
        return r

    kv = {"kv_cache_bytes": 400 * 2**20, "kv_cache": "16 slots x 512 tokens, float32",
          "kv_cache_allocated": True}
    results = {
        "135m": {"file_bytes": 100 * 2**20, "texts": 64, "corpus_tokens": 7000,
                 "jaxembed": engine(600, 0.5, 4000, 60, aggregate_tokens_per_s=300, **kv),
                 "llamacpp": engine(400, 0.25, 1000, 50)},
        "1.7b": {"file_bytes": 1000 * 2**20, "texts": 32, "corpus_tokens": 3500,
                 "jaxembed": engine(2500, 3.0, 900, 15, aggregate_tokens_per_s=40,
                                    load_average=1.5, **kv),
                 "llamacpp": engine(1200, 1.0, 600, 10, load_average=3.5)},
        "7b": {"file_bytes": 4000 * 2**20, "texts": 8, "corpus_tokens": 200,
               "jaxembed": {"failed": {"returncode": -9, "tail": ["Killed"]}},
               "llamacpp": engine(4500, 2.0, 50)},
    }
    r = {"sizes": list(results), "texts": 64, "tokens": 64, "streams": 16, "repeat": 2,
         "threads": 2, "max_model_len": 512, "prompt_tokens": 17, "roofline_flops": 2e11,
         "bandwidth_gb_per_s": 20.0, "results": results, "baseline": 5.0}
    r["targets"] = sizes.targets(r)
    return r


def test_sizes_report_has_a_row_per_figure_and_judges_each_target() -> None:
    from bench import sizes

    r = _sizes_result()
    verdicts = {t["target"]: t["reached"] for t in r["targets"]}
    # 600 MiB <= 1.25 x 100 + 400 + 512; 2500 MiB > 1.25 x 1000 + 400 + 512 = 2162.
    assert verdicts["memory at 135m: peak resident <= 1.25x file + KV cache + 0.5 GiB"] is True
    assert verdicts["memory at 1.7b: peak resident <= 1.25x file + KV cache + 0.5 GiB"] is False
    assert verdicts["memory at 7b: peak resident <= 1.25x file + KV cache + 0.5 GiB"] is None
    assert verdicts["7B Q4_K_M loads and embeds"] is False
    assert verdicts["decode, 1 stream, >= 1.2x llama.cpp at 1.7b"] is True  # 1.5x
    assert verdicts["decode, 16 streams, >= 3x llama.cpp's single stream at 1.7b"] is True  # 4x
    assert verdicts["embeddings >= 2x llama.cpp at 1.7b"] is False  # 1.5x
    assert verdicts["embeddings at 135m no slower than before"] is False  # 4x against 5x
    assert verdicts["load within 2x llama.cpp's at 1.7b"] is False  # 3x its time

    text = "\n".join(sizes.markdown(r))
    assert "| figure | 135m | 1.7b | 7b |" in text
    assert "| embedding corpus, texts (tokens) | 64 (7000) | 32 (3500) | 8 (200) |" in text
    assert "| peak resident memory, MiB | 600 / 400 (1.50x) | 2500 / 1200 (2.08x) | " \
           "failed / 4500 |" in text
    assert "| decode, 16 streams, tokens/s (llama.cpp: its 1 stream) | 300.0 / 50.0 (6.00x) | " \
           "40.0 / 10.0 (4.00x) | failed / - |" in text
    assert "| embedding, share of the fp32 matmul roofline | 40% / 10% (4.00x) |" in text
    assert "| machine's load average (1 min) as the process ended | - | 1.5 / 3.5 | failed / - |" \
        in text
    assert "| memory target (1.25x file + KV cache + 0.5 GiB), MiB | 1037 | 2162 | 5512 |" in text
    assert "- embeddings >= 2x llama.cpp at 1.7b: **missed** (1.50x)" in text
    assert "- memory at 1.7b: peak resident <= 1.25x file + KV cache + 0.5 GiB: **missed** " \
           "(2500 of 2162 MiB)" in text
    assert "jaxembed at 7b failed: -9; last lines: Killed" in text
    # The harness's report carries the section.
    assert "| jaxembed KV cache, MiB | 400 (16 slots x 512 tokens, float32) |" in run.markdown(
        {**RESULT, "sizes": r})


def test_sizes_model_is_smollm2_shaped_with_its_tokenizer_and_loads(tmp_path: Path) -> None:
    import numpy as np

    from bench import sizes
    from jaxembed import EngineBuilder
    from jaxembed.fetch import default_model_path
    from jaxembed.weights.gguf_io import GGUFFile
    from jaxembed.weights.gguf_tokenizer import tokenizer_from_gguf
    from jaxembed.weights.loader import load_checkpoint

    shape = sizes.Shape(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, tied=True)
    path = sizes.write_random_gguf(tmp_path / "tiny.gguf", shape, default_model_path(), seed=3)
    meta, real = GGUFFile(path).metadata, GGUFFile(default_model_path()).metadata
    assert [k for k in meta if k.startswith("tokenizer.")] == \
        [k for k in real if k.startswith("tokenizer.")]
    assert meta["tokenizer.chat_template"] == real["tokenizer.chat_template"]
    assert meta["llama.rope.freq_base"] == real["llama.rope.freq_base"]

    checkpoint = load_checkpoint(path, progress=False)
    cfg = checkpoint.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
            cfg.intermediate_size, cfg.vocab_size) == (2, 64, 4, 2, 128, 49152)
    # The q/k rows were written in llama.cpp's permuted layout: the loader, undoing it, gets
    # back the tensors as drawn (in HF's layout).
    names = [name for name, _, _ in sizes.tensor_specs(shape)]
    for gguf_name, key, layer in (("blk.0.attn_q.weight", "wq", 0),
                                  ("blk.1.attn_k.weight", "wk", 1)):
        i = names.index(gguf_name)
        drawn = sizes.random_tensor(3, i, sizes.tensor_specs(shape)[i][1]).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(checkpoint.params["layers"][key][layer]),
                                      drawn.T)

    engine = EngineBuilder(model=path, warmup=False, progress=False,
                           compilation_cache=False).build()
    try:
        text = "Hello world, café 日本 🙂"
        assert engine.tokenize([text])[0] == tokenizer_from_gguf(real).tokenizer.encode(text).ids
        vectors = engine.encode(["Hello world", "the cat sat"])
        assert vectors.shape == (2, 64) and np.isfinite(vectors).all()
    finally:
        engine.shutdown()


def test_sizes_model_is_quantized_by_llamacpp_once_and_cached(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    from bench import sizes
    from jaxembed import EngineBuilder
    from jaxembed.weights.gguf_io import GGUFFile

    # Rows of 256 values: the K-quants' block, so no tensor falls back to another type.
    shape = sizes.Shape(layers=1, hidden=256, heads=4, kv_heads=2, ffn=512, tied=True)
    path, build_s = sizes.build_model("tiny", shape, cache=tmp_path)
    assert build_s is not None and path == sizes.model_path("tiny", tmp_path)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no F16 or partial file left
    types = {t.type.name for t in GGUFFile(path).tensors.values()}
    assert "Q4_K" in types and "F16" not in types
    stamp = path.stat().st_mtime_ns
    assert sizes.build_model("tiny", shape, cache=tmp_path) == (path, None)
    assert path.stat().st_mtime_ns == stamp

    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False)
    llm.close()
    engine = EngineBuilder(model=path, warmup=False, progress=False,
                           compilation_cache=False).build()
    try:
        assert engine.encode(["Hello world"]).shape == (1, 256)
    finally:
        engine.shutdown()


def test_sizes_child_that_fails_is_reported_not_raised() -> None:
    from bench import sizes

    failed = sizes.run_child({"engine": "no-such-engine"})["failed"]
    assert failed["returncode"] == 1 and "KeyError: 'no-such-engine'" in failed["tail"][-1]
    assert sizes.run_child({"engine": "jaxembed"}, timeout=0.01)["failed"]["timeout_s"] == 0.01


def test_structured_report_compares_each_kind_with_the_free_streams() -> None:
    from bench import structured

    agg = {"free": {"free_stream_decode_tokens_per_s": 20.0, "tokens_per_s": 60.0},
           "constrained": {"constrained_stream_decode_tokens_per_s": 19.0, "tokens_per_s": 57.0},
           "mixed": {"free_stream_decode_tokens_per_s": 18.0,
                     "constrained_stream_decode_tokens_per_s": 17.1},
           "constrained_vs_free": 0.95, "mixed_free_vs_all_free": 0.9,
           "mixed_constrained_vs_all_constrained": 0.9}
    text = "\n".join(structured.markdown({
        "model": "m.gguf", "streams": 16, "repeat": 3, "aggregate": agg,
        "single": {"free": {"decode_tokens_per_s": 45.0},
                   "constrained": {"decode_tokens_per_s": 40.5}, "constrained_vs_free": 0.9},
        "mask_us": {"median": 40.0, "p99": 800.0, "first": 600.0, "tokens": 2000},
        "validity": {"valid": 17, "outputs": 17}}))
    assert "| 1 stream, greedy: decode tokens/s | 45.0 | 40.5 | 0.90x |" in text
    assert "| 18.0 (0.90x) | 17.1 (0.90x) |" in text
    assert "17 of 17 outputs" in text and "median 40 us" in text
