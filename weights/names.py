"""Declarative tables from checkpoint tensor names to params paths, with a named transform each.

A target `"layers.wq"` is a per-layer leaf: the first regex group is the layer index, and the loader
stacks the layers on a leading axis. Transforms turn a source array (row-major, torch layout
`[out, in]`) into the params layout (`[in, out]` for matmul weights).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from jaxembed.config import ModelConfig

Transform = Callable[[np.ndarray, ModelConfig], np.ndarray]


def identity(x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    return x


def transpose(x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    return x.T


def _unpermute(x: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (GGML-interleaved rope pairs -> HF half-split).

    [heads * Dh, in] -> [heads, Dh/2, 2, in] -> swap -> [heads, 2, Dh/2, in] -> [heads * Dh, in].
    """
    rows, cols = x.shape
    return x.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def unpermute_q_transpose(x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    return _unpermute(x, cfg.num_heads).T


def unpermute_k_transpose(x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    return _unpermute(x, cfg.num_kv_heads).T


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern[str]
    target: str
    transform: Transform = identity


def rules(*rows: tuple[str, str, Transform]) -> tuple[Rule, ...]:
    return tuple(Rule(re.compile(p), t, f) for p, t, f in rows)


HF_LLAMA = rules(
    (r"model\.embed_tokens\.weight", "embed", identity),
    (r"model\.norm\.weight", "final_norm", identity),
    (r"lm_head\.weight", "lm_head", transpose),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "layers.attn_norm", identity),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "layers.mlp_norm", identity),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", "layers.wq", transpose),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", "layers.wk", transpose),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", "layers.wv", transpose),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "layers.wo", transpose),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "layers.w_gate", transpose),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "layers.w_up", transpose),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "layers.w_down", transpose),
)

# Old checkpoints carry buffers that the model recomputes.
HF_IGNORED = (re.compile(r".*\.rotary_emb\.inv_freq"),)

GGUF_LLAMA = rules(
    (r"token_embd\.weight", "embed", identity),
    (r"output_norm\.weight", "final_norm", identity),
    (r"output\.weight", "lm_head", transpose),
    (r"blk\.(\d+)\.attn_norm\.weight", "layers.attn_norm", identity),
    (r"blk\.(\d+)\.ffn_norm\.weight", "layers.mlp_norm", identity),
    (r"blk\.(\d+)\.attn_q\.weight", "layers.wq", unpermute_q_transpose),
    (r"blk\.(\d+)\.attn_k\.weight", "layers.wk", unpermute_k_transpose),
    (r"blk\.(\d+)\.attn_v\.weight", "layers.wv", transpose),
    (r"blk\.(\d+)\.attn_output\.weight", "layers.wo", transpose),
    (r"blk\.(\d+)\.ffn_gate\.weight", "layers.w_gate", transpose),
    (r"blk\.(\d+)\.ffn_up\.weight", "layers.w_up", transpose),
    (r"blk\.(\d+)\.ffn_down\.weight", "layers.w_down", transpose),
)

# `rope_freqs` (Llama 3.1 GGUF) is read into the config, not the params.
GGUF_IGNORED = (re.compile(r"rope_freqs\.weight"),)

HF_TABLES = {"llama": HF_LLAMA}
GGUF_TABLES = {"llama": GGUF_LLAMA}
