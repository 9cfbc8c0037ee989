"""CPU kernels that XLA lacks, as XLA FFI custom calls compiled from C++ on first use. Two
libraries: one for x86 CPUs with AVX512-BF16 (`AVX512`):

- `matmul`: float32 rows times bfloat16 or float32 weights packed in its layouts (matmul.cc),
  for the projections of decode steps and of bf16 embedding steps;
- `attention`: prefill attention over rows that pack several sequences (attention.cc);
- `decode_attention`: a decode step's attention over the KV cache, which it updates in place
  (decode_attention.cc);

and one for any x86 CPU with AVX2 (`QUANT`):

- `qmatmul`: float32 rows times a quantized weight kept in its blocks (qmatmul.cc), for every
  product of a GGUF model whose weights stay quantized.

Each shared library is built with the system's C++ compiler into `<cache>/kernels/`, once per
source, compiler and jaxlib, and loaded from there afterwards (a few seconds the first time).
Where the CPU, the compiler or the backend does not allow it, `available()` (`quant_available()`)
is False and callers keep XLA's own ops: the kernels are an optimization, never a requirement.
`JAXEMBED_CPU_KERNELS=0` turns them off.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from jaxembed.fetch import cache_dir, trusted_dir, untrusted_reason

log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a cache key
class Library:
    """One shared library of kernels: its sources, the instruction sets it is built for, the CPU
    flags (as /proc/cpuinfo names them) it needs, and its FFI targets with their symbols."""

    name: str
    sources: tuple[Path, ...]
    headers: tuple[Path, ...]
    isa: tuple[str, ...]
    cpu_flags: tuple[str, ...]
    symbols: dict[str, str]


def _here(*names: str) -> tuple[Path, ...]:
    return tuple(Path(__file__).with_name(n) for n in names)


SOURCES = _here("matmul.cc", "attention.cc", "decode_attention.cc")
HEADERS = _here("pool.h", "vmath.h")
MATMUL = {"bfloat16": "jaxembed_bf16_matmul", "float32": "jaxembed_f32_matmul"}
ATTENTION = "jaxembed_attention"
DECODE_ATTENTION = "jaxembed_decode_attention"
QMATMUL = "jaxembed_qmatmul"
# The FFI targets and the library's symbol for each.
SYMBOLS = {MATMUL["bfloat16"]: "JaxembedBf16Matmul", MATMUL["float32"]: "JaxembedF32Matmul",
           ATTENTION: "JaxembedAttention", DECODE_ATTENTION: "JaxembedDecodeAttention"}
ISA = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16")
CPU_FLAG = "avx512_bf16"  # as /proc/cpuinfo names it
AVX512 = Library("avx512", SOURCES, HEADERS, ISA, (CPU_FLAG,), SYMBOLS)
# The quantized products need no more than AVX2 (with FMA and F16C): every x86 CPU of the last
# decade, the AVX-512 ones included.
QUANT = Library("avx2", _here("qmatmul.cc"), _here("pool.h"), ("-mavx2", "-mfma", "-mf16c"),
                ("avx2", "fma", "f16c"), {QMATMUL: "JaxembedQMatmul"})
# A compiler that hangs must not hang the server's start: past this, XLA's ops run instead.
COMPILER_TIMEOUT_S = 300.0
FAILED = "failed"  # how the reasons begin that are worth a warning
BLOCK = 16  # output columns per packed block: float32 lanes in a zmm register


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags")
            for f in line.split(":", 1)[1].split()}


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def library_path(cxx: str, lib: Library = AVX512) -> Path:
    """Where the build of this library's source by this compiler for this jaxlib is cached."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True,
                             timeout=COMPILER_TIMEOUT_S).stdout.splitlines()[0]
    texts = [p.read_text() for p in (*lib.sources, *lib.headers)]
    key = hashlib.sha256("\0".join([*texts, version, jaxlib.__version__, *lib.isa]).encode()
                         ).hexdigest()[:16]
    suffix = "" if lib is AVX512 else f"-{lib.name}"
    return cache_dir() / "kernels" / f"jaxembed{suffix}-{key}.so"


class Untrusted(RuntimeError):
    """The cache the library would come from could hold another user's code."""


def _build(cxx: str, lib: Library = AVX512) -> Path:
    """The shared library, compiled unless a build of this source by this compiler for this
    jaxlib is already cached (in a folder of this user's only: see `trusted_dir`)."""
    out = library_path(cxx, lib)
    reason = trusted_dir(out.parent)
    if reason is not None:
        raise Untrusted(reason)
    if out.exists():
        reason = untrusted_reason(out)
        if reason is not None:
            raise Untrusted(reason)
        return out
    # Built beside its final name and renamed into place: concurrent builds never see half a file.
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = Path(tmp) / out.name
        cmd = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", *lib.isa,
               # The FFI headers warn under GCC; they are not ours to fix.
               "-Wno-attributes", "-Wno-return-type",
               "-I", jax.ffi.include_dir(), *map(str, lib.sources), "-o", str(built)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILER_TIMEOUT_S)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(built, out)
    return out


@functools.cache
def unavailable_reason(lib: Library = AVX512) -> str | None:
    """Why a library's kernels cannot run here, or None when they can (and are registered with
    XLA)."""
    reason = _load(lib)
    if reason is not None:
        # What this machine lacks is a fact; a build or cache that failed is worth a warning.
        failed = reason.startswith(FAILED)
        log.log(logging.WARNING if failed else logging.INFO, "CPU kernels (%s) not used: %s; "
                "XLA's own ops run instead", lib.name, reason)
    return reason


def _load(lib: Library = AVX512) -> str | None:
    if os.environ.get("JAXEMBED_CPU_KERNELS", "1") == "0":
        return "JAXEMBED_CPU_KERNELS=0"
    if jax.default_backend() != "cpu":
        return f"the backend is {jax.default_backend()}, not cpu"
    missing = [f for f in lib.cpu_flags if f not in _cpu_flags()]
    if missing:
        return f"this CPU has no {', '.join(missing)}"
    cxx = _compiler()
    if cxx is None:
        return "no C++ compiler (c++, g++ or $CXX)"
    try:
        handle = ctypes.cdll.LoadLibrary(str(_build(cxx, lib)))
    except Untrusted as e:
        return f"{FAILED}: not loading them from an untrusted cache: {e}"
    except subprocess.TimeoutExpired as e:
        return f"{FAILED}: the compiler did not finish within {e.timeout:g} s"
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        return f"{FAILED}: the kernels did not build: {e}"
    try:  # every symbol first: a library missing one registers none
        targets = {name: jax.ffi.pycapsule(getattr(handle, symbol))
                   for name, symbol in lib.symbols.items()}
    except AttributeError as e:
        return f"{FAILED}: the kernel library lacks a symbol: {e}"
    for name, capsule in targets.items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    return None


def available() -> bool:
    """Whether the AVX-512 kernels (bf16 products, attention, decode attention) run here."""
    return unavailable_reason() is None


def quant_available() -> bool:
    """Whether the quantized products (`qmatmul`, AVX2) run here."""
    return unavailable_reason(QUANT) is None


PACKED_TYPES = ("bfloat16", "float32")  # the weight types `pack` and `matmul` take


def packable(w: jax.Array, dtype: Any = jnp.bfloat16) -> bool:
    """Whether [..., K, N] weights have the shape `pack` takes, and dtype is one it packs."""
    return (jnp.dtype(dtype).name in PACKED_TYPES and w.ndim >= 2 and w.shape[-2] % 2 == 0
            and w.shape[-1] % BLOCK == 0)


def pack(w: jax.Array, dtype: Any = jnp.bfloat16) -> jax.Array:
    """[..., K, N] weights -> the kernel's layout for dtype (see matmul.cc), per block of 16
    output columns:

    - bfloat16: [..., N / 16, K / 2, 16, 2], the weights of inputs 2k and 2k + 1 side by side,
      held as their bits in uint16;
    - float32: [..., N / 16, K / 2, 2, 16], that is K rows of the block's 16 weights."""
    *lead, k, n = w.shape
    r = len(lead)
    w = jnp.asarray(w, dtype).reshape(*lead, k // 2, 2, n // BLOCK, BLOCK)
    if jnp.dtype(dtype) == jnp.float32:
        return w.transpose(*range(r), r + 2, r, r + 1, r + 3)
    return jax.lax.bitcast_convert_type(w.transpose(*range(r), r + 2, r, r + 3, r + 1),
                                        jnp.uint16)


def unpack(p: jax.Array) -> jax.Array:
    """The inverse of `pack`: [..., K, N] weights, bfloat16 or float32."""
    *lead, nb, kp, _, _ = p.shape
    r = len(lead)
    if p.dtype == jnp.float32:
        return p.transpose(*range(r), r + 1, r + 2, r, r + 3).reshape(*lead, kp * 2, nb * BLOCK)
    p = jax.lax.bitcast_convert_type(p, jnp.bfloat16)
    return p.transpose(*range(r), r + 1, r + 3, r, r + 2).reshape(*lead, kp * 2, nb * BLOCK)


def packed_type(w: jax.Array) -> str | None:
    """The weight type of a projection weight from `pack` ("bfloat16" or "float32"), or None
    for a plain [K, N] (or expert [E, K, N]) weight."""
    if w.ndim != 4:
        return None
    if w.dtype == jnp.uint16 and w.shape[2:] == (BLOCK, 2):
        return "bfloat16"
    if w.dtype == jnp.float32 and w.shape[2:] == (2, BLOCK):
        return "float32"
    return None


def is_packed(w: jax.Array) -> bool:
    """Whether a projection weight comes from `pack` (for `matmul`), not a plain [K, N]."""
    return packed_type(w) is not None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Packed:
    """A projection weight in `pack`'s layout, for `matmul`: the type says how the weight is
    held, so the model never has to guess it from a shape."""

    blocks: jax.Array  # pack()'s array
    kind: str = dataclasses.field(metadata={"static": True})  # "bfloat16" or "float32"

    @classmethod
    def of(cls, w: jax.Array, dtype: Any) -> Packed:
        return cls(pack(w, dtype), jnp.dtype(dtype).name)

    def unpacked(self) -> jax.Array:
        return unpack(self.blocks)


def matmul(x: jax.Array, p: jax.Array | Packed) -> jax.Array:
    """x [..., K] @ packed weights p (rounded to bfloat16 first for bfloat16 weights),
    accumulated and returned in float32 [..., N]. Requires `available()`."""
    if isinstance(p, Packed):
        p = p.blocks
    *lead, k = x.shape
    n = p.shape[0] * BLOCK
    rows = int(np.prod(lead, dtype=np.int64))
    kind = packed_type(p)
    if kind is None:
        raise ValueError(f"matmul takes weights from pack(), not {p.dtype}{list(p.shape)}")
    out = jax.ffi.ffi_call(MATMUL[kind], jax.ShapeDtypeStruct((rows, n), jnp.float32))(
        x.reshape(rows, k).astype(jnp.float32), p)
    return out.reshape(*lead, n)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
              window: jax.Array | int, *, scale: float, softcap: float | None = None,
              causal: bool = True) -> jax.Array:
    """Self-attention of q [B, T, H, Dh] over k, v [B, T, K, Dh] (H a multiple of K, Dh of 16),
    float32 [B, T, H, Dh]. A token sees the tokens of its own segment, at or before it if
    causal, and within `window` positions if window > 0 (an int32 scalar, may be traced).

    A segment is a contiguous run of equal ids in a row, as the scheduler packs sequences:
    unlike a mask over ids, two runs of one id do not see each other. Requires `available()`."""
    f32 = jnp.float32
    return jax.ffi.ffi_call(ATTENTION, jax.ShapeDtypeStruct(q.shape, f32))(
        q.astype(f32), k.astype(f32), v.astype(f32), segment_ids.astype(jnp.int32),
        jnp.asarray(window, jnp.int32), scale=np.float32(scale),
        softcap=np.float32(softcap or 0.0), causal=bool(causal))


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, k_cache: jax.Array,
                     v_cache: jax.Array, slots: jax.Array, positions: jax.Array,
                     window: jax.Array | int, *, scale: float, softcap: float | None = None
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decode step's attention: for each row b, the new key and value k, v [B, K, Dh] go
    into the cache at (slots[b], positions[b]), then its queries q [B, H, Dh] attend over that
    slot's positions up to its own (within `window` of it if window > 0: an int32 scalar, may be
    traced). Returns (out float32 [B, H, Dh], k_cache, v_cache), the caches updated in place:
    keys and values [S, K, M, Dh] of one layer, as float32, bfloat16, or bfloat16 bits in uint16
    (kv_cache.KVCache). H a multiple of K, Dh of 16. Requires `available()`."""
    f32, i32 = jnp.float32, jnp.int32
    out = (jax.ShapeDtypeStruct(q.shape, f32),
           jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
           jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype))
    return jax.ffi.ffi_call(DECODE_ATTENTION, out, input_output_aliases={3: 1, 4: 2})(
        q.astype(f32), k.astype(f32), v.astype(f32), k_cache, v_cache, slots.astype(i32),
        positions.astype(i32), jnp.asarray(window, i32), scale=np.float32(scale),
        softcap=np.float32(softcap or 0.0))


def _layout_operands(w: Any) -> tuple[list[jax.Array], dict[str, Any]]:
    """A quantized weight's arrays (absent ones as a placeholder) and its layout as FFI
    attributes, as qmatmul.cc's handlers take them."""
    lay = w.layout
    none = jnp.zeros((1,), jnp.int8)  # an absent array's place
    arrays = [w.qs, w.scales if w.scales is not None else none,
              w.mins if w.mins is not None else none, w.d,
              w.dmin if w.dmin is not None else none]
    attrs = dict(bits=np.int64(lay.bits), sign=bool(lay.signed), group=np.int64(lay.group),
                 block=np.int64(lay.block), scales=bool(lay.scales), mins=bool(lay.mins),
                 min_offset=np.int64(lay.min_offset), has_dmin=bool(lay.dmin))
    return arrays, attrs


def _need_quant() -> None:
    if not quant_available():  # also what registers the kernels with XLA
        raise RuntimeError(f"the quantized kernels cannot run here: {unavailable_reason(QUANT)}")


def qmatmul(x: jax.Array, w: Any, passes: int = 1) -> jax.Array:
    """x [..., K] @ w.T, w a quantized [N, K] weight (`jaxembed.weights.quant.QArrays` of jax
    arrays), float32 [..., N]: x is quantized to int8 per block of the weight's layout and the
    products summed in integers (qmatmul.cc); `passes` 2 quantizes x's remainder too, for
    nearly float32's precision. Requires `quant_available()`."""
    _need_quant()
    *lead, k = x.shape
    n = int(w.qs.shape[-2])
    rows = int(np.prod(lead, dtype=np.int64))
    arrays, attrs = _layout_operands(w)
    out = jax.ffi.ffi_call(QMATMUL, jax.ShapeDtypeStruct((rows, n), jnp.float32))(
        x.reshape(rows, k).astype(jnp.float32), *arrays, **attrs, passes=np.int64(passes))
    return out.reshape(*lead, n)
