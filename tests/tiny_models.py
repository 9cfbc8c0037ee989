"""Tiny random models built with transformers, saved as safetensors and written as GGUF.

Every tensor is re-initialized (norms around 1 but not 1, weights ~ 1/sqrt(fan_in)), so a dropped
or swapped tensor changes the output. The GGUF writer follows llama.cpp's converter: its tensor
names, its q/k row permutation for the Llama architecture, and its tokenizer metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map text to vectors; similar texts get nearby vectors.",
    "def add(a, b):\n    return a + b\n",
    "JAX compiles numerical programs with XLA for CPUs, GPUs and TPUs.",
    "Naïve café résumé — déjà vu. 日本語のテキスト。 Emoji: 🙂🚀",
    "Numbers like 3.14159 and 2048 appear in text too.",
] * 4


def train_tokenizer(vocab_size: int = 384) -> Tokenizer:
    """A byte-level BPE tokenizer (the GGUF 'gpt2' model), trained deterministically."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def reinit_(model: torch.nn.Module, seed: int) -> None:
    """Give every tensor fresh values so that none is left at a default (ones, zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:  # biases
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p.shape[-1]))


LLAMA_BASE: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
    tie_word_embeddings=False, bos_token_id=None, eos_token_id=0, pad_token_id=0,
)

# Llama 3 scaling with a short original context, so the scaled bands act on test inputs.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
               "rope_theta": 10000.0}


def build_llama(folder: Path, seed: int = 0, rope: dict | None = None, **overrides: Any) -> Path:
    """Save a tiny random Llama (safetensors, config.json, tokenizer.json) into `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_tokenizer()
    cfg_kwargs = {**LLAMA_BASE, "vocab_size": tok.get_vocab_size(), **overrides}
    cfg = LlamaConfig(**cfg_kwargs)
    if rope is not None:
        cfg.rope_parameters = dict(rope)
    else:
        cfg.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    reinit_(model, seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def to_classic_config(folder: Path, scaling_key: str = "rope_type") -> None:
    """Rewrite config.json in the classic style, as checkpoints made before transformers 5 have it.

    `rope_theta` goes to the top level and a non-default scaling to `rope_scaling`, its kind under
    `scaling_key` ("rope_type", or "type" as in Phi-3 checkpoints). `partial_rotary_factor` goes to
    the top level, and so does `original_max_position_embeddings` for longrope (Phi-3 keeps it
    there; Llama 3 keeps it inside `rope_scaling`). Per-layer-type settings (Gemma 3) become the
    global ones plus `rope_local_base_freq`.
    """
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    params = cfg.pop("rope_parameters", None) or {}
    if "full_attention" in params or "sliding_attention" in params:
        local = params.get("sliding_attention", {})
        if "rope_theta" in local:
            cfg["rope_local_base_freq"] = local["rope_theta"]
        params = params.get("full_attention", {})
    params = dict(params)
    cfg["rope_theta"] = params.pop("rope_theta", 10000.0)
    if "partial_rotary_factor" in params:
        cfg["partial_rotary_factor"] = params.pop("partial_rotary_factor")
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if kind == "longrope" and "original_max_position_embeddings" in params:
        cfg["original_max_position_embeddings"] = params.pop("original_max_position_embeddings")
    if kind != "default":
        cfg["rope_scaling"] = {scaling_key: kind, **params}
    path.write_text(json.dumps(cfg, indent=2))


# ---- GGUF ------------------------------------------------------------------------------------

HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_HF_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter permutation of q/k rows (HF half-split -> GGML interleaved)."""
    rows = w.shape[0]
    return (w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2)
            .reshape(w.shape))


def gguf_name(hf_name: str) -> str:
    if hf_name in HF_TO_GGUF:
        return HF_TO_GGUF[hf_name]
    parts = hf_name.split(".")
    assert parts[:2] == ["model", "layers"], hf_name
    return f"blk.{parts[2]}.{LAYER_HF_TO_GGUF['.'.join(parts[3:])]}"


def write_llama_gguf(hf_folder: Path, out: Path, qtype: gguf.GGMLQuantizationType,
                     rope_freqs: np.ndarray | None = None,
                     rename: dict[str, str] | None = None, split_max_tensors: int = 0) -> Path:
    """Write the HF folder's weights and tokenizer as a llama-architecture GGUF.

    Matrices are quantized to `qtype`; 1-D tensors (norms) stay F32, as the converter keeps them.
    `rename` maps GGUF names to other GGUF names (to build deliberately broken files).
    `split_max_tensors`: split into parts of at most this many tensors, as llama.cpp's
    gguf-split names them (`out` then names the first part)."""
    from safetensors.numpy import load_file

    cfg = json.loads((hf_folder / "config.json").read_text())
    tensors = load_file(str(hf_folder / "model.safetensors"))
    tok = json.loads((hf_folder / "tokenizer.json").read_text())
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    rope = cfg.get("rope_parameters") or {}

    w = gguf.GGUFWriter(str(out), "llama", split_max_tensors=split_max_tensors)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(int(qtype) if qtype != gguf.GGMLQuantizationType.F32 else 0)
    _add_bpe_tokenizer(w, tok, cfg)

    for name, arr in tensors.items():
        arr = arr.astype(np.float32)
        if name.endswith("q_proj.weight"):
            arr = llama_permute(arr, heads)
        elif name.endswith("k_proj.weight"):
            arr = llama_permute(arr, kv_heads)
        gname = gguf_name(name)
        gname = (rename or {}).get(gname, gname)
        if arr.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, arr)
        else:
            data = gguf.quants.quantize(arr, qtype)
            w.add_tensor(gname, data, raw_shape=data.shape, raw_dtype=qtype)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    first = w.format_shard_names(Path(out))[0]  # `out` itself unless split
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return first


def _add_bpe_tokenizer(w: gguf.GGUFWriter, tok: dict, cfg: dict) -> None:
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in tok.get("added_tokens", []) if a.get("special")}
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(cfg.get("eos_token_id") or 0)
    w.add_pad_token_id(cfg.get("pad_token_id") or 0)
    w.add_add_bos_token(False)
