"""What a sentence-transformers folder says about serving its model.

A sentence-transformers model is a pipeline of modules (`modules.json`): the transformer itself, a
pooling, optional dense projections, optional L2 normalization. The transformer is what the loader
loads; this module reads the rest, so that a model is served the way it was trained to be used:
its pooling and normalization become the engine's defaults, its dense layers run after pooling
(in float32, on the host), and its prompts (`config_sentence_transformers.json`) can be named by
requests. A folder without `modules.json` (a plain causal LM) gets no configuration at all.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from jaxembed.config import UnsupportedModelError
from jaxembed.protocol import EmbeddingType
from jaxembed.weights.errors import WeightLoadError
from jaxembed.weights.safetensors_io import SafetensorsFile

# sentence-transformers pooling modes this engine computes, by their name in `pooling_mode`.
POOLING_MODES = {"mean": EmbeddingType.Mean, "lasttoken": EmbeddingType.Last,
                 "cls": EmbeddingType.Cls}
# The older config spelling: one boolean flag per mode.
LEGACY_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken",
}
# Dense activations by torch class name (configs store e.g. "torch.nn.modules.activation.Tanh").
ACTIVATIONS = {
    "Identity": lambda x: x,
    "Tanh": np.tanh,
    "ReLU": lambda x: np.maximum(x, 0.0),
    "Sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "SiLU": lambda x: x / (1.0 + np.exp(-x)),
    "GELU": lambda x: 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0))),
}
# Modules that do nothing at inference.
PASSTHROUGH_MODULES = {"Dropout"}

# Keys under which configs declare the Matryoshka sizes a model was trained for.
MATRYOSHKA_KEYS = ("matryoshka_dimensions", "matryoshka_dims")


def _erf(x: np.ndarray) -> np.ndarray:
    # numpy has no erf; scipy is not a dependency of the engine. Abramowitz-Stegun 7.1.26 is
    # accurate to 1.5e-7, below float32 rounding of the activations it feeds.
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027
                                                                           + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


@dataclasses.dataclass(frozen=True, eq=False)
class DenseLayer:
    """One `Dense` module: activation(x @ weight.T + bias), plus an optional residual."""

    weight: np.ndarray  # [out, in] float32, as torch's nn.Linear stores it
    bias: np.ndarray | None  # [out]
    activation: str  # a key of ACTIVATIONS
    residual: np.ndarray | None = None  # [out, in] when the residual needs a projection
    use_residual: bool = False

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = x @ self.weight.T
        if self.bias is not None:
            out = out + self.bias
        out = ACTIVATIONS[self.activation](out)
        if self.use_residual:
            out = out + (x if self.residual is None else x @ self.residual.T)
        return out.astype(np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class SentenceTransformersConfig:
    """The serving settings a sentence-transformers folder declares."""

    pooling: EmbeddingType = EmbeddingType.Mean
    include_prompt: bool = True  # False: prompt tokens attend but are left out of the pooling
    dense: tuple[DenseLayer, ...] = ()
    normalize: bool = False
    prompts: dict[str, str] = dataclasses.field(default_factory=dict)
    default_prompt_name: str | None = None
    max_seq_length: int | None = None
    matryoshka_dimensions: tuple[int, ...] = ()

    def project(self, vectors: np.ndarray) -> np.ndarray:
        """Run the dense layers over pooled float32 vectors [N, hidden]."""
        out = np.asarray(vectors, np.float32)
        for layer in self.dense:
            out = layer(out)
        return out

    def output_size(self, hidden_size: int) -> int:
        return self.dense[-1].out_features if self.dense else hidden_size


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightLoadError(path, f"not valid JSON: {e}") from e


def _class_name(module_type: str) -> str:
    """`sentence_transformers.models.Pooling` and newer module paths alike name the class last."""
    return module_type.rsplit(".", 1)[-1]


def read_sentence_transformers(folder: Path) -> SentenceTransformersConfig | None:
    """The folder's sentence-transformers settings, or None if it is not such a folder."""
    folder = Path(folder)
    modules_path = folder / "modules.json"
    if not folder.is_dir() or not modules_path.is_file():
        return None
    modules = _read_json(modules_path)
    if not isinstance(modules, list):
        raise WeightLoadError(modules_path, "expected a list of modules")
    fields: dict[str, Any] = {}
    dense: list[DenseLayer] = []
    width: int | None = None  # the output size of the modules so far (after the first Dense)
    for position, entry in enumerate(sorted(modules, key=lambda m: m.get("idx", 0))):
        kind = _class_name(str(entry.get("type", "")))
        sub = folder / str(entry.get("path", ""))
        if kind == "Transformer":
            if position != 0 or entry.get("path", ""):
                raise UnsupportedModelError(
                    f"{modules_path}: the Transformer module must come first and live in the "
                    "folder's root (where config.json and the weights are)")
            bert_cfg = sub / "sentence_bert_config.json"
            if bert_cfg.is_file():
                limit = _read_json(bert_cfg).get("max_seq_length")
                fields["max_seq_length"] = int(limit) if limit else None
        elif kind == "Pooling":
            fields.update(_pooling(sub / "config.json"))
        elif kind == "Dense":
            layer = _dense(sub)
            if width is not None and layer.in_features != width:
                raise WeightLoadError(sub, f"in_features {layer.in_features} but the module "
                                      f"before gives {width}")
            dense.append(layer)
            width = layer.out_features
        elif kind == "Normalize":
            fields["normalize"] = True
        elif kind not in PASSTHROUGH_MODULES:
            raise UnsupportedModelError(
                f"{modules_path}: the sentence-transformers module {entry.get('type')!r} is not "
                "supported; supported: Transformer, Pooling, Dense, Normalize, Dropout")
    st_cfg_path = folder / "config_sentence_transformers.json"
    st_cfg = _read_json(st_cfg_path) if st_cfg_path.is_file() else {}
    prompts = {str(k): str(v) for k, v in (st_cfg.get("prompts") or {}).items() if v is not None}
    default_name = st_cfg.get("default_prompt_name") or None
    if default_name is not None and default_name not in prompts:
        raise WeightLoadError(st_cfg_path, f"default_prompt_name {default_name!r} is not one of "
                              f"its prompts {sorted(prompts)}")
    dims: list[int] = []
    hf_cfg = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    for source in (st_cfg, hf_cfg):
        for key in MATRYOSHKA_KEYS:
            if isinstance(source.get(key), list) and not dims:
                dims = sorted({int(d) for d in source[key]})
    return SentenceTransformersConfig(dense=tuple(dense), prompts=prompts,
                                      default_prompt_name=default_name,
                                      matryoshka_dimensions=tuple(dims), **fields)


def _pooling(path: Path) -> dict[str, Any]:
    cfg = _read_json(path) if path.is_file() else {}
    mode = cfg.get("pooling_mode")
    if mode is None:
        modes = [name for flag, name in LEGACY_POOLING_FLAGS.items() if cfg.get(flag)]
        mode = modes or ["mean"]  # sentence-transformers' own fallback
    modes = [mode] if isinstance(mode, str) else list(mode)
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise UnsupportedModelError(
            f"{path}: pooling {modes} is not supported; supported: one of {sorted(POOLING_MODES)}")
    return {"pooling": POOLING_MODES[modes[0]],
            "include_prompt": bool(cfg.get("include_prompt", True))}


def _dense(folder: Path) -> DenseLayer:
    cfg = _read_json(folder / "config.json")
    try:
        n_in, n_out = int(cfg["in_features"]), int(cfg["out_features"])
    except (KeyError, TypeError, ValueError) as e:
        raise WeightLoadError(folder / "config.json", f"a Dense config needs in_features and "
                              f"out_features: {e!r}") from e
    has_bias = bool(cfg.get("bias", True))
    # sentence-transformers' default activation is Tanh when the config names none.
    act = _class_name(str(cfg.get("activation_function") or "torch.nn.Tanh"))
    if act not in ACTIVATIONS:
        raise UnsupportedModelError(
            f"{folder / 'config.json'}: activation {cfg.get('activation_function')!r} is not "
            f"supported; supported: {sorted(ACTIVATIONS)}")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise WeightLoadError(folder, "no model.safetensors in the Dense module's folder (a "
                              "pytorch_model.bin can be converted with safetensors' tools)")
    f = SafetensorsFile(weights)

    def tensor(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in f.names():
            raise WeightLoadError(weights, "missing tensor", name)
        array = np.asarray(f.get(name), np.float32)
        if array.shape != shape:
            raise WeightLoadError(weights, f"shape {list(array.shape)}, but the config implies "
                                  f"{list(shape)}", name)
        return array

    use_residual = bool(cfg.get("use_residual", False))
    return DenseLayer(
        weight=tensor("linear.weight", (n_out, n_in)),
        bias=tensor("linear.bias", (n_out,)) if has_bias else None, activation=act,
        residual=(tensor("residual.weight", (n_out, n_in))
                  if use_residual and n_in != n_out else None),
        use_residual=use_residual)
