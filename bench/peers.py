"""The peers, each measured on the same corpus and the same weights in the same process or run."""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def timed(fn, repeat: int = 1) -> float:
    """Best wall time of `repeat` calls."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def useful_flops(cfg: Any, lengths: list[int]) -> tuple[int, str]:
    """The FLOPs an embedding pass needs, and the arithmetic: 2 x non-embedding params per token,
    plus attention, where QK^T and PV cost 2 x 2 x q_size per (query, key) pair and causal
    masking leaves n(n+1)/2 pairs."""
    params = cfg.non_embedding_params()
    attn = sum(2 * n * (n + 1) * cfg.q_size * cfg.num_layers for n in lengths)
    flop = 2 * params * sum(lengths) + attn
    return flop, (f"2 x {params:,} params x {sum(lengths):,} tokens + attention {attn:,} = "
                  f"{flop:,} FLOP")


def roofline_flops(repeat: int = 5) -> dict[str, float]:
    """FLOP/s of a 2048^3 fp32 matrix product, numpy and JAX, best of `repeat` runs each."""
    import jax
    import jax.numpy as jnp

    n = 2048
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    t_np = timed(lambda: a @ b, repeat=repeat)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    mm = jax.jit(lambda x, y: x @ y)
    mm(ja, jb).block_until_ready()
    t_jax = timed(lambda: mm(ja, jb).block_until_ready(), repeat=repeat)
    flop = 2 * n**3
    return {"numpy": flop / t_np, "jax": flop / t_jax, "best": flop / min(t_np, t_jax)}


@dataclasses.dataclass
class Prepared:
    """A peer loaded and warmed up: `run` embeds the whole corpus once (a timed pass)."""

    info: dict[str, Any]
    run: Callable[[], Any]
    close: Callable[[], None] = lambda: None
    # Figures that need the timed passes done (counters read after them).
    finish: Callable[[], dict[str, Any]] = dict
    max_passes: int | None = None  # None: one timed pass in every round


def interleave(peers: dict[str, Prepared], rounds: int, probe: Callable[[], Any] | None = None,
               pause_s: float = 1.0) -> tuple[dict[str, dict[str, Any]], list[Any]]:
    """Time every peer's pass in turn, `rounds` times, the order reversed every other round.

    This VM's speed drifts by up to 2x within minutes, so peers timed one after another in
    separate windows are not compared on the same machine. Alternating their passes puts every
    peer in every period; the reversed order (A B, B A, A B) also cancels a steady drift between
    neighbours. `probe` (the roofline) runs at the start of each round; its results are returned.
    Each peer's figure is its best pass; `round_ratios` pairs passes of the same round.
    """
    times: dict[str, list[float]] = {name: [] for name in peers}
    probes = []
    for r in range(rounds):
        if probe is not None:
            probes.append(probe())
        names = list(peers) if r % 2 == 0 else list(reversed(peers))
        for name in names:
            cap = peers[name].max_passes
            if cap is not None and len(times[name]) >= cap:
                continue
            gc.collect()
            time.sleep(pause_s)  # lets the last peer's worker threads stop spinning
            start = time.perf_counter()
            peers[name].run()
            times[name].append(time.perf_counter() - start)
    out = {}
    for name, p in peers.items():
        run_s = min(times[name])
        out[name] = {**p.info, **p.finish(), "run_s": run_s, "run_s_passes": times[name],
                     "tokens_per_s": p.info["tokens"] / run_s}
    return out, probes


def round_ratios(a: list[float], b: list[float]) -> list[float]:
    """b's time over a's in each round both ran: how many times faster a was, pass by pass."""
    return [tb / ta for ta, tb in zip(a, b, strict=False)]


def jaxembed_peer(model: Path, texts: list[str], dtype: str = "float32",
                  embed_matmul_dtype: str | None = None) -> Prepared:
    from jaxembed import EngineBuilder
    from jaxembed.weights.loader import load_checkpoint

    load_s = timed(lambda: load_checkpoint(model, progress=False), repeat=3)
    engine = EngineBuilder(model=model, dtype=dtype, progress=False, warmup=False,
                           compilation_cache=False, embed_matmul_dtype=embed_matmul_dtype).build()
    try:
        tokens = sum(len(t) for t in engine.tokenize(texts))
        vectors = engine.encode(texts[:16])
        start = time.perf_counter()
        engine.encode(texts)  # compiles the shapes this workload needs
        first_s = time.perf_counter() - start
    except BaseException:
        engine.shutdown()
        raise
    compiles = engine.stats.compilations
    before = engine.stats.real_tokens, engine.stats.padded_tokens

    def finish() -> dict[str, Any]:
        real = engine.stats.real_tokens - before[0]
        padded = engine.stats.padded_tokens - before[1]
        return {"recompilations_after_warmup": engine.stats.compilations - compiles,
                "padding_waste": 1 - real / padded if padded else 0.0}

    return Prepared(
        {"load_s": load_s, "first_pass_s": first_s, "tokens": tokens, "compilations": compiles,
         "_vectors": vectors, "_cfg": engine.config},
        run=lambda: engine.encode(texts), close=engine.shutdown, finish=finish)


def transformers_pooled(net: Any, ids: list[list[int]], batch: int, order: list[int],
                        pad: int = 0, device: str = "cpu") -> np.ndarray:
    """Mean-pooled final hidden states of token-id lists from a transformers base model, run in
    padded batches of `batch` taken in `order` (rows not in it stay zero), as float32."""
    import torch

    out = np.zeros((len(ids), net.config.hidden_size), np.float32)
    with torch.inference_mode():
        for s in range(0, len(order), batch):
            chunk = order[s : s + batch]
            width = max(len(ids[i]) for i in chunk)
            tokens = torch.full((len(chunk), width), pad)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, i in enumerate(chunk):
                tokens[r, : len(ids[i])] = torch.tensor(ids[i])
                mask[r, : len(ids[i])] = 1
            tokens, mask = tokens.to(device), mask.to(device)
            h = net(input_ids=tokens, attention_mask=mask).last_hidden_state.float()
            pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            out[chunk] = pooled.cpu().numpy()  # the copy to the host waits for the device
    return out


def transformers_peer(model: Path, texts: list[str], threads: int) -> Prepared:
    """transformers on torch CPU, fp32, the same weights; length-sorted batches at its best size."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(threads)
    start = time.perf_counter()
    kw = {"gguf_file": model.name} if model.suffix == ".gguf" else {}
    root = model.parent if model.suffix == ".gguf" else model
    tok = AutoTokenizer.from_pretrained(root, **kw)
    net = AutoModel.from_pretrained(root, dtype=torch.float32, **kw).eval()
    load_s = time.perf_counter() - start
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    encoded = [tok(t)["input_ids"] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    tokens = sum(map(len, encoded))

    def run(batch: int, idx: list[int]) -> np.ndarray:
        return transformers_pooled(net, encoded, batch, idx, pad)

    probe = order[:: max(1, len(order) // 64)]  # a length-spread sample to pick the batch size
    probe_tokens = sum(len(encoded[i]) for i in probe)
    by_batch = {b: probe_tokens / timed(lambda b=b: run(b, probe)) for b in (1, 4, 8, 16, 32)}
    best = max(by_batch, key=by_batch.get)
    return Prepared({"load_s": load_s, "best_batch": best, "probe_tokens_per_s": by_batch,
                     "tokens": tokens, "_vectors": run(16, list(range(16)))[:16]},
                    run=lambda: run(best, order))


def llamacpp_peer(model: Path, texts: list[str], threads: int, max_passes: int | None = 1
                  ) -> Prepared:
    """llama.cpp through llama-cpp-python: the same GGUF, mean pooling, its quantized kernels.
    One timed pass by default: its pass takes several times the others' and more would double
    the run; it still runs between the others' first and second passes."""
    import llama_cpp

    ctx = 2048
    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(model), embedding=True, n_threads=threads,
                          n_threads_batch=threads, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx,
                          pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, verbose=False)
    load_s = time.perf_counter() - start
    tokens = sum(len(llm.tokenize(t.encode(), add_bos=True, special=True)) for t in texts)
    llm.embed(texts[:4])  # warm-up
    vectors = np.asarray(llm.embed(texts[:16], normalize=False), dtype=np.float32)
    return Prepared({"load_s": load_s, "tokens": tokens, "threads": threads, "_vectors": vectors},
                    run=lambda: llm.embed(texts, normalize=False), close=llm.close,
                    max_passes=max_passes)
