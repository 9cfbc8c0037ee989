"""What a sentence-transformers folder says about serving its model.

A sentence-transformers model is a pipeline of modules (`modules.json`): the transformer itself, a
pooling, optional dense projections, optional L2 normalization. The transformer is what the loader
loads; this module reads the rest, so that a model is served the way it was trained to be used:
its pooling and normalization become the engine's defaults, its dense layers run after pooling
(in float32, on the host), and its prompts (`config_sentence_transformers.json`) can be named by
requests. A folder saved by sentence-transformers 6 may list a `message` modality in
`sentence_bert_config.json`; it then sends each text through the model's chat template, as a
user message with the prompt as a system message (`MessageInputs`). A folder without
`modules.json` (a plain causal LM) gets no configuration at all.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxembed.config import UnsupportedModelError
from jaxembed.generation import RESERVED_TEMPLATE_NAMES, ChatTemplate
from jaxembed.protocol import EmbeddingType
from jaxembed.weights.errors import WeightLoadError
from jaxembed.weights.safetensors_io import SafetensorsFile
from jaxembed.weights.tokenizer import tokenizer_from_hf_folder

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

# ---- sentence-transformers 6's `modality_config` (sentence_bert_config.json) ----
# What the engine computes for a text: the model's forward pass, its last hidden states.
TEXT_MODALITY_OUTPUT = {"method": "forward", "method_output_name": "last_hidden_state"}
# How a chat message holds its text: "flat" ({"content": text}) or "structured" ({"content":
# [{"type": "text", "text": text}]}); "auto" (or no format) infers one from the template.
MESSAGE_FORMATS = ("flat", "structured", "auto")
# sentence-transformers' inference for "auto": these model types are flat whatever their template;
# otherwise a template that reads any of these is structured, any other template flat.
FLAT_MESSAGE_MODEL_TYPES = frozenset({"apertus", "deepseek_v3", "gpt_oss", "minicpm3", "seed_oss"})
STRUCTURED_TEMPLATE_MARKS = ("content[0]", ".type", "'type'", '"type"', "item.type",
                             "message.content[")
# The special tokens transformers hands every chat template, by name (those the tokenizer has).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")
# `processing_kwargs.chat_template` keys that shape tokenizing, not rendering: the engine's own
# limits and truncation apply instead (`restore_suffix` is sentence-transformers' flag for its
# truncation).
CHAT_TEMPLATE_SIZE_KEYS = frozenset({"padding", "truncation", "max_length", "return_tensors",
                                     "restore_suffix"})
# apply_chat_template arguments that change more than the template's variables; not supported.
CHAT_TEMPLATE_UNSUPPORTED_KEYS = frozenset({
    "chat_template", "continue_final_message", "tokenize", "return_dict", "tokenizer_kwargs",
    "return_assistant_tokens_mask", "sanitize_control_tokens", "processor_kwargs"})


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
class MessageInputs:
    """sentence-transformers 6's `message` modality: each text is sent through the model's chat
    template as one user message, and a prompt goes into a system message before it (never in
    front of the text). The rendered text is tokenized without adding special tokens: the
    template writes them. The prompt's tokens are always pooled (`include_prompt` has no say)."""

    format: str  # "flat" or "structured" (resolved)
    template: ChatTemplate
    add_generation_prompt: bool = False
    variables: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def content(self, text: str) -> str | list[dict[str, str]]:
        return text if self.format == "flat" else [{"type": "text", "text": text}]

    def messages(self, text: str, prompt: str | None = None) -> list[dict[str, Any]]:
        """The conversation of one text, as sentence-transformers builds it (an empty prompt is
        no prompt)."""
        user = {"role": "user", "content": self.content(text)}
        return [{"role": "system", "content": self.content(prompt)}, user] if prompt else [user]

    def render(self, text: str, prompt: str | None = None) -> str:
        return self.template.render(self.messages(text, prompt), self.add_generation_prompt,
                                    self.variables)


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
    message: MessageInputs | None = None  # None: texts are tokenized as they are, prompt in front

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
    st_cfg_path = folder / "config_sentence_transformers.json"
    if st_cfg_path.is_file() and (cfg := _read_json(st_cfg_path)) and isinstance(cfg, dict) \
            and cfg.get("model_type") == "CrossEncoder":
        return None  # a reranker: its settings are `classify.read_cross_encoder`'s
    modules = _read_json(modules_path)
    if not isinstance(modules, list):
        raise WeightLoadError(modules_path, "expected a list of modules")
    fields: dict[str, Any] = {}
    dense: list[DenseLayer] = []
    width: int | None = None  # the output size of the modules so far (after the first Dense)
    hf_cfg = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    for position, entry in enumerate(sorted(modules, key=lambda m: m.get("idx", 0))):
        kind = _class_name(str(entry.get("type", "")))
        sub = folder / str(entry.get("path", ""))
        if kind == "Transformer":
            if position != 0 or entry.get("path", ""):
                raise UnsupportedModelError(
                    f"{modules_path}: the Transformer module must come first and live in the "
                    "folder's root (where config.json and the weights are)")
            bert_path = sub / "sentence_bert_config.json"
            bert_cfg = _read_json(bert_path) if bert_path.is_file() else {}
            limit = bert_cfg.get("max_seq_length")
            fields["max_seq_length"] = int(limit) if limit else None
            fields["message"] = _message_inputs(bert_path, bert_cfg, hf_cfg.get("model_type"))
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
    for source in (st_cfg, hf_cfg):
        for key in MATRYOSHKA_KEYS:
            if isinstance(source.get(key), list) and not dims:
                dims = sorted({int(d) for d in source[key]})
    return SentenceTransformersConfig(dense=tuple(dense), prompts=prompts,
                                      default_prompt_name=default_name,
                                      matryoshka_dimensions=tuple(dims), **fields)


def _message_inputs(path: Path, cfg: dict[str, Any], model_type: str | None
                    ) -> MessageInputs | None:
    """How texts reach the model, from `modality_config`: through the chat template when it lists
    a `message` modality (sentence-transformers then converts every text to a message), as they
    are otherwise. Folders saved before sentence-transformers 6 have no `modality_config`: text."""
    modalities = cfg.get("modality_config")
    if modalities is None:
        return None
    if not isinstance(modalities, dict) or not all(isinstance(v, dict)
                                                   for v in modalities.values()):
        raise WeightLoadError(path, "'modality_config' must map each modality to an object with "
                              "'method' and 'method_output_name'")
    used = "message" if "message" in modalities else "text"
    if used not in modalities:
        raise UnsupportedModelError(
            f"{path}: the Transformer module takes no text (its modalities are "
            f"{sorted(modalities)}); this engine embeds text, through 'text' or 'message'")
    entry = modalities[used]
    if {k: entry.get(k) for k in TEXT_MODALITY_OUTPUT} != TEXT_MODALITY_OUTPUT:
        raise UnsupportedModelError(
            f"{path}: the {used!r} modality reads {entry.get('method')!r} -> "
            f"{entry.get('method_output_name')!r}; this engine pools the model's "
            f"{TEXT_MODALITY_OUTPUT['method']} -> {TEXT_MODALITY_OUTPUT['method_output_name']!r}")
    if used == "text":
        return None
    fmt = entry.get("format") or "auto"
    if fmt not in MESSAGE_FORMATS:
        raise UnsupportedModelError(f"{path}: the message format {fmt!r} is not one of "
                                    f"{list(MESSAGE_FORMATS)}")
    folder = path.parent
    bundle = tokenizer_from_hf_folder(folder)
    if not bundle.chat_template:
        raise WeightLoadError(path, "the 'message' modality renders each text through the "
                              "tokenizer's chat template, but the folder has none (in "
                              "tokenizer_config.json or chat_template.jinja)")
    if fmt == "auto":
        fmt = _infer_message_format(bundle.chat_template, model_type)
    settings = (cfg.get("processing_kwargs") or {}).get("chat_template") or {}
    if not isinstance(settings, dict):
        raise WeightLoadError(path, "processing_kwargs.chat_template must be an object of "
                              f"template variables; got {settings!r}")
    settings = dict(settings)
    variables = {"tools": None, "documents": None, **_special_tokens(folder)}
    add_generation_prompt = bool(settings.pop("add_generation_prompt", False))
    for key, value in settings.items():
        if key in CHAT_TEMPLATE_SIZE_KEYS:
            continue
        if key in CHAT_TEMPLATE_UNSUPPORTED_KEYS and value:
            raise UnsupportedModelError(
                f"{path}: processing_kwargs.chat_template sets {key!r}, which this engine does "
                "not support; it passes the template its variables and add_generation_prompt")
        variables[key] = value  # later keys win over the special tokens, as in transformers
    bos, eos = variables.pop("bos_token", ""), variables.pop("eos_token", "")
    taken = sorted(RESERVED_TEMPLATE_NAMES & variables.keys())
    if taken:
        raise UnsupportedModelError(f"{path}: processing_kwargs.chat_template may not set "
                                    f"{taken[0]!r}, which the renderer sets itself")
    try:
        template = ChatTemplate(bundle.chat_template, bos, eos)
    except Exception as e:  # jinja2's TemplateSyntaxError and the like
        raise WeightLoadError(folder, f"the chat template does not compile: {e}") from e
    return MessageInputs(fmt, template, add_generation_prompt, variables)


def _infer_message_format(template: str, model_type: str | None) -> str:
    """sentence-transformers' guess for "auto": known model types, else the template's reads."""
    if model_type in FLAT_MESSAGE_MODEL_TYPES:
        return "flat"
    return "structured" if any(m in template for m in STRUCTURED_TEMPLATE_MARKS) else "flat"


def _special_tokens(folder: Path) -> dict[str, str]:
    """The named special tokens tokenizer_config.json sets, as transformers passes them to a chat
    template (a string, or an object with the string as its `content`)."""
    path = folder / "tokenizer_config.json"
    cfg = _read_json(path) if path.is_file() else {}
    out = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = cfg.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[name] = value
    return out


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
