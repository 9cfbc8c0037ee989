"""Weights kept quantized against the same file dequantized at load (`quantize="none"`, the
reference path): the real SmolLM2-135M Q4_1 and Gemma 3 270M Q4_K_M GGUFs, and every family's
tiny Q8_0 and Q4_1 GGUF.

Embeddings (the kernel's one int8 pass over the activations, as llama.cpp) are held to a pooled
cosine of 0.999; greedy generation (two passes: nearly float32's precision) to the reference's
tokens for 16 steps under the tie rule of test_generation_parity: where the reference's two best
tokens are closer than its TIE_GAP either is right, and the comparison goes on from the
reference's token. The reference's top-2 gaps come from its own logprobs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import families as F
import gguf
import jax
import numpy as np
import pytest
from test_generation_parity import SMOLLM2_MESSAGES, Reference, assert_greedy_matches

from jaxembed import Engine, EngineBuilder, kernels
from jaxembed.weights import quant as wq

Q = gguf.GGMLQuantizationType
NEW_TOKENS = 16
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.",
         "def add(a, b):\n    return a + b", "Embeddings map text to vectors; " * 6]
needs_kernel = pytest.mark.skipif(not kernels.quant_available(),
                                  reason=f"no quantized kernel: "
                                  f"{kernels.unavailable_reason(kernels.QUANT)}")


def _build(path: Path, **kw) -> Engine:
    return EngineBuilder(model=path, dtype="float32", warmup=False, progress=False,
                         compilation_cache=False, max_num_seqs=2, max_model_len=256,
                         **kw).build()


def _pair(path: Path) -> Iterator[tuple[Engine, Engine]]:
    quantized, reference = _build(path), _build(path, quantize="none")
    try:
        yield quantized, reference
    finally:
        quantized.shutdown()
        reference.shutdown()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def check_embeddings(quantized: Engine, reference: Engine, min_cosine: float = 0.999) -> None:
    for pooling in ("mean", "last"):
        cos = _cosines(quantized.encode(TEXTS, pooling), reference.encode(TEXTS, pooling))
        assert cos.min() > min_cosine, f"{pooling} pooling: cosines {cos}"


def reference_of(engine: Engine, prompt: list[int], n: int) -> Reference:
    """The reference engine's greedy tokens, and logits that rank its top two as its logprobs
    do (their gap is the logits' gap: one normalizer)."""
    result = engine.generate(prompt, temperature=0, max_tokens=n, ignore_eos=True, logprobs=2)
    choice = result.choices[0]
    logits = np.full((n, engine.config.vocab_size), -np.inf, np.float32)
    for step, lp in enumerate(choice.logprobs):
        for token, value in lp.top:
            logits[step, token] = value
    return Reference(list(choice.token_ids), logits)


def check_greedy(quantized: Engine, reference: Engine, prompt: list[int]) -> list[int]:
    ties = assert_greedy_matches(quantized, reference_of(reference, prompt, NEW_TOKENS), prompt)
    assert len(ties) <= 2, f"{len(ties)} near ties at steps {ties}: suspiciously many"
    return ties


def _quantized_leaves(params: dict) -> list[wq.QArrays]:
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, wq.QArrays))
    return [x for x in leaves if isinstance(x, wq.QArrays)]


def test_quantized_weights_take_about_the_files_bytes(smollm2_path: Path):
    for quantized, reference in _pair(smollm2_path):
        assert set(quantized.checkpoint.quantized) == {"Q4_1", "Q8_0"}
        held = sum(int(a.nbytes) for a in jax.tree.leaves(quantized.params))
        # Q4_1 and Q8_0 keep exactly their bytes; the float norms are a sliver.
        assert held < 1.02 * smollm2_path.stat().st_size
        assert _quantized_leaves(quantized.params)
        assert not _quantized_leaves(reference.params) and not reference.checkpoint.quantized


@needs_kernel
def test_smollm2_quantized_against_its_dequantized_weights(smollm2_path: Path):
    for quantized, reference in _pair(smollm2_path):
        check_embeddings(quantized, reference)
        prompt = reference.chat_prompt(SMOLLM2_MESSAGES).tolist()
        check_greedy(quantized, reference, prompt)


@needs_kernel
def test_gemma3_quantized_against_its_dequantized_weights(gemma3_path: Path):
    for quantized, reference in _pair(gemma3_path):
        assert "Q4_K" in quantized.checkpoint.quantized
        check_embeddings(quantized, reference)
        prompt = reference.tokenize(["The history of the printing press began"])[0]
        check_greedy(quantized, reference, prompt)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("quantized-families")


@needs_kernel
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1], ids=lambda q: q.name)
@pytest.mark.parametrize("family", F.FAMILY_NAMES)
def test_every_family_quantized_against_its_dequantized_weights(tiny_root, family, qtype):
    folder = F.build_family(family, tiny_root / f"{family}-gguf", seed=7, build="gguf") \
        if not (tiny_root / f"{family}-gguf").exists() else tiny_root / f"{family}-gguf"
    path = F.write_family_gguf(folder, tiny_root / f"{family}-{qtype.name}.gguf", qtype)
    for quantized, reference in _pair(path):
        assert qtype.name in quantized.checkpoint.quantized
        check_embeddings(quantized, reference)
        prompt = reference.tokenize(["hello world, the quick brown fox"])[0]
        check_greedy(quantized, reference, prompt)


def test_the_reference_path_is_the_dequantized_model(smollm2_path: Path):
    """Controls: the comparison can fail. A quantized engine whose weights lost a layer's
    values (one weight's scales zeroed) is not held equal to the reference."""
    for quantized, reference in _pair(smollm2_path):
        w = quantized.runner.embed_params["layers"]["wq"].slices[3]
        w.d = w.d * 0  # the embedding path's view of one layer's weight only
        with pytest.raises(AssertionError):
            check_embeddings(quantized, reference, min_cosine=0.9999)
