"""Tiny random models of every supported family, saved as safetensors and written as GGUF.

Each family is built with transformers with every variant it can have switched on, so a variant the
engine ignores changes the output. The GGUF writer follows llama.cpp's converter
(convert_hf_to_gguf.py): its tensor names (from gguf's TensorNameMap), its per-family transforms
(q/k row permutation for the Llama architecture, +1 on Gemma norms, stacked experts), and the
metadata keys it writes for each architecture.

Three builds exist per family:

- "full": every variant on; the safetensors tests use it.
- "gguf": the variants a GGUF file cannot carry are switched off (llama.cpp derives or hardcodes
  them), so that a GGUF written from it describes exactly the same model.
- "check": additionally, every field that transformers' GGUF reader drops is left at the value that
  reader falls back to, so transformers-from-GGUF must equal transformers-from-safetensors. This
  checks the writer's transforms independently of the engine.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from tiny_models import (
    LLAMA3_ROPE,
    _add_bpe_tokenizer,
    llama_permute,
    reinit_,
    train_tokenizer,
)
from tiny_models import to_classic_config as _to_classic_rope

Q = gguf.GGMLQuantizationType
BUILDS = ("full", "gguf", "check")

COMMON: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=0,
    pad_token_id=0,
)

WINDOW = 16  # sliding windows shorter than the test inputs, so they mask something
PHI3_ORIGINAL_CONTEXT = 32  # longrope switches to the long factors past this many positions

# Phi-3 long-rope factors, one per rotary frequency (head_dim 16 -> 8): none equal to 1, and long
# ones larger than short ones, as in the real checkpoints.
PHI3_SHORT_FACTOR = [1.02, 1.05, 1.1, 1.2, 1.35, 1.5, 1.7, 1.9]
PHI3_LONG_FACTOR = [1.1, 1.3, 1.8, 2.6, 3.7, 5.0, 6.4, 8.0]


def default_rope(theta: float, **extra: Any) -> dict[str, Any]:
    return {"rope_type": "default", "rope_theta": theta, **extra}


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """How to build one family, and which of its fields GGUF and transformers' GGUF reader keep."""

    name: str
    hf_config: str  # transformers config class
    model_type: str  # HF model_type written in config.json
    arch: gguf.MODEL_ARCH
    config: dict[str, Any]  # config kwargs with every variant switched on
    variants: tuple[str, ...]  # what `config` switches on, for readers
    # Variants a GGUF file cannot carry: llama.cpp hardcodes or derives them.
    gguf_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Fields transformers' GGUF reader drops, set to what it falls back to (its config defaults).
    transformers_gguf_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The key naming the scaling kind in a classic `rope_scaling` ("type" in Phi-3 checkpoints).
    classic_scaling_key: str = "rope_type"

    @property
    def norm_plus_one(self) -> bool:
        """Gemma's RMSNorm scales by (1 + w) rather than w."""
        return self.name.startswith("gemma")

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]

    def kwargs(self, build: str) -> dict[str, Any]:
        if build not in BUILDS:
            raise ValueError(f"unknown build {build!r}; one of {BUILDS}")
        kw = copy.deepcopy({**COMMON, **self.config})
        if build in ("gguf", "check"):
            kw.update(copy.deepcopy(self.gguf_overrides))
        if build == "check":
            kw.update(copy.deepcopy(self.transformers_gguf_overrides))
        return kw


SPECS: dict[str, FamilySpec] = {
    spec.name: spec for spec in (
        FamilySpec(
            "llama", "LlamaConfig", "llama", gguf.MODEL_ARCH.LLAMA,
            dict(num_hidden_layers=3, head_dim=16, tie_word_embeddings=False,
                 rope_parameters=dict(LLAMA3_ROPE)),
            variants=("llama3_rope",),
            transformers_gguf_overrides=dict(rope_parameters=default_rope(10000.0)),
        ),
        FamilySpec(
            "mistral", "MistralConfig", "mistral", gguf.MODEL_ARCH.LLAMA,
            dict(num_hidden_layers=3, head_dim=16, tie_word_embeddings=False,
                 sliding_window=WINDOW, rope_parameters=default_rope(1_000_000.0)),
            variants=("sliding_window",),
            # The converter writes Mistral as the llama architecture, which has no window key.
            gguf_overrides=dict(sliding_window=None),
        ),
        FamilySpec(
            "phi3", "Phi3Config", "phi3", gguf.MODEL_ARCH.PHI3,
            dict(num_hidden_layers=3, tie_word_embeddings=False,
                 original_max_position_embeddings=PHI3_ORIGINAL_CONTEXT,
                 rope_parameters={
                     "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
                     "short_factor": PHI3_SHORT_FACTOR, "long_factor": PHI3_LONG_FACTOR,
                     "original_max_position_embeddings": PHI3_ORIGINAL_CONTEXT}),
            variants=("fused_qkv", "fused_gate_up", "longrope"),
            transformers_gguf_overrides=dict(
                rope_parameters=default_rope(10000.0, partial_rotary_factor=1.0)),
            classic_scaling_key="type",
        ),
        FamilySpec(
            "gemma", "GemmaConfig", "gemma", gguf.MODEL_ARCH.GEMMA,
            # Gemma's GGUF has no rope base key (llama.cpp uses 10000), so keep the default.
            dict(num_hidden_layers=3, head_dim=32, hidden_act="gelu_pytorch_tanh",
                 tie_word_embeddings=True, rope_parameters=default_rope(10000.0)),
            variants=("gelu_tanh", "norm_plus_one", "embed_scale", "head_dim_32"),
        ),
        FamilySpec(
            "gemma2", "Gemma2Config", "gemma2", gguf.MODEL_ARCH.GEMMA2,
            dict(num_hidden_layers=4, head_dim=32, hidden_activation="gelu_pytorch_tanh",
                 tie_word_embeddings=True, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                 final_logit_softcapping=3.0, sliding_window=WINDOW,
                 rope_parameters=default_rope(10000.0)),
            variants=("attn_softcap", "final_softcap", "query_pre_attn_scalar",
                      "alternating_sliding_window", "sandwich_norms", "norm_plus_one"),
            # llama.cpp scales scores by head_dim**-0.5 (hidden/heads only for the 27B size).
            gguf_overrides=dict(query_pre_attn_scalar=32),
            transformers_gguf_overrides=dict(query_pre_attn_scalar=256,
                                             attn_logit_softcapping=50.0,
                                             final_logit_softcapping=30.0),
        ),
        FamilySpec(
            "gemma3", "Gemma3TextConfig", "gemma3_text", gguf.MODEL_ARCH.GEMMA3,
            # Six layers: Gemma 3's pattern of five sliding layers then one global layer, which is
            # also the pattern llama.cpp hardcodes for this architecture.
            dict(num_hidden_layers=6, head_dim=32, hidden_activation="gelu_pytorch_tanh",
                 tie_word_embeddings=True, query_pre_attn_scalar=24, sliding_window=WINDOW,
                 layer_types=["sliding_attention"] * 5 + ["full_attention"],
                 rope_parameters={"full_attention": default_rope(500_000.0),
                                  "sliding_attention": default_rope(20_000.0)}),
            variants=("qk_norm", "sandwich_norms", "sliding_5_to_1", "local_rope_base",
                      "query_pre_attn_scalar", "norm_plus_one"),
            # llama.cpp hardcodes the local rope base (10000) and scales by head_dim**-0.5.
            gguf_overrides=dict(query_pre_attn_scalar=32,
                                rope_parameters={"full_attention": default_rope(500_000.0),
                                                 "sliding_attention": default_rope(10_000.0)}),
            transformers_gguf_overrides=dict(query_pre_attn_scalar=256),
        ),
        FamilySpec(
            "qwen2", "Qwen2Config", "qwen2", gguf.MODEL_ARCH.QWEN2,
            dict(num_hidden_layers=3, tie_word_embeddings=False,
                 rope_parameters=default_rope(1_000_000.0)),
            variants=("qkv_bias",),
        ),
        FamilySpec(
            "qwen3", "Qwen3Config", "qwen3", gguf.MODEL_ARCH.QWEN3,
            dict(num_hidden_layers=3, head_dim=24, tie_word_embeddings=False,
                 rope_parameters=default_rope(1_000_000.0)),
            variants=("qk_norm", "head_dim_24"),
            # Qwen3Config's default head_dim, which transformers' GGUF reader leaves in place.
            transformers_gguf_overrides=dict(head_dim=128),
        ),
        FamilySpec(
            "qwen3_moe", "Qwen3MoeConfig", "qwen3_moe", gguf.MODEL_ARCH.QWEN3MOE,
            dict(num_hidden_layers=3, head_dim=24, tie_word_embeddings=False, num_experts=4,
                 num_experts_per_tok=2, norm_topk_prob=True, moe_intermediate_size=64,
                 decoder_sparse_step=1, mlp_only_layers=[1],
                 rope_parameters=default_rope(1_000_000.0)),
            variants=("moe_top2_of_4", "norm_topk_prob", "moe_intermediate_size",
                      "dense_layer_among_sparse", "qk_norm", "head_dim_24"),
            # llama.cpp's qwen3moe has no dense layers.
            gguf_overrides=dict(mlp_only_layers=[]),
            transformers_gguf_overrides=dict(moe_intermediate_size=768),
        ),
        FamilySpec(
            "glm4", "Glm4Config", "glm4", gguf.MODEL_ARCH.GLM4,
            dict(num_hidden_layers=3, head_dim=16, tie_word_embeddings=False,
                 attention_bias=True,
                 rope_parameters=default_rope(10000.0, partial_rotary_factor=0.5)),
            variants=("partial_rotary_0.5", "interleaved_rope", "qkv_bias", "fused_gate_up",
                      "sandwich_norms"),
        ),
    )
}
FAMILY_NAMES = tuple(SPECS)
MODEL_TYPE_TO_FAMILY = {s.model_type: s.name for s in SPECS.values()}


# ---- safetensors ------------------------------------------------------------------------------


@functools.cache
def tokenizer_json() -> str:
    return train_tokenizer().to_str()


def build_family(family: str, folder: Path, seed: int = 0, build: str = "full",
                 **overrides: Any) -> Path:
    """Save a tiny random model of `family` (safetensors, config.json, tokenizer.json).

    `build` picks the variants (see the module docstring); `overrides` change config kwargs last.
    """
    import transformers

    spec = SPECS[family]
    tok_json = tokenizer_json()
    vocab = len(json.loads(tok_json)["model"]["vocab"])
    kwargs = {**spec.kwargs(build), "vocab_size": vocab, **overrides}
    cfg = getattr(transformers, spec.hf_config)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    reinit_(model, seed)
    if spec.norm_plus_one:
        # Gemma's norms multiply by (1 + w): store w around 0 so the scale is around 1 but not 1,
        # as for the other families. A scale around 2 at every norm makes these deep tiny models
        # so sensitive that bf16 rounding alone moves the pooled vector by more than 1e-3.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.sub_(1.0)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer.json").write_text(tok_json)
    return folder


def family_of(folder: Path) -> str:
    return MODEL_TYPE_TO_FAMILY[json.loads((folder / "config.json").read_text())["model_type"]]


def to_classic_config(folder: Path) -> None:
    """Rewrite config.json as checkpoints made before transformers 5 have it, for its family.

    Besides the rope settings, Qwen3-MoE checkpoints on the hub name the expert count
    `num_experts`, which transformers 5 saves as `num_local_experts`.
    """
    _to_classic_rope(folder, scaling_key=SPECS[family_of(folder)].classic_scaling_key)
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    if cfg["model_type"] == "qwen3_moe" and "num_local_experts" in cfg:
        cfg["num_experts"] = cfg.pop("num_local_experts")
        path.write_text(json.dumps(cfg, indent=2))


def rope_params(cfg: dict[str, Any], layer_type: str = "full_attention") -> dict[str, Any]:
    """The rope settings of a transformers-5 config.json, for one layer type."""
    params = cfg.get("rope_parameters") or {}
    return params.get(layer_type, params)


# ---- GGUF ------------------------------------------------------------------------------------


def _file_type(qtype: Q) -> gguf.LlamaFileType:
    """`general.file_type` as the converter writes it for an output type."""
    if qtype == Q.F32:
        return gguf.LlamaFileType.ALL_F32
    return gguf.LlamaFileType[f"MOSTLY_{qtype.name}"]


def _head_dim(cfg: dict[str, Any]) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def _num_experts(cfg: dict[str, Any]) -> int | None:
    # transformers 5 saves `num_local_experts`; hub checkpoints say `num_experts`.
    return cfg.get("num_local_experts") or cfg.get("num_experts")


def _base_metadata(w: gguf.GGUFWriter, cfg: dict[str, Any]) -> None:
    """The keys the converter's TextModel.set_gguf_parameters writes for a config."""
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    params = cfg.get("rope_parameters") or {}
    full = params.get("full_attention", params)
    if "rope_theta" in full:
        w.add_rope_freq_base(float(full["rope_theta"]))
    if "rope_theta" in params.get("sliding_attention", {}):
        w.add_rope_freq_base_swa(float(params["sliding_attention"]["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if (n_experts := _num_experts(cfg)) is not None:
        w.add_expert_count(n_experts)
    if cfg.get("num_experts_per_tok") is not None:
        w.add_expert_used_count(cfg["num_experts_per_tok"])
    if cfg.get("head_dim") is not None:
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])


def _gemma_metadata(w: gguf.GGUFWriter, cfg: dict[str, Any]) -> None:
    """GemmaModel / Gemma2Model.set_gguf_parameters: no rope keys at all."""
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    if cfg["model_type"] == "gemma2":
        w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
        w.add_sliding_window(cfg["sliding_window"])


def _phi3_metadata(w: gguf.GGUFWriter, cfg: dict[str, Any]) -> None:
    """Phi3MiniModel.set_gguf_parameters (it does not call the base method)."""
    rope = cfg["rope_parameters"]
    rope_dims = int(rope.get("partial_rotary_factor", 1.0) * cfg["hidden_size"]) // cfg[
        "num_attention_heads"]
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_rope_scaling_orig_ctx_len(_phi3_original_context(cfg))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(rope_dims)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    # The converter writes 0 for "no window" (it tells Phi-4 from other Phi-3 models).
    w.add_sliding_window(cfg.get("sliding_window") or 0)
    if rope.get("long_factor"):
        orig = _phi3_original_context(cfg)
        scale = cfg["max_position_embeddings"] / orig
        w.add_rope_scaling_attn_factors(
            math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0)


def _phi3_original_context(cfg: dict[str, Any]) -> int:
    rope = cfg.get("rope_parameters") or {}
    return int(rope.get("original_max_position_embeddings")
               or cfg.get("original_max_position_embeddings"))


def _metadata(w: gguf.GGUFWriter, family: str, cfg: dict[str, Any]) -> None:
    if family in ("gemma", "gemma2"):
        _gemma_metadata(w, cfg)
    elif family == "phi3":
        _phi3_metadata(w, cfg)
    else:
        _base_metadata(w, cfg)
    if family in ("llama", "mistral"):  # LlamaModel.set_gguf_parameters
        w.add_vocab_size(cfg["vocab_size"])
        w.add_rope_dimension_count(_head_dim(cfg))
    elif family == "gemma3":
        # Gemma3Model re-adds several keys with Gemma defaults; with a full config they are the
        # same values. It writes the window unless the pattern is 1 (no sliding layers).
        w.add_sliding_window(cfg["sliding_window"])
        if cfg.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    elif family == "qwen3_moe":  # Qwen2MoeModel.set_gguf_parameters
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    elif family == "glm4":
        w.add_rope_dimension_count(
            int(_head_dim(cfg) * rope_params(cfg).get("partial_rotary_factor", 0.5)))


def _llama3_rope_factors(cfg: dict[str, Any]) -> np.ndarray | None:
    """LlamaModel.generate_extra_tensors: Llama 3 scaling as per-frequency divisors."""
    rope = rope_params(cfg)
    if rope.get("rope_type") != "llama3":
        return None
    dim = _head_dim(cfg)
    base = rope.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def gguf_tensors(family: str, cfg: dict[str, Any], tensors: dict[str, np.ndarray]
                 ) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every tensor the converter writes, in its layout."""
    spec = SPECS[family]
    n_layers = cfg["num_hidden_layers"]
    name_map = gguf.get_tensor_name_map(spec.arch, n_layers)
    experts: dict[tuple[int, str], dict[int, np.ndarray]] = {}

    def mapped(hf_name: str, arr: np.ndarray) -> tuple[str, np.ndarray]:
        gname = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise KeyError(f"no GGUF name for {hf_name} in the {spec.arch_name} architecture")
        return gname, arr

    for hf_name, arr in tensors.items():
        arr = arr.astype(np.float32)
        if spec.norm_plus_one:
            if hf_name == "lm_head.weight":
                continue  # Gemma is tied; the converter skips a saved head
            if hf_name.endswith("norm.weight"):
                arr = arr + 1  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp by w
        if family in ("llama", "mistral"):
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                arr = llama_permute(arr, cfg["num_attention_heads"])
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                arr = llama_permute(arr, cfg["num_key_value_heads"])
        if hf_name == "score.weight":  # a sequence classifier's head: a rank model's
            yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.CLS_OUT] + ".weight", arr
            continue
        parts = hf_name.split(".")
        if family == "qwen3_moe" and "experts" in parts:
            # model.layers.{b}.mlp.experts.{e}.{w}.weight: stacked per layer into [E, out, in].
            layer, expert, which = int(parts[2]), int(parts[5]), parts[6]
            experts.setdefault((layer, which), {})[expert] = arr
            continue
        yield mapped(hf_name, arr)

    for (layer, which), per_expert in sorted(experts.items()):
        stacked = np.stack([per_expert[e] for e in range(_num_experts(cfg))])
        yield mapped(f"model.layers.{layer}.mlp.experts.{which}.weight", stacked)

    if family in ("llama", "mistral") and (factors := _llama3_rope_factors(cfg)) is not None:
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors
    if family == "phi3" and (rope := cfg["rope_parameters"]).get("long_factor"):
        yield (gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight",
               np.asarray(rope["long_factor"], np.float32))
        yield (gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight",
               np.asarray(rope["short_factor"], np.float32))


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo `llama_permute`: GGML-interleaved rope rows back to HF half-split ones."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantized_folder(gguf_path: Path, hf_folder: Path, out: Path) -> Path:
    """An HF folder holding the GGUF file's weights, dequantized and back in HF layout.

    Config and tokenizer come from `hf_folder` (the folder the file was written from), so
    transformers runs exactly the weights a quantized file carries even where its GGUF reader drops
    a config field.
    """
    from safetensors.numpy import load_file, save_file

    cfg = json.loads((hf_folder / "config.json").read_text())
    family = MODEL_TYPE_TO_FAMILY[cfg["model_type"]]
    spec = SPECS[family]
    hf_names = list(load_file(str(hf_folder / "model.safetensors")))
    name_map = gguf.get_tensor_name_map(spec.arch, cfg["num_hidden_layers"])
    to_hf = {name_map.get_name(n, try_suffixes=(".weight", ".bias")): n for n in hf_names}
    tensors: dict[str, np.ndarray] = {}
    for t in gguf.GGUFReader(gguf_path).tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        data = data.reshape(tuple(int(n) for n in reversed(t.shape)))
        if t.name.startswith(("rope_freqs.", "rope_factors_")):
            continue  # the config carries these
        if "_exps." in t.name:  # blk.{b}.ffn_{w}_exps.weight: [E, out, in]
            layer, which = t.name.split(".")[1], t.name.split(".")[2].split("_")[1]
            for e in range(data.shape[0]):
                tensors[f"model.layers.{layer}.mlp.experts.{e}.{which}_proj.weight"] = data[e]
            continue
        name = to_hf[t.name]
        if family in ("llama", "mistral") and ".attn_q." in t.name:
            data = unpermute(data, cfg["num_attention_heads"])
        elif family in ("llama", "mistral") and ".attn_k." in t.name:
            data = unpermute(data, cfg["num_key_value_heads"])
        elif spec.norm_plus_one and name.endswith("norm.weight"):
            data = data - 1
        tensors[name] = np.ascontiguousarray(data)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for extra in ("config.json", "tokenizer.json"):
        (out / extra).write_bytes((hf_folder / extra).read_bytes())
    return out


def _keeps_f32(name: str, arr: np.ndarray) -> bool:
    """The converter's rule: 1-D tensors, norms and the MoE router stay F32 at any output type."""
    return arr.ndim <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name


def write_family_gguf(hf_folder: Path, out: Path, qtype: Q = Q.F32,
                      transform: Callable[[str, np.ndarray], np.ndarray] | None = None,
                      extra: Callable[[gguf.GGUFWriter], None] | None = None) -> Path:
    """Write the HF folder's weights, config and tokenizer as llama.cpp's converter would.

    Matrices become `qtype` (F16 where a row does not fit the quant blocks, as the converter falls
    back); 1-D tensors, norms and routers stay F32. `transform(name, array)` may alter a tensor
    (to build deliberately broken files); `extra(writer)` may add keys and tensors.
    """
    from safetensors.numpy import load_file

    cfg = json.loads((hf_folder / "config.json").read_text())
    family = MODEL_TYPE_TO_FAMILY[cfg["model_type"]]
    tensors = load_file(str(hf_folder / "model.safetensors"))
    tok = json.loads((hf_folder / "tokenizer.json").read_text())

    w = gguf.GGUFWriter(str(out), SPECS[family].arch_name)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(hf_folder.name)
    _metadata(w, family, cfg)
    w.add_file_type(_file_type(qtype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_bpe_tokenizer(w, tok, cfg)

    for name, arr in gguf_tensors(family, cfg, tensors):
        if transform is not None:
            arr = transform(name, arr)
        if qtype == Q.F32 or _keeps_f32(name, arr):
            w.add_tensor(name, arr.astype(np.float32))
            continue
        try:
            data, raw = gguf.quants.quantize(arr, qtype), qtype
        except gguf.QuantError:
            data, raw = gguf.quants.quantize(arr, Q.F16), Q.F16
        w.add_tensor(name, data, raw_dtype=raw)
    if extra is not None:
        extra(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
