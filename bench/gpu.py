"""Accelerator workload: embedding prefill of a Qwen3-0.6B-shaped model (random weights) in
bfloat16, through the engine and through the real HTTP server, against transformers on the same
device and the same weights (sdpa, and under torch.compile where that works), and against the
bf16 matrix-product rate measured in the same process; a parity gate; generation at 1 and 64
streams against transformers' batched `generate`.

    python -m bench.gpu [--preset qwen3-0.6b] [--texts 2048] [--max-batch-tokens 32768]
                        [--api-batch 32] [--api-clients 16] [--compile-backend inductor]
                        [--streams 1,64] [--gen-tokens 64] [--out bench/results]
    python -m bench.gpu --smoke      # the same code on the CPU with a tiny model (a test runs it)

It runs from a checkout that was never installed (see bench/checkout.py): on a host with JAX,
torch and transformers preinstalled and no network, bring the wheels bench/gpu-wheels.txt lists
into bench/wheels/ first.

Parity is gated: the engine's per-token final hidden states in the run's dtype against
transformers' in float32 on the same weights, relative to the largest value, must be within
twice transformers' own error in the same dtype (at least 1e-5); a run that fails it says so in
its targets and exits 1.

The corpus is token ids (lengths 8 to 512, log-uniform, as workload (a)), so both engines see the
same tokens without a real tokenizer. The API level sends the same ids to POST /v1/embeddings,
`--api-batch` texts a request, from `--api-clients` concurrent clients, to the app `jaxembed
serve` runs (uvicorn on a loopback port, in this process, over the engine-level run's engine).
Useful FLOPs are counted as in bench.run: 2 x non-embedding params per token plus causal
attention. `--preset tiny` runs the same code on a tiny model (on the CPU too) to check the
harness; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import queue
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench.checkout import use_checkout

use_checkout()  # before anything imports jaxembed

from bench.peers import timed, transformers_pooled, useful_flops  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    # Qwen/Qwen3-0.6B's config.json.
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, rope_theta=1_000_000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
                 max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=True,
                 rope_theta=10000.0),
}


def build_model(folder: Path, preset: str, dtype: str, seed: int = 0) -> Path:
    """A random Qwen3 of the preset's shape, saved as an HF folder (safetensors, config.json,
    and a word-level tokenizer.json the loader needs but the token-id corpus never uses)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Qwen3Config, Qwen3ForCausalLM

    shape = dict(PRESETS[preset])
    theta = shape.pop("rope_theta")
    cfg = Qwen3Config(**shape, bos_token_id=None, eos_token_id=0, pad_token_id=0)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).to(getattr(torch, dtype)).eval()
    with torch.no_grad():  # norms around 1 and weights ~ 1/sqrt(fan_in), as trained models are
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(p.shape[-1]))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    return folder


def make_ids(n: int, vocab: int, lo: int = 8, hi: int = 512, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.uniform(np.log(lo), np.log(hi), n)).astype(int)
    return [rng.integers(1, vocab, size=int(t)).tolist() for t in lengths]


def matmul_flops(dtype: str, n: int) -> float:
    """FLOP/s of an n^3 matrix product in `dtype` through JAX, best of 5."""
    import jax
    import jax.numpy as jnp

    key = jax.random.PRNGKey(0)
    a = jax.random.normal(key, (n, n), getattr(jnp, dtype))
    b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), getattr(jnp, dtype))
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, b).block_until_ready()
    return 2 * n**3 / timed(lambda: mm(a, b).block_until_ready(), repeat=5)


@contextlib.contextmanager
def embedding_engine(folder: Path, dtype: str, max_batch_tokens: int, kernels: bool = True,
                     warmup: bool = True) -> Iterator[Any]:
    """The engine as a server starts it on an accelerator: the coarse ladder of step shapes, every
    program compiled before it is ready (`Engine.warmup_all`), on a CPU too (the smoke run), so
    that the run checks steady serving compiles nothing. Contexts of 512 tokens, the corpus's
    longest. kernels=False: every op in XLA (`--no-kernels`), the kernels' comparison, compiled
    on use (warmup=False) to keep the harness short. Yields the engine and its start-up."""
    from jaxembed import EngineBuilder

    start = time.perf_counter()
    engine = EngineBuilder(model=folder, dtype=dtype, max_batch_tokens=max_batch_tokens,
                           max_model_len=512, kernels=kernels, buckets="coarse",
                           progress=False, warmup=warmup, compilation_cache=False).build()
    startup = {"startup_s": time.perf_counter() - start,
               "startup_compilations": engine.stats.compilations}
    try:
        yield engine, startup
    finally:
        engine.shutdown()


def jaxembed_run(engine: Any, ids: list[list[int]]) -> dict[str, Any]:
    """The whole corpus in one request to the engine, in this process."""
    from jaxembed import EmbeddingRequest

    def run() -> np.ndarray:
        response = engine.embed(EmbeddingRequest(input=ids))
        return np.asarray([d.embedding for d in response.data], np.float32)

    compiles = engine.stats.compilations
    start = time.perf_counter()
    run()  # after a full warm-up, compiles nothing
    first_s = time.perf_counter() - start
    run_s = timed(run, repeat=2)
    return {"first_pass_s": first_s, "run_s": run_s, "compilations": compiles,
            "recompilations_after_warmup": engine.stats.compilations - compiles,
            "_vectors": run(), "_cfg": engine.config}


def xla_run(folder: Path, ids: list[list[int]], dtype: str, max_batch_tokens: int,
            vectors: np.ndarray) -> dict[str, Any]:
    """The same corpus with every op in XLA (`--no-kernels`): what the Pallas kernels (attention
    over packed rows, and on GPU hosts the plan's other kernels) buy, and that they agree."""
    with embedding_engine(folder, dtype, max_batch_tokens, kernels=False,
                          warmup=False) as (engine, _):
        run = jaxembed_run(engine, ids)
    run.pop("_cfg")
    run["cosine_vs_kernels_min"] = cosine_min(vectors, run.pop("_vectors"))
    return run


@contextlib.contextmanager
def served(engine: Any) -> Iterator[int]:
    """The engine behind the app `jaxembed serve` runs, uvicorn configured as it does, on a
    free loopback port in a thread of this process; yields the port.

    In this process rather than a `jaxembed serve` of its own: it serves the engine the
    engine-level figure used, so a GPU host compiles the model's steps once, not twice; the
    clients' share of this process's time is small (request JSON, base64 vectors back)."""
    import uvicorn

    from jaxembed.cli import KEEP_ALIVE_SECONDS
    from jaxembed.server import create_app

    # No request timeout: the first pass may wait for compilations of step shapes the
    # engine-level passes never needed, longer than the server's default allows.
    app = create_app(engine, request_timeout=None, playground=False)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                           timeout_keep_alive=KEEP_ALIVE_SECONDS))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # the OS picks a free port; the bound socket goes to uvicorn
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


def post_embeddings(conn: http.client.HTTPConnection, batch: list[list[int]]
                    ) -> tuple[np.ndarray, int]:
    """One POST /v1/embeddings of token-id lists; the vectors in input order (base64, as the
    openai client asks for them) and the prompt tokens the response counted."""
    body = json.dumps({"input": batch, "encoding_format": "base64"})
    conn.request("POST", "/v1/embeddings", body, {"content-type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    if response.status != 200:
        raise RuntimeError(f"POST /v1/embeddings answered {response.status}: {data[:500]!r}")
    answer = json.loads(data)
    items = sorted(answer["data"], key=lambda d: d["index"])
    vectors = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in items])
    return vectors, answer["usage"]["prompt_tokens"]


def api_pass(port: int, batches: list[list[list[int]]], clients: int) -> dict[str, Any]:
    """Every batch POSTed once by `clients` threads, each on its own kept-alive connection and
    taking the next batch when its last is answered, as a pool of concurrent clients does."""
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(len(batches)):
        todo.put(i)
    vectors: list[np.ndarray] = [np.empty(0)] * len(batches)
    usage, latency = [0] * len(batches), [0.0] * len(batches)

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
        try:
            while True:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                start = time.perf_counter()
                vectors[i], usage[i] = post_embeddings(conn, batches[i])
                latency[i] = time.perf_counter() - start
        finally:
            conn.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if not all(usage):  # a client's error: its thread ended without its answers
        raise RuntimeError("a POST /v1/embeddings failed (its traceback is above)")
    return {"run_s": elapsed, "usage_tokens": sum(usage), "latency": latency,
            "_vectors": np.concatenate(vectors)}


def api_run(engine: Any, ids: list[list[int]], batch: int, clients: int,
            repeat: int = 2) -> dict[str, Any]:
    """The corpus through the HTTP server: requests of `batch` texts in the corpus's order (not
    sorted by length: clients do not coordinate), from `clients` concurrent clients; the best
    of `repeat` passes after one that compiles what this load's packing needs."""
    batches = [ids[s : s + batch] for s in range(0, len(ids), batch)]
    with served(engine) as port:
        first = api_pass(port, batches, clients)
        compiles = engine.stats.compilations
        best = min((api_pass(port, batches, clients) for _ in range(repeat)),
                   key=lambda p: p["run_s"])
    latency = np.asarray(best.pop("latency"))
    return {**best, "requests": len(batches), "texts_per_request": batch, "clients": clients,
            "first_pass_s": first["run_s"],
            "recompilations_after_warmup": engine.stats.compilations - compiles,
            "p50_ms": float(np.percentile(latency, 50) * 1e3),
            "p99_ms": float(np.percentile(latency, 99) * 1e3)}


# The batch sizes transformers is timed at, the whole corpus at each (its best is its figure):
# few, since on a GPU host each is a pass over the corpus for each of the two peers.
PEER_BATCHES = (8, 16, 32, 64, 128)


def best_batch(run: Callable[[int, list[int]], np.ndarray], order: list[int],
               first: int) -> dict[str, Any]:
    """Length-sorted, padded batches at each of PEER_BATCHES, one timed pass each (after a
    warm-up batch: kernels, allocator); the pooled vectors of the corpus's first `first`."""
    import torch

    run(8, order[:8])
    by_batch = {}
    for b in PEER_BATCHES:
        try:
            by_batch[b] = timed(lambda b=b: run(b, order))
        except torch.OutOfMemoryError:
            break
    best = min(by_batch, key=by_batch.get)
    return {"best_batch": best, "run_s_by_batch": by_batch, "run_s": by_batch[best],
            "_vectors": run(16, list(range(first)))[:first]}


def transformers_run(folder: Path, ids: list[list[int]], dtype: str,
                     compile_backend: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """transformers on the same device: length-sorted, padded batches at its best batch size,
    mean pooling over the real tokens; sdpa attention, eager and then under torch.compile."""
    import torch
    from transformers import AutoModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = AutoModel.from_pretrained(folder, dtype=getattr(torch, dtype),
                                    attn_implementation="sdpa").to(device).eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    first = min(16, len(ids))

    def run(batch: int, idx: list[int]) -> np.ndarray:
        return transformers_pooled(net, ids, batch, idx, device=device)

    eager = {"device": device, **best_batch(run, order, first)}
    return eager, compiled_run(net, ids, order, device, compile_backend)


def compiled_run(net: Any, ids: list[list[int]], order: list[int], device: str,
                 backend: str) -> dict[str, Any]:
    """The same model under torch.compile, timed as the eager one, its compilation apart; where
    compiling or running it fails, unavailable with the reason.

    Dynamic shapes: length-sorted batching gives nearly every batch a width of its own, and a
    graph compiled for each would take the whole run; one graph takes them all."""
    import torch
    from torch._dynamo.utils import counters

    try:
        compiled = torch.compile(net, dynamic=True, backend=backend)

        def run(batch: int, idx: list[int]) -> np.ndarray:
            return transformers_pooled(compiled, ids, batch, idx, device=device)

        start = time.perf_counter()
        run(8, order[:8])  # compiles; then the other end of the lengths, and another batch size
        run(16, order[-16:])
        compile_s = time.perf_counter() - start
        out = best_batch(run, order, min(16, len(ids)))
        graphs = counters["stats"]["unique_graphs"]  # more than one: graph breaks or recompiles
    except Exception as e:  # any failure of the compiler or its graphs: the peer is unavailable
        return {"available": False, "backend": backend,
                "reason": " ".join(f"{type(e).__name__}: {e}".split())[:500]}
    finally:
        torch._dynamo.reset()  # lets its graphs, and the model they hold, go
    return {"available": True, "backend": backend, "dynamic": True, "compile_s": compile_s,
            "graphs": graphs, **out}


def parity(folder: Path, ids: list[list[int]], dtype: str) -> dict[str, Any]:
    """Per-token final hidden states: the engine's in `dtype` and transformers' in `dtype`, each
    against transformers' float32 on the same weights, as max |error| / max |reference|."""
    import jax.numpy as jnp
    import torch
    from transformers import AutoModel

    from jaxembed import EngineBuilder, model

    device = "cuda" if torch.cuda.is_available() else "cpu"

    def theirs(torch_dtype: str) -> list[np.ndarray]:
        net = AutoModel.from_pretrained(folder, dtype=getattr(torch, torch_dtype),
                                        attn_implementation="sdpa").to(device).eval()
        with torch.inference_mode():
            out = [net(input_ids=torch.tensor([x], device=device)).last_hidden_state[0]
                   .float().cpu().numpy() for x in ids]
        del net
        return out

    reference, peer = theirs("float32"), theirs(dtype)
    engine = EngineBuilder(model=folder, dtype=dtype, progress=False, warmup=False,
                           compilation_cache=False).build()
    try:
        runner = engine.runner
        ours = []
        for x in ids:
            t = len(x)
            h = model.forward(runner.embed_params, jnp.asarray([x], jnp.int32),
                              jnp.arange(t)[None], jnp.zeros((1, t), jnp.int32), engine.config,
                              plan=engine.plan)
            ours.append(np.asarray(h[0], np.float32))
    finally:
        engine.shutdown()

    def error(got: list[np.ndarray]) -> float:
        return max(float(np.abs(g - r).max() / np.abs(r).max()) for g, r in zip(got, reference, strict=True))

    return {"sequences": len(ids), **gate(error(ours), error(peer))}


def gate(jaxembed_error: float, transformers_error: float) -> dict[str, Any]:
    """The parity gate: within twice transformers' own error in the run's dtype (at least 1e-5,
    for float32, where that error is 0)."""
    bound = max(2 * transformers_error, 1e-5)
    return {"jaxembed_error": jaxembed_error, "transformers_error": transformers_error,
            "bound": bound, "passed": jaxembed_error <= bound}


def generation(folder: Path, dtype: str, streams: list[int], tokens: int,
               prompt_len: int = 32) -> dict[str, Any]:
    """Greedy decoding of `tokens` tokens (end of text ignored) at each number of streams:
    jaxembed's aggregate tokens/s (streams submitted at once) against transformers' `generate`
    batched at the same number, on the same device."""
    import torch
    from transformers import AutoModelForCausalLM

    from jaxembed import EngineBuilder

    vocab = int(json.loads((folder / "config.json").read_text())["vocab_size"])
    prompts = make_ids(max(streams), vocab, lo=prompt_len, hi=prompt_len + 1, seed=1)
    out: dict[str, Any] = {"tokens": tokens, "prompt_tokens": prompt_len}
    # No warm-up: the embedding engine shows the start-up and its compile count; here each
    # stream count's passes repeat until one compiles nothing (a full warm-up would compile
    # every embedding program again, minutes of the harness's eight on a GPU host).
    engine = EngineBuilder(model=folder, dtype=dtype, max_num_seqs=max(streams),
                           max_model_len=prompt_len + tokens + 16, progress=False,
                           warmup=False, compilation_cache=False).build()
    try:
        def ours(n: int) -> tuple[float, int]:
            before, start = engine.stats.compilations, time.perf_counter()
            runs = [engine.generate_stream(p, temperature=0, max_tokens=tokens, ignore_eos=True)
                    for p in prompts[:n]]
            made = sum(len(r.collect(list(r)).choices[0].token_ids) for r in runs)
            return made / (time.perf_counter() - start), engine.stats.compilations - before

        for n in streams:
            # Streams submitted one after another may be prefilled in different groupings from
            # run to run: the figure is that of the first run that compiled nothing (of three).
            for _ in range(3):
                rate, compiled = ours(n)
                if not compiled:
                    break
            out[f"jaxembed_{n}"], out[f"jaxembed_{n}_compilations"] = rate, compiled
    finally:
        engine.shutdown()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype),
                                               attn_implementation="sdpa").to(device).eval()

    def theirs(n: int) -> float:
        batch = torch.tensor(prompts[:n], device=device)
        start = time.perf_counter()
        with torch.inference_mode():
            made = net.generate(batch, attention_mask=torch.ones_like(batch), do_sample=False,
                                max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0)
        return (made.shape[1] - prompt_len) * n / (time.perf_counter() - start)

    for n in streams:
        theirs(n)
        out[f"transformers_{n}"] = theirs(n)
        out[f"speedup_{n}"] = out[f"jaxembed_{n}"] / out[f"transformers_{n}"]
    return out


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    """The least cosine similarity of the rows two peers pooled for the same texts."""
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def compare(peer: dict[str, Any], tokens: int, ours: dict[str, Any], api: dict[str, Any]) -> None:
    """A transformers peer's tokens/s, and how many times faster the engine and the API were."""
    peer["tokens_per_s"] = tokens / peer["run_s"]
    peer["cosine_vs_jaxembed_min"] = cosine_min(ours["_vectors"], peer.pop("_vectors"))
    peer["jaxembed_speedup"] = ours["tokens_per_s"] / peer["tokens_per_s"]
    peer["api_speedup"] = api["tokens_per_s"] / peer["tokens_per_s"]


def benchmark(preset: str, texts: int, max_batch_tokens: int, dtype: str | None = None,
              matmul_n: int = 8192, streams: tuple[int, ...] = (1, 64),
              gen_tokens: int = 64, parity_texts: int = 8, api_batch: int = 32,
              api_clients: int = 16, compile_backend: str = "inductor") -> dict[str, Any]:
    import jax

    accelerated = jax.default_backend() != "cpu"
    dtype = dtype or ("bfloat16" if accelerated else "float32")
    r: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "preset": preset, "dtype": dtype,
        "backend": jax.default_backend(), "devices": [d.device_kind for d in jax.devices()],
        "jax": jax.__version__,
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model(Path(tmp) / preset, preset, dtype)
        ids = make_ids(texts, PRESETS[preset]["vocab_size"],
                       hi=min(512, PRESETS[preset]["max_position_embeddings"]))
        tokens = sum(map(len, ids))
        r["texts"], r["tokens"] = len(ids), tokens
        r["matmul_flops"] = matmul_flops(dtype, matmul_n if accelerated else min(matmul_n, 1024))
        with embedding_engine(folder, dtype, max_batch_tokens) as (engine, startup):
            ours = jaxembed_run(engine, ids)
            api = api_run(engine, ids, api_batch, api_clients)
            ours["recompilations_after_warmup"] = engine.stats.compilations - ours[
                "compilations"]  # the engine level's passes and the API's
        ours.update(startup)
        cfg = ours.pop("_cfg")
        xla = xla_run(folder, ids, dtype, max_batch_tokens, ours["_vectors"])
        xla["tokens_per_s"] = tokens / xla["run_s"]
        ours["speedup_vs_xla_ops"] = xla["run_s"] / ours["run_s"]
        r["xla_ops"] = xla
        flop, arithmetic = useful_flops(cfg, [len(x) for x in ids])
        ours["max_batch_tokens"] = max_batch_tokens
        ours["tokens_per_s"] = tokens / ours["run_s"]
        ours["useful_flops_per_s"] = flop / ours["run_s"]
        ours["matmul_fraction"] = ours["useful_flops_per_s"] / r["matmul_flops"]
        ours["flops_arithmetic"] = f"{arithmetic} in {ours['run_s']:.3f} s"
        api["tokens_per_s"] = tokens / api["run_s"]
        api["cosine_vs_jaxembed_min"] = cosine_min(ours["_vectors"], api.pop("_vectors"))
        peer, compiled = transformers_run(folder, ids, dtype, compile_backend)
        compare(peer, tokens, ours, api)
        if compiled["available"]:
            compare(compiled, tokens, ours, api)
        ours.pop("_vectors")
        r["jaxembed"], r["api"] = ours, api
        r["transformers"], r["transformers_compile"] = peer, compiled
        r["parity"] = parity(folder, ids[:parity_texts], dtype)
        r["generation"] = gen = generation(folder, dtype, list(streams), gen_tokens)
    r["targets"] = {"parity": r["parity"]["passed"],
                    "matmul_fraction_at_least_50pct": ours["matmul_fraction"] >= 0.50,
                    "at_least_2x_transformers": peer["jaxembed_speedup"] >= 2.0,
                    "api_at_least_2x_transformers": peer["api_speedup"] >= 2.0,
                    # None where torch.compile did not work there: no figure to meet.
                    "api_at_least_1.2x_transformers_compile":
                        compiled["api_speedup"] >= 1.2 if compiled["available"] else None,
                    "no_recompilation": ours["recompilations_after_warmup"] == 0}
    many = max(streams)
    if many > 1:
        r["targets"][f"{many}_streams_at_least_5x_transformers"] = gen[f"speedup_{many}"] >= 5
    return r


def peer_row(name: str, peer: dict[str, Any]) -> str:
    """A transformers peer's row of the embedding table: its rate, and the engine's and the
    API's speed-ups over it."""
    if not peer.get("available", True):
        return f"| {name} | unavailable: {peer['reason']} | |"
    return (f"| {name}, best batch {peer['best_batch']} | {peer['tokens_per_s']:,.0f} | "
            f"engine {peer['jaxembed_speedup']:.2f}x, API {peer['api_speedup']:.2f}x (pooled "
            f"cosine {peer['cosine_vs_jaxembed_min']:.5f}) |")


def target(value: bool | None) -> str:
    return "n/a" if value is None else "yes" if value else "NO"


def api_line(api: dict[str, Any], compiled: dict[str, Any]) -> str:
    """How the API level was loaded and what it saw; how torch.compile did."""
    line = (f"API level: {api['requests']} requests of up to {api['texts_per_request']} token-id "
            f"lists from {api['clients']} concurrent clients, vectors as base64; latency p50 "
            f"{api['p50_ms']:,.0f} ms, p99 {api['p99_ms']:,.0f} ms; pooled cosine against the "
            f"engine level {api['cosine_vs_jaxembed_min']:.5f}; compilations after its warm-up "
            f"pass {api['recompilations_after_warmup']}.")
    if compiled["available"]:
        line += (f" torch.compile took {compiled['compile_s']:.1f} s, "
                 f"{compiled['graphs']} graph(s).")
    return line


def markdown(r: dict[str, Any]) -> str:
    ours, api, peer, gen = r["jaxembed"], r["api"], r["transformers"], r["generation"]
    compiled = r["transformers_compile"]
    return "\n".join([
        f"Run {r['date']}: {r['preset']}-shaped model (random weights), {r['dtype']}, "
        f"{r['texts']} sequences of 8-512 tokens ({r['tokens']:,} tokens), JAX {r['jax']} on "
        f"{', '.join(sorted(set(r['devices'])))}.", "",
        "| embedding prefill | tokens/s | jaxembed is |", "|---|---|---|",
        f"| jaxembed ({ours['max_batch_tokens']}-token steps) | {ours['tokens_per_s']:,.0f} | |",
        f"| jaxembed API (POST /v1/embeddings, {api['clients']} clients x "
        f"{api['texts_per_request']} texts) | {api['tokens_per_s']:,.0f} | |",
        peer_row("transformers (same device, sdpa)", peer),
        peer_row(f"transformers + torch.compile ({compiled['backend']}, dynamic shapes)",
                 compiled), "",
        api_line(api, compiled), "",
        f"Useful FLOP/s: {ours['useful_flops_per_s'] / 1e12:.1f} TFLOP/s = "
        f"{ours['matmul_fraction']:.0%} of the {r['dtype']} matrix product measured in the same "
        f"process ({r['matmul_flops'] / 1e12:.1f} TFLOP/s). FLOPs: {ours['flops_arithmetic']}.",
        f"Start-up (load and warm-up) {ours['startup_s']:.1f} s, compiling "
        f"{ours['startup_compilations']} programs; compilations after it, through every engine "
        f"and API pass: {ours['recompilations_after_warmup']}.",
        f"Every op in XLA (--no-kernels): {r['xla_ops']['tokens_per_s']:,.0f} tokens/s; the "
        f"kernels are {ours['speedup_vs_xla_ops']:.2f}x that (pooled cosine "
        f"{r['xla_ops']['cosine_vs_kernels_min']:.5f}).", "",
        f"Parity ({r['parity']['sequences']} sequences, per-token final hidden states against "
        f"float32 transformers, relative to the largest value): jaxembed "
        f"{r['parity']['jaxembed_error']:.2e}, transformers in {r['dtype']} "
        f"{r['parity']['transformers_error']:.2e}, bound {r['parity']['bound']:.2e}: "
        f"{'passed' if r['parity']['passed'] else 'FAILED'}.", "",
        "| generation (greedy) | jaxembed tokens/s | transformers generate | jaxembed is |",
        "|---|---|---|---|",
        *(f"| {n} stream{'s' if n > 1 else ''} x {gen['tokens']} tokens | "
          f"{gen[f'jaxembed_{n}']:,.1f} | {gen[f'transformers_{n}']:,.1f} | "
          f"{gen[f'speedup_{n}']:.2f}x |"
          for n in sorted(int(k.split("_")[1]) for k in gen if k.startswith("speedup_"))),
        "", "Targets: " + ", ".join(f"{k} {target(v)}" for k, v in r["targets"].items()), ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen3-0.6b")
    parser.add_argument("--texts", type=int, default=2048)
    parser.add_argument("--max-batch-tokens", type=int, default=32768)
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on an accelerator, "
                                                      "float32 on a CPU")
    parser.add_argument("--api-batch", type=int, default=32,
                        help="API level: texts a request (default: 32)")
    parser.add_argument("--api-clients", type=int, default=16,
                        help="API level: concurrent clients (default: 16)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile's backend for the transformers peer")
    parser.add_argument("--streams", default="1,64",
                        help="generation: numbers of streams at once (default: 1,64)")
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--smoke", action="store_true",
                        help="the tiny preset on a few texts, 1 and 4 streams, torch.compile "
                             "without code generation: checks the harness end to end (on the "
                             "CPU too); its figures mean nothing")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    streams = tuple(int(n) for n in args.streams.split(","))
    if args.smoke:
        args.preset, args.texts, args.max_batch_tokens = "tiny", 16, 512
        streams, args.gen_tokens = (1, 4), 8
        args.api_batch, args.api_clients = 4, 2
        # Dynamo's graph capture without inductor's code generation, which takes a minute on
        # a CPU even for the tiny model: the harness's path is the same.
        args.compile_backend = "eager"
    r = benchmark(args.preset, args.texts, args.max_batch_tokens, args.dtype,
                  matmul_n=256 if args.smoke else 8192, streams=streams,
                  gen_tokens=args.gen_tokens, parity_texts=4 if args.smoke else 8,
                  api_batch=args.api_batch, api_clients=args.api_clients,
                  compile_backend=args.compile_backend)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(r, indent=2, default=float))
    print(markdown(r))
    print(f"wrote {path}")
    return 0 if r["parity"]["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
