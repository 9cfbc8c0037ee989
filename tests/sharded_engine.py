"""Run in a fresh process (XLA_FLAGS must be set before JAX starts): every family through the real
engine (`EngineBuilder(tensor_parallel=N)`) on meshes of 1, 2 and 4 CPU devices, embedding and
greedily generating; prints one JSON report for test_sharding.py to judge.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python sharded_engine.py FOLDER...

Per family and mesh size: the pooled vectors' largest difference from one device's, relative to
their largest value; the generated tokens, checked against one device's under the tie rule of
test_generation_parity.py (a different token is allowed only where one device's top-2 logit gap
is below TIE_GAP, and generation then goes on from one device's token); and the layouts the
params and the KV cache actually have, read from their `.sharding`.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import numpy as np

from jaxembed import Engine, EngineBuilder
from jaxembed.protocol import EmbeddingType

MESHES = (1, 2, 4)
NEW_TOKENS = 8
TIE_GAP = 1e-3
EMBED_LENGTHS = (3, 17, 40, 9)  # packed together into one step
PROMPT_LENGTHS = (5, 12)  # generated together: two rows of one prefill and of each decode step


def build(folder: str, tp: int) -> Engine:
    return EngineBuilder(model=folder, dtype="float32", tensor_parallel=tp, max_model_len=64,
                         max_num_seqs=2, warmup=False, progress=False,
                         compilation_cache=False).build()


def layout(a: jax.Array) -> dict:
    """What the array's sharding says: its spec, its devices, and its per-device shard shape."""
    shapes = {tuple(s.data.shape) for s in a.addressable_shards}
    assert len(shapes) == 1, shapes
    return {"spec": str(a.sharding.spec) if hasattr(a.sharding, "spec") else None,
            "devices": len(a.sharding.device_set), "shape": list(a.shape),
            "shard": list(shapes.pop())}


def greedy(engine: Engine, prompts: list[list[int]], n: int) -> list[tuple[list[int], list]]:
    """Generate for all prompts at once (rows of the same steps); tokens and, per step, the
    top-2 logprobs (their gap is the logit gap). Submitted while the engine is paused, so that
    they share one prefill step: fewer step shapes to compile."""
    with engine.paused():
        streams = [engine.generate_stream(p, temperature=0, max_tokens=n, ignore_eos=True,
                                          logprobs=2) for p in prompts]
    out = []
    for s in streams:
        c = s.collect(list(s)).choices[0]
        out.append((c.token_ids, [[v for _, v in lp.top] for lp in c.logprobs]))
    return out


def check_greedy(engine: Engine, prompt: list[int], ours: list[int],
                 ref: tuple[list[int], list]) -> dict:
    """Hold our tokens to one device's under the tie rule, regenerating from the reference's
    token after an allowed tie."""
    ref_tokens, ref_top = ref
    ties, start = [], 0
    while True:
        bad = next((k for k in range(start, len(ref_tokens)) if ours[k - start] != ref_tokens[k]),
                   None)
        if bad is None:
            return {"ok": True, "ties": ties}
        gap = ref_top[bad][0] - ref_top[bad][1]
        if gap >= TIE_GAP:
            return {"ok": False, "ties": ties, "step": bad, "gap": gap,
                    "ours": ours[bad - start:], "ref": ref_tokens[bad:]}
        ties.append(bad)
        start = bad + 1
        if start == len(ref_tokens):
            return {"ok": True, "ties": ties}
        ours = greedy(engine, [[*prompt, *ref_tokens[:start]]], len(ref_tokens) - start)[0][0]


def main(folders: list[str]) -> None:
    assert len(jax.devices()) == 4, jax.devices()
    report: dict = {}
    rng = np.random.default_rng(0)
    for folder in folders:
        family, ref, rows = None, None, {}
        for tp in MESHES:
            start = time.perf_counter()
            try:
                engine = build(folder, tp)
            except ValueError as e:
                rows[str(tp)] = {"error": str(e)}
                continue
            try:
                cfg = engine.config
                family = cfg.family
                if ref is None:  # the same inputs for every mesh size
                    seqs = [rng.integers(1, cfg.vocab_size, n).astype(np.int32)
                            for n in EMBED_LENGTHS]
                    prompts = [rng.integers(1, cfg.vocab_size, n).tolist()
                               for n in PROMPT_LENGTHS]
                mean = engine.submit(seqs, EmbeddingType.Mean).result()
                last = engine.submit(seqs, EmbeddingType.Last).result()
                gen = greedy(engine, prompts, NEW_TOKENS)
                row: dict = {"params": {
                    "wq": layout(engine.params["layers"]["wq"]),
                    "wk": layout(engine.params["layers"]["wk"]),
                    "wo": layout(engine.params["layers"]["wo"]),
                    "embed": layout(engine.params["embed"])}}
                for stack in ("mlp", "moe"):
                    if stack in engine.params:
                        row["params"][f"{stack}.w_up"] = layout(engine.params[stack]["w_up"])
                        row["params"][f"{stack}.w_down"] = layout(engine.params[stack]["w_down"])
                k = engine.runner.state.kv.k
                row["cache"] = layout(k[0] if isinstance(k, list) else k)
                row["replicated"] = list(engine.sharding.replicated) if engine.sharding else []
                if ref is None:
                    ref = {"mean": mean, "last": last, "gen": gen}
                    row["embed_error_rel"] = 0.0
                    row["greedy"] = [{"ok": True, "ties": []} for _ in prompts]
                else:
                    scale = max(np.abs(ref["mean"]).max(), np.abs(ref["last"]).max())
                    err = max(np.abs(mean - ref["mean"]).max(), np.abs(last - ref["last"]).max())
                    row["embed_error_rel"] = float(err / scale)
                    row["greedy"] = [check_greedy(engine, p, g[0], r)
                                     for p, g, r in zip(prompts, gen, ref["gen"], strict=True)]
                row["tokens"] = [g[0] for g in gen]
                row["seconds"] = round(time.perf_counter() - start, 2)
                rows[str(tp)] = row
                print(family, tp, row["seconds"], file=sys.stderr, flush=True)
            finally:
                engine.shutdown()
        report[family or folder] = rows
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
