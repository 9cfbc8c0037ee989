"""`EngineBuilder`: from a model name or path to a running, warmed-up `Engine`."""

from __future__ import annotations

import dataclasses
import logging
import threading
from concurrent.futures import Future

import jax
from jax.sharding import Mesh

from jaxembed.engine import Engine
from jaxembed.fetch import cache_dir, resolve_model, trusted_dir
from jaxembed.multihost import StepChannel
from jaxembed.options import EngineOptions
from jaxembed.plan import default_dtype
from jaxembed.scheduler import check_ladder
from jaxembed.sharding import make_mesh, placement, plan, shard_params
from jaxembed.weights.loader import load_checkpoint

log = logging.getLogger("jaxembed")


@dataclasses.dataclass
class EngineBuilder(EngineOptions):
    """Everything needed to start an engine (`EngineOptions`, whose fields it takes as
    keywords); `build()` loads the weights, places them, and starts the engine's cores.

    dtype: "float32", "bfloat16" or "float16"; None picks float32 on CPU, bfloat16 on accelerators.
    tensor_parallel: devices one model is sharded over (a mesh with one `tensor` axis: heads,
        kv heads, MLP width and experts split across it). Across several processes joined by
        `jax.distributed` it must be every device of all of them.
    data_parallel: replicas of the model, each on its own `tensor_parallel` devices, with each
        request sent to the least loaded.
    buckets: the step shapes' ladder (`scheduler.Buckets`): "coarse", a few shapes, every one
        compiled by the warm-up (embedding, prefill and decode steps); "fine", many shapes,
        compiled as traffic first needs them (the warm-up compiles the short ones). None: coarse
        on an accelerator, fine on a CPU. Either way `build()` returns (and a server says ready)
        only once the warm-up is done.
    """

    buckets: str | None = None

    @property
    def options(self) -> EngineOptions:
        """These settings as plain options."""
        return EngineOptions(**{f.name: getattr(self, f.name)
                                for f in dataclasses.fields(EngineOptions)})

    def build(self) -> Engine:
        self.validate()
        check_ladder(self.buckets)
        if self.compilation_cache:
            enable_compilation_cache()
        path = resolve_model(self.model)
        meshes = device_groups(self.tensor_parallel, self.data_parallel)
        # The first group's params go from host memory straight onto its devices.
        checkpoint = load_checkpoint(path, self.dtype or default_dtype(), progress=self.progress,
                                     placement=placement(meshes[0]) if meshes else None,
                                     quantize=self.quantize)
        log.info("loaded %s (%s, %s%s) in %.2fs", path, checkpoint.format, checkpoint.dtype,
                 f", {'/'.join(checkpoint.quantized)} kept quantized" if checkpoint.quantized
                 else "", checkpoint.load_seconds)
        if self.attention is not None:
            causal = self.attention == "causal"
            checkpoint = dataclasses.replace(
                checkpoint, config=dataclasses.replace(checkpoint.config, causal=causal))
        channel = StepChannel() if jax.process_count() > 1 else None
        shardings = [plan(checkpoint.config, mesh) for mesh in meshes]
        # The other replicas copy the first one's params onto their own devices.
        replicas = [(shard_params(checkpoint.params, checkpoint.config, sp), sp)
                    for sp in shardings[1:]]
        engine = Engine(checkpoint, self.options, sharding=shardings[0] if shardings else None,
                        channel=channel, replicas=replicas, buckets=self.buckets)
        # The engine holds what it runs (on one GPU the merged projections, whose loaded parts
        # it freed): nothing here may read the loaded params after it.
        del checkpoint, replicas
        # A multi-host follower compiles and runs only the steps its leader sends, warm-up
        # included: a step run on its own would wait forever for the other processes.
        if self.warmup and (channel is None or channel.leader):
            if engine.buckets.is_coarse:
                engine.warmup_all()  # every shape: steady serving compiles nothing
            else:
                engine.warmup()
        if shardings:
            sp = shardings[0]
            log.info("%d replica(s) of %d device(s) each; axes replicated for not dividing: %s",
                     len(shardings), sp.mesh.size, ", ".join(sp.replicated) or "none")
        return engine

    def build_in_background(self) -> Future[Engine]:
        """`build()` on a thread of its own, started now. A server goes on importing its web
        stack and binding its port meanwhile: on a restart that overlaps about 0.4 s of imports
        with reading the weights."""
        future: Future[Engine] = Future()

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


def enable_compilation_cache() -> bool:
    """Persist compiled steps across restarts, under the jaxembed cache folder, where that
    folder is this user's alone: XLA's compiled programs are native code the server runs, so a
    folder others can write to gets no cache (with a warning) rather than their code."""
    if jax.config.jax_compilation_cache_dir is not None:
        return True
    folder = cache_dir() / "xla"
    reason = trusted_dir(folder)
    if reason is not None:
        log.warning("no persistent compilation cache: %s", reason)
        return False
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return True
