"""Run in a fresh process (XLA_FLAGS must be set before JAX starts): every family's forward on
meshes of 1, 2 and 4 CPU devices equals the unsharded one, with params really sharded.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python sharded_forward.py FOLDER...
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from jaxembed import model
from jaxembed.sharding import TENSOR, make_mesh, plan, shard_params
from jaxembed.weights.loader import load_checkpoint


def main(folders: list[str]) -> None:
    assert len(jax.devices()) == 4, jax.devices()
    report = {}
    for folder in folders:
        ck = load_checkpoint(folder, progress=False)
        cfg = ck.config
        ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40)).astype(np.int32)
        pos = np.broadcast_to(np.arange(40, dtype=np.int32), (2, 40))
        seg = np.ones((2, 40), np.int32)
        fwd = jax.jit(lambda p, a, b, c, cfg=cfg: model.forward(p, a, b, c, cfg))
        ref = np.asarray(fwd(ck.params, ids, pos, seg))
        rows = {}
        for tp in (1, 2, 4):
            try:
                sp = plan(cfg, make_mesh(tp))
            except ValueError as e:
                rows[tp] = {"error": str(e)}
                continue
            params = shard_params(ck.params, cfg, sp)
            wq = params["layers"]["wq"]
            sharded = len({s.data.shape for s in wq.addressable_shards}) == 1 and (
                wq.addressable_shards[0].data.shape[-1] == wq.shape[-1] // tp)
            out = np.asarray(fwd(params, ids, pos, seg))
            err = float(np.abs(out - ref).max() / np.abs(ref).max())
            rows[tp] = {"error_rel": err, "wq_sharded": bool(sharded),
                        "wq_spec": str(wq.sharding.spec), "replicated": list(sp.replicated),
                        "mesh_axis": TENSOR}
        report[cfg.family] = rows
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
