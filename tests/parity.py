"""Comparison helpers: our hidden states and pooled vectors against a reference implementation."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxembed import model
from jaxembed.config import ModelConfig

HIDDEN_RTOL = 1e-4  # max|ours - ref| <= 1e-4 * max(1, max|ref|)
COSINE_MIN = 0.9999


def our_hidden(params: dict, cfg: ModelConfig, ids: np.ndarray) -> np.ndarray:
    """Final hidden states [B, T, D] for unpadded rows of equal length."""
    b, t = ids.shape
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    segments = np.ones((b, t), np.int32)
    out = model.forward(params, jnp.asarray(ids, jnp.int32), jnp.asarray(positions),
                        jnp.asarray(segments), cfg)
    return np.asarray(out, dtype=np.float32)


def hidden_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """max|ours - ref| relative to max(1, max|ref|)."""
    return float(np.abs(ours - ref).max() / max(1.0, float(np.abs(ref).max())))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def assert_close_hidden(ours: np.ndarray, ref: np.ndarray) -> None:
    err = hidden_error(ours, ref)
    assert err <= HIDDEN_RTOL, f"hidden states differ: relative error {err:.3g} > {HIDDEN_RTOL}"


def assert_close_pooled(ours: np.ndarray, ref: np.ndarray) -> None:
    cos = cosine(ours, ref)
    assert cos.min() > COSINE_MIN, f"pooled cosine {cos.min():.6f} <= {COSINE_MIN}"


def transformers_from_gguf(path, causal: bool = False):
    """transformers' own model (fp32, eager attention) and tokenizer from the same GGUF file; with
    `causal`, the model with its LM head (whose `.model` is the base model)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    auto = AutoModelForCausalLM if causal else AutoModel
    model = auto.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                 attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def response_vectors(body: dict) -> np.ndarray:
    """An embeddings response's vectors, decoding base64 (little-endian float32) where sent so."""
    import base64

    out = []
    for i, item in enumerate(body["data"]):
        assert item["index"] == i
        emb = item["embedding"]
        out.append(np.frombuffer(base64.b64decode(emb), dtype="<f4") if isinstance(emb, str)
                   else np.asarray(emb, dtype=np.float32))
    return np.stack(out)
