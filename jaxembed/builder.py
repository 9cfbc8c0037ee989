"""`EngineBuilder`: from a model name or path to a running, warmed-up `LLMEngine`."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future

import jax
from jax.sharding import Mesh

from jaxembed.engine import (
    DEFAULT_MAX_QUEUED_REQUESTS,
    LLMEngine,
    default_dtype,
)
from jaxembed.fetch import cache_dir, resolve_model
from jaxembed.multihost import StepChannel
from jaxembed.protocol import EmbeddingDefaults
from jaxembed.replicas import ReplicaRouter
from jaxembed.sharding import make_mesh, placement, plan, shard_params
from jaxembed.weights.loader import load_checkpoint

log = logging.getLogger("jaxembed")

ATTENTION_MODES = ("causal", "bidirectional")


@dataclasses.dataclass
class EngineBuilder:
    """Everything needed to start an engine. `build()` loads the weights and starts its thread.

    model: a GGUF file, an HF folder, an HF repo id, or None for the embedded default model.
    dtype: "float32", "bfloat16" or "float16"; None picks float32 on CPU, bfloat16 on accelerators.
    max_queued_requests: requests waiting or running at once; past it, submissions are refused.
    max_request_tokens: the most tokens one request may hold in all (None: no limit).
    defaults: server-wide values for the request fields a request leaves unset.
    attention: "causal" or "bidirectional" to override what the model's config says.
    instruction_template: how `instruction` is placed, e.g. "Instruct: {instruction}\\nQuery:{text}"
        (ending with `{text}`); None: the family's known template, if any.
    max_num_seqs: sequences generated at once, each with its own KV cache rows (None: 16 on a
        CPU, 64 on an accelerator).
    embed_matmul_dtype: "bfloat16" to run embeddings' projections in bfloat16 over float32
        activations (a CPU with bf16 dot instructions runs them at twice the fp32 rate), from a
        bfloat16 copy of those weights. None: the weights' own dtype.
    decode_matmul_dtype: the same for generation's decode steps (projections and LM head, from
        a bfloat16 copy), with a bfloat16 KV cache: about 1.25x for 16 streams of SmolLM2 on
        such a CPU; greedy text may then differ from float32's where two tokens are nearly
        tied. Prefills keep float32.
    tensor_parallel: devices one model is sharded over (a mesh with one `tensor` axis: heads,
        kv heads, MLP width and experts split across it). Across several processes joined by
        `jax.distributed` it must be every device of all of them.
    data_parallel: replicas of the model, each on its own `tensor_parallel` devices, with each
        request sent to the least loaded; `build()` then returns a `ReplicaRouter`.
    """

    model: str | os.PathLike | None = None
    dtype: str | None = None
    max_model_len: int | None = None
    max_batch_tokens: int | None = None  # None: 1024 on a CPU, 8192 on an accelerator
    served_model_names: Sequence[str] | None = None
    max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS
    max_request_tokens: int | None = None
    defaults: EmbeddingDefaults | None = None
    attention: str | None = None
    instruction_template: str | None = None
    max_num_seqs: int | None = None
    embed_matmul_dtype: str | None = None
    decode_matmul_dtype: str | None = None
    tensor_parallel: int = 1
    data_parallel: int = 1
    warmup: bool = True
    progress: bool = True
    compilation_cache: bool = True

    def build(self) -> LLMEngine | ReplicaRouter:
        if self.compilation_cache:
            enable_compilation_cache()
        path = resolve_model(self.model)
        meshes = device_groups(self.tensor_parallel, self.data_parallel)
        # The first group's params go from host memory straight onto its devices.
        checkpoint = load_checkpoint(path, self.dtype or default_dtype(), progress=self.progress,
                                     placement=placement(meshes[0]) if meshes else None)
        log.info("loaded %s (%s, %s) in %.2fs", path, checkpoint.format, checkpoint.dtype,
                 checkpoint.load_seconds)
        if self.attention is not None:
            if self.attention not in ATTENTION_MODES:
                raise ValueError(f"attention must be one of {ATTENTION_MODES}; got "
                                 f"{self.attention!r}")
            causal = self.attention == "causal"
            checkpoint = dataclasses.replace(
                checkpoint, config=dataclasses.replace(checkpoint.config, causal=causal))
        channel = StepChannel() if jax.process_count() > 1 else None
        engines = []
        for mesh in meshes or [None]:
            ck, sharding = checkpoint, None
            if mesh is not None:
                sharding = plan(checkpoint.config, mesh)
                if mesh is not meshes[0]:  # the other replicas copy the first one's params
                    ck = dataclasses.replace(checkpoint, params=shard_params(
                        checkpoint.params, checkpoint.config, sharding))
            engines.append(LLMEngine(
                ck, max_model_len=self.max_model_len, max_batch_tokens=self.max_batch_tokens,
                served_model_names=self.served_model_names,
                max_queued_requests=self.max_queued_requests,
                max_request_tokens=self.max_request_tokens, defaults=self.defaults,
                instruction_template=self.instruction_template, max_num_seqs=self.max_num_seqs,
                embed_matmul_dtype=self.embed_matmul_dtype,
                decode_matmul_dtype=self.decode_matmul_dtype, sharding=sharding,
                channel=channel))
        # A multi-host follower compiles and runs only the steps its leader sends, warm-up
        # included: a step run on its own would wait forever for the other processes.
        if self.warmup and (channel is None or channel.leader):
            for engine in engines:
                engine.warmup()
        if meshes:
            sp = engines[0].sharding
            assert sp is not None
            log.info("%d replica(s) of %d device(s) each; axes replicated for not dividing: %s",
                     len(engines), sp.mesh.size, ", ".join(sp.replicated) or "none")
        return engines[0] if len(engines) == 1 else ReplicaRouter(engines)

    def build_in_background(self) -> Future[LLMEngine | ReplicaRouter]:
        """`build()` on a thread of its own, started now. A server goes on importing its web
        stack and binding its port meanwhile: on a restart that overlaps about 0.4 s of imports
        with reading the weights."""
        future: Future[LLMEngine | ReplicaRouter] = Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return  # cancelled before it began
            try:
                future.set_result(self.build())
            except BaseException as e:  # the waiting side reports it
                future.set_exception(e)

        threading.Thread(target=run, name="jaxembed-load", daemon=True).start()
        return future


def device_groups(tensor_parallel: int, data_parallel: int) -> list[Mesh]:
    """One mesh per replica over disjoint devices, in device order; empty for the plain case
    (one device, one process), where nothing is placed by hand."""
    tp, dp = tensor_parallel, data_parallel
    if not (isinstance(tp, int) and tp >= 1 and isinstance(dp, int) and dp >= 1):
        raise ValueError(f"tensor_parallel and data_parallel must be integers of at least 1; "
                         f"got {tp!r} and {dp!r}")
    devices = jax.devices()  # every process's devices when several are joined
    if jax.process_count() > 1:
        if dp != 1:
            raise ValueError("data_parallel runs replicas on the devices of one host; across "
                             "hosts, run one server per host behind a load balancer")
        if tp != len(devices):
            raise ValueError(f"across {jax.process_count()} processes the model is sharded over "
                             f"all {len(devices)} devices: use tensor_parallel {len(devices)}")
    if tp * dp > len(devices):
        raise ValueError(f"tensor_parallel {tp} x data_parallel {dp} needs {tp * dp} devices; "
                         f"{len(devices)} are visible ({devices[0].platform})")
    if tp == 1 and dp == 1 and jax.process_count() == 1:
        return []
    return [make_mesh(tp, devices[r * tp : (r + 1) * tp]) for r in range(dp)]


def enable_compilation_cache() -> None:
    """Persist compiled steps across restarts, under the jaxembed cache folder."""
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
