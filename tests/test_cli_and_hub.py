"""The CLI, and HF repo ids resolved from a local hub cache with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxembed.cli import main


def make_hub_cache(root: Path, repo_id: str, files_from: Path) -> Path:
    """Lay out a hub cache the way huggingface_hub writes it: refs/main -> snapshots/<commit>."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in files_from.iterdir():
        shutil.copy(f, snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snap


def test_repo_id_resolves_from_the_local_hub_cache(tiny_llama_dir, tmp_path, tiny_engine):
    make_hub_cache(tmp_path / "hub", "tiny-org/tiny-llama", tiny_llama_dir)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-m", "jaxembed.cli", "embed", "--model", "tiny-org/tiny-llama",
         "--show", "4", "hello world"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("'hello world': dim=64 [")
    values = [float(x) for x in line.split("[", 1)[1].split(",")[:4]]
    np.testing.assert_allclose(values, tiny_engine.encode("hello world")[:4], atol=2e-5)


def test_missing_repo_offline_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["embed", "--model", "nobody/nothing", "x"]) == 2
    assert "not in the local hub cache" in capsys.readouterr().err


def test_bad_model_path_is_a_clear_error(capsys):
    assert main(["embed", "--model", "./no/such/model.gguf", "x"]) == 2
    assert "neither an existing file" in capsys.readouterr().err


def test_cli_embed_in_process(tiny_llama_dir, capsys):
    assert main(["embed", "--model", str(tiny_llama_dir), "one", "two words"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "dim=64" in out[0]


def test_cli_generate_in_process(tiny_llama_dir, tiny_engine, capsys):
    assert main(["generate", "--model", str(tiny_llama_dir), "--max-tokens", "5", "hello"]) == 0
    captured = capsys.readouterr()
    want = tiny_engine.generate("hello", temperature=0, max_tokens=5)
    assert captured.out == "hello" + want.text + "\n"
    assert f"[{len(want.choices[0].token_ids)} tokens, finish: " in captured.err


def test_cli_generate_chat_without_template_is_a_clear_error(tiny_llama_dir, capsys):
    assert main(["generate", "--model", str(tiny_llama_dir), "--chat", "hello"]) == 2
    assert "no chat template" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["serve", "--help"], ["embed", "--help"],
                                  ["generate", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0 and "--model" in capsys.readouterr().out
