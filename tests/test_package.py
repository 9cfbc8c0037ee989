"""The wheel: the packages under their installed names, the license, and no stray top-level
packages."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_the_wheel_ships_the_license_and_only_jaxembed(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("jaxembed-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names[-10:]
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"jaxembed"}, tops  # weights/ and server/ install as jaxembed.weights, .server
    assert "jaxembed/weights/loader.py" in names and "jaxembed/server/app.py" in names
    assert "jaxembed/server/static/playground.js" in names and "jaxembed/kernels/matmul.cc" in names
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    assert "License-Expression: Apache-2.0" in text
    requires = [line for line in text.splitlines() if line.startswith("Requires-Dist:")]
    runtime = [r for r in requires if "extra ==" not in r]
    assert not any(r.split()[1].startswith("safetensors") for r in runtime)  # tests only
    assert any(r.startswith("Requires-Dist: numpy>=2.0") for r in runtime)
