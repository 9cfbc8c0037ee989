"""Bidirectional attention (EmbeddingGemma's Gemma 3 decoder) against transformers."""

from __future__ import annotations

import dataclasses

import families as F
import numpy as np
import torch

from jaxembed.weights.loader import load_checkpoint

from parity import assert_close_hidden, hidden_error, our_hidden


def test_bidirectional_gemma3_matches_transformers(tmp_path):
    folder = F.build_family("gemma3", tmp_path / "bidir", seed=2, use_bidirectional_attention=True)
    ck = load_checkpoint(folder, progress=False)
    assert not ck.config.causal
    ids = np.random.default_rng(0).integers(0, ck.config.vocab_size, (2, 70))
    from transformers import AutoModel

    ref = AutoModel.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
    assert ref.config.use_bidirectional_attention
    with torch.no_grad():
        expected = ref.eval()(torch.as_tensor(ids)).last_hidden_state.numpy()
    assert_close_hidden(our_hidden(ck.params, ck.config, ids), expected)
    # Negative control: causal attention (or the unhalved window) no longer matches.
    causal = dataclasses.replace(ck.config, causal=True)
    assert hidden_error(our_hidden(ck.params, causal, ids), expected) > 1e-3
    wide = dataclasses.replace(ck.config, sliding_window=2 * ck.config.sliding_window)
    assert hidden_error(our_hidden(ck.params, wide, ids), expected) > 1e-3
