"""The real Gemma 3 270M Q4_K_M GGUF (Q4_K, Q6_K, Q5_0, Q8_0 tensors; SentencePiece; sliding
window 512): our token ids and embeddings against transformers loading the same file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jaxembed import EngineBuilder

from parity import assert_close_pooled, transformers_from_gguf

TEXTS = [
    "Hello world",
    "The capital of France is Paris, a city known for its museums and cafés.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "日本語の文章と emoji 🙂🚀 mixed together.",
    "  leading spaces and\ttabs\n\nand blank lines",
    "a",
]
# Longer than the 512-token sliding window, so local and global layers see different contexts.
LONG = " ".join(f"Sentence {i} talks about topic {i % 7} in some detail." for i in range(80))


@pytest.fixture(scope="module")
def engine(gemma3_path):
    # The reference path (dequantized at load), held to transformers reading the file;
    # test_quantized_models holds the quantized default to it.
    eng = EngineBuilder(model=gemma3_path, dtype="float32", warmup=False, progress=False,
                        compilation_cache=False, quantize="none").build()
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def reference(gemma3_path):
    return transformers_from_gguf(gemma3_path)


def test_config(engine):
    cfg = engine.config
    assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.head_dim) == ("gemma3", 18, 640, 256)
    assert cfg.sliding_window == 512 and cfg.layer_types.count("full") == 3
    assert engine.checkpoint.tokenizer.add_bos


def test_token_ids_match_transformers(engine, reference):
    _, tok = reference
    for text in [*TEXTS, LONG]:
        assert engine.tokenize([text])[0] == tok(text)["input_ids"], text


def test_embeddings_match_transformers(engine, reference):
    model, tok = reference
    texts = [*TEXTS, LONG]
    ours = engine.encode(texts)
    last = engine.encode(texts, embedding_type="last")
    for i, text in enumerate(texts):
        ids = tok(text)["input_ids"]
        with torch.no_grad():
            h = model(torch.tensor([ids])).last_hidden_state[0].numpy()
        assert_close_pooled(ours[i], h.mean(0))
        assert_close_pooled(last[i], h[-1])
    assert len(tok(LONG)["input_ids"]) > 512


def test_long_input_needs_the_window(engine, reference):
    """Negative control: with the sliding window opened up, the long input no longer matches."""
    import dataclasses

    from parity import cosine, our_hidden

    model, tok = reference
    ids = np.array([tok(LONG)["input_ids"]])
    with torch.no_grad():
        ref = model(torch.as_tensor(ids)).last_hidden_state.numpy()
    wide = dataclasses.replace(engine.config, sliding_window=100_000)
    ours = our_hidden(engine.params, wide, ids)
    assert cosine(ours[0, -1], ref[0, -1])[0] < 0.9999
