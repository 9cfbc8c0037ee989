"""One frozen config drives every model family.

The config is hashable so that it can be a static argument to `jax.jit`: each field is a compile-time
constant, and families differ by data, not by copies of the model code.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one this engine can run."""


# HF `model_type` -> family, and GGUF `general.architecture` -> family. Later families add rows here.
HF_MODEL_TYPES = {"llama": "llama"}
GGUF_ARCHITECTURES = {"llama": "llama"}

SUPPORTED_FAMILIES_TEXT = (
    "Llama 2/3 (HF model_type 'llama', GGUF architecture 'llama'; SmolLM2 is a Llama)"
)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rope frequency scaling: 'default', 'linear', 'llama3', or 'freq_factors'.

    'freq_factors' divides each inverse frequency by its own factor: this is how llama.cpp carries
    Llama 3 scaling in GGUF (the `rope_freqs` tensor) instead of the config fields.
    """

    kind: str = "default"
    freq_factors: tuple[float, ...] = ()
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


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
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def non_embedding_params(self) -> int:
        """Parameters touched per token by the decoder stack (the LM head and embedding excluded)."""
        d, f = self.hidden_size, self.intermediate_size
        attn = d * self.q_size + 2 * d * self.kv_size + self.q_size * d
        mlp = 3 * d * f
        return self.num_layers * (attn + mlp + 2 * d) + d

    # ---- constructors -------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a transformers `config.json` dict (classic or transformers-5 rope style)."""
        model_type = cfg.get("model_type")
        family = HF_MODEL_TYPES.get(model_type)
        if family is None:
            raise UnsupportedModelError(
                f"unsupported model_type {model_type!r} in config.json; supported: "
                f"{SUPPORTED_FAMILIES_TEXT}"
            )
        hidden = cfg["hidden_size"]
        heads = cfg["num_attention_heads"]
        rope = _hf_rope_params(cfg)
        return cls(
            family=family,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            intermediate_size=cfg["intermediate_size"],
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            rope_scaling=_rope_scaling(rope),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=_first_id(cfg.get("bos_token_id")),
            eos_token_id=_first_id(cfg.get("eos_token_id")),
        )

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], *, vocab_size: int, tied: bool) -> ModelConfig:
        """Build from GGUF metadata (keys as written by llama.cpp's converter)."""
        arch = meta.get("general.architecture")
        family = GGUF_ARCHITECTURES.get(arch)
        if family is None:
            raise UnsupportedModelError(
                f"unsupported GGUF general.architecture {arch!r}; supported: {SUPPORTED_FAMILIES_TEXT}"
            )

        def key(name: str, default: Any = None) -> Any:
            return meta.get(f"{arch}.{name}", default)

        hidden = int(key("embedding_length"))
        heads = int(key("attention.head_count"))
        kv_heads = int(key("attention.head_count_kv", heads))
        head_dim = int(key("attention.key_length", hidden // heads))
        rope: dict[str, Any] = {}
        if key("rope.scaling.type") in ("linear",):
            rope = {"rope_type": "linear", "factor": float(key("rope.scaling.factor", 1.0))}
        return cls(
            family=family,
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_layers=int(key("block_count")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=int(key("feed_forward_length")),
            max_position_embeddings=int(key("context_length", 2048)),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rope_scaling=_rope_scaling(rope),
            tie_word_embeddings=tied,
            bos_token_id=_opt_int(meta.get("tokenizer.ggml.bos_token_id")),
            eos_token_id=_opt_int(meta.get("tokenizer.ggml.eos_token_id")),
        )


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _hf_rope_params(cfg: dict[str, Any]) -> dict[str, Any]:
    """Merge the two config styles into one dict of rope settings.

    Classic: `rope_theta` and `rope_scaling` at the top level. transformers 5: `rope_parameters`
    holding `rope_theta`, `rope_type` and the scaling fields together.
    """
    merged: dict[str, Any] = {}
    if "rope_theta" in cfg:
        merged["rope_theta"] = cfg["rope_theta"]
    for key in ("rope_scaling", "rope_parameters"):
        if isinstance(cfg.get(key), dict):
            merged.update(cfg[key])
    if "type" in merged and "rope_type" not in merged:
        merged["rope_type"] = merged["type"]
    return merged


def _rope_scaling(rope: dict[str, Any]) -> RopeScaling:
    kind = rope.get("rope_type", "default") or "default"
    if kind == "default":
        return RopeScaling()
    if kind == "llama3":
        return RopeScaling(
            kind="llama3",
            factor=float(rope["factor"]),
            low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(rope["factor"]))
    raise UnsupportedModelError(f"unsupported rope scaling type {kind!r}")


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse rotary frequencies [head_dim // 2], scaled as transformers does for each rope type."""
    dim = cfg.head_dim
    # float32 throughout, as transformers computes it, so that angles at long positions agree.
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv = (np.float32(1.0) / (np.float32(cfg.rope_theta) ** exponent)).astype(np.float32)
    rs = cfg.rope_scaling
    if rs.kind == "linear":
        inv = inv / rs.factor
    elif rs.kind == "freq_factors":
        inv = inv / np.asarray(rs.freq_factors, dtype=np.float32)
    elif rs.kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)
