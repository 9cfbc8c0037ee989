"""The decoder as a Flax module: its state is the loader's params tree, leaf for leaf, and applying
it gives what the pure functions (and so the engine) give."""

from __future__ import annotations

import collections
import re

import families as F
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxembed import EmbeddingType, model
from jaxembed.modules import Decoder, bind, decoder_graph
from jaxembed.weights.loader import load_checkpoint


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3_moe"])
def test_the_state_is_the_params_tree(family, tmp_path):
    ck = load_checkpoint(F.build_family(family, tmp_path / family), "float32", progress=False)
    decoder = Decoder.from_params(ck.config, ck.params)
    state = decoder.params()
    assert jax.tree.structure(state) == jax.tree.structure(ck.params)
    # The module holds the loaded arrays themselves: nothing is copied.
    assert all(a is b for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ck.params),
                                      strict=True))
    # Each parameter carries its logical axes, as the sharding rules name them.
    for name, spec in model.param_shapes(ck.config).items():
        if model.is_param_spec(spec):
            assert getattr(decoder, name).logical_axes == spec[1]
        else:
            for leaf, (_, axes) in spec.items():
                assert getattr(getattr(decoder, name), leaf).logical_axes == axes


def test_applying_the_module_gives_the_engine_s_hidden_states(tiny_engine):
    ck = tiny_engine.checkpoint
    ids = np.random.default_rng(0).integers(0, ck.config.vocab_size, (2, 24)).astype(np.int32)
    decoder = Decoder.from_params(ck.config, ck.params, tiny_engine.plan)
    hidden = np.asarray(decoder(ids))
    t = ids.shape[1]
    want = np.asarray(model.forward(ck.params, ids, np.broadcast_to(np.arange(t), ids.shape),
                                    np.ones_like(ids), ck.config, tiny_engine.plan))
    np.testing.assert_array_equal(hidden, want)
    pooled = tiny_engine.submit(list(ids), EmbeddingType.Mean).result()
    assert np.abs(hidden.mean(1) - pooled).max() < 1e-5 * np.abs(pooled).max()


def test_bound_inside_jit_it_compiles_the_pure_functions_program(tiny_engine):
    # Merged inside the jitted function, the module adds nothing to the compiled program.
    ck = tiny_engine.checkpoint
    ids = jnp.zeros((1, 16), jnp.int32)
    pos, seg = jnp.arange(16)[None], jnp.ones((1, 16), jnp.int32)
    graph = decoder_graph(ck.config)

    def through_module(params, ids, pos, seg):
        return bind(graph, params)(ids, pos, seg)

    def pure(params, ids, pos, seg):
        return model.forward(params, ids, pos, seg, ck.config)

    def ops(fn):  # the compiled program's operations, by kind
        text = jax.jit(fn).lower(ck.params, ids, pos, seg).compile().as_text()
        return collections.Counter(re.findall(r"= \S+ ([\w-]+)\(", text))

    want = ops(pure)
    assert sum(want.values()) > 50 and ops(through_module) == want
