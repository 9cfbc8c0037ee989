"""CPU kernels that XLA lacks, as XLA FFI custom calls compiled from C++ on first use.

One so far: `matmul`, a product of float32 rows with bfloat16 weights on x86 CPUs with
AVX512-BF16 (see bf16_matmul.cc for why and how). The shared library is built with the system's
C++ compiler into `<cache>/kernels/`, once per source, compiler and jaxlib, and loaded from
there afterwards (about 2 s the first time). Where the CPU, the compiler or the backend does not
allow it, `available()` is False and callers keep XLA's own dot: the kernel is an optimization,
never a requirement. `JAXEMBED_CPU_KERNELS=0` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from jaxembed.fetch import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("bf16_matmul.cc")
TARGET = "jaxembed_bf16_matmul"
BLOCK = 16  # output columns per packed block: float32 lanes in a zmm register
ISA = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16")
CPU_FLAG = "avx512_bf16"  # as /proc/cpuinfo names it


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags")
            for f in line.split(":", 1)[1].split()}


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _build(cxx: str) -> Path:
    """The shared library, compiled unless a build of this source by this compiler for this
    jaxlib is already cached."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                             check=True).stdout.splitlines()[0]
    key = hashlib.sha256(b"\0".join(s.encode() for s in (
        SOURCE.read_text(), version, jaxlib.__version__, *ISA))).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"bf16_matmul-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed into place: concurrent builds never see half a file.
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        lib = Path(tmp) / out.name
        cmd = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", *ISA,
               # The FFI headers warn under GCC; they are not ours to fix.
               "-Wno-attributes", "-Wno-return-type",
               "-I", jax.ffi.include_dir(), str(SOURCE), "-o", str(lib)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(lib, out)
    return out


@functools.cache
def unavailable_reason() -> str | None:
    """Why `matmul` cannot run here, or None when it can (and is registered with XLA)."""
    reason = _load()
    if reason is not None:
        log.info("bf16 CPU matmul kernel not used: %s", reason)
    return reason


def _load() -> str | None:
    if os.environ.get("JAXEMBED_CPU_KERNELS", "1") == "0":
        return "JAXEMBED_CPU_KERNELS=0"
    if jax.default_backend() != "cpu":
        return f"the backend is {jax.default_backend()}, not cpu"
    if CPU_FLAG not in _cpu_flags():
        return f"this CPU has no {CPU_FLAG}"
    cxx = _compiler()
    if cxx is None:
        return "no C++ compiler (c++, g++ or $CXX)"
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build(cxx)))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        return f"the kernel did not build: {e}"
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JaxembedBf16Matmul),
                                platform="cpu")
    return None


def available() -> bool:
    return unavailable_reason() is None


def packable(w: jax.Array) -> bool:
    """Whether [..., K, N] weights have the shape `pack` takes."""
    return w.ndim >= 2 and w.shape[-2] % 2 == 0 and w.shape[-1] % BLOCK == 0


def pack(w: jax.Array) -> jax.Array:
    """[..., K, N] weights -> [..., N / 16, K / 2, 16, 2] bfloat16, the kernel's layout: per block
    of 16 output columns, the weights of inputs 2k and 2k + 1 side by side."""
    *lead, k, n = w.shape
    w = jnp.asarray(w, jnp.bfloat16).reshape(*lead, k // 2, 2, n // BLOCK, BLOCK)
    r = len(lead)
    return w.transpose(*range(r), r + 2, r, r + 3, r + 1)


def unpack(p: jax.Array) -> jax.Array:
    """The inverse of `pack`: [..., K, N] bfloat16."""
    *lead, nb, kp, _, _ = p.shape
    r = len(lead)
    return p.transpose(*range(r), r + 1, r + 3, r, r + 2).reshape(*lead, kp * 2, nb * BLOCK)


def matmul(x: jax.Array, p: jax.Array) -> jax.Array:
    """x [..., K] (rounded to bfloat16) @ packed weights p [N / 16, K / 2, 16, 2], accumulated
    and returned in float32 [..., N]. Requires `available()`."""
    *lead, k = x.shape
    n = p.shape[0] * BLOCK
    rows = int(np.prod(lead, dtype=np.int64))
    out = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((rows, n), jnp.float32))(
        x.reshape(rows, k).astype(jnp.float32), p)
    return out.reshape(*lead, n)
