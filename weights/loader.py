"""Load an HF safetensors folder or a GGUF file into (config, params pytree, tokenizer).

The loader is strict: it fills exactly the params tree the model expects and stops on any tensor that
is unknown, missing, set twice or of the wrong shape, naming the file and the tensor. Layer params are
written straight into preallocated stacked buffers in the target dtype, so peak host memory stays
near the size of the params themselves.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from jaxembed.config import DENSE, MOE, ModelConfig, UnsupportedModelError
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


# XLA's CPU client adopts a host array as a device buffer without copying it when the data is
# 64-byte aligned; numpy only promises 16. Loading into aligned buffers saves a copy of the whole
# model (and the page faults of its fresh memory) at start-up: about 0.4 s for SmolLM2.
XLA_CPU_ALIGNMENT = 64

# A source tensor: its name and a thunk that reads (and dequantizes) it only when needed.
SourceTensor = tuple[str, Callable[[], np.ndarray]]
# How a filled param leaf goes onto devices: (its path in the params tree, its host array).
Place = Callable[[tuple[str, ...], np.ndarray], jax.Array]
# Given the model's config (known only once loading has begun), how to place its leaves.
Placement = Callable[[ModelConfig], Place]


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialized host array whose data starts on an `XLA_CPU_ALIGNMENT` boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + XLA_CPU_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % XLA_CPU_ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _aligned(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`array` in `dtype`, copied into an aligned buffer (never a view of a mapped file)."""
    out = aligned_empty(array.shape, dtype)
    out[...] = array
    return out


def _default_place(key: tuple[str, ...], array: np.ndarray) -> jax.Array:
    return jnp.asarray(array)


# What reading a config from untrusted metadata raises when a value has the wrong type or range
# (a string for a count, an empty per-layer list, zero heads): the file's fault, not the code's.
_BAD_METADATA = (KeyError, TypeError, ValueError, IndexError, AttributeError, ArithmeticError)


def load_checkpoint(path: str | Path, dtype: str = "float32", progress: bool = True,
                    placement: Placement | None = None) -> Checkpoint:
    """Load a GGUF file or an HF folder (safetensors + config.json + tokenizer.json).

    placement: where each param goes (default: the default device). A sharded placement puts
    each leaf from host memory straight onto its devices, so a model larger than one device
    never has to fit on one."""
    path = Path(path)
    if dtype not in NUMPY_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {sorted(NUMPY_DTYPES)}")
    start = time.perf_counter()
    if path.is_file() and path.suffix == ".gguf":
        cfg, params, tok = _load_gguf(path, NUMPY_DTYPES[dtype], progress, placement)
        fmt = "gguf"
    elif path.is_dir():
        cfg, params, tok = _load_hf_folder(path, NUMPY_DTYPES[dtype], progress, placement)
        fmt = "safetensors"
    elif path.exists():
        raise WeightLoadError(path, "expected a .gguf file or a folder with config.json")
    else:
        raise WeightLoadError(path, "no such file or folder")
    return Checkpoint(cfg, params, tok, path, fmt, dtype, time.perf_counter() - start)


# ---- HF folders ------------------------------------------------------------------------------


def _load_hf_folder(folder: Path, dtype: np.dtype, progress: bool,
                    placement: Placement | None = None
                    ) -> tuple[ModelConfig, Params, TokenizerBundle]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise WeightLoadError(folder, "no config.json in the model folder")
    try:
        hf_cfg = json.loads(config_path.read_text())
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WeightLoadError(config_path, f"not valid JSON: {e}") from e
    if not isinstance(hf_cfg, dict):
        raise WeightLoadError(config_path, "not a JSON object")
    files = [SafetensorsFile(f) for f in safetensors_files(folder)]
    n_tensors = sum(len(f.names()) for f in files)
    text_cfg = hf_cfg.get("text_config")
    for cfg_dict in (hf_cfg, text_cfg if isinstance(text_cfg, dict) else {}):
        _check_layer_count(config_path, cfg_dict.get("num_hidden_layers"), n_tensors)
    try:
        cfg = ModelConfig.from_hf(hf_cfg)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{config_path}: {e}") from e
    except _BAD_METADATA as e:
        raise WeightLoadError(config_path, f"invalid model config: {e!r}") from e
    _check_param_count(config_path, cfg, sum(f.element_count() for f in files))
    sources: list[tuple[Path, SourceTensor]] = [
        (f.path, (_hf_text_name(name), lambda f=f, name=name: f.get(name)))
        for f in files for name in f.names()
    ]
    params = _fill_params(cfg, sources, names.HF_TABLES[cfg.family], names.HF_IGNORED, dtype,
                          progress, folder, placement)
    return cfg, params, tokenizer_from_hf_folder(folder)


def _hf_text_name(name: str) -> str:
    """The causal-LM name of a tensor: base models (many embedding models) save without the
    `model.` prefix, and multimodal wrappers (Gemma 3) nest the language model one level down."""
    if name.startswith(("embed_tokens.", "layers.", "norm.")):
        return "model." + name
    for prefix, repl in (("model.language_model.", "model."), ("language_model.model.", "model."),
                         ("language_model.lm_head.", "lm_head.")):
        if name.startswith(prefix):
            return repl + name[len(prefix):]
    return name


# ---- GGUF ------------------------------------------------------------------------------------


def _load_gguf(path: Path, dtype: np.dtype, progress: bool, placement: Placement | None = None
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
    _check_layer_count(path, meta.get(f"{meta.get('general.architecture')}.block_count"),
                       len(tensors))
    rope_factors = {
        name: tuple(float(v) for v in _dequantize_tensor(path, tensors[f"{name}.weight"]))
        for name in names.GGUF_ROPE_TENSORS if f"{name}.weight" in tensors
    }
    try:
        cfg = ModelConfig.from_gguf(meta, vocab_size=vocab, tied="output.weight" not in tensors,
                                    rope_factors=rope_factors)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{path}: {e}") from e
    except _BAD_METADATA as e:
        raise WeightLoadError(path, f"incomplete model metadata: {e!r}") from e
    _check_param_count(path, cfg, sum(math.prod(t.shape) for t in tensors.values()))
    sources = [(path, (name, lambda t=t: _dequantize_tensor(path, t))) for name, t in tensors.items()]
    params = _fill_params(cfg, sources, names.GGUF_TABLES[cfg.family], names.GGUF_IGNORED, dtype,
                          progress, path, placement)
    return cfg, params, tok


def _dequantize_tensor(path: Path, t: GGUFTensor) -> np.ndarray:
    try:
        return dequantize(t.data, t.type, t.shape)
    except UnsupportedQuantError as e:
        raise WeightLoadError(path, str(e), t.name) from e
    except ValueError as e:
        raise WeightLoadError(path, f"bad data: {e}", t.name) from e


# ---- the metadata against the tensors -----------------------------------------------------------


def _check_layer_count(file: Path, n_layers: object, n_tensors: int) -> None:
    """Every layer has tensors of its own, so a layer count past the checkpoint's tensor count is
    a lie: refused before the config builds per-layer tables that long."""
    try:
        n = int(n_layers)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        return  # not a count at all: the config reader says so
    if n > n_tensors:
        raise WeightLoadError(file, f"{n} layers, but the checkpoint has {n_tensors} tensors")


def _check_param_count(file: Path, cfg: ModelConfig, held: int) -> None:
    """The layers' stacked buffers are allocated, at the sizes the config implies, before any
    tensor is read. Every value in them comes from a tensor of the checkpoint, so sizes past what
    its tensors hold (`held` values) are a lie, refused before asking for that memory."""
    wanted, shapes = 0, param_shapes(cfg)
    for stack in ("layers", "mlp", "moe"):
        for leaf, (shape, _) in shapes.get(stack, {}).items():
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise WeightLoadError(file, f"the config gives {stack}.{leaf} the shape "
                                      f"{list(shape)}: sizes must be non-negative integers")
            wanted += math.prod(shape)
    if wanted > held:
        raise WeightLoadError(file, f"the config implies {wanted} values in the layers, but the "
                              f"checkpoint's tensors hold {held} in all")


# ---- the strict fill -------------------------------------------------------------------------


def _readable(pattern: re.Pattern[str], index: tuple[int, ...]) -> str:
    text = pattern.pattern
    for i in index:
        text = text.replace(r"(\d+)", str(i), 1)
    return text.replace(r"(\d+)", "N").replace("\\", "")


def _slots(cfg: ModelConfig) -> dict[str, list[int | None]]:
    """For each stack, the slot of every layer in it (None: the layer has no such part)."""
    out: dict[str, list[int | None]] = {"layers": list(range(cfg.num_layers))}
    for stack, kind in (("mlp", DENSE), ("moe", MOE)):
        it = iter(range(cfg.num_layers))
        out[stack] = [next(it) if k == kind else None for k in cfg.mlp_layer_kinds]
    return out


def _fill_params(cfg: ModelConfig, sources: Sequence[tuple[Path, SourceTensor]],
                 rules: Iterable[names.Rule], ignored: Iterable[re.Pattern[str]], dtype: np.dtype,
                 progress: bool, location: Path, placement: Placement | None = None) -> Params:
    """Fill exactly the params tree the config implies, or stop naming file, tensor and reason.
    `location`: the checkpoint (file or folder), named when no tensor file is to blame."""
    place = placement(cfg) if placement is not None else _default_place
    rules, ignored = tuple(rules), tuple(ignored)
    shapes = param_shapes(cfg)
    slots = _slots(cfg)
    buffers: dict[str, np.ndarray] = {}  # "stack.leaf" -> preallocated stacked array
    filled: dict[str, np.ndarray] = {}  # "stack.leaf" -> which slots (and experts) are set
    top: dict[str, np.ndarray] = {}
    for stack in ("layers", "mlp", "moe"):
        for leaf, (shape, axes) in shapes.get(stack, {}).items():
            buffers[f"{stack}.{leaf}"] = aligned_empty(shape, dtype)
            per_expert = axes[1] == "experts" and len(shape) == 4
            filled[f"{stack}.{leaf}"] = np.zeros(shape[:2] if per_expert else shape[:1], bool)
    origin: dict[str, str] = {}

    for (file, (name, _)), read in tqdm(_read_ahead(sources), total=len(sources),
                                        desc=f"loading {location.name}", unit="tensor",
                                        disable=not progress, leave=False):
        if any(p.fullmatch(name) for p in ignored):
            continue
        match = next(((r, m) for r in rules if (m := r.pattern.fullmatch(name))), None)
        if match is None:
            raise WeightLoadError(file, f"unknown tensor for a {cfg.family} model", name)
        rule, m = match
        if rule.targets == ("lm_head",) and cfg.tie_word_embeddings:
            continue  # some tied checkpoints save the head too; the embedding is used
        for target in rule.targets:
            if target not in buffers and target not in shapes:
                raise WeightLoadError(file, f"not expected by this {cfg.family} config (the "
                                      f"config has no {target!r})", name)
        source = read()
        try:
            arrays = rule.transform(source, cfg)
        except (ValueError, ArithmeticError) as e:  # a reshape by the config's head counts
            raise WeightLoadError(file, f"shape {list(source.shape)} does not fit this "
                                  f"{cfg.family} config: {e}", name) from e
        for target, array in zip(rule.targets, arrays, strict=True):
            if target in buffers:
                _place(file, name, target, m, array, buffers[target], filled[target], slots)
            else:
                if target in top:
                    raise WeightLoadError(file, f"set twice (also by {origin[target]})", name)
                _check_shape(file, name, array.shape, shapes[target][0])
                top[target] = _aligned(array, dtype)
                origin[target] = name

    file = sources[0][0] if sources else location
    by_target = {t: r.pattern for r in rules for t in r.targets}
    for target, done in filled.items():
        if not done.all():
            missing = np.argwhere(~done)[0]
            stack = target.split(".")[0]
            layer = slots[stack].index(int(missing[0]))
            tensor = _readable(by_target[target], (layer, *map(int, missing[1:])))
            raise WeightLoadError(file, f"missing tensor ({int((~done).sum())} slots lack it)",
                                  tensor)
    for target in shapes:
        if target not in ("layers", "mlp", "moe", "lm_head") and target not in top:
            raise WeightLoadError(file, "missing tensor", _readable(by_target[target], ()))
    # A base-model checkpoint (as many embedding models are saved) has no LM head: embeddings
    # need none, and generation reports its absence.

    params: Params = {k: place((k,), v) for k, v in top.items()}
    for key in list(buffers):
        stack, leaf = key.split(".")
        # Popped, so each host buffer is freed as soon as it is placed.
        params.setdefault(stack, {})[leaf] = place((stack, leaf), buffers.pop(key))
    jax.block_until_ready(params)
    return params


def _read_ahead(sources: Sequence[tuple[Path, SourceTensor]], ahead: int = 4
                ) -> Iterator[tuple[tuple[Path, SourceTensor], Callable[[], np.ndarray]]]:
    """Each source with a `read` whose array a worker thread has already begun to produce, a few
    tensors ahead: dequantizing (numpy, which releases the GIL) overlaps the copying into the
    stacked buffers, which takes about as long. A bounded window keeps at most `ahead` extra
    tensors in memory. Errors come out of `read`, in order."""
    with ThreadPoolExecutor(1, thread_name_prefix="jaxembed-read") as pool:
        window: collections.deque[tuple[tuple[Path, SourceTensor], Future[np.ndarray]]] = collections.deque()
        for src in sources:
            window.append((src, pool.submit(src[1][1])))
            if len(window) > ahead:
                done, future = window.popleft()
                yield done, future.result
        while window:
            done, future = window.popleft()
            yield done, future.result


def _place(file: Path, name: str, target: str, m: re.Match[str], array: np.ndarray,
           buffer: np.ndarray, filled: np.ndarray, slots: dict[str, list[int | None]]) -> None:
    """Write one layer's (or one expert's) array into its slot of a stacked buffer."""
    stack = target.split(".")[0]
    layer = int(m.group(1))
    if layer >= len(slots[stack]):
        raise WeightLoadError(file, f"layer {layer} but the config has {len(slots[stack])}", name)
    slot = slots[stack][layer]
    if slot is None:
        raise WeightLoadError(file, f"layer {layer} has no {stack!r} part in this config", name)
    index: tuple[int, ...] = (slot,)
    if filled.ndim == 2:  # stacked experts
        if m.re.groups >= 2:
            expert = int(m.group(2))
            if expert >= filled.shape[1]:
                raise WeightLoadError(file, f"expert {expert} but the config has "
                                      f"{filled.shape[1]}", name)
            index = (slot, expert)
        want = buffer.shape[len(index):]
    else:
        want = buffer.shape[1:]
    if filled[index].any():
        raise WeightLoadError(file, "set twice (duplicate tensor)", name)
    _check_shape(file, name, array.shape, want)
    buffer[index] = array
    filled[index] = True


def _check_shape(file: Path, name: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    if tuple(got) != tuple(want):
        raise WeightLoadError(
            file, f"shape {list(got)} after layout transform, but the config implies {list(want)}",
            name,
        )
