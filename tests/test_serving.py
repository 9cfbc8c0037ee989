"""Serving in production: load, bad input, overload, shutdown, auth, limits, metrics, fuzzing.

Overload, disconnects and draining are driven with the engine's pause hook, never by timing: a
paused engine queues work without computing it, so each test decides when the work runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from litestar import Litestar
from litestar.testing import TestClient
from tokenizers import Tokenizer, processors

from jaxembed import Engine, EngineBuilder
from jaxembed.cli import KEEP_ALIVE_SECONDS, main
from jaxembed.protocol import EmbeddingDefaults, EmbeddingType
from jaxembed.server import create_app

from parity import response_vectors as vectors

URL = "/v1/embeddings"
KEY = "test-key-123"
AUTH = {"authorization": f"Bearer {KEY}"}
WORDS = ("fox dog quick brown lazy jumps over the vectors text embeddings JAX compiles numbers "
         "café naïve 日本語 🙂 def add return 3.14159 2048").split()


# ---- helpers ---------------------------------------------------------------------------------


def invariant(got: np.ndarray, want: np.ndarray) -> None:
    """Batch invariance: max|diff| <= 1e-5 * max|v|."""
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None,
                        param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and len(err["message"]) > 10
    assert isinstance(err["type"], str) and err["type"]
    if status >= 500:
        assert err["type"] == "server_error"
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    assert r.headers.get("x-request-id")
    return err


def scrape(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text; 0 when absent."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == (f"{name}{{{want}}}" if want else name):
            return float(value)
    return 0.0


def wait_for(condition: Callable[[], bool], what: str, limit: float = 60.0) -> None:
    """Wait for a state the test caused (not for time to pass); fail loudly if it never comes."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@contextmanager
def serve(app: Litestar) -> Iterator[tuple[str, uvicorn.Server, threading.Thread]]:
    """uvicorn on a free loopback port in a thread; yields its base URL, the server and thread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # Keep-alive past the clients' 5 s pool expiry, as the CLI does: otherwise a connection can be
    # closed by the server just as a client reuses it, while a new step shape compiles.
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                           timeout_keep_alive=KEEP_ALIVE_SECONDS))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), "uvicorn to start")
    assert thread.is_alive(), "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}", server, thread
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


def bos_model_dir(src: Path, dst: Path) -> Path:
    """The tiny Llama with a tokenizer that puts <|im_start|> before every text, as BOS."""
    shutil.copytree(src, dst)
    tok = Tokenizer.from_file(str(dst / "tokenizer.json"))
    bos = tok.token_to_id("<|im_start|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", pair="<|im_start|> $A $B", special_tokens=[("<|im_start|>", bos)])
    tok.save(str(dst / "tokenizer.json"))
    (dst / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>"}))
    return dst


# ---- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(tiny_engine: Engine) -> Iterator[TestClient]:
    """The shared engine behind an API key and a 64 KiB body limit."""
    with TestClient(create_app(tiny_engine, api_key=KEY, max_body_bytes=64 * 1024)) as c:
        yield c


@pytest.fixture(scope="module")
def queue_engine(tiny_engine: Engine) -> Iterator[Engine]:
    """An engine over the shared weights whose queue holds four requests."""
    engine = Engine(tiny_engine.checkpoint, max_batch_tokens=512, max_queued_requests=4)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def bos_engine(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Engine]:
    path = bos_model_dir(tiny_llama_dir, tmp_path_factory.mktemp("bos") / "tiny-bos")
    engine = EngineBuilder(model=path, dtype="float32", max_batch_tokens=512, warmup=False,
                           progress=False, compilation_cache=False).build()
    yield engine
    engine.shutdown()


# ---- concurrency and batch invariance --------------------------------------------------------


def test_concurrent_clients_get_batch_invariant_vectors(tiny_engine: Engine) -> None:
    rng = np.random.default_rng(7)
    pool = [" ".join(rng.choice(WORDS, size=int(n))) for n in rng.integers(1, 32, 40)]
    ids = tiny_engine.tokenize(pool)
    assert max(map(len, ids)) <= tiny_engine.max_model_len
    # Every pooled input embedded alone, one step each: the reference for every served vector.
    alone = {pooling: np.stack([tiny_engine.submit([np.asarray(s, np.int32)], pooling).result()[0]
                                for s in ids])
             for pooling in (EmbeddingType.Mean, EmbeddingType.Last)}

    def make(i: int) -> tuple[dict, list[int], EmbeddingType]:
        picks = [int(p) for p in rng.integers(0, len(pool), int(rng.integers(1, 5)))]
        form = i % 4
        body: dict[str, Any] = {
            "input": [pool[picks[0]], [pool[p] for p in picks], ids[picks[0]],
                      [ids[p] for p in picks]][form],
            "encoding_format": "base64" if rng.random() < 0.5 else "float",
        }
        if form in (0, 2):
            picks = picks[:1]
        pooling = EmbeddingType.Last if rng.random() < 0.25 else EmbeddingType.Mean
        if pooling == EmbeddingType.Last:
            body["embedding_type"] = "last"
        return body, picks, pooling

    jobs = [make(i) for i in range(1000)]
    statuses: list[int] = []

    async def run(base: str) -> str:
        todo = iter(jobs)
        async with httpx.AsyncClient(base_url=base, timeout=120,
                                     limits=httpx.Limits(max_connections=64)) as client:

            async def worker() -> None:
                for body, picks, pooling in todo:  # 64 workers share one iterator: bounded
                    r = await client.post(URL, json=body)
                    statuses.append(r.status_code)
                    assert r.status_code == 200, r.text
                    assert float(r.headers["x-queue-time"]) >= 0
                    assert float(r.headers["x-inference-time"]) >= 0
                    invariant(vectors(r.json()), alone[pooling][picks])

            await asyncio.gather(*(worker() for _ in range(64)))
            return (await client.get("/metrics")).text

    with serve(create_app(tiny_engine)) as (base, _, _):
        before = httpx.get(f"{base}/metrics").text
        after = asyncio.run(run(base))
    assert len(statuses) == 1000 and set(statuses) == {200}
    assert scrape(after, "jaxembed_http_requests_total", route=URL, method="POST",
                  status="200") == 1000

    def shared(text: str) -> float:  # steps that carried more than one request
        return (scrape(text, "jaxembed_batch_requests_count")
                - scrape(text, "jaxembed_batch_requests_bucket", le="1"))

    assert shared(after) - shared(before) > 0
    steps = scrape(after, "jaxembed_steps_total") - scrape(before, "jaxembed_steps_total")
    assert steps < 1000  # far fewer steps than requests


# ---- bad input -------------------------------------------------------------------------------

J = {"content-type": "application/json"}
Case = tuple[str, Callable[[Engine], dict[str, Any]], int, str | None]


def _json(body: Any) -> dict[str, Any]:
    return {"content": json.dumps(body).encode(), "headers": {**J, **AUTH}}


def _raw(content: bytes, headers: dict[str, str] | None = None) -> dict[str, Any]:
    return {"content": content, "headers": {**AUTH, **(J if headers is None else headers)}}


BAD: list[Case] = [
    # wrong types
    ("input number", lambda e: _json({"input": 5}), 400, "invalid_type"),
    ("input object", lambda e: _json({"input": {"text": "a"}}), 400, "invalid_type"),
    ("input null", lambda e: _json({"input": None}), 400, "invalid_type"),
    ("input booleans", lambda e: _json({"input": [True, False]}), 400, "invalid_type"),
    ("input floats", lambda e: _json({"input": [1.0, 2.5]}), 400, "invalid_type"),
    ("lists of strings", lambda e: _json({"input": [["a", "b"]]}), 400, "invalid_type"),
    ("mixed kinds", lambda e: _json({"input": ["a", 1]}), 400, None),
    ("model number", lambda e: _json({"input": "a", "model": 7}), 400, "invalid_type"),
    ("dimensions string", lambda e: _json({"input": "a", "dimensions": "8"}), 400,
     "invalid_type"),
    ("normalize string", lambda e: _json({"input": "a", "normalize": "yes"}), 400,
     "invalid_type"),
    ("truncate float", lambda e: _json({"input": "a", "truncate_prompt_tokens": 2.5}), 400,
     "invalid_type"),
    ("encoding format number", lambda e: _json({"input": "a", "encoding_format": 1}), 400, None),
    ("embedding type unknown", lambda e: _json({"input": "a", "embedding_type": "max"}), 400,
     "invalid_value"),
    ("body is an array", lambda e: _json(["a"]), 400, "invalid_type"),
    ("body is a string", lambda e: _json("a"), 400, "invalid_type"),
    ("missing input", lambda e: _json({"model": "default"}), 400, "missing_required_parameter"),
    # broken limits
    ("empty string", lambda e: _json({"input": ""}), 400, "empty_input"),
    ("empty list", lambda e: _json({"input": []}), 400, "empty_input"),
    ("empty token list", lambda e: _json({"input": [[1], []]}), 400, "empty_input"),
    ("2049 inputs", lambda e: _json({"input": ["a"] * 2049}), 400, "too_many_inputs"),
    ("dimensions 0", lambda e: _json({"input": "a", "dimensions": 0}), 400, None),
    ("dimensions above hidden", lambda e: _json({"input": "a",
                                                 "dimensions": e.embedding_size + 1}), 400, None),
    ("dimensions huge", lambda e: _json({"input": "a", "dimensions": 10**30}), 400, None),
    ("truncate 0", lambda e: _json({"input": "a", "truncate_prompt_tokens": 0}), 400, None),
    ("truncate -2", lambda e: _json({"input": "a", "truncate_prompt_tokens": -2}), 400, None),
    ("truncate above limit", lambda e: _json({"input": "a",
                                              "truncate_prompt_tokens": e.max_model_len + 1}),
     400, None),
    ("too many tokens", lambda e: _json({"input": [1] * (e.max_model_len + 1)}), 400,
     "context_length_exceeded"),
    ("too long text", lambda e: _json({"input": "fox " * e.max_model_len}), 400,
     "context_length_exceeded"),
    ("cls on a causal model", lambda e: _json({"input": "a", "embedding_type": "cls"}), 400,
     "unsupported_value"),
    # bad encodings and numbers
    ("invalid utf-8 in a string", lambda e: _raw(b'{"input": "ab\xed\xa0\x80"}'), 400,
     "invalid_json"),
    ("invalid utf-8 byte", lambda e: _raw(b'{"input": "\xff"}'), 400, "invalid_json"),
    ("lone surrogate escape", lambda e: _raw(rb'{"input": "a\ud800"}'), 400, None),
    ("latin-1 body", lambda e: _raw('{"input": "café"}'.encode("latin-1")), 400, "invalid_json"),
    ("NaN", lambda e: _raw(b'{"input": [NaN]}'), 400, "invalid_json"),
    ("Infinity", lambda e: _raw(b'{"input": "a", "dimensions": Infinity}'), 400, "invalid_json"),
    ("huge number", lambda e: _raw(b'{"input": [1e999]}'), 400, None),
    ("truncated json", lambda e: _raw(b'{"input": "a"'), 400, "invalid_json"),
    ("empty body", lambda e: _raw(b""), 400, "invalid_json"),
    ("trailing garbage", lambda e: _raw(b'{"input": "a"} x'), 400, "invalid_json"),
    # token ids
    ("negative token id", lambda e: _json({"input": [5, -1]}), 400, "invalid_token_id"),
    ("token id = vocab", lambda e: _json({"input": [[1], [e.config.vocab_size]]}), 400,
     "invalid_token_id"),
    ("token id beyond int64", lambda e: _json({"input": [10**20]}), 400, None),
    # unknown fields and names
    ("unknown field", lambda e: _json({"input": "a", "temperature": 0.5}), 400,
     "unknown_parameter"),
    ("unknown model", lambda e: _json({"input": "a", "model": "gpt-nope"}), 404,
     "model_not_found"),
    ("model as a path", lambda e: _json({"input": "a", "model": "../../etc/passwd"}), 404,
     "model_not_found"),
    # transport
    ("text/plain", lambda e: _raw(b'{"input": "a"}', {"content-type": "text/plain"}), 415,
     "unsupported_media_type"),
    ("no content type", lambda e: _raw(b'{"input": "a"}', {}), 415, "unsupported_media_type"),
    ("form upload", lambda e: _raw(b"input=a", {"content-type":
                                                "application/x-www-form-urlencoded"}),
     415, "unsupported_media_type"),
    ("oversize body", lambda e: _json({"input": "a" * (65 * 1024)}), 413, "request_too_large"),
    # auth
    ("no api key", lambda e: {"json": {"input": "a"}}, 401, "invalid_api_key"),
    ("wrong api key", lambda e: {"json": {"input": "a"},
                                 "headers": {"authorization": "Bearer nope"}}, 401,
     "invalid_api_key"),
    ("basic auth", lambda e: {"json": {"input": "a"},
                              "headers": {"authorization": f"Basic {KEY}"}}, 401,
     "invalid_api_key"),
    ("key without scheme", lambda e: {"json": {"input": "a"}, "headers": {"authorization": KEY}},
     401, "invalid_api_key"),
]


@pytest.mark.parametrize(("make", "status", "code"), [c[1:] for c in BAD],
                         ids=[c[0] for c in BAD])
def test_bad_input(guarded: TestClient, tiny_engine: Engine,
                   make: Callable[[Engine], dict[str, Any]], status: int,
                   code: str | None) -> None:
    r = guarded.post(URL, **make(tiny_engine))
    err = assert_openai_error(r, status, code)
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"
    assert "Traceback" not in err["message"]
    good = guarded.post(URL, json={"input": "still serving"}, headers=AUTH)
    assert good.status_code == 200, good.text
    invariant(vectors(good.json()), tiny_engine.encode(["still serving"]))


def test_bad_input_battery_is_broad() -> None:
    assert len(BAD) >= 30 and len({c[0] for c in BAD}) == len(BAD)


def test_other_statuses_have_openai_shape(guarded: TestClient) -> None:
    assert_openai_error(guarded.get("/v1/nothing", headers=AUTH), 404, "not_found")
    assert_openai_error(guarded.get(URL, headers=AUTH), 405, "method_not_allowed")
    assert_openai_error(guarded.put("/tokenize", headers=AUTH), 405, "method_not_allowed")
    assert_openai_error(guarded.get("/v1/models"), 401, "invalid_api_key")
    assert_openai_error(guarded.get("/metrics"), 401, "invalid_api_key")
    assert guarded.get("/health").status_code == 200  # no key needed
    assert guarded.get("/v1/models", headers=AUTH).status_code == 200


def test_one_sentence_clients_are_served_in_a_few_batched_steps(tiny_engine: Engine) -> None:
    engine = Engine(tiny_engine.checkpoint, max_batch_tokens=1024, max_queued_requests=128)
    sentences = [" ".join(WORDS[i % 7 : i % 7 + 3 + i % 5]) for i in range(64)]
    want = tiny_engine.encode(sentences)

    async def main(base: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=60,
                                     limits=httpx.Limits(max_connections=64)) as client:
            with engine.paused():
                calls = [asyncio.ensure_future(client.post(URL, json={"input": s}))
                         for s in sentences]
                while engine.queue_depth < len(sentences):  # all 64 queued
                    await asyncio.sleep(0.01)
                before = engine.stats_snapshot().steps
            out = await asyncio.gather(*calls)
            assert engine.stats_snapshot().steps - before <= 2, "64 sentences fit 1024 tokens"
            return out

    try:
        with serve(create_app(engine)) as (base, _, _):
            responses = asyncio.run(main(base))
    finally:
        engine.shutdown()
    for i, r in enumerate(responses):
        assert r.status_code == 200, r.text
        invariant(vectors(r.json()), want[i : i + 1])


def test_a_request_of_2048_inputs_is_split_not_refused(tiny_engine: Engine) -> None:
    texts = [f"{WORDS[i % len(WORDS)]} item {i}" for i in range(2048)]
    before = tiny_engine.stats_snapshot().steps
    with TestClient(create_app(tiny_engine)) as c:
        r = c.post(URL, json={"input": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["index"] for d in body["data"]] == list(range(2048))
    assert tiny_engine.stats_snapshot().steps - before > 1  # 512-token steps: split
    sample = [0, 1, 777, 2047]
    invariant(vectors(body)[sample], tiny_engine.encode([texts[i] for i in sample]))


def test_request_token_limit_over_http(tiny_engine: Engine) -> None:
    engine = Engine(tiny_engine.checkpoint, max_batch_tokens=512, max_request_tokens=24)
    try:
        with TestClient(create_app(engine)) as c:
            for body in ({"input": "fox " * 40}, {"input": ["fox dog"] * 20}):
                err = assert_openai_error(c.post(URL, json=body), 400, "request_too_large")
                assert err["param"] == "input" and "24" in err["message"]
            assert c.post(URL, json={"input": ["fox dog", "lazy"]}).status_code == 200
    finally:
        engine.shutdown()


def test_draining_answers_503_with_retry_after(tiny_engine: Engine) -> None:
    engine = Engine(tiny_engine.checkpoint, max_batch_tokens=512)
    try:
        app = create_app(engine)
        with TestClient(app) as c:
            assert c.post(URL, json={"input": "before"}).status_code == 200
            asyncio.run(app.state.engine_host.stop())  # what the app's shutdown runs first
            for r in (c.post(URL, json={"input": "during"}), c.get("/health")):
                assert_openai_error(r, 503, "draining")
                assert int(r.headers["retry-after"]) >= 1
        engine.shutdown()  # an engine stopped under a running app: the same answer
        with TestClient(create_app(engine)) as c:
            r = c.post(URL, json={"input": "after"})
            assert_openai_error(r, 503, "draining")
            assert int(r.headers["retry-after"]) >= 1
    finally:
        engine.shutdown()


def test_schema_and_its_docs_page(tiny_engine: Engine) -> None:
    with TestClient(create_app(tiny_engine)) as c:
        page = c.get("/schema")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        spec = c.get("/schema/openapi.json").json()
        assert {URL, "/tokenize", "/v1/chat/completions"} <= set(spec["paths"])


def test_serve_binds_loopback_by_default_and_passes_its_limits(
        monkeypatch: pytest.MonkeyPatch, tiny_llama_dir: Path) -> None:
    import concurrent.futures

    import jaxembed.server

    seen: dict[str, Any] = {}

    def started(builder: EngineBuilder) -> concurrent.futures.Future:
        seen["builder"] = builder
        return concurrent.futures.Future()  # nothing is loaded

    def app(source: Any, **kwargs: Any) -> object:
        seen["app"] = kwargs
        return object()

    monkeypatch.setattr(EngineBuilder, "build_in_background", started)
    monkeypatch.setattr(jaxembed.server, "create_app", app)
    monkeypatch.setattr(uvicorn.Server, "run", lambda server: seen.update(config=server.config))
    argv = ["serve", "--model", str(tiny_llama_dir), "--max-request-tokens", "77",
            "--max-queued-requests", "9", "--max-body-bytes", "1234", "--request-timeout", "7",
            "--embed-matmul-dtype", "bfloat16", "--decode-matmul-dtype", "bfloat16"]
    assert main(argv) == 0
    assert seen["config"].host == "127.0.0.1"
    b = seen["builder"]
    assert (b.max_request_tokens, b.max_queued_requests) == (77, 9)
    assert b.embed_matmul_dtype == b.decode_matmul_dtype == "bfloat16"
    assert seen["app"]["max_body_bytes"] == 1234 and seen["app"]["request_timeout"] == 7
    assert seen["app"]["cors_origins"] == []  # CORS only when asked for


# ---- overload, disconnects, timeouts ---------------------------------------------------------


def test_burst_past_the_queue_bound_gets_429_then_recovers(queue_engine: Engine) -> None:
    engine = queue_engine
    codes: list[int] = []

    async def main(base: str) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            with engine.paused():
                held = [asyncio.ensure_future(client.post(URL, json={"input": f"held {i}"}))
                        for i in range(engine.max_queued_requests)]
                while engine.queue_depth < engine.max_queued_requests:  # all four queued
                    await asyncio.sleep(0.01)
                burst = await asyncio.gather(*(client.post(URL, json={"input": f"burst {i}"})
                                               for i in range(16)))
                for r in burst:
                    assert_openai_error(r, 429, "queue_full")
                    assert int(r.headers["retry-after"]) >= 1
                    codes.append(r.status_code)
                assert not any(t.done() for t in held)
            for r in await asyncio.gather(*held):
                assert r.status_code == 200, r.text
            r = await client.post(URL, json={"input": "after the burst"})
            assert r.status_code == 200
            metrics = (await client.get("/metrics")).text
            assert scrape(metrics, "jaxembed_requests_rejected_total") >= 16
            assert scrape(metrics, "jaxembed_http_requests_total", route=URL, method="POST",
                          status="429") == 16

    with serve(create_app(engine)) as (base, _, _):
        asyncio.run(main(base))
    assert codes == [429] * 16


def test_client_gone_is_dropped_before_compute(queue_engine: Engine) -> None:
    engine = queue_engine
    before = engine.stats_snapshot()

    async def main(base: str) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            task = asyncio.ensure_future(client.post(URL, json={"input": "nobody waits"}))
            while engine.queue_depth == 0:
                await asyncio.sleep(0.01)
            task.cancel()  # closes the connection: the server sees the client leave
            with pytest.raises(asyncio.CancelledError):
                await task
            while engine.queue_depth:  # the server cancelled the work
                await asyncio.sleep(0.01)

    with serve(create_app(engine)) as (base, _, _), engine.paused():
        asyncio.run(main(base))
    engine.encode("next")  # a step runs; the cancelled request is not in it
    after = engine.stats_snapshot()
    assert after.cancelled - before.cancelled == 1
    assert after.sequences - before.sequences == 1


def test_request_timeout_cancels_the_work(queue_engine: Engine) -> None:
    with TestClient(create_app(queue_engine, request_timeout=0.3)) as c, queue_engine.paused():
        r = c.post(URL, json={"input": "too slow"})
        err = assert_openai_error(r, 503, "timeout")
        assert "0.3 s" in err["message"]
        assert queue_engine.queue_depth == 0
    with TestClient(create_app(queue_engine, request_timeout=0.3)) as c:
        assert c.post(URL, json={"input": "fast enough"}).status_code == 200


# ---- loading, health, draining and shutdown --------------------------------------------------


class GatedBuilder(EngineBuilder):
    """A builder that waits for the test's go-ahead before loading, so 'loading' can be seen."""

    def __init__(self, gate: threading.Event, fail: bool = False, **kw: Any) -> None:
        super().__init__(**kw)
        self.gate, self.fail = gate, fail

    def build(self) -> Engine:
        assert self.gate.wait(60)
        if self.fail:
            raise RuntimeError("no such weights")
        return super().build()


# `jaxembed serve` starts the build before the app exists and hands the app its future.
@pytest.mark.parametrize("started", [False, True], ids=["builder", "build_in_background"])
def test_health_is_503_until_loaded_and_warm(tiny_llama_dir: Path, started: bool) -> None:
    gate = threading.Event()
    builder = GatedBuilder(gate, model=tiny_llama_dir, dtype="float32", max_batch_tokens=512,
                           progress=False, compilation_cache=False)
    app = create_app(builder.build_in_background() if started else builder)
    host = app.state.engine_host
    with TestClient(app) as c:
        for path in ("/health", "/v1/models"):
            r = c.get(path)
            assert_openai_error(r, 503, "model_loading")
            assert int(r.headers["retry-after"]) >= 1
        assert_openai_error(c.post(URL, json={"input": "a"}), 503, "model_loading")
        assert scrape(c.get("/metrics").text, "jaxembed_ready") == 0
        gate.set()
        wait_for(lambda: host.engine is not None, "the model to load")
        assert host.engine.stats.compilations > 0  # warm-up compiled before it was served
        assert c.get("/health").json() == {"status": "ok"}
        assert c.post(URL, json={"input": "a"}).status_code == 200
        assert scrape(c.get("/metrics").text, "jaxembed_ready") == 1
        engine = host.engine
    assert not engine.ready  # the app built it, so the app shut it down


@pytest.mark.parametrize("started", [False, True], ids=["builder", "build_in_background"])
def test_failed_load_is_reported(tiny_llama_dir: Path, started: bool) -> None:
    gate = threading.Event()
    gate.set()
    errors: list[BaseException] = []
    builder = GatedBuilder(gate, fail=True, model=tiny_llama_dir)
    app = create_app(builder.build_in_background() if started else builder,
                     on_load_error=errors.append)
    with TestClient(app) as c:
        wait_for(lambda: bool(errors), "the load to fail")
        assert_openai_error(c.get("/health"), 503, "model_load_failed")
    assert "no such weights" in str(errors[0])


def test_graceful_shutdown_completes_requests_in_flight(tiny_engine: Engine) -> None:
    engine = Engine(tiny_engine.checkpoint, max_batch_tokens=512)
    texts = [f"in flight {i} " * (1 + i) for i in range(8)]
    want = tiny_engine.encode(texts)
    results: dict[int, httpx.Response] = {}

    def call(i: int) -> None:
        results[i] = httpx.post(f"{base}{URL}", json={"input": texts[i]}, timeout=60)

    with serve(create_app(engine, shutdown_engine=True)) as (base, server, thread):
        engine.pause()
        callers = [threading.Thread(target=call, args=(i,)) for i in range(len(texts))]
        for t in callers:
            t.start()
        wait_for(lambda: engine.queue_depth == len(texts), "the requests to queue")
        server.should_exit = True  # what uvicorn's SIGTERM handler does
        wait_for(lambda: not server.servers or all(not s.is_serving() for s in server.servers),
                 "the listener to close")
        assert thread.is_alive() and engine.ready and not results  # draining, not dropping
        engine.resume()
        for t in callers:
            t.join(60)
        thread.join(60)
        assert not thread.is_alive()
    assert sorted(results) == list(range(len(texts)))
    for i, r in results.items():
        assert r.status_code == 200, r.text
        invariant(vectors(r.json()), want[i : i + 1])
    assert not engine.ready and not any(c.thread.is_alive() for c in engine.cores)


def test_serve_exits_2_when_the_model_cannot_be_served(tiny_llama_dir: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    # The port is bound first; the load fails in the background and stops the server.
    argv = ["serve", "--model", str(tiny_llama_dir), "--port", "0", "--log-level", "warning",
            "--default-embedding-type", "cls"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "failed to load" in err and "cls" in err and "causal" in err


@pytest.mark.slow
def test_sigterm_drains_and_exits_zero(tiny_llama_dir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXEMBED_API_KEY": KEY}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxembed.cli", "serve", "--model", str(tiny_llama_dir),
         "--port", str(port), "--max-batch-tokens", "512", "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                return httpx.get(f"{base}/health", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, "the server to be ready", limit=240)
        r = httpx.post(f"{base}{URL}", json={"input": "hello"}, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        assert httpx.post(f"{base}{URL}", json={"input": "x"}, timeout=60).status_code == 401
        # Two large requests in flight (hundreds of steps, seconds) when the signal comes: both
        # finish before the process exits.
        big = {"input": [f"{i} " + "fox dog " * 50 for i in range(2048)]}
        with ThreadPoolExecutor(2) as pool:
            calls = [pool.submit(httpx.post, f"{base}{URL}", json=big, headers=AUTH, timeout=300)
                     for _ in range(2)]
            wait_for(lambda: scrape(httpx.get(f"{base}/metrics", headers=AUTH).text,
                                    "jaxembed_queue_depth") == 2, "both requests to be queued")
            proc.send_signal(signal.SIGTERM)
            for call in calls:
                r = call.result()
                assert r.status_code == 200, r.text
                assert len(r.json()["data"]) == 2048
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- tokenize and detokenize, truncation with BOS, defaults over HTTP ------------------------


def test_tokenize_matches_the_embedding_path(bos_engine: Engine) -> None:
    bos = bos_engine.tokenizer.token_to_id("<|im_start|>")
    text = "The quick brown fox"
    with TestClient(create_app(bos_engine)) as c:
        r = c.post("/tokenize", json={"model": "default", "prompt": text})
        assert r.status_code == 200, r.text
        body = r.json()
        assert list(body) == ["tokens", "count", "max_model_len"]
        assert body["tokens"][0] == bos and body["count"] == len(body["tokens"])
        assert body["max_model_len"] == bos_engine.max_model_len
        emb = c.post(URL, json={"input": text}).json()
        assert emb["usage"]["prompt_tokens"] == body["count"]
        # The ids embed exactly as the text does.
        by_ids = c.post(URL, json={"input": body["tokens"]}).json()
        invariant(vectors(by_ids), vectors(emb))
        plain = c.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
        assert plain["tokens"] == body["tokens"][1:]
        r = c.post("/detokenize", json={"model": "default", "tokens": plain["tokens"]})
        assert r.status_code == 200 and r.json() == {"prompt": text}
        assert c.post("/detokenize", json={"tokens": body["tokens"]}).json()["prompt"] \
            == "<|im_start|>" + text
        for path, bad, code in [
            ("/tokenize", {"prompt": 3}, "invalid_type"),
            ("/tokenize", {"text": "a"}, "unknown_parameter"),
            ("/tokenize", {"prompt": "a", "model": "nope"}, "model_not_found"),
            ("/detokenize", {"tokens": [-1]}, "invalid_token_id"),
            ("/detokenize", {"tokens": [bos_engine.config.vocab_size]}, "invalid_token_id"),
            ("/detokenize", {"tokens": "abc"}, "invalid_type"),
        ]:
            assert_openai_error(c.post(path, json=bad), 404 if code == "model_not_found" else 400,
                                code)
        assert_openai_error(c.post("/tokenize", content=b"prompt=a",
                                   headers={"content-type": "text/plain"}), 415)


def test_truncation_keeps_bos_and_the_last_tokens(bos_engine: Engine) -> None:
    bos = bos_engine.tokenizer.token_to_id("<|im_start|>")
    text = "one two three four five six seven eight nine ten " * 40
    ids = bos_engine.tokenize([text])[0]
    assert ids[0] == bos and len(ids) > bos_engine.max_model_len
    limit = bos_engine.max_model_len
    with TestClient(create_app(bos_engine)) as c:
        assert_openai_error(c.post(URL, json={"input": text}), 400, "context_length_exceeded")
        for n, kept in [(-1, limit), (10, 10)]:
            want_ids = [bos, *ids[len(ids) - kept + 1 :]]
            want = bos_engine.submit([np.asarray(want_ids, np.int32)]).result()
            for value in (text, ids):  # text and its ids truncate alike
                body = c.post(URL, json={"input": value, "truncate_prompt_tokens": n}).json()
                assert body["usage"]["prompt_tokens"] == kept
                invariant(vectors(body), want)
        err = assert_openai_error(c.post(URL, json={"input": text, "truncate_prompt_tokens": 1}),
                                  400, param="truncate_prompt_tokens")
        assert "at least 2" in err["message"]


def test_server_defaults_and_request_precedence(tiny_engine: Engine) -> None:
    defaults = EmbeddingDefaults(normalize=True, embedding_type=EmbeddingType.Last)
    engine = Engine(tiny_engine.checkpoint, max_batch_tokens=512, defaults=defaults)
    texts = ["first text", "a second, longer text"]
    seqs = [np.asarray(s, np.int32) for s in tiny_engine.tokenize(texts)]
    last = tiny_engine.submit(seqs, EmbeddingType.Last).result()
    mean = tiny_engine.encode(texts)

    def unit(v: np.ndarray) -> np.ndarray:
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    try:
        with TestClient(create_app(engine)) as c:
            invariant(vectors(c.post(URL, json={"input": texts}).json()), unit(last))
            body = c.post(URL, json={"input": texts, "normalize": False, "embedding_type": "mean"})
            invariant(vectors(body.json()), mean)
            nulls = c.post(URL, json={"input": texts, "normalize": None, "embedding_type": None})
            invariant(vectors(nulls.json()), unit(last))
            cut = c.post(URL, json={"input": texts, "dimensions": 6}).json()
            invariant(vectors(cut), unit(last[:, :6]))  # re-normalized after the cut
    finally:
        engine.shutdown()


# ---- CORS ------------------------------------------------------------------------------------


def test_cors_only_when_asked(tiny_engine: Engine) -> None:
    origin = {"origin": "https://app.example"}
    preflight = {**origin, "access-control-request-method": "POST",
                 "access-control-request-headers": "authorization, content-type"}
    with TestClient(create_app(tiny_engine)) as c:
        r = c.post(URL, json={"input": "a"}, headers=origin)
        assert "access-control-allow-origin" not in r.headers
    app = create_app(tiny_engine, cors_origins=["https://app.example"], api_key=KEY)
    with TestClient(app) as c:
        r = c.options(URL, headers=preflight)
        assert r.status_code in (200, 204)
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = c.post(URL, json={"input": "a"}, headers={**origin, **AUTH})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-request-id" in r.headers["access-control-expose-headers"]
        r = c.post(URL, json={"input": "a"}, headers={"origin": "https://evil.example", **AUTH})
        assert "access-control-allow-origin" not in r.headers


# ---- metrics ---------------------------------------------------------------------------------


def test_metrics_are_prometheus_text(tiny_engine: Engine) -> None:
    with TestClient(create_app(tiny_engine)) as c:
        c.post(URL, json={"input": ["a", "b"]})
        c.get("/nowhere")
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    sample = re.compile(r'^[a-z_]+(\{([a-z_]+="[^"]*",?)*\})? -?[0-9.e+\-]+$|^[a-z_]+\{[^}]*\} '
                        r"[0-9]+$")
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
    for name in ("jaxembed_queue_depth", "jaxembed_batch_inputs_count", "jaxembed_batch_tokens_sum",
                 "jaxembed_batch_padding_ratio", "jaxembed_tokens_embedded_total",
                 "jaxembed_compilations_total", "jaxembed_tokens_generated_total"):
        assert re.search(rf"^{name} ", text, re.M), name
    assert scrape(text, "jaxembed_http_requests_total", route=URL, method="POST",
                  status="200") == 1
    assert scrape(text, "jaxembed_http_requests_total", route="unmatched", method="GET",
                  status="404") == 1
    assert scrape(text, "jaxembed_http_request_duration_seconds_count", route=URL) == 1
    assert scrape(text, "jaxembed_compilations_total") >= 1
    assert 0 <= scrape(text, "jaxembed_batch_padding_ratio") < 1
    # The process figures, under Prometheus's standard names.
    assert scrape(text, "process_resident_memory_bytes") > 10 * 2**20
    assert scrape(text, "process_cpu_seconds_total") > 0
    assert 3 <= scrape(text, "process_open_fds") <= scrape(text, "process_max_fds")
    assert time.time() - 86400 < scrape(text, "process_start_time_seconds") <= time.time()


# ---- schema fuzzing --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_client(tiny_engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(tiny_engine)) as c:
        yield c


@pytest.fixture(scope="module")
def request_schema(fuzz_client: TestClient) -> dict:
    doc = fuzz_client.get("/schema/openapi.json").json()
    schema = doc["paths"][URL]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "$ref" not in json.dumps(schema)  # self-contained, so it can drive a generator
    return schema


def from_schema(schema: dict) -> st.SearchStrategy[Any]:
    """Values valid for the JSON Schema subset the OpenAPI document uses (oneOf, type, enum, const,
    minimum, length and item bounds, properties, required, additionalProperties: false)."""
    if "oneOf" in schema:
        return st.one_of(*(from_schema(s) for s in schema["oneOf"]))
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return st.integers(min_value=schema.get("minimum"), max_value=schema.get("maximum"))
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=40)
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {})), min_size=schema.get("minItems", 0),
                        max_size=min(schema.get("maxItems", 8), 8))
    if kind == "object":
        props = {k: from_schema(v) for k, v in schema.get("properties", {}).items()}
        required = set(schema.get("required", []))
        return st.fixed_dictionaries({k: v for k, v in props.items() if k in required},
                                     optional={k: v for k, v in props.items() if k not in required})
    raise AssertionError(f"schema construct not covered: {schema}")


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12)


def _fuzz_check(client: TestClient, body: Any) -> None:
    r = client.post(URL, content=json.dumps(body).encode(), headers=J)
    assert r.status_code < 500, (body, r.text)
    if r.status_code != 200:
        assert_openai_error(r, r.status_code)


# Bounded and derandomized, so the run is quick and repeatable; raise the count for a longer hunt.
FUZZ = settings(max_examples=int(os.environ.get("JAXEMBED_FUZZ_EXAMPLES", "120")), deadline=None,
                derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


@FUZZ
@given(data=st.data())
def test_fuzz_schema_valid_bodies(fuzz_client: TestClient, request_schema: dict,
                                  data: st.DataObject) -> None:
    body = data.draw(from_schema(request_schema))
    _fuzz_check(fuzz_client, body)


@FUZZ
@given(data=st.data())
def test_fuzz_schema_fields_with_any_values(fuzz_client: TestClient, request_schema: dict,
                                            data: st.DataObject) -> None:
    """Negative cases: the schema's own field names, each with arbitrary JSON."""
    names = sorted(request_schema["properties"])
    body = data.draw(st.dictionaries(st.sampled_from([*names, "extra"]), JSON, max_size=4))
    _fuzz_check(fuzz_client, body)
