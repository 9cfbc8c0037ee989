"""Every family sharded over meshes of 1, 2 and 4 CPU devices computes what one device does: the
model's forward (sharded_forward.py), and the real engine's embeddings and greedy generation
(sharded_engine.py), in fresh processes with 4 forced host devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import families as F
import pytest

from jaxembed.config import ModelConfig
from jaxembed.sharding import CACHE_AXES, plan

SCRIPT = Path(__file__).with_name("sharded_forward.py")
ENGINE_SCRIPT = Path(__file__).with_name("sharded_engine.py")
EMBED_TOLERANCE = 1e-5  # of the largest value of the vectors
PROCESSES = 2


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> list[str]:
    return [str(F.build_family(name, tmp_path_factory.mktemp(name) / name))
            for name in F.FAMILY_NAMES]


def run_four_devices(script: Path, folders: list[str]) -> dict:
    """The script's JSON report over all folders, from PROCESSES fresh processes at once (XLA
    compiles on one thread, and compiling is most of the time)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, str(script), *folders[i::PROCESSES]], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(PROCESSES)]
    report: dict = {}
    try:
        for p in procs:
            out, err = p.communicate(timeout=1800)
            assert p.returncode == 0, err[-3000:]
            report.update(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return report


@pytest.fixture(scope="module")
def report(folders) -> dict:
    return run_four_devices(SCRIPT, folders)


@pytest.fixture(scope="module")
def engine_report(folders) -> dict:
    return run_four_devices(ENGINE_SCRIPT, folders)


@pytest.mark.parametrize("family", F.FAMILY_NAMES)
def test_sharded_forward_equals_single_device(report, family):
    rows = report[family]
    for tp in ("1", "2", "4"):
        assert "error" not in rows[tp], rows[tp]
        assert rows[tp]["error_rel"] <= 1e-5, (tp, rows[tp])
        if tp != "1":
            assert rows[tp]["wq_sharded"], rows[tp]


@pytest.mark.parametrize("family", F.FAMILY_NAMES)
def test_engine_embeds_and_generates_the_same_on_every_mesh(engine_report, family):
    """EngineBuilder(tensor_parallel=N): pooled vectors within 1e-5 of the largest value, greedy
    tokens equal but at near ties, params and KV cache laid out as the rules say, read from
    their shardings."""
    rows = engine_report[family]
    for tp in (1, 2, 4):
        row = rows[str(tp)]
        assert "error" not in row, row
        assert row["embed_error_rel"] <= EMBED_TOLERANCE, (tp, row["embed_error_rel"])
        assert all(g["ok"] for g in row["greedy"]), (tp, row["greedy"])
        p = row["params"]
        for name in ("wq", "wo", "embed"):
            assert p[name]["devices"] == tp, (tp, name, p[name])
        # Attention by heads: wq's output columns and wo's input rows split tp ways.
        assert p["wq"]["shard"][-1] == p["wq"]["shape"][-1] // tp, (tp, p["wq"])
        assert p["wo"]["shard"][1] == p["wo"]["shape"][1] // tp, (tp, p["wo"])
        assert p["embed"]["shard"] == p["embed"]["shape"]  # the vocabulary stays whole
        # Every tiny family has 2 kv heads: split on 2 devices, replicated (as documented) on 4.
        kv_split = tp if tp <= 2 else 1
        assert p["wk"]["shard"][-1] == p["wk"]["shape"][-1] // kv_split, (tp, p["wk"])
        assert ("kv_heads" in row["replicated"]) == (tp == 4)
        cache, heads = row["cache"], CACHE_AXES["k"].index("kv_heads")  # the stacked keys
        assert cache["devices"] == tp
        assert cache["shard"][heads] == cache["shape"][heads] // kv_split, (tp, cache)
        if "mlp.w_up" in p:  # column-parallel, then row-parallel
            assert p["mlp.w_up"]["shard"][-1] == p["mlp.w_up"]["shape"][-1] // tp
            assert p["mlp.w_down"]["shard"][1] == p["mlp.w_down"]["shape"][1] // tp
        if "moe.w_up" in p:  # expert parallel: whole experts per device
            assert p["moe.w_up"]["shard"][1] == p["moe.w_up"]["shape"][1] // tp
            assert p["moe.w_up"]["shard"][2:] == p["moe.w_up"]["shape"][2:]
    assert rows["1"]["tokens"] and all(len(t) == 8 for t in rows["1"]["tokens"])


def test_heads_that_do_not_divide_are_a_clear_error():
    import jax

    cfg = ModelConfig(family="llama", vocab_size=8, hidden_size=18, num_layers=1, num_heads=9,
                      num_kv_heads=3, head_dim=2, intermediate_size=8,
                      max_position_embeddings=16)

    class FakeMesh:
        shape = {"tensor": 2}

    with pytest.raises(ValueError, match=r"9 attention heads do not divide.*\[1, 3, 9\]"):
        plan(cfg, FakeMesh())  # type: ignore[arg-type]
    assert jax.devices()  # the main test process keeps its single device
