"""The real SmolLM2-135M-Instruct Q4_1 GGUF: our embeddings against transformers loading the file
(the reference path, dequantized at load; the quantized default is held to it in
test_quantized_models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parity import assert_close_hidden, assert_close_pooled, our_hidden

TEXTS = [
    "Hello world",
    "The capital of France is Paris, a city known for its museums and cafés.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "日本語の文章と emoji 🙂🚀 mixed together.",
    "a",
    "Embeddings from decoder language models can be surprisingly useful for retrieval. " * 8,
]


@pytest.fixture(scope="module")
def reference(smollm2_transformers):
    model, tok = smollm2_transformers
    return model.model, tok  # the base model: final hidden states, no LM head


def test_config_and_tokenizer_metadata(smollm2_engine):
    cfg = smollm2_engine.config
    assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (
        "llama", 30, 576, 9, 3)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0
    bundle = smollm2_engine.checkpoint.tokenizer
    assert not bundle.add_bos and bundle.eos_token_id == 2 and bundle.pad_token_id == 2


def test_embeddings_match_transformers(smollm2_reference_engine, reference):
    model, tok = reference
    engine = smollm2_reference_engine
    ours = engine.encode(TEXTS)
    last = engine.encode(TEXTS, embedding_type="last")
    for i, text in enumerate(TEXTS):
        ids = tok(text)["input_ids"]
        assert ids == engine.tokenize([text])[0]
        with torch.no_grad():
            h = model(torch.tensor([ids])).last_hidden_state[0].numpy()
        assert_close_pooled(ours[i], h.mean(0))
        assert_close_pooled(last[i], h[-1])


def test_hidden_states_match_transformers(smollm2_reference_engine, reference):
    model, tok = reference
    engine = smollm2_reference_engine
    ids = np.array([tok(TEXTS[1] * 3)["input_ids"]])
    with torch.no_grad():
        ref = model(torch.as_tensor(ids)).last_hidden_state.numpy()
    assert_close_hidden(our_hidden(engine.params, engine.config, ids), ref)


def test_usage_counts_every_token_fed(smollm2_engine):
    resp = smollm2_engine.embed(TEXTS)
    assert resp.usage.prompt_tokens == sum(len(t) for t in smollm2_engine.tokenize(TEXTS))
