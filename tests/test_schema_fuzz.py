"""The whole HTTP API fuzzed from its own OpenAPI schema, and the schema held to what it accepts.

schemathesis reads /schema/openapi.json from a loopback server over a tiny chat model and sends
every route the bodies the schema describes, and bodies that break it: no answer may be a 5xx, each
must be one the schema documents (status, content type, body), a body that breaks the schema must
be refused, and the server must still be healthy afterwards. The run is seeded and bounded, so it
is repeatable and takes well under three minutes; for a longer hunt by hand:

    JAXEMBED_SCHEMA_FUZZ_EXAMPLES=1000 JAXEMBED_SCHEMA_FUZZ_SEED=7 \\
        pytest -s tests/test_schema_fuzz.py -k fuzz_the_api

The other tests pin the schema's bounds to the validation at each bound, and hold the fixes of
what the fuzz found.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from litestar.testing import TestClient

from jaxembed import Engine, EngineBuilder
from jaxembed.server import create_app

from test_server import assert_openai_error
from test_serving import serve

EXAMPLES = int(os.environ.get("JAXEMBED_SCHEMA_FUZZ_EXAMPLES", "50"))
SEED = int(os.environ.get("JAXEMBED_SCHEMA_FUZZ_SEED", "20240601"))
CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_headers_conformance", "response_schema_conformance",
          "negative_data_rejection", "unsupported_method"]
ROUTES = {("POST", "/v1/embeddings"), ("POST", "/v1/completions"),
          ("POST", "/v1/chat/completions"), ("POST", "/tokenize"), ("POST", "/detokenize"),
          ("GET", "/v1/models"), ("GET", "/info"), ("GET", "/health"), ("GET", "/metrics"),
          ("POST", "/v1/rerank"), ("POST", "/rerank"), ("POST", "/v2/rerank"),
          ("POST", "/v1/score"), ("POST", "/score"), ("POST", "/classify"),
          ("POST", "/v1/classify")}
# A context this short keeps every generation the schema allows quick.
MAX_MODEL_LEN = 64
TEMPLATE = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
CHAT = [{"role": "user", "content": "hi"}]


# ---- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """The tiny Llama with a chat template, so that every route can answer 200."""
    path = tmp_path_factory.mktemp("models") / "tiny-chat"
    shutil.copytree(tiny_llama_dir, path)
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    config_path.write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    engine = EngineBuilder(model=path, dtype="float32", max_model_len=MAX_MODEL_LEN,
                           max_num_seqs=8, progress=False, compilation_cache=False).build()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def client(engine: Engine) -> Iterator[TestClient]:
    # A short limit: a request that gets no token for this long fails rather than hangs.
    with TestClient(create_app(engine, request_timeout=20)) as c:
        yield c


@pytest.fixture(scope="module")
def spec(client: TestClient) -> dict[str, Any]:
    return client.get("/schema/openapi.json").json()


# ---- the fuzz ----------------------------------------------------------------------------------


def run_schemathesis(url: str, workdir: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    """schemathesis's CLI over the schema at `url`, one request at a time (so a seed repeats)."""
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", url,
           "--checks", ",".join(CHECKS), "--phases", "coverage,fuzzing",
           "--max-examples", str(EXAMPLES), "--seed", str(SEED), "--workers", "1",
           "--generation-database", "none", "--request-timeout", "60",
           "--output-sanitize", "false", "--no-color"]
    start = time.perf_counter()
    # Its own folder: nothing it writes lands in the checkout, and no config file there is read.
    done = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True,
                          timeout=max(600, 20 * EXAMPLES))
    return done, time.perf_counter() - start


def test_fuzz_the_api_from_its_schema(engine: Engine, tmp_path: Path) -> None:
    with serve(create_app(engine)) as (base, _, _):
        done, seconds = run_schemathesis(f"{base}/schema/openapi.json", tmp_path)
        out = done.stdout + done.stderr
        cases = re.search(r"(\d+) generated", out)
        print(f"schemathesis: {cases[1] if cases else '?'} cases in {seconds:.0f} s "
              f"(seed {SEED}, {EXAMPLES} examples per route)")
        assert done.returncode == 0, out
        n = len(ROUTES)
        assert f"{n} selected / {n} total" in out, out  # every route was tested
        with httpx.Client(base_url=base, timeout=30) as http:
            assert http.get("/health").status_code == 200
            r = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2,
                                                        "ignore_eos": True})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_every_route_is_documented_with_its_body_and_answers(spec: dict[str, Any]) -> None:
    """A new route needs a schema before the fuzz can reach it."""
    routes = {(m.upper(), p) for p, item in spec["paths"].items() for m in item}
    assert routes == ROUTES
    for path, item in spec["paths"].items():
        for method, op in item.items():
            assert "200" in op["responses"], (method, path)
            if method == "post":
                body = op["requestBody"]["content"]["application/json"]["schema"]
                assert body["additionalProperties"] is False and body["properties"], path
                assert {"400", "413", "415"} <= set(op["responses"]), path
    for path in ("/v1/completions", "/v1/chat/completions"):
        ok = spec["paths"][path]["post"]["responses"]["200"]["content"]
        assert set(ok) == {"application/json", "text/event-stream"}
        assert ok["application/json"]["schema"]["$ref"].startswith("#/components/schemas/")


# ---- the schema's bounds are the validation's ----------------------------------------------------


BASES = {
    "/v1/completions": {"prompt": "hi", "max_tokens": 1},
    "/v1/chat/completions": {"messages": CHAT, "max_tokens": 1},
    "/v1/embeddings": {"input": "hi"},
    "/tokenize": {"prompt": "hi"},
    "/v1/rerank": {"query": "hi", "documents": ["a", "b"]},
    "/v1/score": {"text_1": "hi", "text_2": ["a", "b"]},
}
# Fields that need another to be set before their own value is looked at.
NEEDS = {"top_logprobs": {"logprobs": True}, "stream_options": {"stream": True},
         ("/v1/completions", "max_tokens"): {"echo": True}}  # 0 scores an echoed prompt
# Errors that name another field than the one sent: the chat route's top_logprobs is checked as
# the engine's logprobs.
PARAMS = {"top_logprobs": "logprobs"}


def _body_schema(spec: dict[str, Any], path: str) -> dict[str, Any]:
    return spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]


def _expect(client: TestClient, spec: dict[str, Any], path: str, body: dict[str, Any],
            refused: str | None) -> None:
    """The schema and the route agree on `body`: valid and answered, or invalid and refused with
    a 400 naming `refused`."""
    valid = Draft202012Validator(_body_schema(spec, path)).is_valid(body)
    assert valid == (refused is None), ("the schema disagrees", body)
    r = client.post(path, json=body)
    if refused is None:
        assert r.status_code == 200, (body, r.text)
    else:
        assert_openai_error(r, 400, refused)


def _bounded(schema: dict[str, Any]) -> dict[str, Any] | None:
    """The numeric schema of a property (looking inside a one-of with null), if it has bounds."""
    for s in schema.get("oneOf", [schema]):
        if s.get("type") in ("integer", "number") and set(s) & {
                "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}:
            return s
    return None


def _edges(s: dict[str, Any]) -> list[tuple[float, bool]]:
    """Values at each bound (accepted) and just past it (refused)."""
    step = 1 if s["type"] == "integer" else 0.5
    out = []
    if "minimum" in s:
        out += [(s["minimum"], True), (s["minimum"] - step, False)]
    if "maximum" in s:
        out += [(s["maximum"], True), (s["maximum"] + step, False)]
    if "exclusiveMinimum" in s:
        out += [(s["exclusiveMinimum"], False), (s["exclusiveMinimum"] + 1e-3, True)]
    if "exclusiveMaximum" in s:
        out += [(s["exclusiveMaximum"], False), (s["exclusiveMaximum"] - 1e-3, True)]
    return out


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/embeddings",
                                  "/v1/rerank"])
def test_numeric_bounds_are_the_validation(client: TestClient, spec: dict[str, Any],
                                           path: str) -> None:
    cases = [(name, value, ok) for name, schema in _body_schema(spec, path)["properties"].items()
             if (s := _bounded(schema)) is not None for value, ok in _edges(s)]
    assert cases
    for name, value, ok in cases:
        needs = NEEDS.get((path, name), NEEDS.get(name, {}))
        body = {**BASES[path], **needs, name: value}
        _expect(client, spec, path, body, None if ok else PARAMS.get(name, name))


FORMS = [
    # (route, fields over the route's base body, the field a 400 names; None: accepted)
    ("/v1/completions", {"stop": "x"}, None),
    ("/v1/completions", {"stop": ""}, "stop"),
    ("/v1/completions", {"stop": ["a"] * 16}, None),
    ("/v1/completions", {"stop": ["a"] * 17}, "stop"),
    ("/v1/completions", {"stop": [""]}, "stop"),
    ("/v1/completions", {"suffix": ""}, None),
    ("/v1/completions", {"suffix": "x"}, "suffix"),
    ("/v1/completions", {"logit_bias": {}}, None),
    ("/v1/completions", {"logit_bias": {"1": 1.0, "2": -100, "3": 100}}, None),
    ("/v1/completions", {"logit_bias": {"1": 100.5}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"x": 1}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {str(i): 1 for i in range(300)}}, None),
    ("/v1/completions", {"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ("/v1/completions", {"prompt": [[1, 2], [3]]}, None),
    ("/v1/completions", {"prompt": [[1, 2], []]}, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, None),
    ("/v1/completions", {"prompt": ["a", ""]}, "prompt"),
    ("/v1/completions", {"prompt": [1] * 2049}, "prompt"),
    ("/v1/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"stream_options": None}, None),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),  # 0 only scores an echoed prompt
    ("/v1/completions", {"max_tokens": 0, "echo": True, "logprobs": 1}, None),
    ("/v1/completions", {"seed": 2**63 - 1}, None),
    ("/v1/completions", {"seed": 2**63}, "seed"),
    ("/v1/embeddings", {"embedding_type": "none"}, None),
    ("/v1/embeddings", {"input": [1] * 2049, "chunked": True}, "input"),  # past MAX_INPUTS
    ("/v1/embeddings", {"input": [[1] * 100], "chunked": True}, None),
    ("/v1/rerank", {"documents": [{"text": "a"}, "b"]}, None),
    ("/v1/rerank", {"documents": []}, "documents"),
    ("/v1/rerank", {"query": ""}, "query"),
    ("/v1/rerank", {"top_n": 0}, "top_n"),
    ("/v1/rerank", {"top_n": 5, "return_documents": False}, None),
    ("/v1/score", {"text_1": ["a", "b"], "text_2": ["c", "d"]}, None),
    ("/v1/score", {"text_2": []}, "text_2"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant"}, *CHAT]}, None),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": None}, *CHAT]},
     None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ("/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "x"}]},
     None),
    ("/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
     "messages"),
    ("/v1/chat/completions", {"response_format": {"type": "text"}}, None),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, None),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"type": "integer"}, "strict": True}}}, None),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema",
                                                  "json_schema": {"name": "n"}}},
     "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format"),
    ("/v1/completions", {"response_format": {"type": "json_object"}}, None),
    ("/v1/completions", {"structured_outputs": {"regex": "a+"}}, None),
    ("/v1/completions", {"structured_outputs": {"json": '{"type": "boolean"}'}}, None),
    ("/v1/completions", {"structured_outputs": {"regex": "a+", "choice": ["a"]}},
     "structured_outputs"),
    ("/v1/completions", {"structured_outputs": {}}, "structured_outputs"),
    ("/v1/completions", {"structured_outputs": {"regexp": "a"}}, "structured_outputs"),
    ("/v1/completions", {"structured_outputs": {"json_object": False}}, "structured_outputs"),
    ("/v1/chat/completions", {"structured_outputs": {"choice": ["yes", "no"]}}, None),
    ("/v1/chat/completions", {"guided_choice": ["yes", "no"]}, None),
    ("/v1/chat/completions", {"guided_choice": []}, "guided_choice"),
    ("/v1/chat/completions", {"guided_choice": [""]}, "guided_choice"),
    ("/v1/completions", {"guided_regex": ""}, "guided_regex"),
    ("/v1/completions", {"guided_grammar": 'start: "a" | "b"'}, None),
    ("/v1/completions", {"guided_json": {"type": "object"}}, None),
    ("/v1/chat/completions", {"tools": []}, None),
    ("/v1/chat/completions", {"tools": [{"type": "function"}]}, "tools"),
    ("/v1/chat/completions", {"chat_template_kwargs": {"enable_thinking": False}}, None),
    ("/v1/chat/completions", {"chat_template_kwargs": {"bos_token": "x"}},
     "chat_template_kwargs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    # The older name is checked too where the newer one wins (it was ignored, 0 included).
    ("/v1/chat/completions", {"max_completion_tokens": 1, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"max_completion_tokens": 1, "max_tokens": 5}, None),
    ("/v1/chat/completions", {"top_logprobs": None}, None),
    ("/v1/embeddings", {"prompt_name": "", "input_type": "query"}, "input_type"),
    ("/v1/embeddings", {"prompt_name": "", "input_type": None}, None),
    ("/v1/embeddings", {"input": [1] * 2049}, "input"),
    ("/tokenize", {"prompt_name": "", "input_type": "document"}, "input_type"),
]


@pytest.mark.parametrize("path,fields,refused", FORMS,
                         ids=[f"{p}:{next(iter(f))}:{i}" for i, (p, f, _) in enumerate(FORMS)])
def test_the_forms_the_schema_allows_are_the_ones_accepted(
        client: TestClient, spec: dict[str, Any], path: str, fields: dict[str, Any],
        refused: str | None) -> None:
    _expect(client, spec, path, {**BASES[path], **fields}, refused)


# ---- what the fuzz found -------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [2**31, 2**40, 2**70])
def test_a_top_k_past_any_vocabulary_is_off_and_the_engine_serves_on(client: TestClient,
                                                                     top_k: int) -> None:
    """A top_k past int32 used to kill the engine's thread, and every later request timed out."""
    for _ in range(2):
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "top_k": top_k,
                                                 "temperature": 1, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 2


def test_a_client_leaving_a_completion_of_several_prompts_stops_every_one(engine: Engine
                                                                          ) -> None:
    """Each prompt of a completion is a generation of its own; when the client leaves, all of them
    must stop, not only the one being read (the others used to run on and hold the slots)."""
    prompts = 3
    core = engine.cores[0]

    def works() -> list[Any]:
        # Paused, the engine thread has taken the first into its scheduler; the rest wait queued.
        return [*(s.work for s in core.scheduler.waiting),
                *(w for w in list(core._queue.queue) if w is not None)]

    async def until(condition: Any, what: str) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.01)

    async def main(base: str) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            task = asyncio.ensure_future(http.post("/v1/completions", json={
                "prompt": ["a"] * prompts, "max_tokens": 8, "ignore_eos": True}))
            await until(lambda: len(works()) == prompts, "the prompts to be queued")
            task.cancel()  # closes the connection: the server sees the client leave
            with pytest.raises(asyncio.CancelledError):
                await task
            await until(lambda: any(w.cancelled for w in works()), "the server to see it")
            await asyncio.sleep(0.5)  # time for any other cancellation to follow

    with serve(create_app(engine)) as (base, _, _), engine.paused():
        asyncio.run(main(base))
        left = sum(not w.cancelled for w in works())
    assert left == 0, f"{left} of {prompts} generations went on after the client left"
