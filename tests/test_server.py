"""The HTTP server: OpenAI's shapes for results and errors, over the tiny engine.

Most tests go through Litestar's in-process TestClient; the `live_server` ones run uvicorn on a
loopback port and talk to it with the official `openai` client, as users do.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from litestar.testing import TestClient

from jaxembed import Engine
from jaxembed.protocol import EmbeddingRequest, EmbeddingType
from jaxembed.server import create_app

from live import serve_in_thread
from parity import response_vectors as vectors

URL = "/v1/embeddings"
TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "JAX compiles numerical programs with XLA.",
         "Naïve café 🙂"]


# ---- helpers ---------------------------------------------------------------------------------


def assert_close(got: Any, want: np.ndarray) -> None:
    """Equal to 1e-6 relative; the absolute floor (scaled to the vector) covers near-zero entries,
    since batching on the server may pack rows differently than the reference call."""
    got = np.asarray(got, dtype=np.float32)
    want = np.asarray(want, dtype=np.float32)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * float(np.abs(want).max()))


def embed(client: TestClient, **body: Any) -> dict:
    r = client.post(URL, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None,
                        code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"].strip()
    assert err["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    assert r.headers.get("x-request-id")
    return err


def assert_still_serves(client: TestClient, engine: Engine) -> None:
    body = embed(client, input="still works")
    assert_close(vectors(body), engine.encode(["still works"]))


def last_token_vectors(engine: Engine, texts: list[str]) -> np.ndarray:
    seqs = [np.asarray(ids, np.int32) for ids in engine.tokenize(texts)]
    return engine.submit(seqs, EmbeddingType.Last).result()


# ---- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tiny_engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(tiny_engine)) as c:
        yield c


class _Delegate:
    """Stands in for the engine, forwarding everything, so a test can break one method of it
    without touching the engine the other tests share."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


@pytest.fixture(scope="module")
def live_server(tiny_engine: Engine) -> Iterator[str]:
    """uvicorn on a loopback port in a background thread; yields the base URL of the API."""
    with serve_in_thread(create_app(tiny_engine)) as url:
        yield url


# ---- results ---------------------------------------------------------------------------------


def test_float_response_has_openai_shape(client: TestClient, tiny_engine: Engine) -> None:
    body = embed(client, input=TEXTS, encoding_format="float")
    assert set(body) == {"object", "data", "model", "usage"}
    assert body["object"] == "list"
    assert body["model"] == tiny_engine.model_name
    for item in body["data"]:
        assert set(item) == {"object", "embedding", "index"}
        assert item["object"] == "embedding"
        assert len(item["embedding"]) == tiny_engine.embedding_size
    assert set(body["usage"]) == {"prompt_tokens", "total_tokens"}
    assert_close(vectors(body), tiny_engine.encode(TEXTS))


def test_base64_is_little_endian_float32(client: TestClient, tiny_engine: Engine) -> None:
    b64 = embed(client, input=TEXTS, encoding_format="base64")
    assert all(isinstance(item["embedding"], str) for item in b64["data"])
    raw = base64.b64decode(b64["data"][0]["embedding"])
    assert len(raw) == 4 * tiny_engine.embedding_size
    assert_close(vectors(b64), tiny_engine.encode(TEXTS))
    assert_close(vectors(b64), vectors(embed(client, input=TEXTS)))


@pytest.mark.parametrize("dimensions", [None, 20])  # 20: the last byte padded with zeros
@pytest.mark.parametrize("precision", ["binary", "ubinary"])
def test_binary_formats_are_sentence_transformers_packed_signs(
        client: TestClient, tiny_engine: Engine, precision: str, dimensions: int | None) -> None:
    from sentence_transformers.quantization import quantize_embeddings

    fields = {} if dimensions is None else {"dimensions": dimensions}
    floats = vectors(embed(client, input=TEXTS, **fields))
    body = embed(client, input=TEXTS, encoding_format=precision, **fields)
    dtype = np.int8 if precision == "binary" else np.uint8
    got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype)
                    for d in body["data"]])
    want = quantize_embeddings(floats, precision=precision)
    size = -(-(dimensions or tiny_engine.embedding_size) // 8)
    assert got.shape == want.shape == (len(TEXTS), size) and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
    assert len({row.tobytes() for row in got}) == len(TEXTS)  # the texts' bits differ


def test_four_input_forms(client: TestClient, tiny_engine: Engine) -> None:
    want = tiny_engine.encode(TEXTS)
    ids = tiny_engine.tokenize(TEXTS)
    assert_close(vectors(embed(client, input=TEXTS[0])), want[:1])
    assert_close(vectors(embed(client, input=TEXTS)), want)
    assert_close(vectors(embed(client, input=ids[0])), want[:1])
    assert_close(vectors(embed(client, input=ids)), want)


def test_usage_counts_tokens(client: TestClient, tiny_engine: Engine) -> None:
    n = sum(len(ids) for ids in tiny_engine.tokenize(TEXTS))
    for value in (TEXTS, tiny_engine.tokenize(TEXTS)):
        usage = embed(client, input=value)["usage"]
        assert usage == {"prompt_tokens": n, "total_tokens": n}


def test_model_names(client: TestClient, tiny_engine: Engine) -> None:
    name = tiny_engine.model_name
    for extra in ({}, {"model": "default"}, {"model": name}):
        assert embed(client, input="hi", **extra)["model"] == name
    r = client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == tiny_engine.served_model_names
    for m in body["data"]:
        assert m["object"] == "model" and m["owned_by"] == "jaxembed"
        assert isinstance(m["created"], int)


def test_last_token_pooling(client: TestClient, tiny_engine: Engine) -> None:
    body = embed(client, input=TEXTS, embedding_type="last")
    want = last_token_vectors(tiny_engine, TEXTS)
    assert_close(vectors(body), want)
    assert not np.allclose(want, tiny_engine.encode(TEXTS))


def test_dimensions_truncates(client: TestClient, tiny_engine: Engine) -> None:
    want = tiny_engine.encode(TEXTS)
    for fmt in ("float", "base64"):
        body = embed(client, input=TEXTS, dimensions=8, encoding_format=fmt)
        assert_close(vectors(body), want[:, :8])
    full = embed(client, input=TEXTS, dimensions=tiny_engine.embedding_size)
    assert_close(vectors(full), want)


def test_health(client: TestClient) -> None:
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


def test_request_ids(client: TestClient) -> None:
    mine = client.get("/health", headers={"x-request-id": "trace-42"})
    assert mine.headers["x-request-id"] == "trace-42"
    for r in (client.get("/health"), client.get("/nowhere"), client.post(URL, json={"input": ""})):
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    a, b = client.get("/health"), client.get("/health")
    assert a.headers["x-request-id"] != b.headers["x-request-id"]
    # An id that could smuggle text into logs is replaced, not echoed.
    odd = client.get("/health", headers={"x-request-id": "a b" + "x" * 200})
    assert re.fullmatch(r"[0-9a-f]{32}", odd.headers["x-request-id"])


def test_openapi_documents_the_request_body(client: TestClient) -> None:
    r = client.get("/schema/openapi.json")
    assert r.status_code == 200
    op = r.json()["paths"]["/v1/embeddings"]["post"]
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    assert set(schema["properties"]) == set(EmbeddingRequest.__struct_fields__)
    assert schema["required"] == ["input"]
    forms = schema["properties"]["input"]["oneOf"]
    assert [f["type"] for f in forms] == ["string", "array", "array", "array"]
    assert [f.get("items", {}).get("type") for f in forms] == [None, "string", "integer", "array"]
    assert forms[3]["items"]["items"]["type"] == "integer"
    assert schema["properties"]["encoding_format"]["enum"] == ["float", "base64", "binary", "ubinary"]
    assert "200" in op["responses"] and "400" in op["responses"]


# ---- errors ----------------------------------------------------------------------------------

Body = Callable[[Engine], Any]

BAD_BODIES: list[tuple[str, Body, int, str | None, str | None]] = [
    ("empty string", lambda e: {"input": ""}, 400, "input", "empty_input"),
    ("empty string in list", lambda e: {"input": ["a", ""]}, 400, "input", "empty_input"),
    ("empty list", lambda e: {"input": []}, 400, "input", "empty_input"),
    ("empty token list", lambda e: {"input": [[1], []]}, 400, "input", "empty_input"),
    ("strings and ints", lambda e: {"input": ["a", 1]}, 400, "input", None),
    ("ints and lists", lambda e: {"input": [1, [2]]}, 400, "input", None),
    ("number", lambda e: {"input": 5}, 400, "input", "invalid_type"),
    ("object", lambda e: {"input": {"text": "a"}}, 400, "input", "invalid_type"),
    ("null", lambda e: {"input": None}, 400, "input", "invalid_type"),
    ("booleans", lambda e: {"input": [True]}, 400, "input", "invalid_type"),
    ("floats", lambda e: {"input": [1.5]}, 400, "input", "invalid_type"),
    ("lists of strings", lambda e: {"input": [["a"]]}, 400, "input", "invalid_type"),
    ("missing input", lambda e: {"model": "default"}, 400, "input",
     "missing_required_parameter"),
    ("encoding xml", lambda e: {"input": "a", "encoding_format": "xml"}, 400, "encoding_format",
     "invalid_value"),
    ("pooling max", lambda e: {"input": "a", "embedding_type": "max"}, 400, "embedding_type",
     "invalid_value"),
    ("dimensions 0", lambda e: {"input": "a", "dimensions": 0}, 400, "dimensions", None),
    ("dimensions > hidden", lambda e: {"input": "a", "dimensions": e.embedding_size + 1}, 400,
     "dimensions", None),
    ("dimensions string", lambda e: {"input": "a", "dimensions": "8"}, 400, "dimensions",
     "invalid_type"),
    ("negative token", lambda e: {"input": [1, -1]}, 400, "input", "invalid_token_id"),
    ("token >= vocab", lambda e: {"input": [[1], [e.config.vocab_size]]}, 400, "input",
     "invalid_token_id"),
    ("too many tokens", lambda e: {"input": [1] * (e.max_model_len + 1)}, 400, "input",
     "context_length_exceeded"),
    ("too long text", lambda e: {"input": "fox " * e.max_model_len}, 400, "input",
     "context_length_exceeded"),
    ("unknown model", lambda e: {"input": "a", "model": "gpt-nope"}, 404, "model",
     "model_not_found"),
    ("model not a string", lambda e: {"input": "a", "model": 3}, 400, "model", "invalid_type"),
    ("unknown field", lambda e: {"input": "a", "temperature": 0.5}, 400, "temperature",
     "unknown_parameter"),
    ("body is an array", lambda e: ["a"], 400, None, "invalid_type"),
]


@pytest.mark.parametrize(("body", "status", "param", "code"),
                         [case[1:] for case in BAD_BODIES], ids=[case[0] for case in BAD_BODIES])
def test_bad_body(client: TestClient, tiny_engine: Engine, body: Body, status: int,
                  param: str | None, code: str | None) -> None:
    r = client.post(URL, json=body(tiny_engine))
    assert_openai_error(r, status, param, code)
    assert_still_serves(client, tiny_engine)


def test_messages_name_the_problem(client: TestClient) -> None:
    def message(body: Any) -> str:
        return client.post(URL, json=body).json()["error"]["message"]

    assert "temperature" in message({"input": "a", "temperature": 0.5})
    typed = message({"input": "a", "dimensions": "8"})
    assert "dimensions" in typed and "integer" in typed
    assert "'xml'" in message({"input": "a", "encoding_format": "xml"})
    assert "input[1]" in message({"input": ["a", 1]})


@pytest.mark.parametrize(("content", "headers", "status", "code"), [
    (b'{"input": "a"', {"content-type": "application/json"}, 400, "invalid_json"),
    (b"", {"content-type": "application/json"}, 400, "invalid_json"),
    (b"\xff\xfe", {"content-type": "application/json"}, 400, "invalid_json"),
    (b'{"input": "a"}', {"content-type": "text/plain"}, 415, "unsupported_media_type"),
    (b"input=a", {"content-type": "application/x-www-form-urlencoded"}, 415,
     "unsupported_media_type"),
    (b'{"input": "a"}', {}, 415, "unsupported_media_type"),
], ids=["truncated json", "empty body", "not utf-8", "text/plain", "form", "no content type"])
def test_bad_transport(client: TestClient, tiny_engine: Engine, content: bytes,
                       headers: dict[str, str], status: int, code: str) -> None:
    r = client.post(URL, content=content, headers=headers)
    err = assert_openai_error(r, status, None, code)
    if status == 400:
        assert "not valid JSON" in err["message"] or "empty" in err["message"]
    assert_still_serves(client, tiny_engine)


def test_json_content_type_with_charset(client: TestClient) -> None:
    r = client.post(URL, content=b'{"input": "a"}',
                    headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text


def test_oversize_body(tiny_engine: Engine) -> None:
    with TestClient(create_app(tiny_engine, max_body_bytes=256)) as small:
        err = assert_openai_error(small.post(URL, json={"input": "a" * 300}), 413, None,
                                  "request_too_large")
        assert "256" in err["message"]
        # Without a content-length (chunked upload) the limit holds while streaming.
        chunks = iter([b'{"input": "', b"a" * 200, b"a" * 200, b'"}'])
        assert_openai_error(small.post(URL, content=chunks,
                                       headers={"content-type": "application/json"}),
                            413, None, "request_too_large")
        assert_still_serves(small, tiny_engine)


def test_unknown_route_and_wrong_method(client: TestClient, tiny_engine: Engine) -> None:
    assert_openai_error(client.get("/v1/nothing"), 404, None, "not_found")
    assert_openai_error(client.post("/v2/embeddings", json={"input": "a"}), 404, None,
                        "not_found")
    r = client.get(URL)
    assert_openai_error(r, 405, None, "method_not_allowed")
    assert "POST" in r.headers["allow"]
    assert_openai_error(client.delete("/v1/models"), 405, None, "method_not_allowed")
    assert_still_serves(client, tiny_engine)


def test_internal_error_hides_details(client: TestClient, tiny_engine: Engine,
                                      monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture) -> None:
    async def broken(request: EmbeddingRequest) -> None:
        raise RuntimeError("secret detail of a bug")

    stand_in = _Delegate(tiny_engine)
    monkeypatch.setattr(stand_in, "aembed_timed", broken, raising=False)
    with TestClient(create_app(stand_in)) as c, caplog.at_level(logging.ERROR, "jaxembed.server"):
        r = c.post(URL, json={"input": "a"})
    err = assert_openai_error(r, 500, None, "internal_error")
    rid = r.headers["x-request-id"]
    assert rid in err["message"]
    for leak in ("secret", "Traceback", "RuntimeError", ".py"):
        assert leak not in r.text
    logged = [rec for rec in caplog.records if rid in rec.getMessage()]
    assert logged and logged[0].exc_info is not None
    assert_still_serves(client, tiny_engine)


def test_token_id_beyond_int64(client: TestClient) -> None:
    assert_openai_error(client.post(URL, json={"input": [10**20]}), 400, "input")


# ---- lifespan --------------------------------------------------------------------------------


class _Stub:
    served_model_names = ["stub"]
    tasks = ("embed",)
    ready = True

    def __init__(self) -> None:
        self.shutdowns = 0

    def shutdown(self) -> None:
        self.shutdowns += 1


@pytest.mark.parametrize("owned", [False, True])
def test_shutdown_engine_only_when_owned(owned: bool) -> None:
    stub = _Stub()
    with TestClient(create_app(stub, shutdown_engine=owned)) as c:  # type: ignore[arg-type]
        card = c.get("/v1/models").json()["data"][0]
        assert card["id"] == "stub" and card["tasks"] == ["embed"]
    assert stub.shutdowns == int(owned)


# ---- a real server and the official client ---------------------------------------------------


def test_openai_client(live_server: str, tiny_engine: Engine) -> None:
    sent: list[bytes] = []
    http = httpx.Client(event_hooks={"request": [lambda req: sent.append(req.read())]})
    client = openai.OpenAI(base_url=live_server, api_key="x", max_retries=0, http_client=http)
    want = tiny_engine.encode(TEXTS)

    r = client.embeddings.create(model="default", input=TEXTS)
    assert b'"base64"' in sent[-1]  # the client's default when numpy is installed
    assert r.model == tiny_engine.model_name
    assert_close([d.embedding for d in r.data], want)
    n = sum(len(ids) for ids in tiny_engine.tokenize(TEXTS))
    assert r.usage.prompt_tokens == r.usage.total_tokens == n

    r = client.embeddings.create(model="default", input=TEXTS, encoding_format="float")
    assert b'"float"' in sent[-1]
    assert_close([d.embedding for d in r.data], want)

    ids = tiny_engine.tokenize(TEXTS)
    r = client.embeddings.create(model=tiny_engine.model_name, input=ids, dimensions=16)
    assert_close([d.embedding for d in r.data], want[:, :16])

    r = client.embeddings.create(model="default", input=TEXTS,
                                 extra_body={"embedding_type": "last"})
    assert_close([d.embedding for d in r.data], last_token_vectors(tiny_engine, TEXTS))

    assert [m.id for m in client.models.list()] == tiny_engine.served_model_names


def test_openai_client_errors(live_server: str) -> None:
    client = openai.OpenAI(base_url=live_server, api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as nf:
        client.embeddings.create(model="nope", input="a")
    assert nf.value.code == "model_not_found" and nf.value.param == "model"
    with pytest.raises(openai.BadRequestError) as bad:
        client.embeddings.create(model="default", input="")
    assert bad.value.param == "input" and bad.value.type == "invalid_request_error"


def test_concurrent_requests(live_server: str, tiny_engine: Engine) -> None:
    texts = [f"{t} #{i}" for i, t in enumerate(TEXTS * 4)]
    want = tiny_engine.encode(texts)

    def one(i: int) -> np.ndarray:
        r = httpx.post(f"{live_server}/embeddings", json={"input": texts[i]}, timeout=60)
        assert r.status_code == 200, r.text
        return vectors(r.json())[0]

    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(one, range(len(texts))))
    assert_close(np.stack(got), want)
