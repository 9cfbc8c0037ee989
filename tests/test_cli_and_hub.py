"""The CLI, and HF repo ids resolved from a local hub cache with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from jaxembed.cli import main
from jaxembed.fetch import choose_gguf, resolve_model
from jaxembed.weights.loader import load_checkpoint

from tiny_models import write_llama_gguf


def make_hub_cache(root: Path, repo_id: str, files_from: Path | dict[str, Path]) -> Path:
    """Lay out a hub cache the way huggingface_hub writes it: refs/main -> snapshots/<commit>,
    whose files are relative links to blobs/<sha256>. `files_from`: a folder, or {repo path: file}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    if isinstance(files_from, Path):
        files_from = {f.name: f for f in files_from.iterdir()}
    for name, src in files_from.items():
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snap


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty local hub cache, offline; huggingface_hub read HF_HUB_CACHE when it was imported,
    so its constant is set too."""
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


@pytest.fixture(scope="module")
def gguf_files(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """A GGUF repo's files as llama.cpp's converter names them. `-hf` reads only the names: the
    file named Q4_K_M holds Q4_0 tensors (gguf-py cannot quantize to K-quants)."""
    out = tmp_path_factory.mktemp("gguf-repo")
    q8 = write_llama_gguf(tiny_llama_dir, out / "q8.gguf", gguf.GGMLQuantizationType.Q8_0)
    q4 = write_llama_gguf(tiny_llama_dir, out / "q4.gguf", gguf.GGMLQuantizationType.Q4_0)
    readme = out / "README.md"
    readme.write_text("# Tiny-Llama GGUF\n")
    # A projector sorts first and is F16: llama.cpp never takes one for the model.
    return {"mmproj-Tiny-Llama-F16.gguf": q8, "Tiny-Llama-Q4_K_M.gguf": q4,
            "Tiny-Llama-Q8_0.gguf": q8, "README.md": readme}


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


# ---- GGUF repos: `org/name` and `org/name:QUANT`, as llama.cpp's `-hf` ------------------------


@pytest.mark.parametrize(("spec", "file"), [
    ("tiny-org/tiny-gguf", "Tiny-Llama-Q4_K_M.gguf"),  # llama.cpp's default: Q4_K_M
    ("tiny-org/tiny-gguf:Q4_K_M", "Tiny-Llama-Q4_K_M.gguf"),
    ("tiny-org/tiny-gguf:q8_0", "Tiny-Llama-Q8_0.gguf"),  # any case
])
def test_gguf_repo_resolves_from_the_local_hub_cache(offline_hub, gguf_files, spec, file):
    snap = make_hub_cache(offline_hub, "tiny-org/tiny-gguf", gguf_files)
    path = resolve_model(spec)
    assert path == snap / file and path.is_file()
    ck = load_checkpoint(path, progress=False)  # the hub cache's link to its blob loads
    assert ck.format == "gguf" and ck.name == file.removesuffix(".gguf")


def test_gguf_repo_serves_through_the_cli(offline_hub, gguf_files, capsys):
    make_hub_cache(offline_hub, "tiny-org/tiny-gguf", gguf_files)
    assert main(["embed", "--model", "tiny-org/tiny-gguf:Q8_0", "hello world"]) == 0
    assert "dim=64" in capsys.readouterr().out


def test_gguf_repo_missing_quant_lists_the_available_ones(offline_hub, gguf_files, capsys):
    make_hub_cache(offline_hub, "tiny-org/tiny-gguf", gguf_files)
    assert main(["embed", "--model", "tiny-org/tiny-gguf:Q5_K_M", "x"]) == 2
    err = capsys.readouterr().err
    assert "no GGUF file of quant type 'Q5_K_M'" in err
    assert "its quant types: Q4_K_M, Q8_0 (" in err  # not the projector's F16


def test_repo_with_safetensors_and_gguf(offline_hub, gguf_files, tiny_llama_dir):
    """Alone, a repo id means its safetensors weights, as before; with a quant, a GGUF file."""
    snap = make_hub_cache(offline_hub, "tiny-org/both",
                          {**gguf_files, **{f.name: f for f in tiny_llama_dir.iterdir()}})
    assert resolve_model("tiny-org/both") == snap
    assert resolve_model("tiny-org/both:Q8_0") == snap / "Tiny-Llama-Q8_0.gguf"


def test_local_path_that_looks_like_a_repo_wins(offline_hub, gguf_files, tmp_path, monkeypatch):
    make_hub_cache(offline_hub, "tiny-org/tiny-gguf", gguf_files)
    monkeypatch.chdir(tmp_path)
    local = Path("tiny-org/tiny-gguf:Q8_0")
    local.mkdir(parents=True)
    assert resolve_model("tiny-org/tiny-gguf:Q8_0") == local


def test_gguf_repo_not_cached_offline(offline_hub, capsys):
    assert main(["embed", "--model", "nobody/nothing:Q4_K_M", "x"]) == 2
    assert "not in the local hub cache" in capsys.readouterr().err


@pytest.mark.parametrize(("files", "quant", "want"), [
    # Without a quant: Q4_K_M, then Q8_0, wherever they are in the listing; then the first model.
    (["a-Q8_0.gguf", "b-Q4_K_M.gguf"], None, ["b-Q4_K_M.gguf"]),
    (["a-Q5_K_S.gguf", "b-Q8_0.gguf"], None, ["b-Q8_0.gguf"]),
    (["mmproj-F16.gguf", "x-imatrix.gguf", "m-Q6_K.gguf", "m-F16.gguf"], None, ["m-F16.gguf"]),
    (["mmproj-F16.gguf"], None, []),
    # With one: the quant followed by "." or "-", in any case; none is no fallback.
    (["m.Q5_K_M.gguf", "m.Q5_K_S.gguf"], "q5_k_s", ["m.Q5_K_S.gguf"]),
    (["m-Q4_K_M.gguf"], "Q4_K", []),
    (["m-Q4_K_M.gguf", "mmproj-m-Q8_0.gguf"], "Q8_0", []),
    # Split models: the first part is the match; all parts come with it, in order.
    (["Q4_K_M/m-Q4_K_M-00002-of-00002.gguf", "Q4_K_M/m-Q4_K_M-00001-of-00002.gguf",
      "m-Q8_0.gguf"], None,
     ["Q4_K_M/m-Q4_K_M-00001-of-00002.gguf", "Q4_K_M/m-Q4_K_M-00002-of-00002.gguf"]),
    (["m-BF16-00001-of-00003.gguf", "m-BF16-00003-of-00003.gguf", "m-BF16-00002-of-00003.gguf"],
     "bf16", ["m-BF16-00001-of-00003.gguf", "m-BF16-00002-of-00003.gguf",
              "m-BF16-00003-of-00003.gguf"]),
])  # fmt: skip
def test_choose_gguf_as_llama_cpp(files, quant, want):
    assert choose_gguf(files, quant) == want


def test_gguf_repo_online_fetches_only_the_chosen_parts(tmp_path, monkeypatch):
    """Online (the hub stood in for): the listing is the hub's, and only the chosen file and its
    split parts are downloaded."""
    import huggingface_hub
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    listing = ["README.md", "mmproj-m-F16.gguf", "m-Q8_0.gguf",
               "m-Q4_K_M-00002-of-00002.gguf", "m-Q4_K_M-00001-of-00002.gguf"]
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id: listing)
    fetched = []

    def download(repo_id, filename):
        fetched.append((repo_id, filename))
        return str(tmp_path / "snap" / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert resolve_model("org/m-GGUF") == tmp_path / "snap" / "m-Q4_K_M-00001-of-00002.gguf"
    assert fetched == [("org/m-GGUF", "m-Q4_K_M-00001-of-00002.gguf"),
                       ("org/m-GGUF", "m-Q4_K_M-00002-of-00002.gguf")]
    fetched.clear()
    assert resolve_model("org/m-GGUF:Q8_0").name == "m-Q8_0.gguf"
    assert fetched == [("org/m-GGUF", "m-Q8_0.gguf")]
    with pytest.raises(FileNotFoundError, match=r"on the hub; its quant types: Q4_K_M, Q8_0"):
        resolve_model("org/m-GGUF:IQ2_XS")
