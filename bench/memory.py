"""Peak memory of embedding: a fresh process loads the model, embeds the corpus and two inputs of
the model's full length, and reports its peak resident set against the float32 weights.

    python -m bench.memory [--model PATH] [--texts 256]

Run in its own process so that nothing else the harness loads (torch, llama.cpp) is counted.
The target is the weights plus 1 GiB: activations, attention scores and compiled code together.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

GIB = 1 << 30


def measure(model: str | None, texts: int) -> dict[str, Any]:
    import jax
    import numpy as np

    from bench.run import make_corpus
    from jaxembed import EngineBuilder

    engine = EngineBuilder(model=model, dtype="float32", progress=False, warmup=False,
                           compilation_cache=False).build()
    try:
        weights = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(engine.params))
        after_load = _peak_rss()
        engine.encode(make_corpus(engine.tokenizer, texts))
        after_corpus = _peak_rss()
        # The longest inputs the server accepts: the largest attention the engine computes.
        longest = engine.tokenizer.decode(list(range(1000, 1000 + engine.max_model_len - 2)))
        ids = engine.tokenize([longest])[0][: engine.max_model_len]
        engine.encode([engine.tokenizer.decode(ids)] * 2)
        peak = _peak_rss()
    finally:
        engine.shutdown()
    return {"weights_bytes": weights, "peak_rss_after_load": after_load,
            "peak_rss_after_corpus": after_corpus, "peak_rss": peak,
            "over_weights": peak - weights, "target_bytes": weights + GIB,
            "within_target": peak <= weights + GIB, "max_model_len": engine.max_model_len}


def _peak_rss() -> int:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: Linux carries that
    across exec from the parent, so a harness holding gigabytes would be counted here."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def peak_memory(model: Path, texts: int) -> dict[str, Any]:
    """`measure` in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-m", "bench.memory", "--model", str(model),
                          "--texts", str(texts)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--texts", type=int, default=256)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.model, args.texts)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
