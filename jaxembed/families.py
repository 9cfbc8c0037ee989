"""The model families as data: one row of traits each, and where each format keeps what a row
leaves to the checkpoint.

`ModelConfig.from_hf` and `ModelConfig.from_gguf` both apply a family's row through
`family_fields`, so which families have which variant is written once, here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one this engine can run."""


# HF `model_type` -> family; GGUF `general.architecture` -> family.
HF_MODEL_TYPES = {
    "llama": "llama", "mistral": "mistral", "phi3": "phi3", "gemma": "gemma", "gemma2": "gemma2",
    "gemma3_text": "gemma3", "gemma3": "gemma3", "qwen2": "qwen2", "qwen3": "qwen3",
    "qwen3_moe": "qwen3_moe", "glm4": "glm4",
}
GGUF_ARCHITECTURES = {
    "llama": "llama", "phi3": "phi3", "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3",
    "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe", "glm4": "glm4",
}

SUPPORTED_FAMILIES_TEXT = (
    "Llama 2/3 (llama), Mistral (mistral; GGUF 'llama'), Phi-3 (phi3), Gemma (gemma), "
    "Gemma 2 (gemma2), Gemma 3 (gemma3_text; GGUF 'gemma3'), Qwen1.5/2/2.5 (qwen2), Qwen3 (qwen3), "
    "Qwen3-MoE (qwen3_moe; GGUF 'qwen3moe'), GLM4 (glm4)"
)

FULL, SLIDING = "full", "sliding"
DENSE, MOE = "dense", "moe"

# Which layers slide (FamilyTraits.layers).
LAYERS_FULL = "all_full"  # none; a window the checkpoint gives is ignored
LAYERS_WINDOWED = "windowed"  # all of them when the checkpoint gives a window (Mistral)
# Every `sliding_period`-th layer is full and the others slide, unless the checkpoint lists each
# layer's type (Gemma 2 and 3).
LAYERS_PERIODIC = "periodic"
# None, and a config that switches Qwen's sliding layers on (`use_sliding_window`) is refused.
LAYERS_REFUSE_WINDOW = "refuse_window"


@dataclasses.dataclass(frozen=True)
class FamilyTraits:
    """What sets one family apart, whichever format its checkpoint comes in.

    Both constructors apply a family's row through `family_fields`, so which families have which
    variant is written once. The formats differ only in where they read what a row leaves to the
    checkpoint (`HFSource`, `GGUFSource`), and in the fallbacks of transformers' and llama.cpp's
    own where a checkpoint says nothing.
    """

    qkv_bias: bool = False  # biases on the q, k and v projections
    qkv_bias_fixed: bool = False  # ...always: the family's config has no switch for them (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head's q and k before rope
    norm_offset: float = 0.0  # norms scale by (offset + w), as transformers stores w
    embed_scale: bool = False  # embeddings times sqrt(hidden)
    activation: str = "silu"
    sandwich_norm: bool = False  # a norm after attention and after the MLP too
    rope_interleaved: bool = False
    partial_rotary_factor: float = 1.0  # transformers' default, for a config.json without one
    tied_embeddings: bool = False  # transformers' default, for a config.json that does not say
    layers: str = LAYERS_FULL
    sliding_period: int = 0  # LAYERS_PERIODIC: every n-th layer is full
    period_configurable: bool = False  # config.json may set the period (`sliding_window_pattern`)
    gguf_window: int | None = None  # the window of a GGUF file that gives none (Gemma 2's)
    query_pre_attn_scalar: bool = False  # q.k is scaled by a scalar of its own, not head_dim
    # GGUF has no key for that scalar; it is head_dim but in the one size (27B) with this many
    # layers, which uses hidden / heads (llama.cpp hardcodes the same).
    wide_query_layers: int = 0
    softcaps: bool = False  # tanh soft-capping of attention scores and output logits
    # Set where sliding layers have a rope base of their own: the one they get if none is given.
    local_rope_theta: float | None = None
    bidirectional_switch: bool = False  # config.json may make attention bidirectional
    moe: bool = False  # routed experts in the MLP


FAMILY_TRAITS: dict[str, FamilyTraits] = {
    "llama": FamilyTraits(),
    "mistral": FamilyTraits(layers=LAYERS_WINDOWED),
    "phi3": FamilyTraits(),
    "gemma": FamilyTraits(norm_offset=1.0, embed_scale=True, activation="gelu_tanh",
                          tied_embeddings=True),
    "gemma2": FamilyTraits(
        norm_offset=1.0, embed_scale=True, activation="gelu_tanh", tied_embeddings=True,
        sandwich_norm=True, layers=LAYERS_PERIODIC, sliding_period=2, gguf_window=4096,
        query_pre_attn_scalar=True, wide_query_layers=46, softcaps=True),
    "gemma3": FamilyTraits(
        norm_offset=1.0, embed_scale=True, activation="gelu_tanh", tied_embeddings=True,
        sandwich_norm=True, layers=LAYERS_PERIODIC, sliding_period=6, period_configurable=True,
        gguf_window=4096, query_pre_attn_scalar=True, wide_query_layers=62, softcaps=True,
        qk_norm=True, local_rope_theta=10000.0, bidirectional_switch=True),
    "qwen2": FamilyTraits(qkv_bias=True, qkv_bias_fixed=True, layers=LAYERS_REFUSE_WINDOW),
    "qwen3": FamilyTraits(qk_norm=True, layers=LAYERS_REFUSE_WINDOW),
    "qwen3_moe": FamilyTraits(qk_norm=True, layers=LAYERS_REFUSE_WINDOW, moe=True),
    "glm4": FamilyTraits(qkv_bias=True, sandwich_norm=True, rope_interleaved=True,
                         partial_rotary_factor=0.5),
}


# ---- what a family's row leaves to the checkpoint -----------------------------------------------


class _Source(Protocol):
    """Where one checkpoint format keeps each setting a FamilyTraits row leaves to the checkpoint.

    Past the first two, a method is called only for a family whose row has the trait, so a format
    is never asked for a setting its family does not have.
    """

    name: str  # the checkpoint's own name for its architecture, for messages

    def qkv_bias(self) -> bool | None: ...  # None: the format has no switch

    def norm_offset(self, offset: float) -> float: ...

    def window(self, fallback: int | None) -> Any: ...

    def sliding_switched_on(self) -> bool: ...

    def layer_types(self) -> list[str] | None: ...

    def sliding_period(self, period: int) -> int: ...

    def query_pre_attn_scalar(self, traits: FamilyTraits, n_layers: int, head_dim: int
                              ) -> float: ...

    def softcaps(self) -> tuple[Any, Any]: ...

    def local_rope_theta(self, theta: float) -> float: ...

    def bidirectional(self) -> bool: ...

    def moe_fields(self, n_layers: int) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class HFSource:
    """A transformers config.json (with its rope settings merged by `_hf_rope_params`)."""

    cfg: dict[str, Any]
    rope: dict[str, Any]
    name: str

    def qkv_bias(self) -> bool | None:
        # A config.json without the key is read as no biases, transformers' default for most
        # families; the configs transformers writes always carry it.
        return bool(self.cfg.get("attention_bias", False))

    def norm_offset(self, offset: float) -> float:
        return offset

    def window(self, fallback: int | None) -> Any:
        # No fallback: transformers writes the window into every config of a family that has one.
        return self.cfg.get("sliding_window")

    def sliding_switched_on(self) -> bool:
        return bool(self.cfg.get("use_sliding_window") and self.cfg.get("sliding_window"))

    def layer_types(self) -> list[str] | None:
        return self.cfg.get("layer_types")

    def sliding_period(self, period: int) -> int:
        return int(self.cfg.get("sliding_window_pattern", period))

    def query_pre_attn_scalar(self, traits: FamilyTraits, n_layers: int, head_dim: int) -> float:
        return float(self.cfg.get("query_pre_attn_scalar", head_dim))

    def softcaps(self) -> tuple[Any, Any]:
        return self.cfg.get("attn_logit_softcapping"), self.cfg.get("final_logit_softcapping")

    def local_rope_theta(self, theta: float) -> float:
        return float(self.rope.get("rope_local_theta", theta))

    def bidirectional(self) -> bool:
        return bool(self.cfg.get("use_bidirectional_attention"))

    def moe_fields(self, n_layers: int) -> dict[str, Any]:
        cfg = self.cfg
        n_exp = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
        step = int(cfg.get("decoder_sparse_step") or 1)
        dense_only = set(cfg.get("mlp_only_layers") or [])
        return dict(
            num_experts=n_exp, num_experts_per_tok=int(cfg["num_experts_per_tok"]),
            moe_intermediate_size=int(cfg["moe_intermediate_size"]),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            mlp_layer_kinds=tuple(
                MOE if n_exp > 0 and i not in dense_only and (i + 1) % step == 0 else DENSE
                for i in range(n_layers)))


@dataclasses.dataclass(frozen=True)
class GGUFSource:
    """GGUF metadata, as llama.cpp's converter writes it and llama.cpp reads it."""

    meta: dict[str, Any]
    name: str  # general.architecture, the prefix of the model's keys

    def key(self, name: str, default: Any = None) -> Any:
        return self.meta.get(f"{self.name}.{name}", default)

    def qkv_bias(self) -> bool | None:
        return None

    def norm_offset(self, offset: float) -> float:
        # The converter bakes gemma's +1 into the norm weights: a plain x * w norm here.
        return 0.0

    def window(self, fallback: int | None) -> Any:
        return self.key("attention.sliding_window") or fallback

    def sliding_switched_on(self) -> bool:
        return False  # the converter writes no such switch

    def layer_types(self) -> list[str] | None:
        return None  # llama.cpp derives them from the period

    def sliding_period(self, period: int) -> int:
        return period  # llama.cpp hardcodes it

    def query_pre_attn_scalar(self, traits: FamilyTraits, n_layers: int, head_dim: int) -> float:
        if n_layers == traits.wide_query_layers:
            return int(self.key("embedding_length")) / int(self.key("attention.head_count"))
        return head_dim

    def softcaps(self) -> tuple[Any, Any]:
        return (opt_float(self.key("attn_logit_softcapping")),
                opt_float(self.key("final_logit_softcapping")))

    def local_rope_theta(self, theta: float) -> float:
        # Older converters write no local rope base; the row's is every Gemma 3's.
        return float(self.key("rope.freq_base_swa", theta))

    def bidirectional(self) -> bool:
        return False

    def moe_fields(self, n_layers: int) -> dict[str, Any]:
        # llama.cpp's qwen3moe has experts in every layer and always renormalizes the top k.
        return dict(
            num_experts=int(self.key("expert_count", 0)),
            num_experts_per_tok=int(self.key("expert_used_count", 0)),
            moe_intermediate_size=int(self.key("expert_feed_forward_length", 0)),
            norm_topk_prob=True, mlp_layer_kinds=(MOE,) * n_layers)


def family_fields(traits: FamilyTraits, source: _Source, n_layers: int, head_dim: int
                   ) -> dict[str, Any]:
    """The ModelConfig fields a family's row sets, each read from `source` where it may vary."""
    bias = source.qkv_bias()
    fields: dict[str, Any] = dict(
        qkv_bias=traits.qkv_bias if traits.qkv_bias_fixed or bias is None else bias,
        qk_norm=traits.qk_norm, norm_offset=source.norm_offset(traits.norm_offset),
        embed_scale=traits.embed_scale, activation=traits.activation,
        sandwich_norm=traits.sandwich_norm, rope_interleaved=traits.rope_interleaved,
        **_layer_fields(traits, source, n_layers))
    if traits.query_pre_attn_scalar:
        fields["query_scale"] = source.query_pre_attn_scalar(traits, n_layers, head_dim) ** -0.5
    if traits.softcaps:
        fields["attn_softcap"], fields["final_softcap"] = source.softcaps()
    if traits.local_rope_theta is not None:
        fields["rope_local_theta"] = source.local_rope_theta(traits.local_rope_theta)
    if traits.bidirectional_switch and source.bidirectional():
        # transformers halves the window of bidirectional models (it looks both ways): tokens
        # closer than window // 2 + 1 see each other.
        fields.update(causal=False, sliding_window=fields["sliding_window"] // 2 + 1)
    if traits.moe:
        fields.update(source.moe_fields(n_layers))
    return fields


def _layer_fields(traits: FamilyTraits, source: _Source, n_layers: int) -> dict[str, Any]:
    """`sliding_window` and `layer_types` by the family's rule (the LAYERS_* constants)."""
    if traits.layers == LAYERS_WINDOWED:
        window = source.window(traits.gguf_window)
        return dict(sliding_window=int(window), layer_types=(SLIDING,) * n_layers) if window else {}
    if traits.layers == LAYERS_REFUSE_WINDOW and source.sliding_switched_on():
        raise UnsupportedModelError(f"{source.name} with use_sliding_window is not supported")
    if traits.layers != LAYERS_PERIODIC:
        return {}
    types = source.layer_types()
    if not types:
        period = traits.sliding_period
        if traits.period_configurable:
            period = source.sliding_period(period)
        types = _periodic_layer_types(period, n_layers)
    return dict(sliding_window=int(source.window(traits.gguf_window)),
                layer_types=tuple(SLIDING if "sliding" in t else FULL for t in types))


def _periodic_layer_types(period: int, n_layers: int) -> list[str]:
    """Every `period`-th layer full, the others sliding (Gemma 2: 2, alternating; Gemma 3: 6)."""
    return [FULL if (i + 1) % period == 0 else SLIDING for i in range(n_layers)]


def first_id(value: Any) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def opt_float(value: Any) -> float | None:
    return None if value is None else float(value)
