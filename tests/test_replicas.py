"""`--data-parallel 2` on 4 CPU devices: two replicas of a model sharded over 2 devices each, behind
one HTTP server, both doing work for concurrent requests; and the least-loaded choice of a replica."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import families as F
import pytest

from jaxembed.engine import least_loaded
from jaxembed.stats import EngineStats, sum_stats

SCRIPT = Path(__file__).with_name("replicas_serve.py")


@pytest.mark.slow
def test_data_parallel_serves_concurrent_requests_from_both_replicas(tmp_path):
    folder = F.build_family("llama", tmp_path / "llama")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(SCRIPT), str(folder)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["kind"] == "Engine"
    assert r["devices"] == [[0, 1], [2, 3]]  # disjoint device groups, in order
    for rep in r["replicas"]:  # both did embedding and generation work
        assert rep["requests"] > 0 and rep["generation_requests"] > 0, r["replicas"]
        assert rep["generated_tokens"] > 0
    assert sum(rep["requests"] for rep in r["replicas"]) == 12 == r["total"]["requests"]
    assert sum(rep["generation_requests"] for rep in r["replicas"]) == 8
    assert r["metrics_completed"] == 12  # /metrics shows the replicas' sum
    assert r["embed_spread"] <= 1e-5 and r["same_completions"]


def test_requests_go_to_the_least_loaded_replica_and_take_turns_at_ties():
    assert least_loaded([3, 0], 0) == 1 and least_loaded([0, 3], 1) == 0
    picks, start = [], 0
    for _ in range(4):  # all idle: each replica in turn
        i = least_loaded([0, 0, 0], start)
        picks.append(i)
        start = (i + 1) % 3
    assert picks == [0, 1, 2, 0]
    assert least_loaded([2, 1, 1], 0) == 1 and least_loaded([2, 1, 1], 2) == 2


def test_summed_stats_add_histograms():
    a, b = EngineStats(steps=2), EngineStats(steps=3)
    a.step_tokens.observe(10)
    b.step_tokens.observe(10)
    b.step_tokens.observe(5000)
    total = sum_stats([a, b])
    assert total.steps == 5 and total.step_tokens.count == 3
    assert total.step_tokens.cumulative()[-1] == 3 and total.step_tokens.total == 5020
