"""The family table and the two constructors that apply it: they must not drift apart.

Each family's row in `FAMILY_TRAITS` is applied by `ModelConfig.from_hf` and `ModelConfig.from_gguf`
alike. These tests feed both the same model (a config.json and the metadata llama.cpp's converter
writes for it) and require the same config, field for field; and they hold each row to what the
constructors actually build, so that a constructor that treats a family otherwise than its row
says, or than the other constructor does, fails here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from jaxembed.config import ModelConfig, UnsupportedModelError
from jaxembed.families import (
    FAMILY_TRAITS,
    FULL,
    GGUF_ARCHITECTURES,
    HF_MODEL_TYPES,
    LAYERS_FULL,
    LAYERS_PERIODIC,
    LAYERS_REFUSE_WINDOW,
    LAYERS_WINDOWED,
    SLIDING,
)

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 32  # head_dim != hidden / heads, as in Gemma
WINDOW, LOCAL_THETA, SOFTCAPS = 16, 10000.0, (50.0, 30.0)
EXPERTS, EXPERTS_PER_TOK, EXPERT_FFN = 4, 2, 32

# The first model_type / architecture naming each family (gemma3: "gemma3_text").
MODEL_TYPE = {family: mt for mt, family in reversed(HF_MODEL_TYPES.items())}
ARCH = {family: arch for arch, family in reversed(GGUF_ARCHITECTURES.items())}
GGUF_FAMILIES = sorted(ARCH)


def query_scalar(family: str, n_layers: int) -> float:
    """What a real config.json holds: head_dim, but hidden / heads for the 27B Gemmas."""
    wide = FAMILY_TRAITS[family].wide_query_layers
    return HIDDEN / HEADS if n_layers == wide else HEAD_DIM


def hf_config(family: str, n_layers: int, **changes: Any) -> dict[str, Any]:
    """A config.json carrying every setting any family reads, whichever family it is."""
    traits = FAMILY_TRAITS[family]
    cfg = dict(
        model_type=MODEL_TYPE[family], vocab_size=100, hidden_size=HIDDEN,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        num_hidden_layers=n_layers, intermediate_size=128, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        rope_theta=500_000.0, rope_local_base_freq=LOCAL_THETA,
        attention_bias=traits.qkv_bias, sliding_window=WINDOW, use_sliding_window=False,
        query_pre_attn_scalar=query_scalar(family, n_layers),
        attn_logit_softcapping=SOFTCAPS[0], final_logit_softcapping=SOFTCAPS[1],
        num_experts=EXPERTS, num_experts_per_tok=EXPERTS_PER_TOK,
        moe_intermediate_size=EXPERT_FFN, norm_topk_prob=True, decoder_sparse_step=1,
    )
    return {**cfg, **changes}


def gguf_metadata(family: str, n_layers: int) -> dict[str, Any]:
    """The same model's GGUF metadata, with every key any architecture has, and none for what
    llama.cpp derives or hardcodes (query scalar, layer pattern, top-k renormalization)."""
    arch = ARCH[family]
    rotary = int(HEAD_DIM * FAMILY_TRAITS[family].partial_rotary_factor)
    keys = {
        "embedding_length": HIDDEN, "attention.head_count": HEADS,
        "attention.head_count_kv": KV_HEADS, "attention.key_length": HEAD_DIM,
        "block_count": n_layers, "feed_forward_length": 128, "context_length": 256,
        "attention.layer_norm_rms_epsilon": 1e-5, "rope.freq_base": 500_000.0,
        "rope.freq_base_swa": LOCAL_THETA, "rope.dimension_count": rotary,
        "attention.sliding_window": WINDOW,
        "attn_logit_softcapping": SOFTCAPS[0], "final_logit_softcapping": SOFTCAPS[1],
        "expert_count": EXPERTS, "expert_used_count": EXPERTS_PER_TOK,
        "expert_feed_forward_length": EXPERT_FFN,
    }
    return {"general.architecture": arch, "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, **{f"{arch}.{k}": v for k, v in keys.items()}}


def from_gguf(family: str, n_layers: int) -> ModelConfig:
    return ModelConfig.from_gguf(gguf_metadata(family, n_layers), vocab_size=100, tied=False)


def layer_counts(family: str) -> list[int]:
    """Six layers (one Gemma 3 period), and the depth of the size with its own query scalar."""
    return sorted({6, FAMILY_TRAITS[family].wide_query_layers or 6})


def test_every_family_has_one_row():
    assert set(FAMILY_TRAITS) == set(HF_MODEL_TYPES.values())
    assert set(GGUF_ARCHITECTURES.values()) <= set(FAMILY_TRAITS)


@pytest.mark.parametrize(("family", "n_layers"),
                         [(f, n) for f in GGUF_FAMILIES for n in layer_counts(f)])
def test_hf_and_gguf_build_the_same_config(family, n_layers):
    hf = ModelConfig.from_hf(hf_config(family, n_layers))
    gguf = from_gguf(family, n_layers)
    # The one difference is in the weights, not the model: the converter bakes gemma's norm
    # offset into them.
    assert gguf.norm_offset == 0.0
    assert hf.norm_offset == FAMILY_TRAITS[family].norm_offset
    assert dataclasses.replace(hf, norm_offset=0.0) == gguf


def minimal_hf_config(family: str, n_layers: int) -> dict[str, Any]:
    """Only what config.json must say for this family; everything else left to the defaults."""
    t = FAMILY_TRAITS[family]
    cfg: dict[str, Any] = dict(
        model_type=MODEL_TYPE[family], vocab_size=100, hidden_size=HIDDEN,
        num_attention_heads=HEADS, head_dim=HEAD_DIM, num_hidden_layers=n_layers,
        tie_word_embeddings=False, attention_bias=t.qkv_bias)
    if t.layers == LAYERS_PERIODIC:
        cfg.update(sliding_window=WINDOW)
    if query_scalar(family, n_layers) != HEAD_DIM:
        cfg.update(query_pre_attn_scalar=query_scalar(family, n_layers))
    if t.moe:  # llama.cpp always renormalizes the top k
        cfg.update(num_experts=EXPERTS, num_experts_per_tok=EXPERTS_PER_TOK,
                   moe_intermediate_size=EXPERT_FFN, norm_topk_prob=True)
    return cfg


def minimal_gguf_metadata(family: str, n_layers: int) -> dict[str, Any]:
    """The same model as the converter writes it at the least."""
    t = FAMILY_TRAITS[family]
    arch = ARCH[family]
    keys: dict[str, Any] = {"embedding_length": HIDDEN, "attention.head_count": HEADS,
                            "attention.key_length": HEAD_DIM, "block_count": n_layers}
    if t.partial_rotary_factor != 1.0:
        keys["rope.dimension_count"] = int(HEAD_DIM * t.partial_rotary_factor)
    if t.layers == LAYERS_PERIODIC:
        keys["attention.sliding_window"] = WINDOW
    if t.moe:
        keys.update({"expert_count": EXPERTS, "expert_used_count": EXPERTS_PER_TOK,
                     "expert_feed_forward_length": EXPERT_FFN})
    return {"general.architecture": arch, **{f"{arch}.{k}": v for k, v in keys.items()}}


@pytest.mark.parametrize(("family", "n_layers"),
                         [(f, n) for f in GGUF_FAMILIES for n in layer_counts(f)])
def test_hf_and_gguf_defaults_agree(family, n_layers):
    hf = ModelConfig.from_hf(minimal_hf_config(family, n_layers))
    gguf = ModelConfig.from_gguf(minimal_gguf_metadata(family, n_layers), vocab_size=100,
                                 tied=False)
    assert dataclasses.replace(hf, norm_offset=0.0) == gguf


@pytest.mark.parametrize(("family", "n_layers"), [("gemma2", 46), ("gemma3", 62)])
def test_gguf_query_scale_of_the_27b_gemmas(family, n_layers):
    """llama.cpp scales the 27B Gemmas' q.k by (hidden / heads) ** -0.5, others by head_dim's."""
    assert from_gguf(family, n_layers).query_scale == (HIDDEN / HEADS) ** -0.5
    assert from_gguf(family, n_layers + 2).query_scale == HEAD_DIM**-0.5


@pytest.mark.parametrize("family", sorted(FAMILY_TRAITS))
def test_the_row_is_what_the_config_gets(family):
    t = FAMILY_TRAITS[family]
    n_layers = 6
    cfg = ModelConfig.from_hf(hf_config(family, n_layers))
    assert (cfg.qkv_bias, cfg.qk_norm, cfg.norm_offset, cfg.embed_scale, cfg.activation,
            cfg.sandwich_norm, cfg.rope_interleaved) == (
        t.qkv_bias, t.qk_norm, t.norm_offset, t.embed_scale, t.activation, t.sandwich_norm,
        t.rope_interleaved)
    assert cfg.rotary_dim == int(HEAD_DIM * t.partial_rotary_factor)
    assert (cfg.attn_softcap, cfg.final_softcap) == (SOFTCAPS if t.softcaps else (None, None))
    assert cfg.rope_local_theta == (LOCAL_THETA if t.local_rope_theta is not None else None)
    assert cfg.query_scale == HEAD_DIM**-0.5  # the scalar a real config.json holds at this size
    assert (cfg.n_moe == n_layers) == t.moe
    assert cfg.num_experts == (EXPERTS if t.moe else 0)
    expected_layers = {
        LAYERS_FULL: (FULL,) * n_layers,
        LAYERS_REFUSE_WINDOW: (FULL,) * n_layers,
        LAYERS_WINDOWED: (SLIDING,) * n_layers,
        LAYERS_PERIODIC: tuple(FULL if (i + 1) % (t.sliding_period or 1) == 0 else SLIDING
                               for i in range(n_layers)),
    }[t.layers]
    assert cfg.layer_types == expected_layers
    assert cfg.sliding_window == (WINDOW if SLIDING in expected_layers else None)
    # Where config.json does not say, tying is the family's default.
    untied = {k: v for k, v in hf_config(family, n_layers).items() if k != "tie_word_embeddings"}
    assert ModelConfig.from_hf(untied).tie_word_embeddings == t.tied_embeddings


@pytest.mark.parametrize("family", sorted(FAMILY_TRAITS))
def test_config_switches_act_only_where_the_row_has_them(family):
    t = FAMILY_TRAITS[family]
    base = ModelConfig.from_hf(hf_config(family, 6))

    biased = ModelConfig.from_hf(hf_config(family, 6, attention_bias=not t.qkv_bias))
    assert biased.qkv_bias == (t.qkv_bias if t.qkv_bias_fixed else not t.qkv_bias)

    bidirectional = ModelConfig.from_hf(hf_config(family, 6, use_bidirectional_attention=True))
    assert bidirectional.causal == (not t.bidirectional_switch)
    if t.bidirectional_switch:  # it looks both ways: half the window each side
        assert bidirectional.sliding_window == WINDOW // 2 + 1

    scaled = ModelConfig.from_hf(hf_config(family, 6, query_pre_attn_scalar=24))
    assert scaled.query_scale == (24**-0.5 if t.query_pre_attn_scalar else base.query_scale)

    period = ModelConfig.from_hf(hf_config(family, 6, sliding_window_pattern=3))
    if t.layers == LAYERS_PERIODIC and t.period_configurable:
        assert period.layer_types == (SLIDING, SLIDING, FULL) * 2
    else:
        assert period.layer_types == base.layer_types

    if t.layers != LAYERS_PERIODIC:  # those need their window
        windowless = ModelConfig.from_hf(hf_config(family, 6, sliding_window=None))
        if t.layers == LAYERS_WINDOWED:
            assert windowless.layer_types == (FULL,) * 6 and windowless.sliding_window is None
        else:
            assert windowless == base

    switched = hf_config(family, 6, use_sliding_window=True)
    if t.layers == LAYERS_REFUSE_WINDOW:
        with pytest.raises(UnsupportedModelError, match="use_sliding_window"):
            ModelConfig.from_hf(switched)
    else:
        assert ModelConfig.from_hf(switched) == base


@pytest.mark.parametrize("family", sorted(f for f in GGUF_FAMILIES
                                          if FAMILY_TRAITS[f].layers == LAYERS_PERIODIC))
def test_gguf_falls_back_to_the_rows_window_and_local_base(family):
    t = FAMILY_TRAITS[family]
    meta = gguf_metadata(family, 6)
    arch = ARCH[family]
    for key in ("attention.sliding_window", "rope.freq_base_swa"):
        meta.pop(f"{arch}.{key}")
    cfg = ModelConfig.from_gguf(meta, vocab_size=100, tied=False)
    assert cfg.sliding_window == t.gguf_window
    assert cfg.rope_local_theta == t.local_rope_theta
