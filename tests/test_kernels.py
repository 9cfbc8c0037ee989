"""The CPU kernels against float64 references: the bf16 matmul on the same bfloat16-rounded
operands, attention against a masked softmax and against the model's own XLA path."""

import itertools
import os
import subprocess

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxembed import fetch, kernels, model
from jaxembed.builder import enable_compilation_cache
from jaxembed.plan import CPU_KERNELS

needs_kernel = pytest.mark.skipif(not kernels.available(),
                                  reason=f"no bf16 CPU kernel: {kernels.unavailable_reason()}")


def _reference(x: np.ndarray, w: np.ndarray, dtype: str = "bfloat16") -> np.ndarray:
    """x and w rounded to dtype (bfloat16: to nearest even), multiplied exactly in float64."""
    t = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    return x.astype(t).astype(np.float64) @ w.astype(t).astype(np.float64)


def test_pack_round_trips_and_lays_out_pairs():
    w = np.arange(6 * 32, dtype=np.float32).reshape(6, 32)
    p = kernels.pack(jnp.asarray(w))
    assert p.shape == (2, 3, 16, 2) and p.dtype == jnp.uint16 and kernels.is_packed(p)
    # Block 1, k-pair 2, column 16 + 5: the weights of inputs 4 and 5 for output column 21, as
    # bfloat16 bits.
    pair = jax.lax.bitcast_convert_type(p[1, 2, 5], jnp.bfloat16)
    assert pair.tolist() == [w[4, 21], w[5, 21]]
    assert not kernels.is_packed(jnp.zeros((2, 3, 16, 2), jnp.bfloat16))
    np.testing.assert_array_equal(kernels.unpack(p), w)
    stacked = np.stack([w, -w])
    np.testing.assert_array_equal(kernels.unpack(kernels.pack(jnp.asarray(stacked))), stacked)
    assert kernels.packable(w) and kernels.packable(stacked)
    assert not kernels.packable(w[:5]) and not kernels.packable(w[:, :24])
    assert not kernels.packable(w, jnp.float16)


def test_float32_pack_lays_out_rows_of_a_column_block():
    w = np.arange(6 * 32, dtype=np.float32).reshape(6, 32)
    p = kernels.pack(jnp.asarray(w), jnp.float32)
    assert p.shape == (2, 3, 2, 16) and p.dtype == jnp.float32
    assert kernels.packed_type(p) == "float32" and kernels.packed_type(kernels.pack(w)) == \
        "bfloat16"
    # Block 1, input 5 (pair 2, second of it): output columns 16-31 of row 5, in order.
    assert p[1, 2, 1].tolist() == w[5, 16:].tolist()
    np.testing.assert_array_equal(kernels.unpack(p), w)
    stacked = np.stack([w, -w])
    np.testing.assert_array_equal(
        kernels.unpack(kernels.pack(jnp.asarray(stacked), jnp.float32)), stacked)
    # Neither a plain weight nor experts' [E, K, N] read as packed ones.
    assert not kernels.is_packed(jnp.zeros((2, 3, 2, 16), jnp.bfloat16))
    assert not kernels.is_packed(jnp.zeros((2, 3, 16, 2), jnp.float32))
    assert not kernels.is_packed(jnp.zeros((4, 6, 32), jnp.float32))


# Rows around the register tile (6) and the task (96); columns around the 4-block panel (64);
# inputs whole and partial 16-float vectors; both weight types.
@needs_kernel
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("m,k,n", [
    (1, 576, 1536), (2, 64, 48), (5, 34, 16), (6, 96, 64), (7, 64, 80), (13, 1536, 192),
    (16, 576, 576), (97, 128, 272), (200, 96, 112),
])
def test_matmul_equals_numpy(m, k, n, dtype):
    rng = np.random.default_rng(m * 1000 + n)
    x = rng.standard_normal((m, k), np.float32)
    w = rng.standard_normal((k, n), np.float32)
    p = kernels.pack(jnp.asarray(w), dtype)
    got = np.asarray(jax.jit(kernels.matmul)(jnp.asarray(x), p))
    want = _reference(x, w, dtype)
    assert got.shape == (m, n) and got.dtype == np.float32
    # Products of bf16 values are exact in float32; only the float32 sums round. Rounding x by
    # truncation instead of to nearest would be off by ~1e-3 of the largest value.
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()


@needs_kernel
def test_matmul_keeps_leading_dims_and_runs_in_a_jitted_model_step():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 3, 64), np.float32))
    w = rng.standard_normal((64, 32), np.float32)
    p = kernels.pack(jnp.asarray(w))

    @jax.jit
    def step(x, p):  # the kernel's output feeds XLA's own ops and back
        h = jax.nn.silu(kernels.matmul(x, p))
        return kernels.matmul(jnp.concatenate([h, h], -1), p)

    h = jax.nn.silu(_reference(np.asarray(x).reshape(6, 64), w)).astype(np.float32)
    want = _reference(np.concatenate([h, h], -1), w).reshape(2, 3, 32)
    got = np.asarray(step(x, p))
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()


def test_off_switch_and_backends_say_why(monkeypatch):
    monkeypatch.setenv("JAXEMBED_CPU_KERNELS", "0")
    assert kernels._load() == "JAXEMBED_CPU_KERNELS=0"
    monkeypatch.delenv("JAXEMBED_CPU_KERNELS")
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: {"avx2"})
    assert "avx512_bf16" in kernels._load()


def test_kernel_builds_where_the_cpu_allows():
    # A missing compiler or a build error would otherwise only show as slower bf16 decoding.
    if kernels.CPU_FLAG not in kernels._cpu_flags() or jax.default_backend() != "cpu":
        pytest.skip(f"this machine cannot run the kernel: {kernels.unavailable_reason()}")
    assert kernels.available(), kernels.unavailable_reason()


# ---- the kernels' cache: only code this user built is loaded -----------------------------------

can_build = pytest.mark.skipif(
    kernels.CPU_FLAG not in kernels._cpu_flags() or kernels._compiler() is None,
    reason="this machine cannot build the kernels")


@can_build
def test_a_cache_others_can_write_to_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXEMBED_CACHE", str(tmp_path))
    (tmp_path / "kernels").mkdir(mode=0o777)
    (tmp_path / "kernels").chmod(0o777)  # past the umask: anyone may plant a library here
    reason = kernels._load()
    assert reason is not None and "untrusted" in reason and "writable by" in reason


@can_build
def test_a_library_of_another_owner_is_refused(tmp_path, monkeypatch):
    if os.getuid() != 0:
        pytest.skip("only root can give a file to another user")
    monkeypatch.setenv("JAXEMBED_CACHE", str(tmp_path))
    planted = kernels.library_path(kernels._compiler())
    planted.parent.mkdir(mode=0o700, parents=True)
    planted.write_bytes(b"\x7fELF")
    os.chown(planted, 12345, 12345)
    reason = kernels._load()
    assert reason is not None and "uid 12345" in reason


def test_the_kernel_cache_is_made_private(tmp_path, monkeypatch):
    # A compiler that names itself and then fails: the folder is made, nothing is built.
    failing = tmp_path / "failing-c++"
    failing.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo failing 1.0; exit 0; }\nexit 1\n')
    failing.chmod(0o755)
    monkeypatch.setenv("JAXEMBED_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="failed"):
        kernels._build(str(failing))
    assert (tmp_path / "cache" / "kernels").stat().st_mode & 0o777 == 0o700


def test_a_hung_compiler_falls_back(tmp_path, monkeypatch):
    hung = tmp_path / "hung-c++"
    hung.write_text("#!/bin/sh\nsleep 30\n")
    hung.chmod(0o755)
    monkeypatch.setenv("CXX", str(hung))
    monkeypatch.setenv("JAXEMBED_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: {kernels.CPU_FLAG})
    monkeypatch.setattr(kernels, "COMPILER_TIMEOUT_S", 0.5)
    if jax.default_backend() != "cpu":
        pytest.skip("the kernels are for the CPU backend")
    reason = kernels._load()
    assert reason is not None and "did not finish" in reason


@can_build
def test_a_library_missing_a_symbol_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXEMBED_CACHE", str(tmp_path))
    cxx = kernels._compiler()
    lib = kernels.library_path(cxx)
    lib.parent.mkdir(mode=0o700, parents=True)
    empty = tmp_path / "empty.cc"
    empty.write_text("extern \"C\" int jaxembed_nothing() { return 0; }\n")
    subprocess.run([cxx, "-shared", "-fPIC", str(empty), "-o", str(lib)], check=True)
    reason = kernels._load()
    assert reason is not None and "lacks a symbol" in reason


def test_a_private_cache_folder_is_trusted_and_others_are_not(tmp_path):
    folder = tmp_path / "a" / "b"
    assert fetch.trusted_dir(folder) is None
    assert folder.stat().st_mode & 0o777 == 0o700
    folder.chmod(0o770)
    assert "writable by its group" in fetch.trusted_dir(folder)


def test_no_compilation_cache_in_a_folder_others_can_write_to(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXEMBED_CACHE", str(tmp_path))
    (tmp_path / "xla").mkdir(mode=0o777)
    (tmp_path / "xla").chmod(0o777)
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        assert not enable_compilation_cache()  # the function itself, not conftest's stand-in
        assert jax.config.jax_compilation_cache_dir is None
        (tmp_path / "xla").chmod(0o700)  # the same folder, this user's alone: used
        assert enable_compilation_cache()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def _attention_reference(q, k, v, seg, window, scale, softcap, causal):
    """Masked softmax attention in float64, the mask over segment ids as `attention_masks`."""
    t, g = q.shape[1], q.shape[2] // k.shape[2]
    kk, vv = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bthd,bshd->bhts", q.astype(np.float64), kk) * scale
    if softcap:
        s = np.tanh(s / softcap) * softcap
    i, j = np.arange(t)[:, None], np.arange(t)[None]
    m = seg[:, :, None] == seg[:, None, :]
    if causal:
        m = m & (j <= i)
    if window:
        m = m & (np.abs(i - j) < window)
    s = np.where(m[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhts,bshd->bthd", p / p.sum(-1, keepdims=True), vv)


# Grouped and plain heads, head sizes 16-256, causal or not, windows, softcap (Gemma 2), rows
# longer than one task's block of queries.
@needs_kernel
@pytest.mark.parametrize("b,t,h,kv,dh,causal,window,softcap", [
    (1, 64, 4, 2, 16, True, 0, 0.0), (2, 200, 9, 3, 64, True, 0, 0.0),
    (1, 300, 8, 2, 128, False, 0, 0.0), (2, 130, 4, 4, 32, True, 7, 0.0),
    (1, 97, 6, 2, 256, True, 0, 50.0), (1, 150, 4, 1, 64, False, 9, 0.0),
])
def test_attention_equals_masked_softmax(b, t, h, kv, dh, causal, window, softcap):
    rng = np.random.default_rng(t + dh)
    q = rng.standard_normal((b, t, h, dh), np.float32)
    k = rng.standard_normal((b, t, kv, dh), np.float32)
    v = rng.standard_normal((b, t, kv, dh), np.float32)
    seg = np.zeros((b, t), np.int32)  # packed rows: a few sequences, then padding
    for r in range(b):
        cuts = [0, *sorted(rng.choice(np.arange(1, t - 5), 4, replace=False)), t - 5]
        for n, (lo, hi) in enumerate(itertools.pairwise(cuts)):
            seg[r, lo:hi] = n + 1
    scale = 3 / np.sqrt(dh)  # sharp enough that a wrong mask or max shows

    def run(q, k, v, seg, window):
        return kernels.attention(q, k, v, seg, window, scale=scale, softcap=softcap,
                                 causal=causal)
    got = np.asarray(jax.jit(run)(q, k, v, seg, np.int32(window)))
    want = _attention_reference(q, k, v, seg, window, scale, softcap, causal)
    real = seg > 0  # padding's output is never read
    assert np.abs(got - want)[real].max() < 2e-5 * np.abs(want).max()


@needs_kernel
def test_model_attends_alike_through_the_kernel(tiny_engine):
    # The same forward pass with XLA's masked attention and with the kernel, on packed rows.
    cfg, params = tiny_engine.config, tiny_engine.params
    rng = np.random.default_rng(1)
    lengths = [[40, 3, 70, 15], [128]]
    seg = np.array([np.repeat(np.arange(1, len(r) + 1), r) for r in lengths], np.int32)
    pos = np.array([np.concatenate([np.arange(n) for n in r]) for r in lengths], np.int32)
    tokens = rng.integers(0, cfg.vocab_size, seg.shape).astype(np.int32)
    run = jax.jit(model.forward, static_argnames=("cfg", "plan"))
    plan = tiny_engine.plan
    assert plan.attention == CPU_KERNELS  # the engine attends in the kernel on this machine
    want = np.asarray(run(params, tokens, pos, seg, cfg=cfg))
    got = np.asarray(run(params, tokens, pos, seg, cfg=cfg, plan=plan))
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()


def _decode_reference(q, kc, vc, slots, positions, window, scale, softcap):
    """Each row's attention over its slot's cache positions up to its own (within the window),
    in float64, from caches that already hold the step's keys and values."""
    g = q.shape[1] // kc.shape[1]
    out = np.zeros(q.shape)
    for r, (s, p) in enumerate(zip(slots, positions, strict=True)):
        lo = max(0, p + 1 - window) if window else 0
        keys = np.repeat(kc[s, :, lo:p + 1].astype(np.float64), g, axis=0)  # [H, n, Dh]
        values = np.repeat(vc[s, :, lo:p + 1].astype(np.float64), g, axis=0)
        x = np.einsum("hd,hnd->hn", q[r], keys) * scale
        if softcap:
            x = np.tanh(x / softcap) * softcap
        e = np.exp(x - x.max(-1, keepdims=True))
        out[r] = np.einsum("hn,hnd->hd", e / e.sum(-1, keepdims=True), values)
    return out


# Cache types (float32, bfloat16 and its bits), grouped and plain heads, head sizes 16-256,
# windows (shorter and longer than the position), softcap, positions 0 to the cache's last, and
# padding rows that share the scratch slot; steps small enough for one thread and large enough
# to be shared.
@needs_kernel
@pytest.mark.parametrize("cache,b,h,kv,dh,m,window,softcap", [
    ("float32", 1, 9, 3, 64, 96, 0, 0.0), ("uint16", 4, 9, 3, 64, 96, 0, 0.0),
    ("bfloat16", 3, 8, 2, 128, 96, 5, 0.0), ("float32", 5, 4, 4, 16, 96, 40, 30.0),
    ("uint16", 2, 16, 1, 256, 96, 0, 50.0), ("float32", 16, 32, 2, 32, 96, 0, 0.0),
    ("uint16", 16, 9, 3, 64, 1000, 300, 0.0), ("float32", 16, 8, 4, 64, 700, 0, 0.0),
])
def test_decode_attention_equals_softmax_over_the_cache(cache, b, h, kv, dh, m, window,
                                                         softcap):
    rng = np.random.default_rng(b * h + dh)
    slots_n = 17
    bits = cache == "uint16"
    dtype = ml_dtypes.bfloat16 if cache != "float32" else np.float32
    kc = rng.standard_normal((slots_n, kv, m, dh)).astype(dtype)
    vc = rng.standard_normal((slots_n, kv, m, dh)).astype(dtype)
    q = rng.standard_normal((b, h, dh), np.float32)
    k = rng.standard_normal((b, kv, dh), np.float32)
    v = rng.standard_normal((b, kv, dh), np.float32)
    slots = rng.permutation(slots_n - 1)[:b].astype(np.int32)
    positions = rng.integers(0, m, b).astype(np.int32)
    positions[0] = m - 1
    if b > 2:  # padding rows: the scratch slot, position 0
        slots[-1] = slots_n - 1
        positions[-1] = 0
        positions[1] = 0
    scale = 3 / np.sqrt(dh)

    def as_cache(x):
        return jax.lax.bitcast_convert_type(jnp.asarray(x), jnp.uint16) if bits else \
            jnp.asarray(x)

    def step(kc, vc, q, k, v, slots, positions, window):
        return kernels.decode_attention(q, k, v, kc, vc, slots, positions, window,
                                        scale=scale, softcap=softcap)
    out, kc2, vc2 = jax.jit(step, donate_argnums=(0, 1))(
        as_cache(kc), as_cache(vc), q, k, v, slots, positions, np.int32(window))
    if bits:
        kc2, vc2 = (jax.lax.bitcast_convert_type(c, jnp.bfloat16) for c in (kc2, vc2))
    # The stored key and value are the step's, rounded to the cache's type.
    kc_want, vc_want = kc.copy(), vc.copy()
    for r, (s, p) in enumerate(zip(slots, positions, strict=True)):
        kc_want[s, :, p, :] = k[r].astype(dtype)
        vc_want[s, :, p, :] = v[r].astype(dtype)
    np.testing.assert_array_equal(np.asarray(kc2), kc_want)
    np.testing.assert_array_equal(np.asarray(vc2), vc_want)
    want = _decode_reference(q, kc_want, vc_want, slots, positions, window, scale, softcap)
    assert np.abs(np.asarray(out) - want).max() < 2e-5 * np.abs(want).max()


@needs_kernel
def test_decode_attention_refuses_an_index_outside_the_cache():
    kc = vc = jnp.zeros((3, 1, 8, 16), jnp.float32)
    q = jnp.ones((1, 2, 16))
    k = v = jnp.ones((1, 1, 16))
    for slot, pos in ((3, 0), (0, 8), (-1, 0)):
        with pytest.raises(Exception, match="out of range"):
            jax.block_until_ready(kernels.decode_attention(
                q, k, v, kc, vc, jnp.array([slot]), jnp.array([pos]), 0, scale=1.0))
