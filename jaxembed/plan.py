"""The execution plan: how this engine runs its model here, decided once.

Every per-platform choice lives in `ExecutionPlan.decide`: which ops attend and multiply (XLA's,
or the CPU kernels of `jaxembed.kernels`), how each path's weights are laid out, the KV cache's
layout and dtype, and the limits that follow from the backend. Nothing downstream asks which
backend it is on: the model runner prepares weights and caches as the plan says, and the model
reads its ops from the plan. A GPU path is a new branch here and new ops in the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxembed import kernels, memory
from jaxembed.config import ModelConfig
from jaxembed.options import EngineOptions

# Where an op runs.
XLA = "xla"  # XLA's own ops, on any backend
CPU_KERNELS = "cpu_kernels"  # jaxembed.kernels: C++ custom calls for one x86 CPU
GPU_KERNELS = "gpu_kernels"  # jaxembed.gpu: Pallas (Triton) kernels for one NVIDIA GPU

# How decode steps read the layer weights.
STACKED = "stacked"  # [L, ...] arrays, scanned (and sharded on a mesh)
PER_LAYER = "per_layer"  # an array per layer, unrolled: a CPU's matmuls read them in place

# The KV cache's storage: a dtype name, or BF16_BITS (see kv_cache.BF16_BITS).
BF16_BITS = "bf16_bits"

# Defaults by platform. On a CPU a step's activations should stay in cache: with SmolLM2 on two
# cores, 1024-token steps embed about 20% more tokens/s than 8192-token ones (bench/, interleaved
# runs), and 512 to 1536 are level; accelerators want large steps (a 16k budget: see
# `scheduler.Buckets.coarse`, whose few shapes it spans). Every KV cache slot costs host
# memory on a CPU, and long contexts are slow there anyway.
MAX_BATCH_TOKENS = {"cpu": 1024, "accelerator": 16384}
MAX_MODEL_LEN = {"cpu": 2048, "accelerator": 8192}
MAX_NUM_SEQS = {"cpu": 16, "accelerator": 64}


def default_dtype(backend: str | None = None) -> str:
    """The dtype weights load in when none is asked: float32 on a CPU (whose fast bf16 products
    the plan uses through narrowed projections instead), bfloat16 on accelerators."""
    return "float32" if (backend or jax.default_backend()) == "cpu" else "bfloat16"


@dataclasses.dataclass(frozen=True)
class WeightLayout:
    """How one path's projection weights (attention, dense MLPs, and for decoding the LM head)
    are held: `dtype` to narrow float32 weights to (None: their own), and `packed` for
    `kernels.matmul`'s layout where a weight's shape allows (`kernels.Packed`)."""

    dtype: str | None = None
    packed: bool = False

    @property
    def plain(self) -> bool:
        """The params as loaded, shared as they are."""
        return self.dtype is None and not self.packed


@dataclasses.dataclass(frozen=True)
class ExecutionPlan:
    """Frozen and hashable: the jitted steps close over it, and the model reads its ops here."""

    backend: str  # jax.default_backend(): "cpu", "gpu", "tpu"
    devices: int  # devices one model runs on (its mesh; 1 without one)
    attention: str  # embedding and prefill steps' attention: XLA, CPU_KERNELS or GPU_KERNELS
    decode_attention: str  # decode steps' attention over the cache: XLA, CPU_KERNELS or GPU_KERNELS
    embed_weights: WeightLayout  # prefills read the loaded params
    decode_weights: WeightLayout
    decode_layers: str  # STACKED or PER_LAYER
    kv_dtype: str  # the cache's storage: "float32", "bfloat16", "float16" or BF16_BITS
    max_model_len: int
    max_batch_tokens: int
    max_num_seqs: int
    # Quantized weights (a GGUF model's, or --quantize int8) multiply in `kernels.qmatmul`
    # (CPU_KERNELS: AVX2) or in XLA over weights dequantized for each step (XLA).
    quant_matmul: str = XLA
    # The kernel's passes over the activations. One (int8 per 256 values, llama.cpp's
    # precision) keeps SmolLM2's pooled vectors to a cosine of 0.9997 of the float products'
    # but Gemma 3's, whose activations have outlier channels, only to 0.9965; two (the
    # remainder too) keep both to 1.0 within 1e-5, and greedy tokens to the float products'.
    embed_passes: int = 2
    generate_passes: int = 2
    # The most rows a product runs in the kernel; past it XLA dequantizes the weight within the
    # step and multiplies in float32. With AVX2 (no VNNI) two passes of int8 products run at
    # about 0.6x XLA's float32 dot on many rows, and XLA's dequantization costs a fixed share
    # of the weight: measured alternately on SmolLM2-1.7B's matrices, the kernel is 3-12x
    # faster up to 32 rows, 2x at 64, level at 128, and XLA faster past it (an embedding step's
    # hundreds of tokens, a long prompt).
    quant_kernel_rows: int = 128
    # GPU kernels in Pallas's interpret mode: the GPU branch of the plan run on a CPU (tests).
    interpret: bool = False
    # q|k|v and gate|up held as one weight each (`layers.merge_projections`), on one GPU with
    # its kernels (--no-kernels keeps the weights as loaded: the reference). Not on a CPU,
    # whose kernels and packed layouts are per weight, nor on a mesh, whose partitioner shards
    # each weight by its own axes.
    merged_projections: bool = False

    @property
    def quant_op(self) -> str:
        """How quantized weights multiply (`weights.quant.QArrays.op`)."""
        if self.quant_matmul == GPU_KERNELS:
            return "gpu_interpret" if self.interpret else "gpu"
        return "cpu" if self.quant_matmul == CPU_KERNELS else "xla"
    # Decode steps' fewest rows: XLA's CPU product of a single bf16 row takes a slow path
    # (SmolLM2: 150 ms a step, against 23 ms for two rows).
    min_decode_rows: int = 1

    @property
    def accelerated(self) -> bool:
        return self.backend != "cpu"

    @property
    def branchless_sampling(self) -> bool:
        """Sampling computes every filter for every row (`sampling.sample`), greedy steps apart:
        a GPU's conditionals may read their predicate back to the host; a CPU's and a TPU's
        run where the data is."""
        return self.backend in ("gpu", "cuda")

    @property
    def kv_per_layer(self) -> bool:
        """A cache buffer per layer, to go with per-layer decode weights."""
        return self.decode_layers == PER_LAYER

    @property
    def kv_storage(self) -> Any:
        """The dtype the cache's arrays have (bfloat16 kept as bits: uint16)."""
        return jnp.uint16 if self.kv_dtype == BF16_BITS else jnp.dtype(self.kv_dtype)

    @classmethod
    def decide(cls, cfg: ModelConfig, weights_dtype: str, options: EngineOptions,
               devices: int = 1, backend: str | None = None, kernels_ok: bool | None = None,
               model_len_cap: int | None = None, quant_kernels_ok: bool | None = None,
               interpret: bool = False) -> ExecutionPlan:
        """The plan for a model whose params are `weights_dtype`, on `devices` devices of the
        default backend, under `options`. `kernels_ok` (default: `kernels.available()`) and
        `backend` can be given to plan for another machine; `model_len_cap`: a further bound on
        the context (a sentence-transformers folder's max_seq_length); `quant_kernels_ok`
        (default: `kernels.quant_available()`): whether the quantized products' kernel runs.
        `interpret`: with backend "gpu", plan the GPU kernels in Pallas's interpret mode, to run
        the GPU branch on a CPU."""
        backend = backend or jax.default_backend()
        where = "cpu" if backend == "cpu" else "accelerator"
        embed_dtype = _narrowing(options.embed_matmul_dtype, "embed_matmul_dtype", weights_dtype)
        decode_dtype = _narrowing(options.decode_matmul_dtype, "decode_matmul_dtype",
                                  weights_dtype)
        # One CPU device: where the kernels run, and where decoding reads per-layer copies (a
        # mesh scans its stacked, sharded weights: copies would need layouts of their own, and
        # the trick is about one CPU's memory traffic, not about a mesh).
        one_cpu = backend == "cpu" and devices == 1
        use_kernels = one_cpu and options.kernels and (kernels.available() if kernels_ok is None
                                                       else kernels_ok)
        # The kernels' attention computes only the scores a packed row's mask keeps (SmolLM2,
        # 1024-token rows of mixed lengths: attention was about half of an embedding step).
        attention = CPU_KERNELS if use_kernels and kernels_fit(cfg) else XLA
        # One GPU: the Pallas kernels (a mesh keeps XLA's ops, which its partitioner splits).
        one_gpu = backend in ("gpu", "cuda") and devices == 1
        gpu_kernels = one_gpu and options.kernels
        if gpu_kernels and gpu_attention_fits(cfg, weights_dtype):
            attention = GPU_KERNELS
        limit = min(cfg.max_position_embeddings, MAX_MODEL_LEN[where],
                    model_len_cap or cfg.max_position_embeddings)
        max_num_seqs = int(options.max_num_seqs or MAX_NUM_SEQS[where])
        quant_kernels = one_cpu and options.kernels and (
            kernels.quant_available() if quant_kernels_ok is None else quant_kernels_ok)
        quant_matmul = CPU_KERNELS if quant_kernels else GPU_KERNELS if gpu_kernels else XLA
        return cls(
            backend=backend, devices=devices, attention=attention,
            # The CPU decode kernel writes and reads the per-layer cache buffers in place; the
            # GPU one (`gpu.decode`) reads the rows' keys where they lie, where XLA's ops gather
            # a copy of each row's cache every layer.
            decode_attention=attention if attention in (CPU_KERNELS, GPU_KERNELS) else XLA,
            # With the kernels, bf16 embedding products run in `kernels.matmul`: around XLA's
            # own bf16 products it spends as long again converting activations and slicing the
            # stacked weights in bfloat16. Float32 embedding steps have hundreds of rows, where
            # XLA's dot is as fast as the kernel, so they keep the loaded weights.
            embed_weights=WeightLayout(embed_dtype, packed=use_kernels and embed_dtype is not None),
            # With the kernels, decode steps multiply in `kernels.matmul` whatever the weights'
            # type: XLA's CPU dot reads a one-row step's weights at about two thirds of the
            # kernel's rate, and a single bf16 row far slower still (SmolLM2's 30 layers of
            # bf16 products: 5.5 ms for one row against XLA's 120).
            decode_weights=WeightLayout(decode_dtype, packed=use_kernels),
            decode_layers=PER_LAYER if one_cpu else STACKED,
            # Narrowed decoding keeps the cache in bfloat16 too, as its bits: half the bytes each
            # step gathers (SmolLM2, 16 rows: 8% a step), and XLA's CPU backend moves 16-bit
            # integers as plain data where it converts bfloat16 element by element.
            kv_dtype=_kv_dtype(options.kv_cache_dtype, decode_dtype, weights_dtype, backend),
            max_model_len=int(options.max_model_len or limit),
            max_batch_tokens=int(options.max_batch_tokens or MAX_BATCH_TOKENS[where]),
            max_num_seqs=max_num_seqs,
            # The kernel reads a weight's blocks in place and sums in integers: for a decode
            # step it reads 4-6 bits a weight where XLA would first write out 32.
            quant_matmul=quant_matmul,
            interpret=interpret,
            merged_projections=gpu_kernels,
            min_decode_rows=2 if decode_dtype is not None and not use_kernels else 1)

    @property
    def kv_itemsize(self) -> int:
        return jnp.dtype(self.kv_storage).itemsize

    def sized(self, cfg: ModelConfig, options: EngineOptions, budget: memory.Budget,
              extra: int = 0) -> ExecutionPlan:
        """This plan with as many KV cache slots as fit in the memory left (see
        `jaxembed.memory`): `max_num_seqs` if asked for and it fits (else KVCacheTooLarge),
        else up to the default. extra: bytes still to be allocated before the cache (decode
        copies of the weights)."""
        slots = memory.fit_slots(
            cfg, self.max_model_len, self.kv_itemsize, self.max_num_seqs,
            explicit=options.max_num_seqs is not None,
            free=budget.free(options.memory_utilization), budget=budget,
            utilization=options.memory_utilization, extra=extra)
        return dataclasses.replace(self, max_num_seqs=slots)

    @property
    def summary(self) -> str:
        """One line for the log: what runs where."""
        return (f"{self.backend} x{self.devices}: attention {self.attention}, decode "
                f"{self.decode_layers} weights ({self.decode_weights.dtype or 'loaded'}"
                f"{', packed' if self.decode_weights.packed else ''}), KV cache {self.kv_dtype} "
                f"x {self.max_num_seqs} slots of {self.max_model_len}, "
                f"quantized products {self.quant_matmul}")


def _kv_dtype(asked: str | None, decode_dtype: str | None, weights_dtype: str, backend: str
              ) -> str:
    """The cache's storage: as asked, else bfloat16 where decoding narrows to it, else the
    weights' dtype. A CPU keeps bfloat16 as its bits (see kv_cache.BF16_BITS)."""
    kind = asked or ("bfloat16" if decode_dtype is not None else weights_dtype)
    return BF16_BITS if kind == "bfloat16" and backend == "cpu" else kind


def gpu_attention_fits(cfg: ModelConfig, dtype: str) -> bool:
    """Whether the GPU attention kernel takes this model's heads in this dtype."""
    from jaxembed.gpu import attention as gpu_attention  # Pallas: only where it runs

    return cfg.num_heads % cfg.num_kv_heads == 0 and gpu_attention.supported(cfg.head_dim, dtype)


def kernels_fit(cfg: ModelConfig) -> bool:
    """Whether the CPU kernels' attention takes this model's heads (given `kernels.available()`):
    head sizes a multiple of 16, query heads a multiple of kv heads."""
    return cfg.head_dim % 16 == 0 and cfg.num_heads % cfg.num_kv_heads == 0


def _narrowing(value: str | None, name: str, weights_dtype: str) -> str | None:
    """The dtype a `*_matmul_dtype` option asks projections to be multiplied in, or None."""
    if value is None:
        return None
    if value != "bfloat16":
        raise ValueError(f"{name} must be 'bfloat16' (or unset); got {value!r}")
    if weights_dtype != "float32":
        raise ValueError(f"{name} needs float32 weights to narrow; these are "
                         f"{weights_dtype}: load them as float32")
    return value
