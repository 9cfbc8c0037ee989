"""Workloads through the real server: HTTP throughput under concurrency, and cold start."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(model: Path, port: int, cache: str) -> subprocess.Popen:
    env = {**os.environ, "JAXEMBED_CACHE": cache}
    return subprocess.Popen(
        [sys.executable, "-m", "jaxembed.cli", "serve", "--model", str(model), "--port", str(port),
         "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _first_ok(port: int, proc: subprocess.Popen, timeout: float = 300.0) -> float:
    """Seconds until POST /v1/embeddings answers 200 (polling every 50 ms)."""
    import httpx

    start = time.perf_counter()
    body = {"input": "Hello world", "model": "default"}
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json=body,
                          timeout=60).status_code == 200:
                return time.perf_counter() - start
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError("the server did not answer in time")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def cold_start(model: Path) -> dict[str, Any]:
    """(c) `jaxembed serve` to the first 200, with an empty and then a warm compilation cache."""
    with tempfile.TemporaryDirectory() as cache:
        times = []
        for _ in range(2):
            port = _free_port()
            proc = _start_server(model, port, cache)
            try:
                times.append(_first_ok(port, proc))
            finally:
                _stop(proc)
    return {"cold_s": times[0], "warm_cache_s": times[1]}


def make_sentences(n: int = 64, seed: int = 1) -> list[str]:
    """n single sentences of 6 to 16 words (about 8 to 30 tokens), as chat-sized queries are."""
    from bench.run import WORDS

    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(6, 17)))).capitalize() + "."
            for _ in range(n)]


def _load(port: int, sentences: list[str], clients: int, requests: int,
          model: str = "default") -> list[float]:
    """`requests` POSTs to /v1/embeddings from `clients` concurrent clients; their latencies."""
    import httpx

    async def run() -> list[float]:
        latencies: list[float] = []
        queue = iter(range(requests))
        limits = httpx.Limits(max_connections=clients)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600,
                                     limits=limits) as client:
            async def worker() -> None:
                for i in queue:
                    t = time.perf_counter()
                    r = await client.post("/v1/embeddings", json={
                        "input": sentences[i % len(sentences)], "model": model})
                    r.raise_for_status()
                    latencies.append(time.perf_counter() - t)
            await asyncio.gather(*(worker() for _ in range(clients)))
        return latencies

    return asyncio.run(run())


def _timed_load(port: int, sentences: list[str], clients: int, requests: int,
                model: str = "default") -> dict[str, Any]:
    # An untimed pass first: it compiles the step shapes this load produces (jaxembed) and
    # warms caches (both servers); the figures come from the second.
    _load(port, sentences, clients, max(clients, requests // 2), model)
    start = time.perf_counter()
    lat = np.array(_load(port, sentences, clients, requests, model))
    elapsed = time.perf_counter() - start
    return {"clients": clients, "requests": requests, "requests_per_s": requests / elapsed,
            "p50_ms": float(np.percentile(lat, 50) * 1e3),
            "p99_ms": float(np.percentile(lat, 99) * 1e3)}


def http_throughput(model: Path, sentences: list[str], clients: int = 32,
                    requests: int = 640) -> dict[str, Any]:
    """(b) Single-sentence requests from concurrent clients over loopback."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as cache:
        proc = _start_server(model, port, cache)
        try:
            _first_ok(port, proc)
            return _timed_load(port, sentences, clients, requests)
        finally:
            _stop(proc)


def llamacpp_http_throughput(model: Path, sentences: list[str], threads: int, clients: int = 32,
                             requests: int = 640) -> dict[str, Any]:
    """(b) The same load against llama-cpp-python's OpenAI-compatible server on the same GGUF,
    with mean pooling (as jaxembed's default) and its batch as large as the context."""
    import httpx

    port = _free_port()
    ctx = "2048"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.llamacpp_server", "--model", str(model), "--embedding", "true",
         "--n_threads", str(threads), "--n_threads_batch", str(threads),
         "--n_ctx", ctx, "--n_batch", ctx, "--n_ubatch", ctx, "--host", "127.0.0.1",
         "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.perf_counter() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {proc.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.perf_counter() > deadline:
                raise TimeoutError("llama_cpp.server did not start in time")
            time.sleep(0.2)
        return {**_timed_load(port, sentences, clients, requests, model=model.name),
                "threads": threads}
    finally:
        _stop(proc)
