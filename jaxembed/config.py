"""One frozen config drives every model family.

The config is hashable so that it can be a static argument to `jax.jit`: each field is a compile-time
constant, and families differ by data (the flags below), not by copies of the model code.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

# The family table lives in `families`; its names are also importable from here.
from jaxembed.families import (  # noqa: F401
    DENSE,
    FAMILY_TRAITS,
    FULL,
    GGUF_ARCHITECTURES,
    HF_MODEL_TYPES,
    MOE,
    SLIDING,
    SUPPORTED_FAMILIES_TEXT,
    GGUFSource,
    HFSource,
    UnsupportedModelError,
    family_fields,
    first_id,
    opt_int,
)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rope frequency scaling.

    kind: 'default'; 'linear' (divide by `factor`); 'llama3' (Llama 3.1 banded scaling);
    'freq_factors' (divide each frequency by its own factor: how llama.cpp carries Llama 3 scaling in
    GGUF, the `rope_freqs` tensor); 'longrope' (Phi-3: `short_factor` or `long_factor` per
    sequence, by whether the sequence is longer than `original_max_position_embeddings`, and cos/sin
    scaled by `attention_factor`).
    """

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    freq_factors: tuple[float, ...] = ()
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # ---- variants ----
    norm_offset: float = 0.0  # gemma: x * (offset + w); GGUF stores gemma norms with the +1 baked in
    embed_scale: bool = False  # gemma: embeddings times sqrt(hidden)
    activation: str = "silu"  # "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    qkv_bias: bool = False  # qwen2, glm4
    qk_norm: bool = False  # qwen3, gemma3: RMSNorm over each head's q and k before rope
    sandwich_norm: bool = False  # gemma2/3, glm4: a norm after attention and after the MLP too
    rotary_dim: int = 0  # dims rotated per head (0: all); glm4 rotates half
    rope_interleaved: bool = False  # glm4 rotates pairs (x0, x1) instead of halves
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    rope_local_theta: float | None = None  # gemma3: the sliding layers' own base
    attn_softcap: float | None = None  # gemma2: tanh soft-capping of attention scores
    final_softcap: float | None = None  # gemma2: tanh soft-capping of the output logits
    query_scale: float = 0.0  # multiplier of q.k (0: head_dim ** -0.5)
    sliding_window: int | None = None
    causal: bool = True  # False: every token sees its whole sequence (EmbeddingGemma)
    layer_types: tuple[str, ...] = ()  # FULL or SLIDING per layer (empty: all FULL)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    mlp_layer_kinds: tuple[str, ...] = ()  # DENSE or MOE per layer (empty: all DENSE)

    def __post_init__(self) -> None:
        if not self.rotary_dim:
            object.__setattr__(self, "rotary_dim", self.head_dim)
        if not self.query_scale:
            object.__setattr__(self, "query_scale", self.head_dim**-0.5)
        if not self.layer_types:
            object.__setattr__(self, "layer_types", (FULL,) * self.num_layers)
        if not self.mlp_layer_kinds:
            object.__setattr__(self, "mlp_layer_kinds", (DENSE,) * self.num_layers)
        if len(self.layer_types) != self.num_layers or len(self.mlp_layer_kinds) != self.num_layers:
            raise ValueError("layer_types and mlp_layer_kinds need one entry per layer")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise ValueError("sliding layers need a sliding_window")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def n_dense(self) -> int:
        return self.mlp_layer_kinds.count(DENSE)

    @property
    def n_moe(self) -> int:
        return self.mlp_layer_kinds.count(MOE)

    def non_embedding_params(self) -> int:
        """Parameters touched per token by the decoder stack (active experts only; no LM head)."""
        d = self.hidden_size
        attn = d * self.q_size + 2 * d * self.kv_size + self.q_size * d
        dense = 3 * d * self.intermediate_size
        moe = 3 * d * self.moe_intermediate_size * self.num_experts_per_tok + d * self.num_experts
        return self.num_layers * attn + self.n_dense * dense + self.n_moe * moe

    # ---- constructors -------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a transformers `config.json` dict (classic or transformers-5 rope style)."""
        model_type = cfg.get("model_type")
        if model_type == "gemma3" and isinstance(cfg.get("text_config"), dict):
            cfg = {**cfg["text_config"], "model_type": "gemma3_text"}
        family = HF_MODEL_TYPES.get(model_type)
        if family is None:
            raise UnsupportedModelError(
                f"unsupported model_type {model_type!r} in config.json; supported: "
                f"{SUPPORTED_FAMILIES_TEXT}")
        traits = FAMILY_TRAITS[family]
        hidden = cfg["hidden_size"]
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or hidden // heads
        n_layers = cfg["num_hidden_layers"]
        rope = _hf_rope_params(cfg)
        rotary = float(rope.get("partial_rotary_factor", traits.partial_rotary_factor))
        base = dict(
            family=family, vocab_size=cfg["vocab_size"], hidden_size=hidden, num_layers=n_layers,
            num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim, intermediate_size=cfg.get("intermediate_size") or 0,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", traits.tied_embeddings)),
            bos_token_id=first_id(cfg.get("bos_token_id")),
            eos_token_id=first_id(cfg.get("eos_token_id")),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            rope_scaling=_rope_scaling(rope, cfg),
            rotary_dim=int(head_dim * rotary),
        )
        source = HFSource(cfg, rope, str(model_type))
        return cls(**base, **family_fields(traits, source, n_layers, head_dim))

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], *, vocab_size: int, tied: bool,
                  rope_factors: dict[str, tuple[float, ...]] | None = None) -> ModelConfig:
        """Build from GGUF metadata (keys as written by llama.cpp's converter).

        `rope_factors` carries the rope tensors some files hold (`rope_freqs`, Phi-3's
        `rope_factors_short` / `rope_factors_long`), keyed by those names.
        """
        arch = meta.get("general.architecture")
        family = GGUF_ARCHITECTURES.get(arch)
        if family is None:
            raise UnsupportedModelError(
                f"unsupported GGUF general.architecture {arch!r}; supported: "
                f"{SUPPORTED_FAMILIES_TEXT}")
        source = GGUFSource(meta, str(arch))
        key = source.key
        hidden = int(key("embedding_length"))
        heads = int(key("attention.head_count"))
        head_dim = int(key("attention.key_length", hidden // heads))
        n_layers = int(key("block_count"))
        kv = key("attention.head_count_kv", heads)
        kv = int(kv[0] if isinstance(kv, list | np.ndarray) else kv)  # one per layer
        factors = rope_factors or {}
        rope = RopeScaling()
        if key("rope.scaling.type") == "linear":
            rope = RopeScaling(kind="linear", factor=float(key("rope.scaling.factor", 1.0)))
        if "rope_freqs" in factors:
            rope = RopeScaling(kind="freq_factors", freq_factors=factors["rope_freqs"])
        if "rope_factors_long" in factors:
            rope = RopeScaling(
                kind="longrope", short_factor=factors["rope_factors_short"],
                long_factor=factors["rope_factors_long"],
                original_max_position_embeddings=int(key("rope.scaling.original_context_length")),
                attention_factor=float(key("rope.scaling.attn_factor", 1.0)))
        base = dict(
            family=family, vocab_size=vocab_size, hidden_size=hidden, num_layers=n_layers,
            num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
            intermediate_size=int(key("feed_forward_length", 0) or 0),
            max_position_embeddings=int(key("context_length", 2048)),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
            tie_word_embeddings=tied,
            bos_token_id=opt_int(meta.get("tokenizer.ggml.bos_token_id")),
            eos_token_id=opt_int(meta.get("tokenizer.ggml.eos_token_id")),
            rope_theta=float(key("rope.freq_base", 10000.0)), rope_scaling=rope,
            # llama.cpp rotates the whole head where the file gives no count.
            rotary_dim=int(key("rope.dimension_count", head_dim)),
        )
        return cls(**base, **family_fields(FAMILY_TRAITS[family], source, n_layers, head_dim))


def _hf_rope_params(cfg: dict[str, Any]) -> dict[str, Any]:
    """Merge the two config styles into one flat dict of rope settings.

    Classic: `rope_theta`, `rope_scaling` (with `type` or `rope_type`), `partial_rotary_factor`
    and `original_max_position_embeddings` at the top level. transformers 5: `rope_parameters`
    holding all of them together (for Gemma 3, one dict per layer type).
    """
    merged: dict[str, Any] = {}
    for key in ("rope_theta", "partial_rotary_factor", "original_max_position_embeddings"):
        if cfg.get(key) is not None:
            merged[key] = cfg[key]
    if cfg.get("rope_local_base_freq") is not None:
        merged["rope_local_theta"] = cfg["rope_local_base_freq"]
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per layer type (gemma3)
        merged.update(params.get("full_attention") or {})
        local = params.get("sliding_attention") or {}
        if "rope_theta" in local:
            merged["rope_local_theta"] = local["rope_theta"]
    elif isinstance(params, dict):
        merged.update(params)
    if isinstance(cfg.get("rope_scaling"), dict):
        merged.update(cfg["rope_scaling"])
    if "type" in merged and "rope_type" not in merged:
        merged["rope_type"] = merged["type"]
    return merged


def _rope_scaling(rope: dict[str, Any], cfg: dict[str, Any]) -> RopeScaling:
    kind = rope.get("rope_type", "default") or "default"
    if kind == "default":
        return RopeScaling()
    if kind == "llama3":
        return RopeScaling(
            kind="llama3", factor=float(rope["factor"]),
            low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(rope["factor"]))
    if kind in ("longrope", "su"):
        original = int(rope.get("original_max_position_embeddings")
                       or cfg["original_max_position_embeddings"])
        factor = rope.get("factor") or cfg.get("max_position_embeddings", original) / original
        attention = rope.get("attention_factor")
        if attention is None:
            attention = (1.0 if factor <= 1.0
                         else math.sqrt(1 + math.log(factor) / math.log(original)))
        return RopeScaling(
            kind="longrope", short_factor=tuple(float(f) for f in rope["short_factor"]),
            long_factor=tuple(float(f) for f in rope["long_factor"]),
            original_max_position_embeddings=original, attention_factor=float(attention))
    raise UnsupportedModelError(f"unsupported rope scaling type {kind!r}")


def rope_inv_freq(cfg: ModelConfig, theta: float | None = None, long: bool = False) -> np.ndarray:
    """Inverse rotary frequencies [rotary_dim // 2], scaled as transformers does for each type.

    `theta` overrides the base (Gemma 3's sliding layers); `long` picks long-rope's long factors.
    """
    dim = cfg.rotary_dim
    base = np.float32(cfg.rope_theta if theta is None else theta)
    # float32 throughout, as transformers computes it, so that angles at long positions agree.
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv = (np.float32(1.0) / (base**exponent)).astype(np.float32)
    rs = cfg.rope_scaling
    if theta is not None and theta != cfg.rope_theta:
        return inv  # local layers use plain rope
    if rs.kind == "linear":
        inv = inv / np.float32(rs.factor)
    elif rs.kind == "freq_factors":
        inv = inv / np.asarray(rs.freq_factors, dtype=np.float32)
    elif rs.kind == "longrope":
        ext = np.asarray(rs.long_factor if long else rs.short_factor, dtype=np.float32)
        inv = (np.float32(1.0) / (ext * base**exponent)).astype(np.float32)
    elif rs.kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)
