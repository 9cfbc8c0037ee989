"""The benchmark harness keeps working where it is not run every day: the accelerator workload
(here on its tiny preset, on the CPU) and the report's table and plot."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import gpu, run


def test_gpu_workload_runs_and_agrees_with_transformers() -> None:
    r = gpu.benchmark("tiny", texts=12, max_batch_tokens=1024)
    assert r["jaxembed"]["recompilations_after_warmup"] == 0
    # Same random weights, same token ids: the two engines' pooled vectors agree.
    assert r["transformers"]["cosine_vs_jaxembed_min"] > 0.9999
    assert r["jaxembed"]["tokens_per_s"] > 0 and r["transformers"]["tokens_per_s"] > 0
    text = gpu.markdown(r)
    assert "| jaxembed (1024-token steps) |" in text and "x (pooled cosine" in text


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
