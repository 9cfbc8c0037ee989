"""Quantized weights kept in their blocks: the repacking of every GGML type against
`gguf.quants.dequantize`, XLA's dequantization against numpy's, and the CPU kernel's products
against the same products computed in float64 from the same int8-quantized activations."""

from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from jaxembed import kernels, model, quant
from jaxembed.config import ModelConfig
from jaxembed.weights import quant as wq

# Where each type keeps its float16 scales in a block (the rest may be any bytes).
F16_FIELDS = {
    Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0], Q.Q2_K: [80, 82],
    Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208], Q.IQ4_NL: [0],
    Q.IQ4_XS: [0],
}
TYPES = list(F16_FIELDS)
MAX_GROWTH = {Q.Q6_K: 1.31, Q.Q5_0: 1.55, Q.Q5_1: 1.5, Q.Q5_K: 1.57, Q.Q3_K: 1.33,
              Q.Q2_K: 1.96, Q.IQ4_NL: 1.89, Q.IQ4_XS: 1.96}
needs_kernel = pytest.mark.skipif(not kernels.quant_available(),
                                  reason=f"no quantized kernel: "
                                  f"{kernels.unavailable_reason(kernels.QUANT)}")


def random_blocks(qtype: Q, n: int, k: int, rng: np.random.Generator, scale: float = 0.01
                  ) -> np.ndarray:
    """[n, bytes of k values] of random blocks: every bit pattern of values and integer scales,
    with finite float16 scales (some negative: a Q4_1 min, a signed d)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n * (k // block), size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        scale = (rng.uniform(-1, 1, (raw.shape[0], 1)) * scale).astype(np.float16)
        raw[:, off : off + 2] = scale.view(np.uint8)
    return raw.reshape(n, -1)


def test_every_linear_type_has_a_layout():
    assert set(wq.REPACK) == set(F16_FIELDS)
    for qtype, lay in wq.LAYOUTS.items():
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        assert lay.block == block and lay.source == qtype.name


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_repacked_weights_equal_gguf_dequantize(qtype):
    rng = np.random.default_rng(int(qtype))
    raw = random_blocks(qtype, 24, 512, rng)
    want = gguf.quants.dequantize(raw, qtype).reshape(24, 512)
    q = wq.repack(raw, qtype, (24, 512))
    assert q.shape == (24, 512) and q.layout == wq.LAYOUTS[qtype]
    # The same values, to the last bit or one rounding of float32 apart (Q6_K and Q3_K fold
    # their offsets into a min: (d sc) u - d (32 sc) rounds where (d sc)(u - 32) may not).
    np.testing.assert_allclose(wq.dequantize(q), want, rtol=1e-6, atol=1e-9)
    # The bytes a weight takes: about the file's own, but where values of 2, 3, 5 or 6 bits
    # take 4 or 8 (Q6_K 1.31x, the 5-bit types about 1.6x, Q2_K 1.95x).
    assert q.nbytes == 24 * q.layout.nbytes_per(512)
    assert q.nbytes <= MAX_GROWTH.get(qtype, 1.05) * raw.nbytes
    # And XLA's dequantization gives numpy's.
    np.testing.assert_allclose(np.asarray(quant.dequantize(q.map(jnp.asarray))),
                               wq.dequantize(q), rtol=1e-6, atol=1e-9)


def test_repack_keeps_leading_dims_and_refuses_partial_blocks():
    rng = np.random.default_rng(0)
    raw = random_blocks(Q.Q4_K, 3 * 8, 256, rng)
    q = wq.repack(raw, Q.Q4_K, (3, 8, 256))  # stacked experts
    assert q.qs.shape == (3, 8, 128) and q.d.shape == (3, 8, 1)
    want = gguf.quants.dequantize(raw, Q.Q4_K).reshape(3, 8, 256)
    np.testing.assert_allclose(wq.dequantize(q), want, rtol=1e-6)
    with pytest.raises(ValueError, match="whole Q4_K blocks"):
        wq.repack(raw, Q.Q4_K, (24 * 2, 128))


def test_quantize_q8_matches_ggml():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 96)).astype(np.float32)
    x[3] = 0  # an all-zero block has scale 0
    q = wq.quantize_q8(x)
    ref = gguf.quants.quantize(x, Q.Q8_0)
    np.testing.assert_array_equal(wq.dequantize(q), gguf.quants.dequantize(ref, Q.Q8_0))


def _x_quantized(x: np.ndarray, block: int) -> np.ndarray:
    """x as the kernel quantizes it: per `block` values, scale = max |x| / 127 and
    q = round(x * (127 / max)), in float32; returned dequantized (q * scale)."""
    m, k = x.shape
    b = x.reshape(m, k // block, block)
    mx = np.abs(b).max(-1, keepdims=True)
    inv = np.where(mx > 0, np.float32(127) / np.where(mx > 0, mx, 1), 0).astype(np.float32)
    q = np.rint(b * inv)
    return (q * (mx / np.float32(127))).reshape(m, k)


# Rows around the kernel's tiles (4) and task (64); weights of one and several tasks of 32.
@needs_kernel
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m,n,k", [(1, 40, 512), (6, 33, 256), (70, 65, 768)])
def test_kernel_equals_float64_products_of_the_quantized_operands(qtype, m, n, k):
    rng = np.random.default_rng(m * 100 + n + int(qtype))
    q = wq.repack(random_blocks(qtype, n, k, rng), qtype, (n, k))
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0, :32] *= 50  # one block of outliers: its own scale
    qj = q.map(jnp.asarray)
    got = np.asarray(jax.jit(kernels.qmatmul)(jnp.asarray(x), qj))
    want = _x_quantized(x, q.layout.block).astype(np.float64) @ wq.dequantize(q).T
    assert got.shape == (m, n) and got.dtype == np.float32
    # Integer sums are exact; the floats round once a block. A wrong nibble, scale or min is
    # off by a good part of the largest value.
    assert np.abs(got - want).max() < 2e-5 * np.abs(want).max()
    # Two passes: x's remainder too, for the float product to within about 1e-4 of its largest
    # value, where one pass is off by about 1e-2.
    exact = x.astype(np.float64) @ wq.dequantize(q).astype(np.float64).T
    two = np.asarray(jax.jit(lambda x, w: kernels.qmatmul(x, w, passes=2))(jnp.asarray(x), qj))
    assert np.abs(two - exact).max() < 4e-4 * np.abs(exact).max()
    assert np.abs(got - exact).max() > 10 * np.abs(two - exact).max()


@needs_kernel
def test_kernel_keeps_leading_dims():
    rng = np.random.default_rng(3)
    q = wq.repack(random_blocks(Q.Q4_1, 16, 64, rng), Q.Q4_1, (16, 64)).map(jnp.asarray)
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    got = np.asarray(kernels.qmatmul(jnp.asarray(x), q))
    flat = np.asarray(kernels.qmatmul(jnp.asarray(x.reshape(6, 64)), q))
    np.testing.assert_array_equal(got.reshape(6, 16), flat)


def _random_model(cfg: ModelConfig, seed: int) -> dict:
    rng = np.random.default_rng(seed)

    def init(spec: tuple) -> jax.Array:
        shape, axes = spec
        if "norm" in str(axes):
            return jnp.asarray(1 + 0.1 * rng.standard_normal(shape), jnp.float32)
        return jnp.asarray(0.08 * rng.standard_normal(shape), jnp.float32)
    return jax.tree.map(init, model.param_shapes(cfg), is_leaf=model.is_param_spec)


def _quantized(params: dict, types: list[Q], rng: np.random.Generator) -> tuple[dict, dict]:
    """params with every projection and the embedding quantized, each layer's weight to the
    next of `types` in turn (so one stack mixes layouts), and the float params holding exactly
    the quantized weights' values (the reference)."""
    qp = {**params, "layers": dict(params["layers"]), "mlp": dict(params["mlp"])}
    ref = {**params, "layers": dict(params["layers"]), "mlp": dict(params["mlp"])}
    turn = iter(range(10_000))

    def one(w: np.ndarray) -> wq.QArrays:  # w: [N, K]
        qtype = types[next(turn) % len(types)]
        try:
            raw = gguf.quants.quantize(w, qtype)
        except NotImplementedError:  # gguf cannot make K-quants: random blocks of w's size
            raw = random_blocks(qtype, w.shape[0], w.shape[1], rng, scale=3e-4)
        return wq.repack(raw, qtype, w.shape)

    for group, names in (("layers", ("wq", "wk", "wv", "wo")),
                         ("mlp", ("w_gate", "w_up", "w_down"))):
        for n in names:
            stack = np.asarray(params[group][n])  # [L, in, out]
            slices = tuple(one(np.ascontiguousarray(stack[i].T)) for i in range(len(stack)))
            qp[group][n] = quant.QStack(tuple(s.map(jnp.asarray) for s in slices))
            ref[group][n] = jnp.stack([jnp.asarray(wq.dequantize(s).T) for s in slices])
    table = one(np.asarray(params["embed"]))
    qp["embed"], ref["embed"] = table.map(jnp.asarray), jnp.asarray(wq.dequantize(table))
    return qp, ref


CFG = ModelConfig.from_hf(dict(
    model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, vocab_size=384, max_position_embeddings=256,
    rms_norm_eps=1e-5, tie_word_embeddings=True))


@pytest.mark.parametrize("passes", [0, pytest.param(1, marks=needs_kernel),
                                    pytest.param(2, marks=needs_kernel)])
def test_model_over_quantized_weights_equals_the_dequantized_model(passes):
    # Layers of one stack in four types (as llama.cpp's Q4_K_M mixes Q4_K and Q6_K): the
    # scanned layers switch between each layer's own arrays.
    params = _random_model(CFG, 0)
    qp, ref = _quantized(params, [Q.Q4_K, Q.Q6_K, Q.Q8_0, Q.Q4_1], np.random.default_rng(1))
    qp = quant.with_op(qp, "cpu" if passes else "xla", passes)
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, 48)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(48), (2, 48))
    seg = jnp.ones((2, 48), jnp.int32)
    want = model.forward(ref, tokens, pos, seg, CFG)
    got = jax.jit(lambda p, t: model.forward(p, t, pos, seg, CFG))(qp, tokens)
    logits = model.logits(qp, got[:, -1], CFG)
    want_logits = model.logits(ref, want[:, -1], CFG)
    if passes != 1:  # XLA multiplies the dequantized weights, or the kernel nearly as exactly
        tol = 1e-4 if passes == 0 else 1e-3
        np.testing.assert_allclose(got, want, atol=tol * float(jnp.abs(want).max()))
        np.testing.assert_allclose(logits, want_logits,
                                   atol=tol * float(jnp.abs(want_logits).max()))
        return
    # One pass multiplies int8-quantized activations, as llama.cpp does: close, not equal.
    cos = jnp.sum(got.mean(1) * want.mean(1), -1) / (
        jnp.linalg.norm(got.mean(1), axis=-1) * jnp.linalg.norm(want.mean(1), axis=-1))
    assert float(cos.min()) > 0.999
    assert float(jnp.abs(logits - want_logits).max()) < 0.05 * float(jnp.abs(want_logits).max())


# A process that writes the persistent compilation cache, then one that reads it (a server's
# restart): the program holding the kernel's custom call comes back from the cache and runs.
CACHE_ROUND_TRIP = """
import sys
import gguf.quants as gq
import jax, jax.numpy as jnp, numpy as np
from gguf import GGMLQuantizationType as Q
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
hits = []
jax.monitoring.register_event_listener(
    lambda event, **_: hits.append(event) if event.endswith("cache_hits") else None)
from jaxembed import kernels
from jaxembed.weights import quant as wq
rng = np.random.default_rng(0)
w = rng.standard_normal((64, 256)).astype(np.float32)
q = wq.repack(gq.quantize(w, Q.Q8_0), Q.Q8_0, (64, 256)).map(jnp.asarray)
x = jnp.asarray(rng.standard_normal((3, 256)).astype(np.float32))
out = jax.jit(lambda x, w: kernels.qmatmul(x, w, passes=2) * 2.0)(x, q)
print(len(hits), np.asarray(out).tobytes().hex())
"""


@needs_kernel
def test_a_program_with_the_kernel_comes_back_from_the_compilation_cache(tmp_path):
    import subprocess
    import sys

    def run() -> tuple[int, str]:
        done = subprocess.run([sys.executable, "-c", CACHE_ROUND_TRIP, str(tmp_path / "xla")],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        hits, out = done.stdout.split()
        return int(hits), out

    (written_hits, written), (read_hits, read) = run(), run()
    assert written_hits == 0 and read_hits > 0  # the second process compiled nothing
    assert read == written


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q8_0])
def test_xla_dequantizes_a_part_of_the_weight_at_a_time(qtype, monkeypatch):
    # The same products as over the whole weight dequantized, in a fraction of its floats.
    rng = np.random.default_rng(5)
    n, k = 512, 512
    w = wq.repack(random_blocks(qtype, n, k, rng), qtype, (n, k)).map(jnp.asarray)
    x = jnp.asarray(rng.standard_normal((3, 40, k)).astype(np.float32))

    def compiled(chunk_bytes: int):
        monkeypatch.setattr(quant, "DEQUANTIZED_CHUNK_BYTES", chunk_bytes)
        jax.clear_caches()
        return jax.jit(lambda x, w: quant.matmul(x, w)).lower(x, w).compile()
    whole, parts = compiled(1 << 40), compiled(n * k * 4 // 8)
    assert quant._chunks(n, k, 4) == 8
    np.testing.assert_array_equal(np.asarray(parts(x, w)), np.asarray(whole(x, w)))
    ref = np.asarray(x, np.float64) @ wq.dequantize(w.map(np.asarray)).T.astype(np.float64)
    np.testing.assert_allclose(np.asarray(parts(x, w)), ref, rtol=0,
                               atol=1e-4 * np.abs(ref).max())  # float32 sums of 512 products
    # The whole weight in float32 (1 MiB) is no longer among the step's buffers.
    assert (whole.memory_analysis().temp_size_in_bytes - parts.memory_analysis().temp_size_in_bytes
            >= n * k * 4 // 2)


def test_a_weight_is_split_only_into_parts_of_64_rows_or_more():
    assert quant._chunks(8192, 2048, 4) == 4  # 64 MiB in parts of 16
    assert quant._chunks(100, 2048, 4) == 1  # 0.8 MiB: whole
    # Qwen's vocabulary, 151,936 = 2^7 x 1,187 rows: 1.16 GiB in 128 parts of 1,187 rows.
    assert quant._chunks(151936, 2048, 4) == 128
    assert quant._chunks(2 * 1031, 8192, 4) == 1  # 64 MiB, but 1,031 rows or 2 parts only: whole


def test_a_weight_smaller_than_the_output_is_dequantized_whole(monkeypatch):
    # Rows >= K: the parts' stacked outputs would cost more than the weight's floats save.
    rng = np.random.default_rng(6)
    w = wq.repack(random_blocks(Q.Q4_K, 512, 256, rng), Q.Q4_K, (512, 256)).map(jnp.asarray)
    x = jnp.asarray(rng.standard_normal((300, 256)).astype(np.float32))
    monkeypatch.setattr(quant, "DEQUANTIZED_CHUNK_BYTES", 512 * 256 * 4 // 8)
    jax.clear_caches()
    hlo = jax.jit(lambda x, w: quant.matmul(x, w)).lower(x, w).as_text()
    assert "while" not in hlo  # no loop over parts
    small = jax.jit(lambda x, w: quant.matmul(x, w)).lower(x[:100], w).as_text()
    assert "while" in small  # the control: fewer rows than K split
