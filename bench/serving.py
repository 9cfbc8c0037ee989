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


def http_throughput(model: Path, texts: list[str], clients: int = 32,
                    requests: int = 640) -> dict[str, Any]:
    """(b) Single-sentence requests from concurrent clients over loopback."""
    import httpx

    sentences = [t for t in texts if len(t) < 200][:64] or texts[:64]
    port = _free_port()
    with tempfile.TemporaryDirectory() as cache:
        proc = _start_server(model, port, cache)
        try:
            _first_ok(port, proc)

            async def load(n: int) -> list[float]:
                latencies: list[float] = []
                queue = iter(range(n))
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                             timeout=120) as client:
                    async def worker() -> None:
                        for i in queue:
                            t = time.perf_counter()
                            r = await client.post("/v1/embeddings", json={
                                "input": sentences[i % len(sentences)], "model": "default"})
                            r.raise_for_status()
                            latencies.append(time.perf_counter() - t)
                    await asyncio.gather(*(worker() for _ in range(clients)))
                return latencies

            asyncio.run(load(requests // 2))  # compiles the batch shapes this load produces
            start = time.perf_counter()
            lat = np.array(asyncio.run(load(requests)))
            elapsed = time.perf_counter() - start
        finally:
            _stop(proc)
    return {"clients": clients, "requests": requests, "requests_per_s": requests / elapsed,
            "p50_ms": float(np.percentile(lat, 50) * 1e3),
            "p99_ms": float(np.percentile(lat, 99) * 1e3)}
