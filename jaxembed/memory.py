"""How much memory the engine may use, and how the KV cache is sized to it.

The KV cache is the one large allocation that is the engine's choice: the weights are what they
are, and activations are bounded by the step budget. So, as vLLM does with
`--gpu-memory-utilization`, the engine takes a fraction of the memory it runs in (the host's on a
CPU, the device's on an accelerator), subtracts what it holds once the weights are loaded, and
gives the cache what is left: as many sequence slots of `max_model_len` tokens as fit, up to
`max_num_seqs`. A cache that cannot hold even one sequence is an error at start-up that gives
the sizes, never a failure on the first generation request.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from jaxembed.config import ModelConfig

GiB = 1 << 30
DEFAULT_UTILIZATION = 0.9
# Held back from the cache for what a step allocates (activations, logits, outputs) and for the
# runtime's own growth (compiled programs): the cache never takes the last of the budget.
RESERVE_BYTES = 512 << 20


class KVCacheTooLarge(ValueError):
    """Not even one sequence's cache fits in the memory left after the weights."""


@dataclasses.dataclass(frozen=True)
class Budget:
    """The memory the engine runs in: `total` bytes (the machine's or the device's), of which
    `used` are in use once the weights are loaded."""

    total: int
    used: int
    where: str  # "host" or "device", for messages

    def free(self, utilization: float) -> int:
        return int(utilization * self.total) - self.used - RESERVE_BYTES


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_limit() -> int | None:
    """A container's memory limit (cgroup v2, then v1), if it sets one."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return int(text)
    return None


def resident_bytes() -> int:
    """This process's resident memory."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed() -> bool:
    """Hand back to the OS the memory the C allocator holds free; False where it cannot.

    Why: compiling a program (LLVM, on any backend) allocates and frees hundreds of MB in
    blocks that glibc's dynamic mmap threshold keeps on the heap, and step buffers of a few MB
    stay there too. Measured on a 1.7B model on the CPU, the resident set grew by about 100 MB
    with the first decode program compiled and by about 25 MB with the next (at 135M: 15-18 MB each), and a
    malloc_trim gave most of it back. The runner calls this after a step that compiled (rare:
    a new shape), not after every step, where the cost would be the next step's page faults."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def host_budget() -> Budget:
    """The host's memory (or the container's limit), and what this process holds."""
    limits = [t for t in (_meminfo("MemTotal"), _cgroup_limit()) if t is not None]
    return Budget(min(limits) if limits else 64 * GiB, resident_bytes(), "host")


def device_budget(device: jax.Device | None = None) -> Budget | None:
    """An accelerator's memory and what is allocated on it, where the runtime reports them."""
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # backends without the call raise anything from NotImplementedError on
        return None
    if "bytes_limit" not in stats:
        return None
    return Budget(int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0)), "device")


def budget(backend: str) -> Budget:
    if backend != "cpu":
        found = device_budget()
        if found is not None:
            return found
    return host_budget()


def slot_bytes(cfg: ModelConfig, max_model_len: int, kv_itemsize: int) -> int:
    """What one sequence slot holds: keys and values of every layer for max_model_len tokens,
    and its sampling state (token counts and the prompt's tokens, per vocabulary entry)."""
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * max_model_len * kv_itemsize
    return kv + cfg.vocab_size * (np.dtype(np.int32).itemsize + 1)


def fit_slots(cfg: ModelConfig, max_model_len: int, kv_itemsize: int, wanted: int,
              explicit: bool, free: int, budget: Budget, utilization: float,
              extra: int = 0) -> int:
    """Slots of the KV cache that fit in `free` bytes less `extra` (a decode copy of the weights
    still to be made): `wanted` when they fit; fewer when `wanted` was only the default; else
    KVCacheTooLarge, with the sizes."""
    per = slot_bytes(cfg, max_model_len, kv_itemsize)
    room = free - extra
    fits = max(0, room // per) if per else wanted
    if fits >= wanted:
        return wanted
    if fits >= 1 and not explicit:
        return int(fits)
    need = (wanted if explicit else 1) * per + extra
    raise KVCacheTooLarge(
        f"the KV cache does not fit: {wanted if explicit else 1} sequence(s) of {max_model_len} "
        f"tokens need {need / GiB:.2f} GiB ({per / GiB:.3f} GiB each"
        + (f", plus {extra / GiB:.2f} GiB of decode weights" if extra else "")
        + f"), but of the {budget.where}'s {budget.total / GiB:.2f} GiB x {utilization:g} "
        f"(--memory-utilization) {budget.used / GiB:.2f} GiB are in use after loading the "
        f"weights, and {RESERVE_BYTES / GiB:.2f} GiB are kept for steps: {max(0, room) / GiB:.2f} "
        "GiB are left. Lower --max-model-len"
        + (" or --max-num-seqs" if explicit else "")
        + ", keep the cache in bfloat16 (--kv-cache-dtype bfloat16), or raise "
        "--memory-utilization.")
