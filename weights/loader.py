"""Load an HF safetensors folder or a GGUF file into (config, params pytree, tokenizer).

The loader is strict: it fills exactly the params tree the model expects and stops on any tensor that
is unknown, missing, set twice or of the wrong shape, naming the file and the tensor. Layer params are
written straight into preallocated stacked buffers in the target dtype, so peak host memory stays
near the size of the params themselves.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from jaxembed.config import ModelConfig, RopeScaling, UnsupportedModelError
from jaxembed.model import Params, param_shapes
from jaxembed.weights import names
from jaxembed.weights.dequant import UnsupportedQuantError, dequantize
from jaxembed.weights.errors import WeightLoadError
from jaxembed.weights.gguf_io import GGUFFile, GGUFTensor
from jaxembed.weights.gguf_tokenizer import tokenizer_from_gguf
from jaxembed.weights.safetensors_io import SafetensorsFile, safetensors_files
from jaxembed.weights.tokenizer import TokenizerBundle, tokenizer_from_hf_folder

NUMPY_DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}


@dataclasses.dataclass
class Checkpoint:
    """A loaded model: everything the engine needs, nothing it must look up again."""

    config: ModelConfig
    params: Params
    tokenizer: TokenizerBundle
    path: Path
    format: str  # "safetensors" or "gguf"
    dtype: str
    load_seconds: float

    @property
    def name(self) -> str:
        """The default served name: the file name without `.gguf`, or the folder name."""
        return self.path.stem if self.path.suffix == ".gguf" else self.path.name


# A source tensor: its name and a thunk that reads (and dequantizes) it only when needed.
SourceTensor = tuple[str, Callable[[], np.ndarray]]


def load_checkpoint(path: str | Path, dtype: str = "float32", progress: bool = True) -> Checkpoint:
    """Load a GGUF file or an HF folder (safetensors + config.json + tokenizer.json)."""
    path = Path(path)
    if dtype not in NUMPY_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {sorted(NUMPY_DTYPES)}")
    start = time.perf_counter()
    if path.is_file() and path.suffix == ".gguf":
        cfg, params, tok = _load_gguf(path, NUMPY_DTYPES[dtype], progress)
        fmt = "gguf"
    elif path.is_dir():
        cfg, params, tok = _load_hf_folder(path, NUMPY_DTYPES[dtype], progress)
        fmt = "safetensors"
    elif path.exists():
        raise WeightLoadError(path, "expected a .gguf file or a folder with config.json")
    else:
        raise WeightLoadError(path, "no such file or folder")
    return Checkpoint(cfg, params, tok, path, fmt, dtype, time.perf_counter() - start)


# ---- HF folders ------------------------------------------------------------------------------


def _load_hf_folder(folder: Path, dtype: np.dtype, progress: bool
                    ) -> tuple[ModelConfig, Params, TokenizerBundle]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise WeightLoadError(folder, "no config.json in the model folder")
    try:
        hf_cfg = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise WeightLoadError(config_path, f"not valid JSON: {e}") from e
    try:
        cfg = ModelConfig.from_hf(hf_cfg)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{config_path}: {e}") from e
    files = [SafetensorsFile(f) for f in safetensors_files(folder)]
    sources: list[tuple[Path, SourceTensor]] = [
        (f.path, (name, lambda f=f, name=name: f.get(name))) for f in files for name in f.names()
    ]
    params = _fill_params(cfg, sources, names.HF_TABLES[cfg.family], names.HF_IGNORED, dtype,
                          progress, folder.name)
    return cfg, params, tokenizer_from_hf_folder(folder)


# ---- GGUF ------------------------------------------------------------------------------------


def _load_gguf(path: Path, dtype: np.dtype, progress: bool
               ) -> tuple[ModelConfig, Params, TokenizerBundle]:
    f = GGUFFile(path)
    meta, tensors = f.metadata, f.tensors
    try:
        tok = tokenizer_from_gguf(meta)
    except ValueError as e:
        raise WeightLoadError(path, f"tokenizer metadata: {e}") from e
    vocab = len(meta.get("tokenizer.ggml.tokens", []))
    if not vocab and "token_embd.weight" in tensors:
        vocab = tensors["token_embd.weight"].shape[0]
    try:
        cfg = ModelConfig.from_gguf(meta, vocab_size=vocab, tied="output.weight" not in tensors)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{path}: {e}") from e
    except (KeyError, TypeError, ValueError) as e:
        raise WeightLoadError(path, f"incomplete model metadata: {e!r}") from e
    if "rope_freqs.weight" in tensors:
        factors = _dequantize_tensor(path, tensors["rope_freqs.weight"])
        cfg = dataclasses.replace(
            cfg, rope_scaling=RopeScaling(kind="freq_factors",
                                          freq_factors=tuple(float(f) for f in factors)))
    sources = [(path, (name, lambda t=t: _dequantize_tensor(path, t))) for name, t in tensors.items()]
    params = _fill_params(cfg, sources, names.GGUF_TABLES[cfg.family], names.GGUF_IGNORED, dtype,
                          progress, path.name)
    return cfg, params, tok


def _dequantize_tensor(path: Path, t: GGUFTensor) -> np.ndarray:
    try:
        return dequantize(t.data, t.type, t.shape)
    except UnsupportedQuantError as e:
        raise WeightLoadError(path, str(e), t.name) from e
    except ValueError as e:
        raise WeightLoadError(path, f"bad data: {e}", t.name) from e


# ---- the strict fill -------------------------------------------------------------------------


def _readable(pattern: re.Pattern[str], layer: int | None) -> str:
    text = pattern.pattern.replace(r"(\d+)", str(layer) if layer is not None else "N")
    return text.replace("\\", "")


def _fill_params(cfg: ModelConfig, sources: Sequence[tuple[Path, SourceTensor]],
                 rules: Iterable[names.Rule], ignored: Iterable[re.Pattern[str]], dtype: np.dtype,
                 progress: bool, label: str) -> Params:
    rules, ignored = tuple(rules), tuple(ignored)
    shapes = param_shapes(cfg)
    n_layers = cfg.num_layers
    layer_shapes = {k: v[0] for k, v in shapes["layers"].items()}
    buffers: dict[str, np.ndarray] = {
        k: np.empty(shape, dtype) for k, shape in layer_shapes.items()
    }
    filled: dict[str, np.ndarray] = {k: np.zeros(n_layers, bool) for k in layer_shapes}
    top: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    tied_head = cfg.tie_word_embeddings

    for file, (name, read) in tqdm(sources, desc=f"loading {label}", unit="tensor",
                                   disable=not progress, leave=False):
        if any(p.fullmatch(name) for p in ignored):
            continue
        match = next(((r, m) for r in rules if (m := r.pattern.fullmatch(name))), None)
        if match is None:
            raise WeightLoadError(file, f"unknown tensor for a {cfg.family} model", name)
        rule, m = match
        if rule.target == "lm_head" and tied_head:
            continue  # some tied checkpoints save the head too; the embedding is used
        array = rule.transform(read(), cfg)
        if rule.target.startswith("layers."):
            key = rule.target.split(".", 1)[1]
            layer = int(m.group(1))
            if layer >= n_layers:
                raise WeightLoadError(file, f"layer {layer} but the config has {n_layers}", name)
            if filled[key][layer]:
                raise WeightLoadError(file, "set twice (duplicate tensor)", name)
            _check_shape(file, name, array.shape, layer_shapes[key][1:])
            buffers[key][layer] = array
            filled[key][layer] = True
        else:
            if rule.target in top:
                raise WeightLoadError(file, f"set twice (also by {origin[rule.target]})", name)
            _check_shape(file, name, array.shape, shapes[rule.target][0])
            top[rule.target] = np.asarray(array, dtype)
            origin[rule.target] = name

    file = sources[0][0] if sources else Path(label)
    by_target = {r.target: r.pattern for r in rules}
    for key, done in filled.items():
        if not done.all():
            layer = int(np.argmin(done))
            tensor = _readable(by_target[f"layers.{key}"], layer)
            raise WeightLoadError(file, f"missing tensor ({(~done).sum()} layers lack it)", tensor)
    for target in shapes:
        if target != "layers" and target not in top:
            raise WeightLoadError(file, "missing tensor", _readable(by_target[target], None))

    to_device = lambda a: jnp.asarray(a)  # noqa: E731
    params: Params = {k: to_device(v) for k, v in top.items()}
    params["layers"] = {k: to_device(v) for k, v in buffers.items()}
    jax.block_until_ready(params)
    return params


def _check_shape(file: Path, name: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    if tuple(got) != tuple(want):
        raise WeightLoadError(
            file, f"shape {list(got)} after layout transform, but the config implies {list(want)}",
            name,
        )
