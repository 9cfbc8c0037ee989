"""The Llama decoder from safetensors against transformers on the same re-initialized weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from jaxembed.weights.loader import load_checkpoint

from parity import (
    assert_close_hidden,
    assert_close_pooled,
    hidden_error,
    our_hidden,
)
from tiny_models import LLAMA3_ROPE, build_llama, to_classic_config

SEQ = 100  # past the tiny rope's original context (64), so Llama 3 scaling acts


def reference_hidden(folder: Path, ids: np.ndarray) -> np.ndarray:
    from transformers import AutoModel

    ref = AutoModel.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        return ref.eval()(torch.as_tensor(ids)).last_hidden_state.numpy()


@pytest.fixture(scope="module")
def ids(tiny_llama_dir: Path) -> np.ndarray:
    vocab = json.loads((tiny_llama_dir / "config.json").read_text())["vocab_size"]
    return np.random.default_rng(0).integers(0, vocab, (2, SEQ))


@pytest.fixture(scope="module")
def reference(tiny_llama_dir: Path, ids: np.ndarray) -> np.ndarray:
    return reference_hidden(tiny_llama_dir, ids)


def test_hidden_states_and_mean_pooling_match_transformers(tiny_llama_dir, ids, reference):
    ck = load_checkpoint(tiny_llama_dir, progress=False)
    assert ck.config.rope_scaling.kind == "llama3"
    ours = our_hidden(ck.params, ck.config, ids)
    assert_close_hidden(ours, reference)
    assert_close_pooled(ours.mean(1), reference.mean(1))


def test_sharded_checkpoint_loads_the_same(tiny_llama_dir, tmp_path, ids, reference):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    shutil.copy(tiny_llama_dir / "tokenizer.json", tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    ck = load_checkpoint(tmp_path, progress=False)
    assert_close_hidden(our_hidden(ck.params, ck.config, ids), reference)


def test_classic_config_style_loads_the_same(tiny_llama_dir, tmp_path, ids, reference):
    folder = tmp_path / "classic"
    shutil.copytree(tiny_llama_dir, folder)
    to_classic_config(folder)
    cfg = json.loads((folder / "config.json").read_text())
    assert "rope_parameters" not in cfg and cfg["rope_scaling"]["rope_type"] == "llama3"
    ck = load_checkpoint(folder, progress=False)
    assert ck.config == load_checkpoint(tiny_llama_dir, progress=False).config
    assert_close_hidden(our_hidden(ck.params, ck.config, ids), reference)


def test_tied_embeddings(tmp_path):
    folder = build_llama(tmp_path / "tied", seed=3, tie_word_embeddings=True)
    ck = load_checkpoint(folder, progress=False)
    assert ck.config.tie_word_embeddings and "lm_head" not in ck.params
    ids = np.random.default_rng(1).integers(0, ck.config.vocab_size, (1, 40))
    assert_close_hidden(our_hidden(ck.params, ck.config, ids), reference_hidden(folder, ids))


# ---- negative controls: the comparison must fail when the mapping or a variant is wrong --------


def _swap(params: dict, a: str, b: str) -> dict:
    mlp = dict(params["mlp"])
    mlp[a], mlp[b] = mlp[b], mlp[a]
    return {**params, "mlp": mlp}


@pytest.mark.parametrize("mutation", ["swap_gate_up", "swap_layers", "norm_ones", "no_rope_scaling"])
def test_negative_controls_fail(tiny_llama_dir, ids, reference, mutation):
    import dataclasses

    from jaxembed.config import RopeScaling

    ck = load_checkpoint(tiny_llama_dir, progress=False)
    params, cfg = ck.params, ck.config
    if mutation == "swap_gate_up":
        params = _swap(params, "w_gate", "w_up")
    elif mutation == "swap_layers":
        params = {**params, "layers": jax.tree.map(lambda x: x[::-1], params["layers"])}
    elif mutation == "norm_ones":
        params = {**params, "final_norm": params["final_norm"] * 0 + 1}
    elif mutation == "no_rope_scaling":
        cfg = dataclasses.replace(cfg, rope_scaling=RopeScaling())
    err = hidden_error(our_hidden(params, cfg, ids), reference)
    assert err > 1e-3, f"{mutation} went unnoticed (error {err:.2g})"


def test_default_rope_model_matches(tmp_path):
    folder = build_llama(tmp_path / "plain", seed=4, rope=None)
    ck = load_checkpoint(folder, progress=False)
    assert ck.config.rope_scaling.kind == "default"
    ids = np.random.default_rng(2).integers(0, ck.config.vocab_size, (2, 33))
    assert_close_hidden(our_hidden(ck.params, ck.config, ids), reference_hidden(folder, ids))


def test_llama3_rope_is_exercised():
    """The tiny rope settings put some frequencies in each of the three Llama 3 bands."""
    from jaxembed.config import ModelConfig, rope_inv_freq

    base = ModelConfig.from_hf({"model_type": "llama", "vocab_size": 10, "hidden_size": 64,
                                "num_hidden_layers": 1, "num_attention_heads": 4,
                                "intermediate_size": 8, "head_dim": 16,
                                "rope_parameters": {"rope_type": "default"}})
    scaled = ModelConfig.from_hf({**_as_hf(base), "rope_parameters": LLAMA3_ROPE})
    plain, s = rope_inv_freq(base), rope_inv_freq(scaled)
    ratio = plain / s
    assert np.isclose(ratio, 1.0).any()  # high frequencies kept
    assert np.isclose(ratio, LLAMA3_ROPE["factor"]).any()  # low frequencies divided
    assert ((ratio > 1.01) & (ratio < LLAMA3_ROPE["factor"] - 0.01)).any()  # blended band


def _as_hf(cfg) -> dict:
    return {"model_type": "llama", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "intermediate_size": cfg.intermediate_size, "head_dim": cfg.head_dim}
