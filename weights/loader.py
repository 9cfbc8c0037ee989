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
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from jaxembed.config import DENSE, MOE, ModelConfig, UnsupportedModelError
from jaxembed.model import Params, param_shapes
from jaxembed.quant import QStack
from jaxembed.weights import names
from jaxembed.weights import quant as wq
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
    dtype: str  # of the float params and the activations
    load_seconds: float
    # The GGML types of the weights kept quantized (int8 for --quantize int8); empty: all float.
    quantized: tuple[str, ...] = ()
    # Heads outside the decoder (`names.HF_HEADS`, `names.GGUF_HEADS`), float32 on the host:
    # "score" [labels, hidden] (and "score_bias" [labels]) for a sequence classifier.
    heads: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    # The checkpoint's own config (config.json, or the GGUF metadata) for what the model
    # config leaves out (a classifier's labels).
    raw_config: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        """The default served name: the file name without `.gguf`, or the folder name."""
        return self.path.stem if self.path.suffix == ".gguf" else self.path.name


# XLA's CPU client adopts a host array as a device buffer without copying it when the data is
# 64-byte aligned; numpy only promises 16. Loading into aligned buffers saves a copy of the whole
# model (and the page faults of its fresh memory) at start-up: about 0.4 s for SmolLM2.
XLA_CPU_ALIGNMENT = 64

# A source tensor: its name and a thunk that reads (and dequantizes, or repacks) it only when
# needed.
SourceTensor = tuple[str, Callable[[], "np.ndarray | wq.QArrays"]]
# The params a quantized weight may fill: the projections, the embedding table and the head.
QUANTIZABLE = frozenset({
    "layers.wq", "layers.wk", "layers.wv", "layers.wo", "mlp.w_gate", "mlp.w_up", "mlp.w_down",
    "moe.w_gate", "moe.w_up", "moe.w_down", "embed", "lm_head"})
# Float params are [in, out] (`x @ w`); a quantized weight keeps the file's rows, [out, in]. The
# embedding table is rows already.
ROWS_ALREADY = frozenset({"embed"})
FLOAT_TYPES = frozenset({"F32", "F16", "BF16", "F64"})
QUANTIZE_MODES = (None, "none", "int8")
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
                    placement: Placement | None = None, quantize: str | None = None
                    ) -> Checkpoint:
    """Load a GGUF file or an HF folder (safetensors + config.json + tokenizer.json).

    placement: where each param goes (default: the default device). A sharded placement puts
    each leaf from host memory straight onto its devices, so a model larger than one device
    never has to fit on one.
    quantize: None keeps a GGUF file's quantized weights in their blocks (`weights.quant`) and
    float weights float; "none" dequantizes every weight into dtype (the reference); "int8"
    also quantizes float projection weights to Q8_0's layout. A sharded placement takes float
    weights only: quantized ones are dequantized for it."""
    path = Path(path)
    if dtype not in NUMPY_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {sorted(NUMPY_DTYPES)}")
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}; got {quantize!r}")
    if placement is not None:
        if quantize == "int8":
            raise ValueError("--quantize int8 keeps weights on one device; a sharded model "
                             "holds them in --dtype")
        quantize = "none"
    start = time.perf_counter()
    if path.is_file() and path.suffix == ".gguf":
        cfg, params, tok, heads, raw = _load_gguf(path, NUMPY_DTYPES[dtype], progress,
                                                  placement, quantize)
        fmt = "gguf"
    elif path.is_dir():
        cfg, params, tok, heads, raw = _load_hf_folder(path, NUMPY_DTYPES[dtype], progress,
                                                       placement, quantize)
        fmt = "safetensors"
    elif path.exists():
        raise WeightLoadError(path, "expected a .gguf file or a folder with config.json")
    else:
        raise WeightLoadError(path, "no such file or folder")
    kinds = sorted({w.layout.source for w in jax.tree.leaves(
        params, is_leaf=lambda x: isinstance(x, wq.QArrays)) if isinstance(w, wq.QArrays)})
    return Checkpoint(cfg, params, tok, path, fmt, dtype, time.perf_counter() - start,
                      tuple(kinds), heads, raw)


def _quantized_targets(rules: Sequence[names.Rule], tensor_types: dict[str, str],
                       quantize: str | None) -> frozenset[str]:
    """The params kept quantized: those a quantized tensor fills (unless quantize is "none"),
    and with "int8" every projection (but experts saved one tensor per expert)."""
    if quantize == "none":
        return frozenset()
    out = set()
    for name, kind in tensor_types.items():
        rule = next((r for r in rules if r.pattern.fullmatch(name)), None)
        if rule is None:
            continue
        if quantize == "int8" or kind not in FLOAT_TYPES:
            per_expert = rule.pattern.groups >= 2
            out |= {t for t in rule.targets if t in QUANTIZABLE and not per_expert}
    return frozenset(out)


# ---- HF folders ------------------------------------------------------------------------------


def _load_hf_folder(folder: Path, dtype: np.dtype, progress: bool,
                    placement: Placement | None = None, quantize: str | None = None
                    ) -> tuple[ModelConfig, Params, TokenizerBundle, Heads, dict[str, Any]]:
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
    sources, heads = _heads(cfg, sources, names.HF_HEADS)
    rules = names.HF_TABLES[cfg.family]
    # Every tensor of a folder is float: only --quantize int8 quantizes.
    quantized = _quantized_targets(rules, {name: "F32" for _, (name, _) in sources}, quantize)
    params = _fill_params(cfg, sources, rules, names.HF_IGNORED, dtype, progress, folder,
                          placement, quantized)
    return cfg, params, tokenizer_from_hf_folder(folder), heads, hf_cfg


Heads = dict[str, np.ndarray]


def _heads(cfg: ModelConfig, sources: list[tuple[Path, SourceTensor]], table: dict[str, str]
           ) -> tuple[list[tuple[Path, SourceTensor]], Heads]:
    """Split the heads outside the decoder (`table`: tensor name -> head) from the decoder's
    tensors; read them as float32 and check their shapes ([labels, hidden] and [labels])."""
    heads: Heads = {}
    rest = []
    for file, (name, read) in sources:
        if name not in table:
            rest.append((file, (name, read)))
            continue
        value = read()
        if isinstance(value, wq.QArrays):
            raise WeightLoadError(file, "a classifier head in quantized blocks is not supported",
                                  name)
        heads[table[name]] = np.asarray(value, np.float32)
    score, bias = heads.get("score"), heads.get("score_bias")
    names_of = {v: k for k, v in table.items()}
    if score is not None and (score.ndim != 2 or score.shape[1] != cfg.hidden_size
                              or score.shape[0] < 1):
        raise WeightLoadError(sources[0][0], f"shape {list(score.shape)}; a classifier head is "
                              f"[labels, {cfg.hidden_size}]", names_of["score"])
    if bias is not None and (score is None or bias.shape != score.shape[:1]):
        raise WeightLoadError(sources[0][0], f"shape {list(bias.shape)} does not fit the "
                              "classifier head's labels", names_of["score_bias"])
    return rest, heads


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


SPLIT_NAME = re.compile(r"(.*)-(\d{5})-of-(\d{5})\.gguf")


def _gguf_parts(path: Path, first: GGUFFile) -> list[GGUFFile]:
    """Every part of a model split by llama.cpp's gguf-split (`-00001-of-00003.gguf`): the
    first holds the metadata, each part its share of the tensors."""
    count = first.metadata.get("split.count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count <= 1:
        return [first]
    m = SPLIT_NAME.fullmatch(path.name)
    if m is None or int(m.group(2)) != 1 or int(m.group(3)) != count:
        raise WeightLoadError(path, f"split into {count} parts (split.count), but its name is not "
                              f"the first of them (<name>-00001-of-{count:05d}.gguf)")
    parts = [first]
    for i in range(2, count + 1):
        part = path.with_name(f"{m.group(1)}-{i:05d}-of-{count:05d}.gguf")
        if not part.is_file():
            raise WeightLoadError(path, f"part {i} of {count} is missing: {part.name}")
        parts.append(GGUFFile(part))
    return parts


def _load_gguf(path: Path, dtype: np.dtype, progress: bool, placement: Placement | None = None,
               quantize: str | None = None
               ) -> tuple[ModelConfig, Params, TokenizerBundle, Heads, dict[str, Any]]:
    f = GGUFFile(path)
    parts = _gguf_parts(path, f)
    meta, tensors, owner = f.metadata, {}, {}
    for part in parts:
        for name, t in part.tensors.items():
            if name in tensors:
                raise WeightLoadError(part.path, "appears in two parts of the split model", name)
            tensors[name], owner[name] = t, part
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
    rules = names.GGUF_TABLES[cfg.family]
    quantized = _quantized_targets(rules, {n: t.type.name for n, t in tensors.items()},
                                   quantize)

    def read(t: GGUFTensor) -> np.ndarray | wq.QArrays:
        rule = next((r for r in rules if r.pattern.fullmatch(t.name)), None)
        file = owner[t.name].path
        if rule is not None and set(rule.targets) & quantized:
            out = _repack_tensor(file, t)
        else:
            out = _dequantize_tensor(file, t)
        owner[t.name].release(t)  # its pages are read: only the result stays
        return out

    sources = [(owner[name].path, (name, lambda t=t: read(t))) for name, t in tensors.items()]
    sources, heads = _heads(cfg, sources, names.GGUF_HEADS)
    params = _fill_params(cfg, sources, rules, names.GGUF_IGNORED, dtype, progress, path,
                          placement, quantized)
    return cfg, params, tok, heads, meta


def _repack_tensor(path: Path, t: GGUFTensor) -> np.ndarray | wq.QArrays:
    """A tensor of a linear GGML type in its blocks (repacked); of another type, as floats
    (`_fill_params` quantizes those to int8)."""
    if not wq.repackable(t.type):
        return _dequantize_tensor(path, t)
    try:
        return wq.repack(t.data, t.type, t.shape, alloc=aligned_empty)
    except ValueError as e:
        raise WeightLoadError(path, f"bad data: {e}", t.name) from e


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
                 progress: bool, location: Path, placement: Placement | None = None,
                 quantized: frozenset[str] = frozenset()) -> Params:
    """Fill exactly the params tree the config implies, or stop naming file, tensor and reason.
    `location`: the checkpoint (file or folder), named when no tensor file is to blame.
    `quantized`: the params held quantized (`weights.quant.QArrays`, a `quant.QStack` of one per
    layer for a stack's), never allocated as floats."""
    place = placement(cfg) if placement is not None else _default_place
    rules, ignored = tuple(rules), tuple(ignored)
    shapes = param_shapes(cfg)
    slots = _slots(cfg)
    buffers: dict[str, np.ndarray] = {}  # "stack.leaf" -> preallocated stacked array
    filled: dict[str, np.ndarray] = {}  # "stack.leaf" -> which slots (and experts) are set
    top: dict[str, np.ndarray] = {}
    qslots: dict[str, list[wq.QArrays | None]] = {}  # quantized "stack.leaf" -> per slot
    for stack in ("layers", "mlp", "moe"):
        for leaf, (shape, axes) in shapes.get(stack, {}).items():
            key = f"{stack}.{leaf}"
            if key in quantized:
                qslots[key] = [None] * shape[0]
                filled[key] = np.zeros(shape[:1], bool)
                continue
            buffers[key] = aligned_empty(shape, dtype)
            per_expert = axes[1] == "experts" and len(shape) == 4
            filled[key] = np.zeros(shape[:2] if per_expert else shape[:1], bool)
    origin: dict[str, str] = {}

    def matched(name: str) -> tuple[names.Rule, re.Match[str]] | None:
        return next(((r, m) for r in rules if (m := r.pattern.fullmatch(name))), None)

    def transformed(src: tuple[Path, SourceTensor]) -> Callable[[], Any]:
        """The source's read, then its rule's transform, both on a worker thread: a quantized
        tensor's row permutation (llama.cpp's q/k order) is a copy of the whole tensor, and
        the main thread is busy placing the tensors before it. A transform's error comes back
        as the value, for the main loop to name the tensor."""
        file, (name, read) = src
        match = None if any(p.fullmatch(name) for p in ignored) else matched(name)

        def run() -> tuple[tuple[int, ...], Any]:
            source = read()
            if match is None:
                return source.shape, ()
            try:
                return source.shape, _transform(match[0], source, cfg, quantized)
            except (ValueError, ArithmeticError) as e:  # a reshape by the config's head counts
                return source.shape, e
        return run

    for (file, (name, _)), read in tqdm(_read_ahead(sources, transformed),
                                        total=len(sources),
                                        desc=f"loading {location.name}", unit="tensor",
                                        disable=not progress, leave=False):
        if any(p.fullmatch(name) for p in ignored):
            continue
        match = matched(name)
        if match is None:
            raise WeightLoadError(file, f"unknown tensor for a {cfg.family} model", name)
        rule, m = match
        if rule.targets == ("lm_head",) and cfg.tie_word_embeddings:
            continue  # some tied checkpoints save the head too; the embedding is used
        for target in rule.targets:
            if target not in buffers and target not in qslots and target not in shapes:
                raise WeightLoadError(file, f"not expected by this {cfg.family} config (the "
                                      f"config has no {target!r})", name)
        shape, arrays = read()
        if isinstance(arrays, Exception):
            raise WeightLoadError(file, f"shape {list(shape)} does not fit this "
                                  f"{cfg.family} config: {arrays}", name) from arrays
        for target, array in zip(rule.targets, arrays, strict=True):
            if target in qslots:
                _place_quantized(file, name, target, m, array, qslots[target], filled[target],
                                 slots, shapes[target.split(".")[0]][target.split(".")[1]][0])
            elif target in buffers:
                _place(file, name, target, m, array, buffers[target], filled[target], slots)
            elif target in quantized:
                if target in top:
                    raise WeightLoadError(file, f"set twice (also by {origin[target]})", name)
                _check_shape(file, name, _logical(target, array.shape), shapes[target][0])
                top[target] = array
                origin[target] = name
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

    params: Params = {k: _place_leaf(place, (k,), v) for k, v in top.items()}
    for key in list(buffers):
        stack, leaf = key.split(".")
        # Popped, so each host buffer is freed as soon as it is placed.
        params.setdefault(stack, {})[leaf] = place((stack, leaf), buffers.pop(key))
    for key in list(qslots):
        stack, leaf = key.split(".")
        layers = qslots.pop(key)
        params.setdefault(stack, {})[leaf] = QStack(tuple(
            _place_leaf(place, (stack, leaf), q) for q in layers if q is not None))
    jax.block_until_ready(params)
    return params


def _place_leaf(place: Place, key: tuple[str, ...], v: np.ndarray | wq.QArrays) -> Any:
    if isinstance(v, wq.QArrays):  # onto the default device (a CPU adopts aligned arrays)
        return v.map(jax.device_put)
    return place(key, v)


def _logical(target: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The params shape a quantized weight of `shape` ([..., out, in]) stands for."""
    if target.split(".")[-1] in ROWS_ALREADY:
        return tuple(shape)
    return (*shape[:-2], shape[-1], shape[-2])


def _transform(rule: names.Rule, source: np.ndarray | wq.QArrays, cfg: ModelConfig,
               quantized: frozenset[str]) -> tuple[Any, ...]:
    """The rule's arrays for its targets: floats as the rule transforms them; for a target held
    quantized, its rows (quantized at load to int8 if they came as floats).

    A rule's transforms (transposes, llama.cpp's q/k row permutation, splits of fused rows) only
    move whole rows, so a quantized tensor's are found by transforming the row numbers."""
    if isinstance(source, wq.QArrays):
        *lead, n, _ = source.shape
        rows = np.arange(int(np.prod([*lead, n]))).reshape(*lead, n, 1)
        out = []
        for target, picked in zip(rule.targets, rule.transform(rows, cfg), strict=True):
            if target.split(".")[-1] not in ROWS_ALREADY:
                picked = np.swapaxes(picked, -1, -2)  # back to [..., rows, 1]
            out.append(_rows(source, picked[..., 0]))
        return tuple(out)
    arrays = rule.transform(source, cfg)
    return tuple(
        wq.quantize_q8(np.ascontiguousarray(
            a if t.split(".")[-1] in ROWS_ALREADY else np.swapaxes(a, -1, -2)),
            alloc=aligned_empty) if t in quantized else a
        for t, a in zip(rule.targets, arrays, strict=True))


def _rows(q: wq.QArrays, index: np.ndarray) -> wq.QArrays:
    """q's rows `index` ([..., n] into q's rows flattened), into aligned arrays; q itself when
    they are all its rows in order."""
    total = int(np.prod(q.shape[:-1]))
    flat = index.reshape(-1)
    if flat.size == total and (flat == np.arange(total)).all():
        return q

    def take(a: np.ndarray) -> np.ndarray:
        out = aligned_empty((flat.size, a.shape[-1]), a.dtype)
        np.take(a.reshape(total, a.shape[-1]), flat, axis=0, out=out)
        return out.reshape(*index.shape, a.shape[-1])
    return q.map(take)


def _place_quantized(file: Path, name: str, target: str, m: re.Match[str], q: wq.QArrays,
                     layers: list[wq.QArrays | None], filled: np.ndarray,
                     slots: dict[str, list[int | None]], shape: tuple[int, ...]) -> None:
    """One layer's quantized weight (all its experts at once) into its slot."""
    stack = target.split(".")[0]
    layer = int(m.group(1))
    if layer >= len(slots[stack]):
        raise WeightLoadError(file, f"layer {layer} but the config has {len(slots[stack])}", name)
    slot = slots[stack][layer]
    if slot is None:
        raise WeightLoadError(file, f"layer {layer} has no {stack!r} part in this config", name)
    if filled[slot]:
        raise WeightLoadError(file, "set twice (duplicate tensor)", name)
    _check_shape(file, name, _logical(target, q.shape), shape[1:])
    layers[slot] = q
    filled[slot] = True


def _read_ahead(sources: Sequence[tuple[Path, SourceTensor]],
                work: Callable[[tuple[Path, SourceTensor]], Callable[[], Any]],
                ahead: int = 4) -> Iterator[tuple[tuple[Path, SourceTensor], Callable[[], Any]]]:
    """Each source with a `read` whose result (`work(source)()`) worker threads have already
    begun to produce, a few tensors ahead: dequantizing, repacking and permuting rows (numpy,
    which releases the GIL) overlap the copying into the stacked buffers, and on two cores or
    more run on both. A bounded window keeps at most `ahead` extra tensors in memory. Errors
    come out of `read`, in order."""
    workers = max(1, min(2, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers, thread_name_prefix="jaxembed-read") as pool:
        window: collections.deque[tuple[tuple[Path, SourceTensor], Future[Any]]] = collections.deque()
        for src in sources:
            window.append((src, pool.submit(work(src))))
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
