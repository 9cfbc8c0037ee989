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


def test_token_embeddings_match_transformers(smollm2_reference_engine, reference):
    """Pooling "none": every token's final hidden state, each text packed beside the others in
    the engine's steps, against transformers' last_hidden_state of that text alone; through
    Python (`pooling=None`) and the route, whose values are the same. A control: the model's
    states of another text fail."""
    from litestar.testing import TestClient

    from jaxembed.server.app import create_app

    model, tok = reference
    engine = smollm2_reference_engine
    ours = engine.encode(TEXTS, pooling=None)
    refs = []
    for text, got in zip(TEXTS, ours, strict=True):
        with torch.no_grad():
            refs.append(model(torch.tensor([tok(text)["input_ids"]])).last_hidden_state[0].numpy())
        assert got.shape == refs[-1].shape
        assert_close_hidden(got, refs[-1])
    with pytest.raises(AssertionError):
        assert_close_hidden(ours[0], refs[1][: len(ours[0])])
    assert engine.encode(TEXTS[0], embedding_type="none").shape == ours[0].shape
    with TestClient(create_app(engine)) as client:
        r = client.post("/v1/embeddings", json={"input": TEXTS[:2], "embedding_type": "none"})
        assert r.status_code == 200, r.text
        body = r.json()
        for d, got in zip(body["data"], ours, strict=False):
            assert_close_hidden(np.array(d["embedding"]), got)  # packed otherwise: rounding
        assert body["usage"]["prompt_tokens"] == len(ours[0]) + len(ours[1])
        r = client.post("/v1/embeddings", json={"input": TEXTS[1], "embedding_type": "none",
                                                "normalize": True})
        np.testing.assert_allclose(np.linalg.norm(r.json()["data"][0]["embedding"], axis=1), 1,
                                   atol=1e-5)
        for bad, param in [({"encoding_format": "base64"}, "encoding_format"),
                           ({"dimensions": 64}, "dimensions")]:
            r = client.post("/v1/embeddings", json={"input": "a", "embedding_type": "none",
                                                    **bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == param


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
