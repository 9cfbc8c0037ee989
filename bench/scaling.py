"""Embedding throughput of one workload on 1, 2, 4... devices: an efficiency curve.

    python -m bench.scaling [--model PATH] [--texts 128] [--devices 1,2,4] [--mode tensor|data]

Each device count runs in its own process, since JAX reads its device count once at start; on a
CPU host the devices are forced (`--xla_force_host_platform_device_count`), and then they share the
same cores: the curve shows what sharding costs there (collectives, smaller matmuls), not a
speedup. `--mode tensor` shards one engine (`tensor_parallel=N`) and sends the corpus as one
request; `--mode data` runs N replicas (`data_parallel=N`) and sends the corpus in N concurrent
parts. The corpus is bench.run's: texts of 8 to 512 tokens.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time
from typing import Any


def worker(model: str | None, texts_n: int, devices: int, mode: str, repeat: int) -> dict:
    import jax

    from bench.run import make_corpus
    from jaxembed import EngineBuilder

    sizes = {"tensor_parallel": devices} if mode == "tensor" else {"data_parallel": devices}
    engine = EngineBuilder(model=model, progress=False, warmup=False, compilation_cache=False,
                           **sizes).build()
    try:
        texts = make_corpus(engine.tokenizer, texts_n)
        tokens = sum(len(t) for t in engine.tokenize(texts))
        parts = [texts[i::devices] for i in range(devices)] if mode == "data" else [texts]

        def run() -> None:
            with concurrent.futures.ThreadPoolExecutor(len(parts)) as pool:
                list(pool.map(engine.encode, parts))

        start = time.perf_counter()
        run()  # compiles the shapes this workload needs
        first = time.perf_counter() - start
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
        return {"devices": devices, "mode": mode, "backend": jax.default_backend(),
                "visible_devices": len(jax.devices()), "tokens": tokens,
                "first_pass_s": first, "run_s": best, "tokens_per_s": tokens / best}
    finally:
        engine.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the embedded model")
    parser.add_argument("--texts", type=int, default=128)
    parser.add_argument("--devices", default="1,2,4")
    parser.add_argument("--mode", choices=("tensor", "data"), default="tensor")
    parser.add_argument("--repeat", type=int, default=2, help="timed passes (the best is kept)")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args.model, args.texts, args.worker, args.mode, args.repeat)))
        return 0
    rows: list[dict[str, Any]] = []
    for n in (int(x) for x in args.devices.split(",")):
        env = dict(os.environ)
        if env.get("JAX_PLATFORMS", "cpu") == "cpu":  # forced host devices; a GPU has its own
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                                f" --xla_force_host_platform_device_count={n}").strip()
        cmd = [sys.executable, "-m", "bench.scaling", "--worker", str(n), "--mode", args.mode,
               "--texts", str(args.texts), "--repeat", str(args.repeat)]
        if args.model:
            cmd += ["--model", args.model]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    base = rows[0]["tokens_per_s"] / rows[0]["devices"]
    print(f"| devices ({args.mode} parallel) | tokens/s | speedup | efficiency |")
    print("|---|---|---|---|")
    for r in rows:
        speedup = r["tokens_per_s"] / rows[0]["tokens_per_s"]
        print(f"| {r['devices']} | {r['tokens_per_s']:.0f} | {speedup:.2f}x | "
              f"{r['tokens_per_s'] / (base * r['devices']):.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
