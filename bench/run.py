"""Benchmark harness: jaxembed against its peers, measured side by side in one run.

    python -m bench.run [--texts 512] [--model PATH] [--skip-transformers] [--out bench/results]

Workloads: (a) embedding throughput on a fixed corpus of texts from 8 to 512 tokens, and (d) GGUF
load time. Peers in the same process: transformers (torch CPU, fp32, the same weights dequantized
from the same GGUF, length-sorted batches at its best batch size) and a roofline (the FLOP/s of a
large fp32 matrix product, best of numpy and JAX). Every figure is reported as a ratio to a peer
from this run; absolute times from other runs are never compared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

WORDS = ["the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "they", "you", "were", "their", "one", "all", "we", "can", "her", "has", "there", "been", "if", "more", "when", "will", "would", "who", "so", "no", "embedding", "vector", "model", "token", "attention", "layer", "compile", "kernel", "matrix", "memory", "cache", "latency", "throughput", "server", "request", "batch", "python", "jax", "numpy", "torch", "llama", "gemma", "qwen", "mistral", "retrieval", "search", "ranking", "semantic", "similarity", "cosine", "distance", "query", "document", "passage", "Paris", "Tokyo", "Berlin", "2048", "3.14159", "café", "naïve", "日本", "emoji", "🙂", "def", "return", "class", "import", "{}", "()", "[]", ";"]


def make_corpus(tokenizer: Any, n: int, lo: int = 8, hi: int = 512, seed: int = 0) -> list[str]:
    """n texts whose token counts spread evenly (log-uniform) from lo to hi."""
    rng = np.random.default_rng(seed)
    targets = np.exp(rng.uniform(np.log(lo), np.log(hi), n)).astype(int)
    texts = []
    for t in targets:
        words = rng.choice(WORDS, size=int(t * 2)).tolist()
        ids = tokenizer.encode(" ".join(words)).ids[: int(t)]
        texts.append(tokenizer.decode(ids))
    return texts


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def roofline_flops() -> dict[str, float]:
    """FLOP/s of a 2048^3 fp32 matrix product, numpy and JAX, best of several runs."""
    import jax
    import jax.numpy as jnp

    n = 2048
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    t_np = timed(lambda: a @ b, repeat=5)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    mm = jax.jit(lambda x, y: x @ y)
    mm(ja, jb).block_until_ready()
    t_jax = timed(lambda: mm(ja, jb).block_until_ready(), repeat=5)
    flop = 2 * n**3
    return {"numpy": flop / t_np, "jax": flop / t_jax, "best": flop / min(t_np, t_jax)}


def bench_jaxembed(model: Path, texts: list[str]) -> dict[str, Any]:
    from jaxembed import EngineBuilder
    from jaxembed.weights.loader import load_checkpoint

    load_s = timed(lambda: load_checkpoint(model, progress=False), repeat=3)
    engine = EngineBuilder(model=model, dtype="float32", progress=False, warmup=False,
                           compilation_cache=False).build()
    try:
        tokens = sum(len(t) for t in engine.tokenize(texts))
        start = time.perf_counter()
        engine.encode(texts)  # compiles the shapes this workload needs
        first_s = time.perf_counter() - start
        compiles = engine.stats.compilations
        before = engine.stats.real_tokens, engine.stats.padded_tokens
        run_s = timed(lambda: engine.encode(texts), repeat=2)
        real = (engine.stats.real_tokens - before[0]) / 2
        padded = (engine.stats.padded_tokens - before[1]) / 2
        recompiles = engine.stats.compilations - compiles
        vectors = engine.encode(texts[:16])
        cfg = engine.config
        return {
            "load_s": load_s, "first_pass_s": first_s, "run_s": run_s, "tokens": tokens,
            "tokens_per_s": tokens / run_s, "compilations": compiles,
            "recompilations_after_warmup": recompiles,
            "padding_waste": 1 - real / padded, "non_embedding_params": cfg.non_embedding_params(),
            "_vectors": vectors,
            "_cfg": cfg,
        }
    finally:
        engine.shutdown()


def bench_transformers(model: Path, texts: list[str], threads: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(threads)
    start = time.perf_counter()
    kw = {"gguf_file": model.name} if model.suffix == ".gguf" else {}
    root = model.parent if model.suffix == ".gguf" else model
    tok = AutoTokenizer.from_pretrained(root, **kw)
    net = AutoModel.from_pretrained(root, dtype=torch.float32, **kw).eval()
    load_s = time.perf_counter() - start
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    encoded = [tok(t)["input_ids"] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    tokens = sum(map(len, encoded))

    def run(batch: int, idx: list[int]) -> np.ndarray:
        out = np.zeros((len(texts), net.config.hidden_size), np.float32)
        with torch.inference_mode():
            for s in range(0, len(idx), batch):
                chunk = idx[s : s + batch]
                width = max(len(encoded[i]) for i in chunk)
                ids = torch.full((len(chunk), width), tok.pad_token_id)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, i in enumerate(chunk):
                    ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
                    mask[r, : len(encoded[i])] = 1
                h = net(input_ids=ids, attention_mask=mask).last_hidden_state
                pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
                out[chunk] = pooled.numpy()
        return out

    probe = order[:: max(1, len(order) // 64)]  # a length-spread sample to pick the batch size
    probe_tokens = sum(len(encoded[i]) for i in probe)
    by_batch = {b: probe_tokens / timed(lambda b=b: run(b, probe)) for b in (1, 4, 8, 16, 32)}
    best = max(by_batch, key=by_batch.get)
    run_s = timed(lambda: run(best, order))
    vectors = run(16, list(range(16)))[:16]
    return {"load_s": load_s, "best_batch": best, "probe_tokens_per_s": by_batch,
            "run_s": run_s, "tokens": tokens, "tokens_per_s": tokens / run_s,
            "_vectors": vectors}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF file (default: the embedded model)")
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)

    from jaxembed.fetch import resolve_model
    from jaxembed.weights.loader import load_checkpoint

    model = resolve_model(args.model)
    tokenizer = load_checkpoint(model, progress=False).tokenizer.tokenizer
    texts = make_corpus(tokenizer, args.texts)
    import jax

    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "backend": jax.default_backend(),
                    "devices": [d.device_kind for d in jax.devices()]},
        "model": model.name, "texts": len(texts),
    }
    result["roofline_flops"] = roofline_flops()
    ours = bench_jaxembed(model, texts)
    cfg = ours.pop("_cfg")
    # Useful FLOPs: 2 x non-embedding params per token, plus attention (QK^T and PV: 4 x T x q_size
    # per layer for a T-token sequence, i.e. 2 x T per token on average under causal masking).
    lengths = [len(t) for t in tokenizer.encode_batch(texts)]
    attn = sum(2 * n * n * cfg.q_size * cfg.num_layers for n in lengths)
    useful = 2 * cfg.non_embedding_params() * sum(lengths) + attn
    ours["useful_flops_per_s"] = useful / ours["run_s"]
    ours["roofline_fraction"] = ours["useful_flops_per_s"] / result["roofline_flops"]["best"]
    ours["flops_arithmetic"] = (
        f"2 x {cfg.non_embedding_params():,} params x {sum(lengths):,} tokens + attention "
        f"{attn:,} = {useful:,} FLOP in {ours['run_s']:.2f}s")
    result["jaxembed"] = ours
    if not args.skip_transformers:
        ref = bench_transformers(model, texts, args.threads)
        cos = (ours["_vectors"] * ref["_vectors"]).sum(1) / (
            np.linalg.norm(ours["_vectors"], axis=1) * np.linalg.norm(ref["_vectors"], axis=1))
        ref["cosine_vs_jaxembed_min"] = float(cos.min())
        result["transformers"] = ref
        result["ratios"] = {
            "throughput_vs_transformers": ours["tokens_per_s"] / ref["tokens_per_s"],
            "load_vs_transformers": ref["load_s"] / ours["load_s"],
        }
    for peer in ("jaxembed", "transformers"):
        if peer in result:
            result[peer] = {k: v for k, v in result[peer].items() if not k.startswith("_")}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2, default=float))
    print(markdown(result))
    print(f"\nwrote {path}")
    return 0


def markdown(r: dict[str, Any]) -> str:
    ours = r["jaxembed"]
    rows = [
        "| metric | jaxembed | transformers | ratio |",
        "|---|---|---|---|",
    ]
    ref = r.get("transformers")
    rows.append(f"| embedding throughput (real tokens/s) | {ours['tokens_per_s']:.0f} | "
                + (f"{ref['tokens_per_s']:.0f} (batch {ref['best_batch']}) | "
                   f"{r['ratios']['throughput_vs_transformers']:.2f}x |" if ref else "- | - |"))
    rows.append(f"| GGUF load (s) | {ours['load_s']:.2f} | "
                + (f"{ref['load_s']:.1f} | {r['ratios']['load_vs_transformers']:.1f}x faster |"
                   if ref else "- | - |"))
    rows.append(f"| padding waste | {ours['padding_waste']:.1%} | - | - |")
    rows.append(f"| roofline fraction (fp32 matmul {r['roofline_flops']['best'] / 1e9:.0f} "
                f"GFLOP/s) | {ours['roofline_fraction']:.0%} | - | - |")
    rows.append(f"| recompilations after warm-up | {ours['recompilations_after_warmup']} | - | - |")
    if ref:
        rows.append(f"| pooled cosine, ours vs transformers (min of 16) | "
                    f"{ref['cosine_vs_jaxembed_min']:.6f} | | |")
    head = (f"{r['date']}, {r['model']}, {r['texts']} texts (8-512 tokens, "
            f"{ours['tokens']:,} tokens), {r['machine']['cpus']} CPUs, backend "
            f"{r['machine']['backend']}")
    return head + "\n\n" + "\n".join(rows) + "\n\n" + ours["flops_arithmetic"]


if __name__ == "__main__":
    raise SystemExit(main())
