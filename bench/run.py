"""Benchmark harness: jaxembed against its peers, measured side by side in one run.

    python -m bench.run [--texts 512] [--model PATH] [--peers transformers,llamacpp,bf16]
                        [--workloads throughput,http,coldstart] [--out bench/results]
                        [--rounds 3]
                        [--tokens 128] [--streams 16] [--gen-repeat 3]
                        [--gen-warmup workload|full]
                        [--sizes 135m,1.7b,7b] [--sizes-texts N] [--sizes-tokens 32]
                        [--sizes-baseline EARLIER.json]

Workloads: (a) embedding throughput on a fixed corpus of texts spread from 8 to 512 tokens, with
GGUF load time (d); (b) the same corpus through HTTP with 32 concurrent clients; (c) cold start,
`jaxembed serve` to the first 200 on /v1/embeddings, then again with the persistent compilation
cache warm; and, when asked for (`--workloads generation`), (e) generation: single-stream decode
tokens/s against llama.cpp on the same GGUF, each as a fraction of its memory-bandwidth bound, and
the aggregate tokens/s of `--streams` concurrent requests (bench/generation.py); and with
`--workloads sizes`, memory, load, embedding and decode against llama.cpp at three model sizes
(bench/sizes.py); with `--workloads structured`, what a JSON-schema constraint costs a stream
against free ones, and how often its text validates (bench/structured.py). Peers run in the same run: transformers (torch CPU, fp32, the same weights
dequantized from the same GGUF, length-sorted batches at its best batch size), llama.cpp through
llama-cpp-python (the same GGUF), and a roofline (the FLOP/s of a large fp32 matrix product in the
same process, best of numpy and JAX). Figures are reported as ratios to peers from this run.
In (a) every engine is loaded and warmed up first, then their timed passes alternate for
`--rounds` rounds (the roofline measured at the start of each), so a drift in the machine's speed
during the run reaches every peer alike; each peer's figure is its best pass.
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

from bench import generation, sizes
from bench.memory import peak_memory
from bench.peers import (
    Prepared,
    interleave,
    jaxembed_peer,
    llamacpp_peer,
    roofline_flops,
    round_ratios,
    transformers_peer,
    useful_flops,
)
from bench.serving import cold_start, http_throughput, llamacpp_http_throughput, make_sentences

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were their one all we can her has there been if more when will would "
    "who so no embedding vector model token attention layer compile kernel matrix memory cache "
    "latency throughput server request batch python jax numpy torch llama gemma qwen mistral "
    "retrieval search ranking semantic similarity cosine distance query document passage "
    "Paris Tokyo Berlin 2048 3.14159 café naïve 日本 emoji 🙂 def return class import {} () [] ;"
).split()


def make_corpus(tokenizer: Any, n: int, lo: int = 8, hi: int = 512, seed: int = 0) -> list[str]:
    """n texts whose token counts spread log-uniformly from lo to hi."""
    rng = np.random.default_rng(seed)
    targets = np.exp(rng.uniform(np.log(lo), np.log(hi), n)).astype(int)
    texts = []
    for t in targets:
        words = rng.choice(WORDS, size=int(t * 2)).tolist()
        ids = tokenizer.encode(" ".join(words)).ids[: int(t)]
        texts.append(tokenizer.decode(ids))
    return texts


def _cosines(a: np.ndarray, b: np.ndarray) -> float:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF file (default: the embedded model)")
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--peers", default="transformers,llamacpp,bf16",
                        help="bf16: jaxembed itself with bfloat16 projections (the stretch "
                        "target: beat the fp32 roofline at a pooled cosine >= 0.999)")
    parser.add_argument("--workloads", default="throughput,http,coldstart,memory")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--docs", default=None, help="also write this markdown page")
    parser.add_argument("--plot", default=None,
                        help="also draw the throughput figures against the peers (a PNG)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="throughput: timed passes per peer, alternated between the peers")
    parser.add_argument("--http-requests", type=int, default=640,
                        help="HTTP: timed requests per server (after an untimed half as many)")
    parser.add_argument("--tokens", type=int, default=128,
                        help="generation: tokens generated per request")
    parser.add_argument("--streams", type=int, default=16,
                        help="generation: concurrent requests of the aggregate figure")
    parser.add_argument("--gen-repeat", type=int, default=3,
                        help="generation: timed single-stream runs (the best is reported)")
    parser.add_argument("--gen-warmup", choices=("workload", "full"), default="workload",
                        help="generation: compile by running the workload once untimed, or "
                        "also compile every decode shape first (warmup_generation)")
    parser.add_argument("--sizes", default="135m,1.7b",
                        help="sizes: the models measured, of " + ",".join(sizes.SHAPES)
                        + " (7b: memory, load and one small embedding call)")
    parser.add_argument("--sizes-texts", type=int, default=None,
                        help="sizes: texts of the embedding corpus (default: 64 at 135m, 32 at "
                        "1.7b, 8 at 7b)")
    parser.add_argument("--sizes-tokens", type=int, default=32,
                        help="sizes: tokens of each decode")
    parser.add_argument("--corpus-rows", type=int, default=100_000,
                        help="corpus: short texts embedded by embed-file and by the engine")
    parser.add_argument("--sizes-baseline", default=None,
                        help="sizes: an earlier run's results, to judge 135m against")
    args = parser.parse_args(argv)
    peers = {p for p in args.peers.split(",") if p}
    workloads = {w for w in args.workloads.split(",") if w}

    import jax

    from jaxembed.fetch import resolve_model
    from jaxembed.weights.loader import load_checkpoint

    model = resolve_model(args.model)
    tokenizer = load_checkpoint(model, progress=False).tokenizer.tokenizer
    texts = make_corpus(tokenizer, args.texts)
    r: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "backend": jax.default_backend(),
                    "devices": [d.device_kind for d in jax.devices()]},
        "model": model.name, "texts": len(texts),
    }
    if "throughput" in workloads:
        r.update(throughput(model, tokenizer, texts, peers, args.threads, args.rounds))
    if "http" in workloads:
        sentences = make_sentences()
        r["http"] = http_throughput(model, sentences, requests=args.http_requests)
        if "llamacpp" in peers:
            try:
                peer = llamacpp_http_throughput(model, sentences, args.threads,
                                                requests=args.http_requests)
                peer["jaxembed_throughput_ratio"] = (r["http"]["requests_per_s"]
                                                     / peer["requests_per_s"])
                r["http_llamacpp"] = peer
            except ImportError:
                r["http_llamacpp"] = {"skipped": "llama-cpp-python[server] is not installed "
                                      "(pip install -e '.[bench]')"}
    if "coldstart" in workloads:
        r["coldstart"] = cold_start(model)
    if "memory" in workloads:
        r["memory"] = peak_memory(model, args.texts)
    if "generation" in workloads:
        r["generation"] = generation.generation_benchmark(
            model, tokens=args.tokens, streams=args.streams, threads=args.threads, peers=peers,
            repeat=args.gen_repeat, warmup=args.gen_warmup)
    if "sizes" in workloads:
        r["sizes"] = sizes.sizes_benchmark(
            [s for s in args.sizes.split(",") if s], texts=args.sizes_texts,
            tokens=args.sizes_tokens, streams=args.streams, threads=args.threads,
            baseline=Path(args.sizes_baseline) if args.sizes_baseline else None)
    if "structured" in workloads:
        from bench.structured import structured_benchmark

        r["structured"] = structured_benchmark(model, streams=args.streams, tokens=args.tokens)
    if "corpus" in workloads:
        from bench.corpus import corpus_benchmark

        r["corpus"] = corpus_benchmark(model, args.corpus_rows)
    for value in r.values():
        if isinstance(value, dict):
            for k in [k for k in value if k.startswith("_")]:
                del value[k]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(r, indent=2, default=float))
    text = markdown(r)
    print(text)
    if args.docs:
        Path(args.docs).write_text(text)
    if args.plot:
        plot(r, Path(args.plot))
    print(f"\nwrote {path}")
    return 0


def throughput(model: Path, tokenizer: Any, texts: list[str], peers: set[str], threads: int,
               rounds: int) -> dict[str, Any]:
    """(a) and (d): every engine loaded and warmed up, then their timed passes alternated."""
    prepared: dict[str, Prepared] = {}
    skipped = {}
    try:
        prepared["jaxembed"] = jaxembed_peer(model, texts)
        if "bf16" in peers:
            prepared["jaxembed_bf16"] = jaxembed_peer(model, texts,
                                                      embed_matmul_dtype="bfloat16")
        if "transformers" in peers:
            prepared["transformers"] = transformers_peer(model, texts, threads)
        if "llamacpp" in peers:
            try:
                prepared["llamacpp"] = llamacpp_peer(model, texts, threads)
            except ImportError:
                skipped["llamacpp"] = {"skipped": "llama-cpp-python is not installed (pip "
                                       "install -e '.[bench]')"}
        results, roofs = interleave(prepared, rounds, probe=lambda: roofline_flops(repeat=3))
    finally:
        for p in prepared.values():
            p.close()
    ours = results["jaxembed"]
    cfg = ours.pop("_cfg")
    lengths = [len(e.ids) for e in tokenizer.encode_batch(texts)]
    useful, arithmetic = useful_flops(cfg, lengths)
    # The roofline is the best product rate seen in any round: the machine's peak in this run.
    roof = {k: max(p[k] for p in roofs) for k in roofs[0]}
    ours["useful_flops_per_s"] = useful / ours["run_s"]
    ours["roofline_fraction"] = ours["useful_flops_per_s"] / roof["best"]
    ours["roofline_fraction_rounds"] = [useful / t / p["best"]
                                        for t, p in zip(ours["run_s_passes"], roofs, strict=True)]
    ours["flops_arithmetic"] = f"{arithmetic} in {ours['run_s']:.2f} s"
    out: dict[str, Any] = {"roofline_flops": roof, "roofline_rounds": roofs, "jaxembed": ours,
                           **skipped}
    if "jaxembed_bf16" in results:
        narrow = results["jaxembed_bf16"]
        narrow.pop("_cfg")
        narrow["useful_flops_per_s"] = useful / narrow["run_s"]
        narrow["fp32_roofline_fraction"] = narrow["useful_flops_per_s"] / roof["best"]
        narrow["cosine_vs_fp32_min"] = _cosines(ours["_vectors"], narrow["_vectors"])
        narrow["speedup_over_fp32"] = narrow["tokens_per_s"] / ours["tokens_per_s"]
        out["jaxembed_bf16"] = narrow
    for name in ("transformers", "llamacpp"):
        if name in results:
            peer = results[name]
            peer["cosine_vs_jaxembed_min"] = _cosines(ours["_vectors"], peer["_vectors"])
            peer["jaxembed_speedup"] = ours["tokens_per_s"] / peer["tokens_per_s"]
            peer["jaxembed_speedup_rounds"] = round_ratios(ours["run_s_passes"],
                                                           peer["run_s_passes"])
            out[name] = peer
    return out


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    corpus = f"{r['texts']} texts of 8-512 tokens, " if "jaxembed" in r or "http" in r else ""
    lines = [f"Run {r['date']}: {r['model']}, {corpus}{m['cpus']} CPUs, "
             f"JAX backend {m['backend']} ({', '.join(sorted(set(m['devices'])))}).", ""]
    if "jaxembed" in r:
        ours = r["jaxembed"]
        lines += ["| embedding throughput (real tokens/s) | value | jaxembed is |",
                  "|---|---|---|",
                  f"| jaxembed | {ours['tokens_per_s']:.0f} | |"]
        narrow = r.get("jaxembed_bf16")
        if narrow:
            lines.append(f"| jaxembed, bfloat16 projections (stretch) | "
                         f"{narrow['tokens_per_s']:.0f} | {narrow['speedup_over_fp32']:.2f}x "
                         f"jaxembed fp32; {narrow['fp32_roofline_fraction']:.0%} of the fp32 "
                         f"roofline (pooled cosine {narrow['cosine_vs_fp32_min']:.5f} against "
                         "fp32) |")
        for name, label in (("transformers", "transformers (torch CPU, fp32)"),
                            ("llamacpp", "llama.cpp (llama-cpp-python)")):
            peer = r.get(name)
            if peer and "tokens_per_s" in peer:
                extra = f", batch {peer['best_batch']}" if "best_batch" in peer else ""
                passes = peer.get("jaxembed_speedup_rounds", [])
                by_round = (f"; pass by pass {' / '.join(f'{x:.2f}' for x in passes)}"
                            if len(passes) > 1 else "")
                lines.append(f"| {label}{extra} | {peer['tokens_per_s']:.0f} | "
                             f"{peer['jaxembed_speedup']:.2f}x (pooled cosine "
                             f"{peer['cosine_vs_jaxembed_min']:.5f}{by_round}) |")
            elif peer:
                lines.append(f"| {label} | skipped: {peer['skipped']} | |")
        roof = r["roofline_flops"]["best"]
        fractions = " / ".join(f"{f:.0%}" for f in ours.get("roofline_fraction_rounds", []))
        lines += ["", "| other figures | jaxembed | peer |", "|---|---|---|",
                  f"| roofline fraction | {ours['roofline_fraction']:.0%} of {roof / 1e9:.0f} "
                  f"GFLOP/s (fp32 matmul, same process, best of the rounds); pass by pass "
                  f"against each round's own: {fractions} | |",
                  f"| padding waste | {ours['padding_waste']:.1%} | |",
                  f"| recompilations after warm-up | {ours['recompilations_after_warmup']} | |"]
        load_peers = [f"{n} {r[n]['load_s']:.1f} s" for n in ("transformers", "llamacpp")
                      if "load_s" in r.get(n, {})]
        lines.append(f"| GGUF load | {ours['load_s']:.2f} s | {', '.join(load_peers)} |")
    if "http" in r:
        h, peer = r["http"], r.get("http_llamacpp", {})
        if "requests_per_s" in peer:
            shown = (f"llama-cpp-python server: {peer['requests_per_s']:.1f} req/s, p50 "
                     f"{peer['p50_ms']:.0f} ms, p99 {peer['p99_ms']:.0f} ms; jaxembed "
                     f"{peer['jaxembed_throughput_ratio']:.1f}x its throughput")
        else:
            shown = f"skipped: {peer['skipped']}" if peer else ""
        lines.append(f"| HTTP, {h['clients']} clients, single sentences | {h['requests_per_s']:.1f} "
                     f"req/s, p50 {h['p50_ms']:.0f} ms, p99 {h['p99_ms']:.0f} ms | {shown} |")
    if "coldstart" in r:
        c = r["coldstart"]
        lines.append(f"| cold start to first 200 | {c['cold_s']:.1f} s; restart with compile "
                     f"cache {c['warm_cache_s']:.1f} s | |")
    if "memory" in r:
        mem = r["memory"]
        lines.append(f"| peak memory (fresh process: corpus, then 2 x {mem['max_model_len']} "
                     f"tokens) | {mem['peak_rss'] / 2**20:.0f} MiB = float32 weights "
                     f"{mem['weights_bytes'] / 2**20:.0f} MiB + "
                     f"{mem['over_weights'] / 2**20:.0f} MiB (target: + 1024 MiB) | |")
    if "jaxembed" in r:
        lines += ["", f"FLOPs: {r['jaxembed']['flops_arithmetic']}."]
    if "generation" in r:
        lines += [""] * (lines[-1] != "") + generation.markdown(r["generation"])
    if "sizes" in r:
        lines += [""] * (lines[-1] != "") + sizes.markdown(r["sizes"])
    if "corpus" in r:
        c = r["corpus"]
        lines += [""] * (lines[-1] != "") + [
            f"embed-file, {c['rows']:,} short texts ({c['tokens']:,} tokens), batches of "
            f"{c['batch']}: {c['embed_file_rows_per_s']:,.0f} rows/s, "
            f"{c['embed_file_tokens_per_s']:,.0f} tokens/s; the engine's own on the same "
            f"batches: {c['engine_rows_per_s']:,.0f} rows/s "
            f"(embed-file at {c['embed_file_vs_engine']:.2f}x)."]
    if "structured" in r:
        from bench.structured import markdown as structured_markdown

        lines += [""] * (lines[-1] != "") + structured_markdown(r["structured"])
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], path: Path) -> None:
    """Bars of each measured figure, jaxembed beside its peer from the same run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, dict[str, float]]] = []
    if "jaxembed" in r:
        bars = {"jaxembed": r["jaxembed"]["tokens_per_s"]}
        bars |= {name: r[name]["tokens_per_s"] for name in ("transformers", "llamacpp")
                 if "tokens_per_s" in r.get(name, {})}
        bars["fp32 roofline"] = (r["jaxembed"]["tokens_per_s"]
                                 / r["jaxembed"]["roofline_fraction"])
        panels.append(("embedding throughput (tokens/s)", bars))
    if "http" in r:
        bars = {"jaxembed": r["http"]["requests_per_s"]}
        if "requests_per_s" in r.get("http_llamacpp", {}):
            bars["llama-cpp-python server"] = r["http_llamacpp"]["requests_per_s"]
        panels.append((f"HTTP, {r['http']['clients']} clients (requests/s)", bars))
    gen = r.get("generation", {})
    if "jaxembed_single" in gen:
        bars = {"jaxembed 1 stream": gen["jaxembed_single"]["decode_tokens_per_s"],
                f"jaxembed {gen['streams']} streams": gen["jaxembed_aggregate"]["tokens_per_s"]}
        if "bf16_aggregate" in gen:
            bars[f"jaxembed bf16 {gen['streams']} streams"] = gen["bf16_aggregate"]["tokens_per_s"]
        if "decode_tokens_per_s" in gen.get("llamacpp_single", {}):
            bars["llama.cpp 1 stream"] = gen["llamacpp_single"]["decode_tokens_per_s"]
        panels.append(("generation (tokens/s)", bars))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (title, bars) in zip(axes[0], panels, strict=True):
        colours = ["#2457c5" if k.startswith("jaxembed") else "#9aa5b1" for k in bars]
        ax.bar(list(bars), list(bars.values()), color=colours)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        for i, v in enumerate(bars.values()):
            ax.annotate(f"{v:.0f}" if v >= 10 else f"{v:.1f}", (i, v), ha="center",
                        va="bottom", fontsize=8)
    fig.suptitle(f"{r['model']}, {r['machine']['cpus']} CPUs, {r['date']} (one run)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
