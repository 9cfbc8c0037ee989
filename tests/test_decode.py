"""Decoding with the KV cache against the plain forward, for both layouts of the model: the
stacked layers (scanned; what accelerators run) and the per-layer weights and cache buffers (what
the CPU runs). Every family with a variant that touches decoding: sliding windows and local rope
(Gemma 3), long-rope (Phi-3), soft-capping (Gemma 2), experts (Qwen3-MoE), partial interleaved rope
(GLM4)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import families as F
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxembed import kernels, kv_cache, model
from jaxembed.kv_cache import KVCache
from jaxembed.options import EngineOptions
from jaxembed.plan import CPU_KERNELS, STACKED, ExecutionPlan, kernels_fit
from jaxembed.weights.loader import load_checkpoint

DECODE_FAMILIES = ["gemma3", "phi3", "gemma2", "qwen3_moe", "glm4", "llama"]


def reference_logits(params, cfg, ids: np.ndarray) -> np.ndarray:
    """The logits after each token of `ids`, from one plain forward over the whole sequence."""
    t = len(ids)
    hidden = model.forward(params, jnp.asarray(ids[None]), jnp.arange(t)[None],
                           jnp.ones((1, t), jnp.int32), cfg)
    return np.asarray(model.logits(params, hidden[0], cfg))


# per_layer_kernel: the per-layer layout in the CPU kernels (`kernels.attention` for the
# prefill, `kernels.decode_attention` and `kernels.matmul` for the steps), where this machine
# can run them.
@pytest.mark.parametrize("layout", ["stacked", "per_layer", "per_layer_kernel"])
@pytest.mark.parametrize("family", DECODE_FAMILIES)
def test_decode_matches_the_forward(family: str, layout: str, tmp_path: Path) -> None:
    folder = F.build_family(family, tmp_path / family, seed=3)
    ck = load_checkpoint(folder, "float32", progress=False)
    params, cfg = ck.params, ck.config
    cpu_attention = layout == "per_layer_kernel"
    if cpu_attention and not kernels.available():
        pytest.skip(f"no CPU kernels here: {kernels.unavailable_reason()}")
    if cpu_attention and not kernels_fit(cfg):
        pytest.skip(f"head size {cfg.head_dim}: the kernels take multiples of 16")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, n).astype(np.int32) for n in (5, 11)]
    steps, max_len, slots = 14, 64, 4  # past every sliding window (16) and rope threshold
    # The plan as the engine makes it for one CPU, with or without the kernels (which decode
    # from float32 weights packed for kernels.matmul); "stacked" as a mesh would decode.
    plan = ExecutionPlan.decide(cfg, "float32", EngineOptions(max_num_seqs=slots,
                                                              max_model_len=max_len),
                                kernels_ok=cpu_attention)
    assert (plan.attention == CPU_KERNELS) == cpu_attention
    if layout == "stacked":
        plan = dataclasses.replace(plan, decode_layers=STACKED)
    layers = None if layout == "stacked" else model.split_layers(params, cfg,
                                                                plan.decode_weights)
    cache = KVCache.zeros(cfg, slots, max_len, jnp.float32, per_layer=plan.kv_per_layer)
    # Prefill both prompts in one step (rows padded to the longer), into slots 2 and 0.
    t = 16
    tokens = np.zeros((2, t), np.int32)
    seg = np.zeros((2, t), np.int32)
    pos = np.zeros((2, t), np.int32)
    for r, p in enumerate(prompts):
        tokens[r, :len(p)], seg[r, :len(p)], pos[r, :len(p)] = p, 1, np.arange(len(p))
    row_slots = np.array([2, 0], np.int32)
    cache, last = model.prefill(params, cache, tokens, pos, seg, row_slots,
                                np.array([len(p) - 1 for p in prompts], np.int32), cfg, plan)
    seqs = [list(p) for p in prompts]
    got = [[np.asarray(model.logits(params, last[r], cfg))] for r in range(2)]
    decode = jax.jit(model.decode, static_argnames=("kv_len", "cfg", "plan"))
    for _ in range(steps):
        nxt = [int(np.argmax(g[-1])) for g in got]
        for s, n in zip(seqs, nxt, strict=True):
            s.append(n)
        positions = np.array([len(s) - 1 for s in seqs], np.int32)
        cache, hidden = decode(params, cache, np.array(nxt, np.int32), positions, row_slots,
                               kv_len=32, cfg=cfg, layers=layers, plan=plan)
        for r in range(2):
            got[r].append(np.asarray(model.logits(params, hidden[r], cfg)))
    for r, s in enumerate(seqs):
        want = reference_logits(params, cfg, np.asarray(s, np.int32))[len(prompts[r]) - 1:]
        np.testing.assert_allclose(np.stack(got[r]), want, rtol=1e-4,
                                   atol=1e-4 * np.abs(want).max())


def test_a_bf16_bits_cache_holds_bfloat16_values():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3, 8)), jnp.float32)
    stored = kv_cache.to_cache(x, kv_cache.BF16_BITS)
    assert stored.dtype == kv_cache.BF16_BITS
    back = kv_cache.from_cache(stored, jnp.float32)
    np.testing.assert_array_equal(back, x.astype(jnp.bfloat16).astype(jnp.float32))
    assert not np.array_equal(back, x)  # rounded to bfloat16, not kept whole
    np.testing.assert_array_equal(
        kv_cache.from_cache(kv_cache.to_cache(x, jnp.float32), jnp.float32), x)
