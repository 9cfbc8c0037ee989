"""The GPU kernels (jaxembed.gpu), run in Pallas' interpreter on the CPU: attention over packed rows
against a materialized masked softmax (itself checked against the model's XLA attention), and the
quantized products of every GGML type against XLA's product with the dequantized weight. The
interpreter reads past an array's end as NaN, so a load the kernels forget to mask shows as NaN.
Each kernel also lowers to Triton for the GPU here, which catches what Triton cannot express
(array sizes that are not powers of two, unsupported operations) without a GPU."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import types

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from test_quant import F16_FIELDS, random_blocks

from jaxembed import layers, quant
from jaxembed.config import FULL, SLIDING
from jaxembed.gpu import attention as ga
from jaxembed.gpu import decode as gd
from jaxembed.gpu import qmatmul as gq
from jaxembed.weights import quant as wq

TRITON_CALL = "__gpu$xla.gpu.triton"  # the custom call a Pallas kernel lowers to on CUDA


def packed_segments(rng: np.random.Generator, b: int, t: int, pieces: int = 4, pad: int = 5
                    ) -> np.ndarray:
    """[B, T] segment ids as the scheduler packs rows: a few sequences of random lengths, each with
    its own id, then `pad` tokens of padding (0); the last of several rows has none (a sequence
    ends it, so the keys past T are next to real ones)."""
    seg = np.zeros((b, t), np.int32)
    for r in range(b):
        end = t - pad if r < b - 1 or b == 1 else t
        cuts = [0, *sorted(rng.choice(np.arange(1, end), pieces - 1, replace=False)), end]
        for n, (lo, hi) in enumerate(itertools.pairwise(cuts)):
            seg[r, lo:hi] = 10 * r + n + 1
    return seg


def qkv(rng: np.random.Generator, b: int, t: int, h: int, kv: int, dh: int, dtype=jnp.float32):
    def one(heads: int) -> jax.Array:
        return jnp.asarray(rng.standard_normal((b, t, heads, dh), np.float32), dtype)
    return one(h), one(kv), one(kv)


# ---- the reference is the model's attention ----------------------------------------------


@pytest.mark.parametrize("causal,window,softcap", [
    (True, 0, None), (True, 6, 30.0), (False, 0, 20.0), (False, 9, None)])
def test_reference_equals_the_models_attention(causal, window, softcap):
    # layers.attention_masks + layers._attend, as the model's XLA path runs them.
    rng = np.random.default_rng(window)
    b, t, h, kv, dh = 2, 48, 6, 2, 16
    q, k, v = qkv(rng, b, t, h, kv, dh)
    seg = packed_segments(rng, b, t)
    scale = 2 / np.sqrt(dh)
    cfg = types.SimpleNamespace(causal=causal, layer_types=(SLIDING,) if window else (FULL,),
                                sliding_window=window or None, query_scale=scale,
                                attn_softcap=softcap)
    full, sliding = layers.attention_masks(jnp.asarray(seg), cfg)
    qh = q.reshape(b, t, kv, h // kv, dh).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, Dh]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    model = layers._attend(qh, kh, vh, sliding if window else full, cfg)
    model = model.transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)
    ref = ga.attention_reference(q, k, v, jnp.asarray(seg), window, scale=scale, softcap=softcap,
                                 causal=causal)
    np.testing.assert_allclose(np.asarray(ref), np.asarray(model), rtol=2e-5, atol=2e-6)


def test_visible_keys_are_the_masks_intervals():
    # What the kernel reads instead of a mask: per query one interval of keys, exactly the mask's
    # row, never decreasing along the row (which is what lets it skip key blocks).
    rng = np.random.default_rng(3)
    seg = jnp.asarray(packed_segments(rng, 3, 70, pieces=6))
    j = np.arange(70)
    for causal, window in itertools.product((True, False), (0, 1, 5, 100)):
        lo, hi = map(np.asarray, ga.visible_keys(seg, window, causal))
        mask = np.asarray(ga.reference_mask(seg, window, causal))
        np.testing.assert_array_equal((j >= lo[..., None]) & (j < hi[..., None]), mask)
        assert (np.diff(lo) >= 0).all() and (np.diff(hi) >= 0).all()
    # A row of one token sees itself.
    lo, hi = ga.visible_keys(jnp.zeros((2, 1), jnp.int32), 0, True)
    assert lo.tolist() == [[0], [0]] and hi.tolist() == [[1], [1]]


def test_query_blocks_read_only_the_key_blocks_they_can_see():
    # Eight sequences of 128 tokens in a row of 1024, in blocks of 128 queries and 64 keys: each
    # query block reads its own sequence's two key blocks, against 9 on average for causal
    # masking alone and 16 without.
    seg = jnp.asarray(np.repeat(np.arange(1, 9), 128)[None], jnp.int32)
    for causal, window, reads in ((True, 0, 2), (False, 0, 2), (True, 32, 2)):
        lo, hi = ga.visible_keys(seg, window, causal)
        first, stop = ga.key_blocks(lo.reshape(8, 128), hi.reshape(8, 128), 64)
        assert (np.asarray(stop - first) <= reads).all() and (np.asarray(stop) > first).all()
    # A window inside one long sequence: 128 queries see 128 + 31 keys, three blocks of 64.
    lo, hi = ga.visible_keys(jnp.ones((1, 1024), jnp.int32), 32, True)
    first, stop = ga.key_blocks(lo.reshape(8, 128), hi.reshape(8, 128), 64)
    assert np.asarray(stop - first)[1:].tolist() == [3] * 7


# ---- attention -------------------------------------------------------------------------------


def run_attention(q, k, v, seg, window, **kw) -> np.ndarray:
    """The kernel with the window traced, as the model's layer scan passes it."""
    fn = jax.jit(functools.partial(ga.attention, interpret=True, **kw))
    return np.asarray(fn(q, k, v, jnp.asarray(seg), jnp.int32(window)))


# Plain and grouped heads (H/K 1, 3, 4), every head size (80 padded to 128), causal and
# bidirectional, windows, soft-capping; rows shorter than a block, and rows that end inside one.
@pytest.mark.parametrize("b,t,h,kv,dh,causal,window,softcap", [
    (2, 100, 4, 4, 64, True, 0, None),
    (1, 160, 6, 2, 128, True, 24, 30.0),
    (2, 77, 8, 2, 256, False, 0, None),
    (2, 130, 4, 1, 80, False, 9, 20.0),
    (1, 40, 3, 1, 96, True, 0, None),
])
def test_attention_equals_the_reference(b, t, h, kv, dh, causal, window, softcap):
    rng = np.random.default_rng(t + dh)
    q, k, v = qkv(rng, b, t, h, kv, dh)
    seg = packed_segments(rng, b, t)
    kw = dict(scale=3 / np.sqrt(dh), softcap=softcap, causal=causal)  # sharp: errors show
    got = run_attention(q, k, v, seg, window, **kw)
    want = np.asarray(ga.attention_reference(q, k, v, jnp.asarray(seg), window, **kw))
    assert np.isfinite(got).all()  # padding too: nothing to leak
    real = seg > 0  # padding's outputs are never read
    np.testing.assert_allclose(got[real], want[real], rtol=2e-5, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("dh,causal", [(64, True), (128, False)])
def test_attention_in_bfloat16(dh, causal):
    # bf16 products and p rounded to bf16 (as the model's _attend does): bf16's precision.
    rng = np.random.default_rng(dh)
    b, t, h, kv = 2, 96, 4, 2
    q, k, v = qkv(rng, b, t, h, kv, dh, jnp.bfloat16)
    seg = packed_segments(rng, b, t)
    kw = dict(scale=1 / np.sqrt(dh), softcap=None, causal=causal)
    got = run_attention(q, k, v, seg, 7, **kw)
    assert got.dtype == jnp.bfloat16
    f32 = [a.astype(jnp.float32) for a in (q, k, v)]  # the same values, the result unrounded
    want = np.asarray(ga.attention_reference(*f32, jnp.asarray(seg), 7, **kw))
    real = seg > 0
    np.testing.assert_allclose(got[real].astype(np.float32), want[real], rtol=1e-2, atol=1e-2)


def test_two_runs_of_one_id_do_not_see_each_other():
    # The kernel's contract is the CPU kernel's: a segment is a run. Its output for a row with
    # two runs of id 1 is the reference's for the same row with the runs told apart.
    rng = np.random.default_rng(5)
    seg = np.array([[1] * 20 + [2] * 15 + [1] * 25 + [0] * 4], np.int32)
    apart = np.array([[1] * 20 + [2] * 15 + [3] * 25 + [0] * 4], np.int32)
    q, k, v = qkv(rng, 1, 64, 2, 2, 64)
    for causal in (True, False):
        kw = dict(scale=0.3, softcap=None, causal=causal)
        got = run_attention(q, k, v, seg, 0, **kw)
        want = np.asarray(ga.attention_reference(q, k, v, jnp.asarray(apart), 0, **kw))
        np.testing.assert_allclose(got[0, :60], want[0, :60], rtol=2e-5, atol=2e-5)


def test_attention_refuses_what_it_does_not_run():
    q, k, v = qkv(np.random.default_rng(0), 1, 16, 6, 4, 64)
    seg = np.ones((1, 16), np.int32)
    with pytest.raises(ValueError, match="K dividing H"):
        ga.attention(q, k, v, seg, 0, scale=1.0, interpret=True)
    q, k, v = qkv(np.random.default_rng(0), 1, 16, 2, 2, 48)
    assert not ga.supported(48, jnp.float32) and ga.supported(80, jnp.bfloat16)
    with pytest.raises(ValueError, match="head size 48"):
        ga.attention(q, k, v, seg, 0, scale=1.0, interpret=True)


# ---- quantized products ------------------------------------------------------------------


def quantized(qtype: Q, n: int, k: int, rng: np.random.Generator) -> wq.QArrays:
    return wq.repack(random_blocks(qtype, n, k, rng), qtype, (n, k)).map(jnp.asarray)


def check_qmatmul(x: jax.Array, w: wq.QArrays) -> None:
    """The kernel against XLA's product with the dequantized weight: to float32 summation's
    precision where the weight and x are rounded to bfloat16 alike, and to bfloat16's against the
    float32 product."""
    got = np.asarray(gq.qmatmul(x, w, interpret=True))
    dense = quant.dequantize(w)  # [N, K] float32
    hi = jax.lax.Precision.HIGHEST
    want = np.asarray(jnp.dot(x.astype(jnp.float32), dense.T, precision=hi))
    bf16 = np.asarray(jnp.dot(x.astype(jnp.bfloat16).astype(jnp.float32),
                              dense.astype(jnp.bfloat16).astype(jnp.float32).T, precision=hi))
    assert got.dtype == np.float32 and got.shape == want.shape
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, bf16, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-2 * scale)


# Every type; M of decode (1, 7: one 16-row tile, K split across programs) and of prefill (130:
# 128-row tiles, one past); N past the tiles' multiples; K past whole steps (576: 4.5 steps of
# 128 values) where the type allows (the K-quants need whole super-blocks of 256).
@pytest.mark.parametrize("m", [1, 7, 130])
@pytest.mark.parametrize("qtype", list(F16_FIELDS), ids=lambda t: t.name)
def test_qmatmul_equals_the_dequantized_product(qtype, m):
    rng = np.random.default_rng(int(qtype) * 7 + m)
    k = 768 if wq.LAYOUTS[qtype].block == wq.QK_K else 576
    w = quantized(qtype, 40, k, rng)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    check_qmatmul(x, w)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q8_0, Q.Q5_1])
def test_qmatmul_rows_of_an_odd_number_of_32_values(qtype):
    # K = 96: a 4-bit type keeps a byte a value (repack), every type's rows end mid-chunk of 64.
    rng = np.random.default_rng(int(qtype))
    w = quantized(qtype, 70, 96, rng)
    assert w.layout.bits == 8
    check_qmatmul(jnp.asarray(rng.standard_normal((3, 96)), jnp.bfloat16), w)


def test_qmatmul_splits_k_for_decode_and_not_for_prefill():
    lay = wq.LAYOUTS[Q.Q4_K]
    decode = gq.tiles_for(lay, 1, 4096, 4096)
    assert (decode.m, decode.n) == (16, 64) and decode.splits > 1
    assert gq.tiles_for(lay, 512, 4096, 4096).splits == 1
    # A split never starts past the last step of K.
    for k in (256, 512, 768, 4096):
        t = gq.tiles_for(lay, 1, 64, k)
        steps = -(-k // t.k)
        assert (t.splits - 1) * -(-steps // t.splits) < steps


def test_qmatmul_supports_every_layout_and_refuses_others():
    assert all(gq.supported(lay) for lay in wq.LAYOUTS.values())
    odd = wq.QLayout(8, True, 32, 64, False, False, 0, False, "made-up")
    assert not gq.supported(odd)
    w = wq.quantize_q8(np.ones((4, 64), np.float32)).map(jnp.asarray)
    with pytest.raises(ValueError, match="no GPU kernel"):
        gq.qmatmul(jnp.ones((1, 64)), dataclasses.replace(w, layout=odd), interpret=True)
    with pytest.raises(ValueError, match="weight"):
        gq.qmatmul(jnp.ones((1, 32)), w, interpret=True)


# ---- lowering for the GPU --------------------------------------------------------------------


def lowers_to_triton(fn, *args) -> bool:
    """Whether fn lowers for CUDA (no GPU needed) with its kernel as a Triton call."""
    return TRITON_CALL in jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("dh", ga.HEAD_DIMS)
def test_attention_lowers_to_triton(dh, dtype):
    t = 1000
    q = jax.ShapeDtypeStruct((2, t, 8, dh), dtype)
    k = jax.ShapeDtypeStruct((2, t, 2, dh), dtype)
    seg, w = jax.ShapeDtypeStruct((2, t), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32)
    for causal, softcap in ((True, 50.0), (False, None)):
        fn = functools.partial(ga.attention, scale=0.1, softcap=softcap, causal=causal)
        assert lowers_to_triton(fn, q, k, k, seg, w)


@pytest.mark.parametrize("qtype", list(wq.LAYOUTS), ids=lambda t: t.name)
def test_qmatmul_lowers_to_triton(qtype):
    w = wq.empty(wq.LAYOUTS[qtype], (1000, 2304), lambda s, d: jax.ShapeDtypeStruct(s, d))
    for m in (1, 64, 300):
        assert lowers_to_triton(gq.qmatmul, jax.ShapeDtypeStruct((m, 2304), jnp.bfloat16), w)


# ---- decode attention over the cache in place -------------------------------------------------


def decode_reference(q, k_cache, v_cache, rows, positions, window, scale, softcap):
    """Each row's query against its cache row's positions up to its own, in float64 numpy: the
    decode mask of `model.decode` (j <= position, within the window if any)."""
    b, h, dh = q.shape
    kv, m = k_cache.shape[1], k_cache.shape[2]
    out = np.zeros((b, h, dh))
    for r in range(b):
        k, v = (np.asarray(c[int(rows[r])], np.float64) for c in (k_cache, v_cache))
        qq = np.asarray(q[r], np.float64).reshape(kv, h // kv, dh)
        s = np.einsum("kgd,ksd->kgs", qq, k) * scale
        if softcap:
            s = np.tanh(s / softcap) * softcap
        j, p = np.arange(m), int(positions[r])
        seen = (j <= p) & ((window == 0) | (p - j < window))
        s = s[..., seen]
        e = np.exp(s - s.max(-1, keepdims=True))
        out[r] = np.einsum("kgs,ksd->kgd", e / e.sum(-1, keepdims=True),
                           v[:, seen]).reshape(h, dh)
    return out


@pytest.mark.parametrize("h,kv,dh,window,softcap,splits", [
    (8, 2, 64, 0, None, 1), (8, 2, 64, 0, None, 3), (4, 4, 128, 9, 30.0, 2),
    (12, 2, 80, 0, 20.0, 1), (6, 1, 256, 70, None, 4), (16, 8, 96, 0, None, 2)])
def test_decode_attention_equals_the_reference(h, kv, dh, window, softcap, splits):
    """Rows reading slots in any order (one twice), at positions from the first to the cache's
    last, past blocks and splits that see nothing; the cache's other positions hold values the
    rows must not see, and NaN where nothing was ever written would poison a careless load."""
    rng = np.random.default_rng(h * dh + splits)
    n, m = 6, 200
    kc = rng.standard_normal((n, kv, m, dh)).astype(np.float32)
    vc = rng.standard_normal((n, kv, m, dh)).astype(np.float32)
    rows = np.array([4, 0, 2, 4, 5])
    positions = np.array([150, 0, 199, 63, 64])
    for r, p in zip(rows, positions, strict=True):
        if r != 4:
            kc[r, :, p + 1:], vc[r, :, p + 1:] = np.nan, np.nan
    q = rng.standard_normal((len(rows), h, dh)).astype(np.float32)
    got = gd.decode_attention(jnp.asarray(q), jnp.asarray(kc), jnp.asarray(vc),
                              jnp.asarray(rows), jnp.asarray(positions), window, scale=0.11,
                              softcap=softcap, splits=splits, interpret=True)
    want = decode_reference(q, kc, vc, rows, positions, window, 0.11, softcap)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


def test_decode_attention_in_bfloat16_over_a_bfloat16_cache():
    rng = np.random.default_rng(7)
    kc, vc = (jnp.asarray(rng.standard_normal((3, 2, 300, 128)), jnp.bfloat16) for _ in "kv")
    q = jnp.asarray(rng.standard_normal((2, 8, 128)), jnp.bfloat16)
    rows, positions = np.array([2, 1]), np.array([299, 40])
    got = gd.decode_attention(q, kc, vc, jnp.asarray(rows), jnp.asarray(positions), 0,
                              scale=0.09, splits=2, interpret=True)
    assert got.dtype == jnp.bfloat16
    want = decode_reference(np.asarray(q, np.float32), np.asarray(kc, np.float32),
                            np.asarray(vc, np.float32), rows, positions, 0, 0.09, None)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2)


def test_decode_tiles_fit_shared_memory():
    # float32 at head size 256 takes half tiles: two of 64 KiB, double-buffered, would not fit.
    assert [gd.block_k(dh, size) for dh, size in ((256, 4), (128, 4), (96, 4), (256, 2))] == [
        32, 64, 64, 64]


def test_decode_splits_fill_the_gpu_only_for_few_rows_of_long_contexts():
    assert gd.splits_for(64, 8, 8192) == 1  # 512 programs already
    assert gd.splits_for(1, 8, 8192) == 32
    assert gd.splits_for(1, 8, 256) == 1  # too short to split
    assert gd.splits_for(2, 8, 2048) == 8


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=lambda d: jnp.dtype(d).name)
def test_decode_attention_lowers_to_triton(dtype):
    q = jax.ShapeDtypeStruct((4, 16, 128), dtype)
    cache = jax.ShapeDtypeStruct((9 * 28, 8, 1000, 128), jnp.bfloat16)
    ints = jax.ShapeDtypeStruct((4,), jnp.int32)
    fn = functools.partial(gd.decode_attention, scale=0.1, softcap=30.0, splits=4)
    assert lowers_to_triton(fn, q, cache, cache, ints, ints, jax.ShapeDtypeStruct((), jnp.int32))


def cache_reads(jaxpr) -> list[tuple]:
    """The shapes of every gather and dynamic slice in a jaxpr (nested ones too): how XLA's decode
    path reads rows of the cache."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("gather", "dynamic_slice"):
            out.append(tuple(eqn.invars[0].aval.shape))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out += cache_reads(sub)
    return out


@pytest.mark.parametrize("family", ["qwen3", "gemma2"])
def test_the_gpu_plan_decodes_as_xla_does_reading_the_cache_in_place(family):
    """model.decode under the GPU plan (its kernel in interpret mode) gives XLA's hidden states and
    cache on the same weights and cache, a stacked cache read by layer index included; and it
    gathers no copy of the cache's rows, where XLA's path gathers one per layer."""
    from test_quant import _random_model

    from jaxembed import model
    from jaxembed.config import ModelConfig
    from jaxembed.kv_cache import KVCache
    from jaxembed.options import EngineOptions
    from jaxembed.plan import GPU_KERNELS, ExecutionPlan

    extra = dict(query_pre_attn_scalar=64, attn_logit_softcapping=5.0, sliding_window=8,
                 final_logit_softcapping=3.0, hidden_activation="gelu_pytorch_tanh") \
        if family == "gemma2" else {}
    cfg = ModelConfig.from_hf(dict(
        model_type=family, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=384,
        max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=True, **extra))
    plan = ExecutionPlan.decide(cfg, "float32", EngineOptions(), backend="gpu", interpret=True)
    assert plan.decode_attention == GPU_KERNELS
    params = _random_model(cfg, 5)
    rng = np.random.default_rng(6)
    slots, m = 5, 96
    cache = KVCache.zeros(cfg, slots, m, jnp.float32)
    cache = KVCache(*(jnp.asarray(rng.standard_normal(c.shape), jnp.float32) * 0.5
                      for c in (cache.k, cache.v)))
    tokens = jnp.asarray([3, 77, 301], jnp.int32)
    positions = jnp.asarray([40, 0, 63], jnp.int32)
    rows = jnp.asarray([4, 1, 0], jnp.int32)
    args = (params, cache, tokens, positions, rows, 64, cfg)
    want_cache, want = model.decode(*args)
    got_cache, got = model.decode(*args, plan=plan)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4)
    # Later layers' keys carry the earlier layers' rounding.
    for name in "kv":
        np.testing.assert_allclose(np.asarray(getattr(got_cache, name)),
                                   np.asarray(getattr(want_cache, name)), atol=1e-5)
    assert family != "gemma2" or cfg.sliding_window == 8 and cfg.attn_softcap == 5.0

    def reads(p):
        return [s for s in cache_reads(jax.make_jaxpr(
            functools.partial(model.decode, kv_len=64, cfg=cfg, plan=p))(
                params, cache, tokens, positions, rows).jaxpr) if s[-2:] == (m, cfg.head_dim)]
    assert reads(None), "the control: XLA's path gathers rows of the cache"
    assert reads(plan) == []


# ---- the plan's GPU branch, run on a CPU -------------------------------------------------------


def test_the_gpu_plan_runs_the_model_through_both_kernels():
    """ExecutionPlan.decide for one GPU picks the Pallas attention and quantized products; the
    model run with that plan (kernels in interpret mode) equals XLA's ops on the same weights,
    layers of several quantized types included."""
    from test_quant import _quantized, _random_model

    from jaxembed import model
    from jaxembed.config import ModelConfig
    from jaxembed.options import EngineOptions
    from jaxembed.plan import GPU_KERNELS, ExecutionPlan

    cfg = ModelConfig.from_hf(dict(
        model_type="qwen3", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=384,
        max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=True))
    plan = ExecutionPlan.decide(cfg, "float32", EngineOptions(), backend="gpu", interpret=True)
    assert (plan.attention, plan.quant_matmul, plan.decode_attention) == (GPU_KERNELS,) * 3
    assert plan.quant_op == "gpu_interpret"
    params = _random_model(cfg, 3)
    qp, ref = _quantized(params, [Q.Q4_K, Q.Q8_0], np.random.default_rng(4))
    rng = np.random.default_rng(5)
    lengths = [[20, 7, 30], [57]]
    t = 60
    seg = np.zeros((2, t), np.int32)
    pos = np.zeros((2, t), np.int32)
    for r, row in enumerate(lengths):
        col = 0
        for i, n in enumerate(row, start=1):
            seg[r, col : col + n], pos[r, col : col + n] = i, np.arange(n)
            col += n
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, t)), jnp.int32)
    want = model.forward(ref, tokens, jnp.asarray(pos), jnp.asarray(seg), cfg)
    qp = quant.with_op(qp, plan.quant_op)
    ops = {w.op for w in jax.tree.leaves(qp, is_leaf=lambda x: isinstance(x, wq.QArrays))
           if isinstance(w, wq.QArrays)}
    assert ops == {"gpu_interpret"}
    got = model.forward(qp, tokens, jnp.asarray(pos), jnp.asarray(seg), cfg, plan)
    real = seg > 0
    # The GPU's products round x and the weights to bfloat16, as its tensor cores take them.
    err = np.abs(np.asarray(got) - np.asarray(want))[real].max()
    assert err < 3e-2 * np.abs(np.asarray(want)).max(), err


def test_merged_projections_on_one_gpu_give_the_separate_ones_results():
    """On one GPU the plan merges q|k|v (with their biases) and gate|up into one weight each, held
    instead of the parts; the model's prefill and decode over them equal the separate products.
    Quantized weights stay apart. A CPU and a mesh keep them separate."""
    from test_quant import _quantized, _random_model

    from jaxembed import model
    from jaxembed.config import ModelConfig
    from jaxembed.kv_cache import KVCache
    from jaxembed.options import EngineOptions
    from jaxembed.plan import ExecutionPlan

    cfg = ModelConfig.from_hf(dict(
        model_type="qwen2", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
        max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False))
    assert cfg.qkv_bias

    def plan(**kw):
        return ExecutionPlan.decide(cfg, "float32", EngineOptions(), **kw)
    assert plan(backend="gpu", interpret=True).merged_projections
    assert not plan(backend="cpu").merged_projections
    assert not plan(backend="gpu", devices=2).merged_projections

    params = _random_model(cfg, 8)
    merged = model.merge_projections(params)
    assert set(merged["layers"]) - set(params["layers"]) == {"wqkv", "bqkv"}
    assert not {"wq", "wk", "wv", "bq", "bk", "bv"} & set(merged["layers"])
    assert set(merged["mlp"]) == {"w_gate_up", "w_down"}
    assert merged["layers"]["wqkv"].shape == (2, 128, cfg.q_size + 2 * cfg.kv_size)

    rng = np.random.default_rng(9)
    tokens = jnp.asarray(rng.integers(0, 300, (2, 24)), jnp.int32)
    positions = jnp.tile(jnp.arange(24, dtype=jnp.int32), (2, 1))
    seg = jnp.ones((2, 24), jnp.int32)
    np.testing.assert_allclose(np.asarray(model.forward(merged, tokens, positions, seg, cfg)),
                               np.asarray(model.forward(params, tokens, positions, seg, cfg)),
                               atol=1e-5)
    cache = KVCache.zeros(cfg, 3, 32, jnp.float32)
    steps = [model.decode(p, cache, tokens[:, 0], jnp.asarray([0, 5]), jnp.asarray([2, 0]), 16,
                          cfg) for p in (merged, params)]
    np.testing.assert_allclose(np.asarray(steps[0][1]), np.asarray(steps[1][1]), atol=1e-5)

    # The engine's merge frees the parts as it goes: one stacked weight twice at a time.
    copy = jax.tree.map(jnp.array, params)
    consumed = model.merge_projections(copy, consume=True)
    assert all(copy["layers"][n].is_deleted() for n in ("wq", "wk", "wv", "bq", "bk", "bv"))
    assert not copy["layers"]["wo"].is_deleted()
    for group in ("layers", "mlp"):
        for name, a in merged[group].items():
            np.testing.assert_array_equal(np.asarray(consumed[group][name]), np.asarray(a))

    qp, _ = _quantized(params, [Q.Q8_0], np.random.default_rng(1))
    kept = model.merge_projections(qp)
    assert {"wq", "wk", "wv", "bq", "bk", "bv"} <= set(kept["layers"])
    assert {"w_gate", "w_up"} <= set(kept["mlp"])
    np.testing.assert_array_equal(
        np.asarray(model.forward(kept, tokens, positions, seg, cfg)),
        np.asarray(model.forward(qp, tokens, positions, seg, cfg)))


def test_no_kernels_plans_every_op_in_xla_on_either_machine():
    """--no-kernels: the reference path, and the way round a kernel a machine cannot compile.
    The flag parses to the option, and the plan then holds no kernel for a GPU or a CPU."""
    import argparse

    from jaxembed import options as opts
    from jaxembed.config import ModelConfig
    from jaxembed.plan import CPU_KERNELS, GPU_KERNELS, XLA, ExecutionPlan

    parser = argparse.ArgumentParser()
    opts.add_arguments(parser)
    assert opts.from_args(parser.parse_args([]))["kernels"] is True
    off = opts.EngineOptions(**opts.from_args(parser.parse_args(["--no-kernels"])))
    assert off.kernels is False
    cfg = ModelConfig.from_hf(dict(
        model_type="qwen3", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=384,
        max_position_embeddings=256, rms_norm_eps=1e-6))
    for backend, kernel in (("gpu", GPU_KERNELS), ("cpu", CPU_KERNELS)):
        kw = dict(backend=backend, kernels_ok=True, quant_kernels_ok=True)
        on = ExecutionPlan.decide(cfg, "float32", opts.EngineOptions(), **kw)
        assert (on.attention, on.decode_attention, on.quant_matmul) == (kernel,) * 3
        plan = ExecutionPlan.decide(cfg, "float32", off, **kw)
        assert (plan.attention, plan.decode_attention, plan.quant_matmul) == (XLA,) * 3
        assert not plan.embed_weights.packed and not plan.decode_weights.packed
        assert not plan.merged_projections  # the weights as loaded
        assert on.merged_projections == (backend == "gpu")
        # Sampling skips no filter only on a GPU, whose conditionals may sync with the host.
        assert plan.branchless_sampling == on.branchless_sampling == (backend == "gpu")
    tpu = ExecutionPlan.decide(cfg, "float32", opts.EngineOptions(), backend="tpu")
    assert not tpu.branchless_sampling


# ---- the whole engine on the plan's GPU branch, run on a CPU ------------------------------------


def test_the_engine_on_the_gpu_branch_serves_what_the_cpu_plan_serves(tmp_path, monkeypatch):
    """An engine whose plan is one GPU's (its kernels in interpret mode): its params hold the
    merged projections, its decoder module takes them, its steps run the packed-row attention,
    the decode kernel over the cache and sampling without conditionals, on the coarse ladder;
    it embeds and generates (greedy, and seeded with top-p) what the CPU's plan does."""
    from jaxembed import EngineBuilder
    from jaxembed.plan import GPU_KERNELS, ExecutionPlan

    from tiny_models import build_llama

    folder = build_llama(tmp_path / "llama", seed=3, head_dim=64, hidden_size=128,
                         num_attention_heads=2, num_key_value_heads=1)
    kw = dict(model=folder, dtype="float32", max_model_len=256, max_batch_tokens=512,
              max_num_seqs=4, warmup=False, progress=False, compilation_cache=False)
    texts = ["hello world", "a somewhat longer text about nothing in particular", "x"]
    asks = [dict(temperature=0), dict(temperature=0.8, top_p=0.9, seed=5)]

    def serve(engine):
        try:
            return engine, engine.encode(texts), [
                engine.generate("hello there", max_tokens=12, ignore_eos=True, **a
                                ).choices[0].token_ids for a in asks]
        finally:
            engine.shutdown()

    cpu, cpu_vectors, cpu_tokens = serve(EngineBuilder(**kw).build())
    decide = ExecutionPlan.decide.__func__
    monkeypatch.setattr(ExecutionPlan, "decide", classmethod(
        lambda cls, *a, **k: decide(cls, *a, **{**k, "backend": "gpu", "interpret": True})))
    gpu, vectors, tokens = serve(EngineBuilder(**kw).build())
    plan = gpu.plan
    assert (plan.attention, plan.decode_attention) == (GPU_KERNELS, GPU_KERNELS)
    assert plan.merged_projections and plan.branchless_sampling and gpu.buckets.is_coarse
    assert {"wqkv", "w_gate_up"} <= set(gpu.checkpoint.params["layers"]) | set(
        gpu.checkpoint.params["mlp"])
    assert not cpu.plan.merged_projections
    cos = (vectors * cpu_vectors).sum(-1) / np.linalg.norm(vectors, axis=-1) / np.linalg.norm(
        cpu_vectors, axis=-1)
    assert cos.min() > 0.9999, cos
    assert tokens == cpu_tokens


def test_the_gpu_branch_compiles_every_program_at_start_up(tmp_path, monkeypatch):
    """On the plan's GPU branch (interpret mode) the builder's warm-up compiles every program of
    the coarse ladder, greedy and sampled steps apart (greedy ones skip the filters, which a
    branchless sampler would otherwise run): then embeddings, greedy, seeded, logprobs and
    grammar-constrained generation compile nothing."""
    from jaxembed import EngineBuilder, StructuredOutput
    from jaxembed.plan import ExecutionPlan

    from tiny_models import build_llama

    folder = build_llama(tmp_path / "llama", seed=3, head_dim=64, hidden_size=128,
                         num_attention_heads=2, num_key_value_heads=1)
    decide = ExecutionPlan.decide.__func__
    monkeypatch.setattr(ExecutionPlan, "decide", classmethod(
        lambda cls, *a, **k: decide(cls, *a, **{**k, "backend": "gpu", "interpret": True})))
    engine = EngineBuilder(model=folder, dtype="float32", max_model_len=128,
                           max_batch_tokens=256, max_num_seqs=2, progress=False,
                           compilation_cache=False).build()
    try:
        assert engine.plan.branchless_sampling and engine.buckets.is_coarse
        started = engine.stats.compilations
        engine.encode(["hello world", "a longer text " * 12])
        kw = dict(max_tokens=5, ignore_eos=True)
        engine.generate("hello there", temperature=0, **kw)
        engine.generate("hello there", temperature=0.7, top_p=0.9, seed=1, **kw)
        engine.generate("hello there", temperature=0, logprobs=2, **kw)
        out = engine.generate("pick", temperature=0,
                              structured=StructuredOutput(regex="(yes|no)"), max_tokens=4)
        assert out.choices[0].text in ("yes", "no")
        assert engine.stats.compilations == started
    finally:
        engine.shutdown()
