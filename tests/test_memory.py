"""The KV cache sized to the memory the engine runs in, checked at start-up."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from jaxembed import EngineBuilder, memory
from jaxembed.config import ModelConfig
from jaxembed.plan import BF16_BITS

GiB = memory.GiB
CFG = ModelConfig.from_hf(dict(
    model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
    num_attention_heads=32, num_key_value_heads=32, vocab_size=49152,
    max_position_embeddings=8192, rms_norm_eps=1e-5))


def test_a_slot_holds_every_layers_keys_and_values_and_its_sampling_state():
    # SmolLM2-1.7B's shape: 2 x 24 layers x 2048 values a token, float32.
    per = memory.slot_bytes(CFG, 2048, 4)
    assert per == 2 * 24 * 2048 * 2048 * 4 + 49152 * 5
    assert memory.slot_bytes(CFG, 2048, 2) < per / 1.99


def test_slots_fit_the_memory_left_after_the_weights():
    budget = memory.Budget(total=16 * GiB, used=3 * GiB, where="host")
    free = budget.free(0.9)  # 14.4 - 3 - 0.5 GiB
    per = memory.slot_bytes(CFG, 2048, 4)  # 0.75 GiB
    fits = int(free // per)
    assert 1 < fits < 16
    # The default (16) shrinks to what fits; one asked for explicitly is kept when it fits.
    assert memory.fit_slots(CFG, 2048, 4, 16, False, free, budget, 0.9) == fits
    assert memory.fit_slots(CFG, 2048, 4, 2, True, free, budget, 0.9) == 2
    # bfloat16 holds twice the slots.
    assert memory.fit_slots(CFG, 2048, 2, 64, False, free, budget, 0.9) == int(free // (per / 2))
    # A decode copy of the weights still to come takes its share first.
    assert memory.fit_slots(CFG, 2048, 4, 16, False, free, budget, 0.9, extra=4 * GiB) < fits


def test_a_cache_that_cannot_fit_is_an_error_giving_the_sizes():
    budget = memory.Budget(total=8 * GiB, used=6 * GiB, where="host")
    free = budget.free(0.9)
    with pytest.raises(memory.KVCacheTooLarge) as e:
        memory.fit_slots(CFG, 2048, 4, 16, False, free, budget, 0.9)
    text = str(e.value)
    for part in ("2048 tokens", "0.75", "8.00 GiB", "6.00 GiB", "--max-model-len",
                 "--kv-cache-dtype bfloat16", "--memory-utilization"):
        assert part in text, (part, text)
    # Asked for explicitly, more slots than fit is an error too, not quietly fewer.
    budget = memory.Budget(total=16 * GiB, used=3 * GiB, where="host")
    with pytest.raises(memory.KVCacheTooLarge, match="16 sequence"):
        memory.fit_slots(CFG, 2048, 4, 16, True, budget.free(0.9), budget, 0.9)


def test_the_engine_sizes_its_cache_at_start_up(tiny_llama_dir: Path):
    # A fraction of the host's memory smaller than what the process already holds: refused at
    # start-up, before any request.
    with pytest.raises(memory.KVCacheTooLarge, match="KV cache does not fit"):
        EngineBuilder(model=tiny_llama_dir, warmup=False, progress=False,
                      compilation_cache=False, memory_utilization=0.01).build()


def test_a_bfloat16_cache_on_a_cpu(tiny_llama_dir: Path):
    engine = EngineBuilder(model=tiny_llama_dir, dtype="float32", warmup=False, progress=False,
                           compilation_cache=False, max_num_seqs=2, max_model_len=64,
                           kv_cache_dtype="bfloat16").build()
    try:
        assert engine.plan.kv_dtype == BF16_BITS and engine.plan.kv_itemsize == 2
        result = engine.generate("hello world", temperature=0, max_tokens=4, ignore_eos=True)
        assert len(result.choices[0].token_ids) == 4
        assert str(engine.runner.state.kv.dtype) == "uint16"  # bfloat16 kept as its bits
    finally:
        engine.shutdown()


@pytest.mark.skipif(memory._malloc_trim() is None, reason="the C library has no malloc_trim")
def test_release_freed_hands_the_allocators_free_memory_back():
    # glibc keeps freed blocks below its (dynamically raised) mmap threshold on the heap: the
    # way a compile's or a step's buffers stayed resident. A freed 16 MiB mapping raises the
    # threshold; 63 blocks of 1 MiB, written and freed under the 64th (still held, so the heap's
    # top is not trimmed on its own), stay resident until `release_freed`.
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.free(libc.malloc(16 << 20))
    blocks = [libc.malloc(1 << 20) for _ in range(64)]
    top = blocks.pop()
    for b in blocks:
        ctypes.memset(b, 1, 1 << 20)
    for b in blocks:
        libc.free(b)
    held = memory.resident_bytes()
    try:
        assert memory.release_freed()
        assert held - memory.resident_bytes() >= 48 << 20
    finally:
        libc.free(top)


def test_the_runner_releases_freed_memory_after_a_step_that_compiled(
        tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch):
    calls: list[int] = []
    monkeypatch.setattr(memory, "release_freed", lambda: calls.append(1) or True)
    engine = EngineBuilder(model=tiny_llama_dir, dtype="float32", warmup=False, progress=False,
                           compilation_cache=False, max_num_seqs=2, max_model_len=64).build()
    try:
        engine.encode(["hello world"])
        assert len(calls) == 1  # the embedding step's shape compiled
        engine.encode(["hello there"])
        assert len(calls) == 1  # the same shape: nothing compiled, nothing to release
        engine.generate("hello world", temperature=0, max_tokens=3, ignore_eos=True)
        after_first = len(calls)
        assert after_first > 1  # the prefill and decode programs compiled
        engine.generate("hello world", temperature=0, max_tokens=3, ignore_eos=True)
        assert len(calls) == after_first
    finally:
        engine.shutdown()
