"""Every family sharded over meshes of 1, 2 and 4 CPU devices computes what one device does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import families as F
import pytest

from jaxembed.config import ModelConfig
from jaxembed.sharding import plan

SCRIPT = Path(__file__).with_name("sharded_forward.py")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    folders = [str(F.build_family(name, tmp_path_factory.mktemp(name) / name)) for name in F.FAMILY_NAMES]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(SCRIPT), *folders], env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("family", F.FAMILY_NAMES)
def test_sharded_forward_equals_single_device(report, family):
    rows = report[family]
    for tp in ("1", "2", "4"):
        assert "error" not in rows[tp], rows[tp]
        assert rows[tp]["error_rel"] <= 1e-5, (tp, rows[tp])
        if tp != "1":
            assert rows[tp]["wq_sharded"], rows[tp]


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
