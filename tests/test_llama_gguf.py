"""The tiny Llama written as GGUF at every spine quant type: ours against transformers on that file."""

from __future__ import annotations

from pathlib import Path

import gguf
import jax
import numpy as np
import pytest
import torch

from jaxembed.config import rope_inv_freq
from jaxembed.weights.errors import WeightLoadError
from jaxembed.weights.loader import load_checkpoint

from parity import assert_close_hidden, assert_close_pooled, hidden_error, our_hidden
from tiny_models import build_llama, write_llama_gguf

Q = gguf.GGMLQuantizationType
SPINE_TYPES = [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]


@pytest.fixture(scope="module")
def plain_llama(tmp_path_factory) -> Path:
    """No rope scaling: transformers' GGUF reader carries none, and the comparison needs equal models."""
    return build_llama(tmp_path_factory.mktemp("gguf-src") / "llama", seed=5, rope=None)


@pytest.fixture(scope="module")
def ids() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 384, (2, 70))


def transformers_gguf_hidden(path: Path, ids: np.ndarray) -> np.ndarray:
    from transformers import AutoModel

    ref = AutoModel.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                    attn_implementation="eager")
    with torch.no_grad():
        return ref.eval()(torch.as_tensor(ids)).last_hidden_state.numpy()


@pytest.mark.parametrize("qtype", SPINE_TYPES, ids=lambda q: q.name)
def test_gguf_matches_transformers_on_the_same_file(plain_llama, tmp_path, ids, qtype):
    path = write_llama_gguf(plain_llama, tmp_path / f"tiny-{qtype.name}.gguf", qtype)
    ck = load_checkpoint(path, progress=False)
    assert ck.format == "gguf" and ck.config.family == "llama"
    ours = our_hidden(ck.params, ck.config, ids)
    ref = transformers_gguf_hidden(path, ids)
    assert_close_hidden(ours, ref)
    assert_close_pooled(ours.mean(1), ref.mean(1))


def test_q8_gguf_is_close_to_the_safetensors_weights(plain_llama, tmp_path, ids):
    """Quantization moves the result only a little: the q/k un-permutation is right."""
    ck_st = load_checkpoint(plain_llama, progress=False)
    path = write_llama_gguf(plain_llama, tmp_path / "tiny.gguf", Q.Q8_0)
    ck = load_checkpoint(path, progress=False)
    a = our_hidden(ck.params, ck.config, ids)
    b = our_hidden(ck_st.params, ck_st.config, ids)
    assert hidden_error(a, b) < 0.05


def test_unpermute_negative_control(plain_llama, tmp_path, ids):
    """Skipping the q/k un-permutation must break the comparison."""
    from jaxembed.weights import names

    path = write_llama_gguf(plain_llama, tmp_path / "tiny.gguf", Q.F32)
    ref = transformers_gguf_hidden(path, ids)
    table = names.GGUF_TABLES["llama"]
    broken = tuple(names.Rule(r.pattern, r.targets, names.transpose)
                   if r.targets in (("layers.wq",), ("layers.wk",)) else r for r in table)
    orig = names.GGUF_TABLES["llama"]
    names.GGUF_TABLES["llama"] = broken
    try:
        ck = load_checkpoint(path, progress=False)
    finally:
        names.GGUF_TABLES["llama"] = orig
    assert hidden_error(our_hidden(ck.params, ck.config, ids), ref) > 1e-3


def test_rope_freqs_tensor_equals_llama3_scaling_from_safetensors(tmp_path, ids):
    """Llama 3 scaling travels in GGUF as `rope_freqs`; transformers' GGUF reader drops it, so our
    GGUF load is compared with our safetensors load of the same weights instead."""
    from tiny_models import LLAMA3_ROPE

    folder = build_llama(tmp_path / "l3", seed=6, rope=LLAMA3_ROPE)
    ck_st = load_checkpoint(folder, progress=False)
    plain = rope_inv_freq(load_checkpoint(build_llama(tmp_path / "p", seed=6), progress=False).config)
    factors = plain / rope_inv_freq(ck_st.config)  # what llama.cpp's converter writes
    path = write_llama_gguf(folder, tmp_path / "l3.gguf", Q.F32, rope_freqs=factors)
    ck = load_checkpoint(path, progress=False)
    assert ck.config.rope_scaling.kind == "freq_factors"
    long_ids = np.random.default_rng(4).integers(0, 384, (1, 200))
    assert_close_hidden(our_hidden(ck.params, ck.config, long_ids),
                        our_hidden(ck_st.params, ck_st.config, long_ids))


def test_a_split_gguf_loads_as_the_whole_file(plain_llama, tmp_path):
    """A model split by llama.cpp's gguf-split (as hub repos ship large ones) loads from its
    first part: every part's tensors, the same params as the file whole; a missing part is named."""
    whole = load_checkpoint(write_llama_gguf(plain_llama, tmp_path / "whole.gguf", Q.Q8_0),
                            progress=False, quantize="none")
    first = write_llama_gguf(plain_llama, tmp_path / "tiny.gguf", Q.Q8_0, split_max_tensors=7)
    assert first.name.startswith("tiny-00001-of-0000")
    split = load_checkpoint(first, progress=False, quantize="none")
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(split.params), strict=True):
        np.testing.assert_array_equal(a, b)
    count = int(first.name.split("-of-")[1][:5])
    first.with_name(f"tiny-{count:05d}-of-{count:05d}.gguf").unlink()
    with pytest.raises(WeightLoadError, match=f"part {count} of {count} is missing"):
        load_checkpoint(first, progress=False)
