"""Declarative tables from checkpoint tensor names to params paths, with a named transform each.

A rule maps a name pattern to one or more targets. A target `"layers.wq"` is a per-layer leaf of
the stack `layers` (likewise `mlp` for dense MLPs and `moe` for expert MLPs): the first regex group
is the layer index, and a second group, where present, the expert index. Transforms turn a source
array (row-major, torch layout `[out, in]`) into the params layout (`[in, out]` for matmul weights),
returning one array per target.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from jaxembed.config import ModelConfig

Transform = Callable[[np.ndarray, ModelConfig], tuple[np.ndarray, ...]]


def identity(x: np.ndarray, cfg: ModelConfig) -> tuple[np.ndarray, ...]:
    return (x,)


def transpose(x: np.ndarray, cfg: ModelConfig) -> tuple[np.ndarray, ...]:
    return (x.T,)


def transpose_last(x: np.ndarray, cfg: ModelConfig) -> tuple[np.ndarray, ...]:
    """[E, out, in] -> [E, in, out] (stacked expert weights)."""
    return (x.swapaxes(-1, -2),)


def _unpermute(x: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (GGML-interleaved rope pairs -> HF half-split).

    [heads * Dh, ...] -> [heads, Dh/2, 2, ...] -> swap -> [heads, 2, Dh/2, ...] -> back.
    """
    rows = x.shape[0]
    return x.reshape(heads, rows // heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def unpermute_q(x: np.ndarray, cfg: ModelConfig) -> tuple[np.ndarray, ...]:
    return (_unpermute(x, cfg.num_heads).T,)


def unpermute_k(x: np.ndarray, cfg: ModelConfig) -> tuple[np.ndarray, ...]:
    return (_unpermute(x, cfg.num_kv_heads).T,)


def split_qkv(x: np.ndarray, cfg: ModelConfig) -> tuple[np.ndarray, ...]:
    """Fused [q + k + v, in] (Phi-3) -> wq, wk, wv as [in, out]."""
    q, k = cfg.q_size, cfg.kv_size
    return x[:q].T, x[q : q + k].T, x[q + k :].T


def split_gate_up(x: np.ndarray, cfg: ModelConfig) -> tuple[np.ndarray, ...]:
    """Fused [gate + up, in] (Phi-3, GLM4) -> w_gate, w_up as [in, out]; gate comes first."""
    half = x.shape[0] // 2
    return x[:half].T, x[half:].T


def split_gate_up_experts(x: np.ndarray, cfg: ModelConfig) -> tuple[np.ndarray, ...]:
    """Fused experts [E, gate + up, in] (transformers 5's Qwen3-MoE) -> [E, in, F] twice."""
    half = x.shape[1] // 2
    return x[:, :half].swapaxes(1, 2), x[:, half:].swapaxes(1, 2)


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern[str]
    targets: tuple[str, ...]
    transform: Transform = identity


def rules(*rows: tuple[str, str | tuple[str, ...], Transform]) -> tuple[Rule, ...]:
    return tuple(Rule(re.compile(p), (t,) if isinstance(t, str) else t, f) for p, t, f in rows)


_L = r"model\.layers\.(\d+)\."
_HF_COMMON = (
    (r"model\.embed_tokens\.weight", "embed", identity),
    (r"model\.norm\.weight", "final_norm", identity),
    (r"lm_head\.weight", "lm_head", transpose),
    (_L + r"input_layernorm\.weight", "layers.attn_norm", identity),
    (_L + r"self_attn\.o_proj\.weight", "layers.wo", transpose),
)
_HF_QKV = (
    (_L + r"self_attn\.q_proj\.weight", "layers.wq", transpose),
    (_L + r"self_attn\.k_proj\.weight", "layers.wk", transpose),
    (_L + r"self_attn\.v_proj\.weight", "layers.wv", transpose),
)
_HF_QKV_BIAS = (
    (_L + r"self_attn\.q_proj\.bias", "layers.bq", identity),
    (_L + r"self_attn\.k_proj\.bias", "layers.bk", identity),
    (_L + r"self_attn\.v_proj\.bias", "layers.bv", identity),
)
_HF_QK_NORM = (
    (_L + r"self_attn\.q_norm\.weight", "layers.q_norm", identity),
    (_L + r"self_attn\.k_norm\.weight", "layers.k_norm", identity),
)
_HF_MLP = (
    (_L + r"mlp\.gate_proj\.weight", "mlp.w_gate", transpose),
    (_L + r"mlp\.up_proj\.weight", "mlp.w_up", transpose),
    (_L + r"mlp\.down_proj\.weight", "mlp.w_down", transpose),
)
_HF_PRE_MLP_NORM = ((_L + r"post_attention_layernorm\.weight", "layers.mlp_norm", identity),)

HF_LLAMA = rules(*_HF_COMMON, *_HF_QKV, *_HF_QKV_BIAS, *_HF_PRE_MLP_NORM, *_HF_MLP)
HF_PHI3 = rules(
    *_HF_COMMON, *_HF_PRE_MLP_NORM,
    (_L + r"self_attn\.qkv_proj\.weight", ("layers.wq", "layers.wk", "layers.wv"), split_qkv),
    (_L + r"mlp\.gate_up_proj\.weight", ("mlp.w_gate", "mlp.w_up"), split_gate_up),
    (_L + r"mlp\.down_proj\.weight", "mlp.w_down", transpose),
)
HF_GEMMA_SANDWICH = rules(
    *_HF_COMMON, *_HF_QKV, *_HF_QK_NORM, *_HF_MLP,
    (_L + r"post_attention_layernorm\.weight", "layers.post_attn_norm", identity),
    (_L + r"pre_feedforward_layernorm\.weight", "layers.mlp_norm", identity),
    (_L + r"post_feedforward_layernorm\.weight", "layers.post_mlp_norm", identity),
)
HF_QWEN = rules(*_HF_COMMON, *_HF_QKV, *_HF_QKV_BIAS, *_HF_QK_NORM, *_HF_PRE_MLP_NORM, *_HF_MLP)
HF_QWEN3_MOE = rules(
    *_HF_COMMON, *_HF_QKV, *_HF_QK_NORM, *_HF_PRE_MLP_NORM, *_HF_MLP,
    (_L + r"mlp\.gate\.weight", "moe.router", transpose),
    # Published checkpoints: one tensor per expert.
    (_L + r"mlp\.experts\.(\d+)\.gate_proj\.weight", "moe.w_gate", transpose),
    (_L + r"mlp\.experts\.(\d+)\.up_proj\.weight", "moe.w_up", transpose),
    (_L + r"mlp\.experts\.(\d+)\.down_proj\.weight", "moe.w_down", transpose),
    # transformers 5 saves the experts fused and stacked.
    (_L + r"mlp\.experts\.gate_up_proj", ("moe.w_gate", "moe.w_up"), split_gate_up_experts),
    (_L + r"mlp\.experts\.down_proj", "moe.w_down", transpose_last),
)
HF_GLM4 = rules(
    *_HF_COMMON, *_HF_QKV, *_HF_QKV_BIAS, *_HF_PRE_MLP_NORM,
    (_L + r"post_self_attn_layernorm\.weight", "layers.post_attn_norm", identity),
    (_L + r"post_mlp_layernorm\.weight", "layers.post_mlp_norm", identity),
    (_L + r"mlp\.gate_up_proj\.weight", ("mlp.w_gate", "mlp.w_up"), split_gate_up),
    (_L + r"mlp\.down_proj\.weight", "mlp.w_down", transpose),
)

# Old checkpoints carry buffers that the model recomputes.
HF_IGNORED = (re.compile(r".*\.rotary_emb\.inv_freq"),)

_B = r"blk\.(\d+)\."
_GGUF_COMMON = (
    (r"token_embd\.weight", "embed", identity),
    (r"output_norm\.weight", "final_norm", identity),
    (r"output\.weight", "lm_head", transpose),
    (_B + r"attn_norm\.weight", "layers.attn_norm", identity),
    (_B + r"attn_output\.weight", "layers.wo", transpose),
    (_B + r"ffn_norm\.weight", "layers.mlp_norm", identity),
)
_GGUF_QKV = (
    (_B + r"attn_q\.weight", "layers.wq", transpose),
    (_B + r"attn_k\.weight", "layers.wk", transpose),
    (_B + r"attn_v\.weight", "layers.wv", transpose),
)
_GGUF_QKV_BIAS = (
    (_B + r"attn_q\.bias", "layers.bq", identity),
    (_B + r"attn_k\.bias", "layers.bk", identity),
    (_B + r"attn_v\.bias", "layers.bv", identity),
)
_GGUF_QK_NORM = (
    (_B + r"attn_q_norm\.weight", "layers.q_norm", identity),
    (_B + r"attn_k_norm\.weight", "layers.k_norm", identity),
)
_GGUF_MLP = (
    (_B + r"ffn_gate\.weight", "mlp.w_gate", transpose),
    (_B + r"ffn_up\.weight", "mlp.w_up", transpose),
    (_B + r"ffn_down\.weight", "mlp.w_down", transpose),
)
_GGUF_SANDWICH = (
    (_B + r"post_attention_norm\.weight", "layers.post_attn_norm", identity),
    (_B + r"post_ffw_norm\.weight", "layers.post_mlp_norm", identity),
)

GGUF_LLAMA = rules(
    *_GGUF_COMMON, *_GGUF_MLP,
    # llama.cpp permutes q/k rows of the Llama architecture for its rope; undone here.
    (_B + r"attn_q\.weight", "layers.wq", unpermute_q),
    (_B + r"attn_k\.weight", "layers.wk", unpermute_k),
    (_B + r"attn_v\.weight", "layers.wv", transpose),
)
GGUF_PHI3 = rules(
    *_GGUF_COMMON,
    (_B + r"attn_qkv\.weight", ("layers.wq", "layers.wk", "layers.wv"), split_qkv),
    (_B + r"ffn_up\.weight", ("mlp.w_gate", "mlp.w_up"), split_gate_up),
    (_B + r"ffn_down\.weight", "mlp.w_down", transpose),
)
GGUF_GEMMA = rules(*_GGUF_COMMON, *_GGUF_QKV, *_GGUF_QK_NORM, *_GGUF_MLP, *_GGUF_SANDWICH)
GGUF_QWEN = rules(*_GGUF_COMMON, *_GGUF_QKV, *_GGUF_QKV_BIAS, *_GGUF_QK_NORM, *_GGUF_MLP)
GGUF_QWEN3_MOE = rules(
    *_GGUF_COMMON, *_GGUF_QKV, *_GGUF_QK_NORM, *_GGUF_MLP,
    (_B + r"ffn_gate_inp\.weight", "moe.router", transpose),
    (_B + r"ffn_gate_exps\.weight", "moe.w_gate", transpose_last),
    (_B + r"ffn_up_exps\.weight", "moe.w_up", transpose_last),
    (_B + r"ffn_down_exps\.weight", "moe.w_down", transpose_last),
)
GGUF_GLM4 = rules(
    *_GGUF_COMMON, *_GGUF_QKV, *_GGUF_QKV_BIAS, *_GGUF_SANDWICH,
    (_B + r"ffn_up\.weight", ("mlp.w_gate", "mlp.w_up"), split_gate_up),
    (_B + r"ffn_down\.weight", "mlp.w_down", transpose),
)

# Rope tensors are read into the config, not the params.
GGUF_ROPE_TENSORS = ("rope_freqs", "rope_factors_long", "rope_factors_short")
GGUF_IGNORED = tuple(re.compile(re.escape(n) + r"\.weight") for n in GGUF_ROPE_TENSORS)

HF_TABLES = {
    "llama": HF_LLAMA, "mistral": HF_LLAMA, "qwen2": HF_QWEN, "qwen3": HF_QWEN,
    "qwen3_moe": HF_QWEN3_MOE, "phi3": HF_PHI3, "gemma": HF_LLAMA, "gemma2": HF_GEMMA_SANDWICH,
    "gemma3": HF_GEMMA_SANDWICH, "glm4": HF_GLM4,
}
GGUF_TABLES = {
    "llama": GGUF_LLAMA, "mistral": GGUF_LLAMA, "qwen2": GGUF_QWEN, "qwen3": GGUF_QWEN,
    "qwen3_moe": GGUF_QWEN3_MOE, "phi3": GGUF_PHI3, "gemma": GGUF_GEMMA, "gemma2": GGUF_GEMMA,
    "gemma3": GGUF_GEMMA, "glm4": GGUF_GLM4,
}

# Heads over the final hidden states that are not the decoder's: a sequence classifier's, as
# transformers' *ForSequenceClassification saves it (`score`, [labels, hidden], no bias) and as
# llama.cpp's converter writes a rank model's (`cls.output`). Read as float32 into
# `Checkpoint.heads` by these names, outside the params pytree.
HF_HEADS = {"score.weight": "score", "score.bias": "score_bias"}
GGUF_HEADS = {"cls.output.weight": "score", "cls.output.bias": "score_bias"}
