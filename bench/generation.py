"""Generation: jaxembed's decode against llama.cpp on the same GGUF, measured in the same run.

    python -m bench.run --workloads generation [--tokens 128] [--streams 16] [--peers llamacpp]
    python -m bench.generation [--tokens 8] [--streams 2]       (the same, generation only)

Three figures, each a function returning a dict:

- `memory_bandwidth`: this machine's memory read bandwidth (best of numpy, numpy on every core,
  and a JAX reduction over a 512 MiB array). Over the weight bytes an engine reads per generated
  token it is the bandwidth-bound tokens/s of a single stream (KV cache reads left out: small at
  these lengths): for jaxembed the weights its decode steps read (`decode_bytes_per_token`; the
  tied LM head reads the embedding table whole), for llama.cpp the tensor bytes of the GGUF.
- `jaxembed_single_stream` / `llamacpp_single_stream`: a ~16-token prompt continued greedily for
  `tokens` tokens past any end of text; time to first token (the prefill) apart from the decode
  rate, (tokens - 1) / (last token - first token). Best of `repeat` runs after an untimed one.
  llama.cpp twice: its engine through llama-cpp-python's token generator (`Llama.generate`,
  sampling in C: close to llama-bench's tg figure), and through its public
  `create_completion(stream=True)`, where end-of-generation tokens are banned with `logit_bias`.
  The faster of the two is the peer figure.
- `jaxembed_aggregate`: `streams` threads, each calling `engine.generate` on its own prompt for
  tokens/2 to tokens-1 tokens, batched by the engine into shared decode steps; total generated
  tokens / wall time (best of `repeat` passes), after the same workload once untimed to compile
  its shapes. The issue's goal: at least 3x llama.cpp's single stream.

With the `bf16` peer, jaxembed's two figures again with `--decode-matmul-dtype bfloat16`, whose
bandwidth bound counts the narrowed weights it reads.
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.peers import timed

PROMPTS = [
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The most important thing to understand about compilers is that they",
    "Here is a short recipe for a simple tomato soup. First, you need",
    "In the year 2048, the city of Tokyo had changed beyond recognition, and",
    "The history of the Roman Empire can be divided into several periods, starting with",
    "To train a neural network, you first collect a data set and then",
    "My favourite place in Paris is a small café near the river, where",
    "The mountain trail was steep and narrow, and the hikers slowly climbed toward",
    "A good database index speeds up queries because it lets the engine",
    "When the orchestra began to play, the audience fell silent and listened to",
    "The three laws of thermodynamics describe how energy behaves, and the first says",
    "Dear team, I am writing to let you know about the changes to our schedule",
    "The detective looked at the empty room and noticed that the window was",
    "Photosynthesis is the process by which green plants turn sunlight into",
    "Our journey across the desert lasted seven days, and on the third day we",
    "The best way to learn a new programming language is to write small programs that",
]
BANDWIDTH_MIB = 512


def prompt(i: int) -> str:
    """The i-th stream's prompt: distinct for every i."""
    base = PROMPTS[i % len(PROMPTS)]
    return base if i < len(PROMPTS) else f"({i // len(PROMPTS)}) {base}"


# ---- memory bandwidth and the bytes each engine reads per token ----------------------------


def decode_bytes_per_token(engine: Any) -> int:
    """The weight bytes an engine's decode step reads, from the copies it decodes with: the
    per-layer weights (narrowed ones with --decode-matmul-dtype), the output head (the whole
    embedding table when tied), the final norm. Without per-layer copies (a mesh): every
    parameter of the weights it scans. The input embedding's one row per token is left out."""
    return engine.runner.decode_weights.nbytes


def gguf_bytes_per_token(model: Path) -> int | None:
    """The tensor bytes of a GGUF: llama.cpp reads its quantized weights as they are."""
    if model.suffix != ".gguf":
        return None
    from jaxembed.weights.gguf_io import GGUFFile

    return int(sum(t.data.nbytes for t in GGUFFile(model).tensors.values()))


def memory_bandwidth(model: Path, size_mib: int = BANDWIDTH_MIB, repeat: int = 5,
                     threads: int | None = None) -> dict[str, Any]:
    """Read bandwidth in GB/s (a sum over a `size_mib` fp32 array: numpy on one core, numpy split
    over `threads` cores, JAX), and llama.cpp's bandwidth-bound single-stream tokens/s."""
    import jax
    import jax.numpy as jnp

    threads = threads or os.cpu_count() or 1
    a = np.random.default_rng(0).standard_normal(size_mib * 2**20 // 4, dtype=np.float32)
    nbytes = a.nbytes
    t_np = timed(lambda: a.sum(), repeat=repeat)
    chunks = np.array_split(a, threads)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:  # numpy frees the GIL here
        t_thr = timed(lambda: list(pool.map(np.sum, chunks)), repeat=repeat)
    ja = jnp.asarray(a)
    total = jax.jit(jnp.sum)
    total(ja).block_until_ready()
    t_jax = timed(lambda: total(ja).block_until_ready(), repeat=repeat)
    gbs = {"numpy": nbytes / t_np / 1e9, f"numpy_{threads}_threads": nbytes / t_thr / 1e9,
           "jax": nbytes / t_jax / 1e9}
    best = max(gbs.values())
    theirs = gguf_bytes_per_token(model)
    r: dict[str, Any] = {"array_mib": size_mib, "gb_per_s": gbs, "best_gb_per_s": best}
    if theirs:
        r["llamacpp_bytes_per_token"] = theirs
        r["llamacpp_bound_tokens_per_s"] = best * 1e9 / theirs
    return r


# ---- single stream ---------------------------------------------------------------------------


def _rates(runs: list[dict[str, float]]) -> dict[str, Any]:
    """The best run by decode rate, with every run's figures kept."""
    best = max(runs, key=lambda r: r["decode_tokens_per_s"])
    return {**best, "runs": runs}


def _run_figures(start: float, first: float, last: float, n: int) -> dict[str, float]:
    return {"tokens": n, "ttft_s": first - start, "decode_s": last - first,
            "decode_tokens_per_s": (n - 1) / (last - first) if n > 1 and last > first else 0.0,
            "total_s": last - start}


def jaxembed_single_stream(engine: Any, ids: list[int], tokens: int,
                           repeat: int = 3) -> dict[str, Any]:
    """One request at a time: time to first token, then the decode rate of the rest."""

    def once() -> dict[str, float]:
        start = time.perf_counter()
        stream = engine.generate_stream(ids, temperature=0, max_tokens=tokens, ignore_eos=True)
        first = last = 0.0
        n = 0
        for delta in stream:
            if delta.token_ids:
                last = time.perf_counter()
                if n == 0:
                    first = last
                n += len(delta.token_ids)
        return _run_figures(start, first, last, n)

    once()  # compiles this prompt's prefill and the decode shapes up to its length
    compiles = engine.stats_snapshot().compilations
    runs = [once() for _ in range(repeat)]
    return {**_rates(runs), "recompilations": engine.stats_snapshot().compilations - compiles}


def _eog_ids(llm: Any) -> list[int]:
    import llama_cpp

    vocab = llm._model.vocab
    return [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]


def llamacpp_single_stream(model: Path, ids: list[int], tokens: int, threads: int,
                           repeat: int = 3) -> dict[str, Any]:
    """llama.cpp through llama-cpp-python, the same GGUF and prompt token ids, greedy."""
    import llama_cpp

    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(model), n_threads=threads, n_threads_batch=threads,
                          n_ctx=2048, n_batch=512, verbose=False)
    load_s = time.perf_counter() - start
    try:
        def engine_once() -> dict[str, float]:
            # Its token generator: decode and greedy sampling in C, no end-of-text check (like
            # ignore_eos). reset() first, so that no prefix of the last run's cache is reused.
            llm.reset()
            start = time.perf_counter()
            first = last = 0.0
            n = 0
            for _ in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                last = time.perf_counter()
                if n == 0:
                    first = last
                n += 1
                if n >= tokens:
                    break
            return _run_figures(start, first, last, n)

        bias = {t: -1e9 for t in _eog_ids(llm)}

        def api_once() -> dict[str, float]:
            # The public API, detokenizing as it goes; banned end-of-generation tokens make it
            # run to max_tokens (it has no ignore_eos).
            llm.reset()
            start = time.perf_counter()
            first = last = 0.0
            for _ in llm.create_completion(ids, max_tokens=tokens, temperature=0.0,
                                           stream=True, logit_bias=bias):
                last = time.perf_counter()
                first = first or last
            # Chunks are not tokens (a split character waits, and an empty chunk carries the
            # finish reason); every token drawn but the last was fed back through the model.
            return _run_figures(start, first, last, llm.n_tokens - len(ids) + 1)

        results = {}
        for name, once in (("generate", engine_once), ("create_completion", api_once)):
            once()  # warm-up
            results[name] = _rates([once() for _ in range(repeat)])
    finally:
        llm.close()
    best = max(results, key=lambda k: results[k]["decode_tokens_per_s"])
    return {**results[best], "path": best, "paths": results, "load_s": load_s,
            "threads": threads}


# ---- many streams at once --------------------------------------------------------------------


def jaxembed_aggregate(engine: Any, tokens: int, streams: int, warmup_passes: int = 3,
                       repeat: int = 1) -> dict[str, Any]:
    """`streams` threads, one request each, all started at once; lengths spread over
    [tokens/2, tokens) so that the batch shrinks as they finish. The best of `repeat` timed
    passes, every pass's tokens/s kept."""
    prompts = [prompt(i) for i in range(streams)]
    lengths = [max(1, tokens // 2 + i * (tokens - tokens // 2) // max(streams, 1))
               for i in range(streams)]

    def once() -> tuple[float, list[int], list[float]]:
        gate = threading.Barrier(streams + 1)

        def one(i: int) -> tuple[int, float]:
            gate.wait()
            t = time.perf_counter()
            out = engine.generate(prompts[i], temperature=0, max_tokens=lengths[i],
                                  ignore_eos=True)
            return len(out.choices[0].token_ids), time.perf_counter() - t

        with concurrent.futures.ThreadPoolExecutor(streams) as pool:
            futures = [pool.submit(one, i) for i in range(streams)]
            gate.wait()
            start = time.perf_counter()
            done = [f.result() for f in futures]
            wall = time.perf_counter() - start
        return wall, [n for n, _ in done], [s for _, s in done]

    # Untimed passes compile the prefill and decode shapes this workload produces. How the
    # requests are admitted (one prefill or several) depends on thread timing, so a pass may still
    # meet a new shape: repeat until one compiles nothing (at most `warmup_passes`).
    first_start = time.perf_counter()
    passes = 0
    while passes < warmup_passes:
        compiles = engine.stats_snapshot().compilations
        once()
        passes += 1
        if engine.stats_snapshot().compilations == compiles:
            break
    first_s = time.perf_counter() - first_start
    start = engine.stats_snapshot()
    timed_passes = []
    for _ in range(max(repeat, 1)):
        before = engine.stats_snapshot()
        wall, counts, latencies = once()
        timed_passes.append((sum(counts) / wall, wall, counts, latencies, before,
                             engine.stats_snapshot()))
    _, wall, counts, latencies, before, after = max(timed_passes, key=lambda p: p[0])
    steps = after.decode_steps - before.decode_steps
    generated = after.generated_tokens - before.generated_tokens
    return {
        "streams": streams, "max_tokens": lengths, "generated_tokens": sum(counts),
        "wall_s": wall, "tokens_per_s": sum(counts) / wall, "warmup_passes": passes,
        "warmup_s": first_s,
        "decode_steps": steps, "prefill_steps": after.prefill_steps - before.prefill_steps,
        # Each request's first token comes from its prefill, the rest from decode steps.
        "mean_rows_per_decode_step": (generated - streams) / steps if steps else 0.0,
        "request_p50_s": float(np.percentile(latencies, 50)),
        "request_max_s": float(max(latencies)),
        "passes_tokens_per_s": [p[0] for p in timed_passes],
        # Over every timed pass, not only the best one.
        "compilations_before": start.compilations,
        "compilations_after": engine.stats_snapshot().compilations,
        "recompilations": engine.stats_snapshot().compilations - start.compilations,
    }


# ---- the workload --------------------------------------------------------------------------


def generation_benchmark(model: Path, tokens: int = 128, streams: int = 16,
                         threads: int | None = None, peers: set[str] | None = None,
                         repeat: int = 3, warmup: str = "workload",
                         bandwidth_mib: int = BANDWIDTH_MIB) -> dict[str, Any]:
    """All three figures, with the ratios between them; with "bf16" among the peers, jaxembed's
    single stream and aggregate again with --decode-matmul-dtype bfloat16. warmup "full" also
    compiles every decode shape first (`engine.warmup_generation`); "workload" relies on the
    untimed passes."""
    from jaxembed import EngineBuilder

    threads = threads or os.cpu_count() or 1
    peers = {"llamacpp"} if peers is None else peers
    r: dict[str, Any] = {"tokens": tokens, "streams": streams, "repeat": repeat,
                         "warmup": warmup, "threads": threads}
    variants = {"jaxembed": None, **({"bf16": "bfloat16"} if "bf16" in peers else {})}
    for name, dtype in variants.items():
        engine = EngineBuilder(model=model, warmup=False, progress=False,
                               max_num_seqs=max(16, streams), decode_matmul_dtype=dtype).build()
        try:
            if "memory_bandwidth" not in r:
                r["memory_bandwidth"] = memory_bandwidth(model, size_mib=bandwidth_mib,
                                                         threads=threads)
            ids = [int(t) for t in engine.prepare_prompt(PROMPTS[0])]
            r["prompt_tokens"] = len(ids)
            if warmup == "full":
                start = time.perf_counter()
                engine.warmup_generation()
                r[f"{name}_warmup_generation_s"] = time.perf_counter() - start
            single = jaxembed_single_stream(engine, ids, tokens, repeat)
            agg = jaxembed_aggregate(engine, tokens, streams, repeat=repeat)
            per_token = decode_bytes_per_token(engine)
        finally:
            engine.shutdown()
        bound = r["memory_bandwidth"]["best_gb_per_s"] * 1e9 / per_token
        single.update(bytes_per_token=per_token, bound_tokens_per_s=bound,
                      bound_fraction=single["decode_tokens_per_s"] / bound)
        agg["vs_jaxembed_single"] = agg["tokens_per_s"] / max(single["decode_tokens_per_s"], 1e-9)
        r[f"{name}_single"], r[f"{name}_aggregate"] = single, agg
    if "bf16_single" in r:
        r["bf16_single"]["vs_fp32"] = (r["bf16_single"]["decode_tokens_per_s"]
                                       / r["jaxembed_single"]["decode_tokens_per_s"])
        r["bf16_aggregate"]["vs_fp32"] = (r["bf16_aggregate"]["tokens_per_s"]
                                          / r["jaxembed_aggregate"]["tokens_per_s"])
    r["compilations"] = r["jaxembed_aggregate"]["compilations_after"]
    bw = r["memory_bandwidth"]
    if "llamacpp" in peers:
        try:
            peer = llamacpp_single_stream(model, ids, tokens, threads, repeat)
        except ImportError:
            peer = {"skipped": "llama-cpp-python is not installed (pip install -e '.[bench]')"}
        if "decode_tokens_per_s" in peer:
            rate = peer["decode_tokens_per_s"]
            if "llamacpp_bound_tokens_per_s" in bw:
                peer["bound_fraction"] = rate / bw["llamacpp_bound_tokens_per_s"]
            for name in variants:
                r[f"{name}_single"]["vs_llamacpp"] = r[f"{name}_single"]["decode_tokens_per_s"] / rate
                agg = r[f"{name}_aggregate"]
                agg["vs_llamacpp_single"] = agg["tokens_per_s"] / rate
                agg["meets_3x_goal"] = agg["vs_llamacpp_single"] >= 3.0
        r["llamacpp_single"] = peer
    return r


def markdown(g: dict[str, Any]) -> list[str]:
    """Lines of the generation section of the results page."""
    bw, peer = g["memory_bandwidth"], g.get("llamacpp_single", {})
    lines = [f"Generation: a {g['prompt_tokens']}-token prompt, {g['tokens']} tokens greedy "
             f"(past any end of text), best of {g['repeat']}; {g['threads']} threads for "
             f"llama.cpp. Memory read bandwidth {bw['best_gb_per_s']:.1f} GB/s (best of "
             + ", ".join(f"{k} {v:.1f}" for k, v in bw["gb_per_s"].items()) + ").", "",
             "| generation | decode tokens/s | of its bandwidth bound | time to first token | "
             "jaxembed is |", "|---|---|---|---|---|"]
    names = {"jaxembed": "jaxembed", "bf16": "jaxembed `--decode-matmul-dtype bfloat16`"}
    for key, label in names.items():
        if f"{key}_single" not in g:
            continue
        ours = g[f"{key}_single"]
        vs = f"{ours['vs_llamacpp']:.2f}x llama.cpp" if "vs_llamacpp" in ours else ""
        if "vs_fp32" in ours:
            vs += f"{'; ' if vs else ''}{ours['vs_fp32']:.2f}x fp32"
        lines.append(f"| {label}, 1 stream ({ours['bytes_per_token'] / 1e6:.0f} MB of weights "
                     f"per token) | {ours['decode_tokens_per_s']:.1f} | "
                     f"{ours['bound_fraction']:.0%} of {ours['bound_tokens_per_s']:.0f} | "
                     f"{ours['ttft_s'] * 1e3:.0f} ms | {vs} |")
    if "decode_tokens_per_s" in peer:
        bound = (f"{peer['bound_fraction']:.0%} of {bw['llamacpp_bound_tokens_per_s']:.0f}"
                 if "bound_fraction" in peer else "")
        size = (f" ({bw['llamacpp_bytes_per_token'] / 1e6:.0f} MB of GGUF tensors per token)"
                if "llamacpp_bytes_per_token" in bw else "")
        lines.append(f"| llama.cpp (llama-cpp-python `{peer['path']}`), 1 stream{size} | "
                     f"{peer['decode_tokens_per_s']:.1f} | {bound} | {peer['ttft_s'] * 1e3:.0f} "
                     f"ms | |")
        for name, p in peer["paths"].items():
            if name != peer["path"]:
                lines.append(f"| llama.cpp (llama-cpp-python `{name}`), 1 stream | "
                             f"{p['decode_tokens_per_s']:.1f} | | {p['ttft_s'] * 1e3:.0f} ms | |")
    elif peer:
        lines.append(f"| llama.cpp | skipped: {peer['skipped']} | | | |")
    notes = []
    for key, label in names.items():
        if f"{key}_aggregate" not in g:
            continue
        agg, ours = g[f"{key}_aggregate"], g[f"{key}_single"]
        vs = (f"{agg['vs_llamacpp_single']:.2f}x llama.cpp's single stream (goal 3x: "
              f"{'met' if agg['meets_3x_goal'] else 'not met'})" if "vs_llamacpp_single" in agg
              else "")
        if "vs_fp32" in agg:
            vs += f"{'; ' if vs else ''}{agg['vs_fp32']:.2f}x fp32"
        lines.append(f"| {label}, {agg['streams']} concurrent streams of "
                     f"{min(agg['max_tokens'])}-{max(agg['max_tokens'])} tokens (aggregate) | "
                     f"{agg['tokens_per_s']:.1f} | | | {vs} |")
        notes.append(
            f"{label}, aggregate: best of {len(agg['passes_tokens_per_s'])} passes ("
            + ", ".join(f"{x:.0f}" for x in agg["passes_tokens_per_s"])
            + f" tokens/s); {agg['generated_tokens']} tokens in {agg['wall_s']:.2f} s, "
            f"{agg['decode_steps']} decode steps of {agg['mean_rows_per_decode_step']:.1f} "
            f"sequences on average, {agg['vs_jaxembed_single']:.1f}x its single stream; "
            f"request latency p50 {agg['request_p50_s']:.2f} s, max {agg['request_max_s']:.2f} "
            f"s. Compilations {agg['compilations_before']} before the timed passes, "
            f"{agg['compilations_after']} after ({agg['recompilations']} new; "
            f"{agg['warmup_passes']} untimed passes first); single stream "
            f"{ours['recompilations']} new after its warm-up.")
    for note in notes:
        lines += ["", note]
    return lines


if __name__ == "__main__":
    from bench.run import main

    raise SystemExit(main(["--workloads", "generation", *sys.argv[1:]]))
