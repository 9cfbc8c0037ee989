"""Run in a fresh process (XLA_FLAGS must be set before JAX starts): the HTTP server over
`EngineBuilder(data_parallel=2, tensor_parallel=2)` on 4 CPU devices, hit by concurrent embedding
and completion requests; prints one JSON report for test_replicas.py to judge.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python replicas_serve.py FOLDER
"""

from __future__ import annotations

import concurrent.futures
import json
import sys
import time

import httpx
import jax
import numpy as np

from jaxembed import EngineBuilder
from jaxembed.server import create_app

from live import serve_in_thread

TEXTS = ["the quick brown fox", "jumps over the lazy dog", "a b c d e f g", "hello world"]


def main(folder: str) -> None:
    assert len(jax.devices()) == 4, jax.devices()
    builder = EngineBuilder(model=folder, dtype="float32", tensor_parallel=2, data_parallel=2,
                            max_model_len=64, max_num_seqs=2, warmup=False, progress=False,
                            compilation_cache=False)
    app = create_app(builder)  # the app builds the replicas as `jaxembed serve` does
    report: dict = {}
    with serve_in_thread(app) as base, httpx.Client(base_url=base, timeout=120) as client:
        deadline = time.monotonic() + 120
        while client.get(base.removesuffix("/v1") + "/health").status_code != 200:
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.2)
        engine = app.state.engine_host.engine
        report["kind"] = type(engine).__name__
        report["devices"] = [
            sorted(d.id for d in c.runner.params["layers"]["wq"].sharding.device_set)
            for c in engine.cores]

        def embed(i: int) -> list[list[float]]:
            r = client.post("/embeddings", json={"input": TEXTS[i % 2 :], "model": "default"})
            r.raise_for_status()
            return [d["embedding"] for d in r.json()["data"]]

        def complete(i: int) -> str:
            r = client.post("/completions", json={
                "prompt": TEXTS[i % len(TEXTS)], "max_tokens": 6, "temperature": 0,
                "ignore_eos": True})
            r.raise_for_status()
            return r.json()["choices"][0]["text"]

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            embeds = [pool.submit(embed, i) for i in range(12)]
            texts = [pool.submit(complete, i) for i in range(8)]
            vectors = [f.result() for f in embeds]
            completions = [f.result() for f in texts]
        # The same input gives the same vector (and text) whichever replica served it.
        report["embed_spread"] = max(
            float(np.abs(np.asarray(v) - np.asarray(vectors[i % 2])).max())
            for i, v in enumerate(vectors))
        report["same_completions"] = all(
            completions[i] == completions[i % len(TEXTS)] for i in range(len(completions)))
        report["replicas"] = [{
            "requests": st.requests, "generation_requests": st.generation_requests,
            "generated_tokens": st.generated_tokens, "steps": st.steps,
        } for st in (c.stats_snapshot() for c in engine.cores)]
        total = engine.stats_snapshot()
        report["total"] = {"requests": total.requests,
                           "generation_requests": total.generation_requests}
        metrics = client.get(base.removesuffix("/v1") + "/metrics").text
        report["metrics_completed"] = next(
            float(line.split()[-1]) for line in metrics.splitlines()
            if line.startswith("jaxembed_requests_completed_total"))
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
