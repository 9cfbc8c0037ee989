"""Structured outputs: JSON schema, JSON object, regex, choice and grammar constraints, on the
engine and over both generation routes.

Every constrained text must parse and validate (`jsonschema`, `re.fullmatch`) at temperature 0 and
at 1 over many seeds, on the real SmolLM2 and on a tiny random model (which never writes JSON by
itself); a control shows the same requests without the constraint do not, so the checks can fail.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import openai
import pytest
from litestar.testing import TestClient

from jaxembed import Engine, InvalidRequestError, StructuredOutput, sampling
from jaxembed.grammar import full_mask
from jaxembed.server.app import create_app

from live import serve_in_thread
from test_server import assert_openai_error

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "admin": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "admin"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a person as JSON with a name, age and tags."}]


def _valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


# ---- the mask on the device ------------------------------------------------------------------


def test_the_bitmask_unpacks_as_llguidance_packs_it() -> None:
    rng = np.random.default_rng(0)
    v = 1000  # not a multiple of 32: the last word is partly used
    mask = full_mask(3, v)
    mask[:] = rng.integers(-2**31, 2**31, mask.shape, dtype=np.int64).astype(np.int32)
    want = np.unpackbits(mask.view(np.uint8), axis=1, bitorder="little")[:, :v].astype(bool)
    np.testing.assert_array_equal(np.asarray(sampling.allowed(jnp.asarray(mask), v)), want)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0),
                                                     (0.8, 5, 1.0), (1.0, 0, 0.5)])
def test_sampling_draws_only_allowed_tokens(temperature: float, top_k: int, top_p: float
                                            ) -> None:
    """Whatever the settings, a masked token is never drawn, and the logprobs stay the model's
    (the mask changes the draw, not what is reported)."""
    b, v = 8, 700
    logits = jax.random.normal(jax.random.key(0), (b, v)) * 4
    rng = np.random.default_rng(1)
    allowed = rng.random((b, v)) < 0.05
    allowed[np.arange(b), rng.integers(0, v, b)] = True  # at least one a row
    packed = np.packbits(np.pad(allowed, ((0, 0), (0, -v % 32))), axis=1, bitorder="little")
    mask = packed.view(np.int32)
    params = sampling.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                     logprobs=2)
    counts, seen = jnp.zeros((b, v), jnp.int32), jnp.zeros((b, v), bool)
    sample = jax.jit(sampling.sample)
    for counter in range(6):
        rows = sampling.row_arrays([(params, 7 + r, counter) for r in range(b)], mask)
        tokens, chosen, top_ids, _ = sample(logits, counts, seen, rows)
        tokens = np.asarray(tokens)
        assert allowed[np.arange(b), tokens].all()
        lp = np.asarray(jax.nn.log_softmax(logits, -1))
        np.testing.assert_allclose(np.asarray(chosen), lp[np.arange(b), tokens], rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_array_equal(np.asarray(top_ids)[:, 0], lp.argmax(-1))
    # Greedy under the mask is the best allowed token.
    rows = sampling.row_arrays([(sampling.SamplingParams(temperature=0), 0, 0)] * b, mask)
    tokens = np.asarray(sample(logits, counts, seen, rows)[0])
    np.testing.assert_array_equal(tokens, np.where(allowed, np.asarray(logits), -np.inf)
                                  .argmax(-1))


# ---- the engine ------------------------------------------------------------------------------


@pytest.mark.parametrize("engine_name", ["smollm2_engine", "tiny_engine"])
def test_json_schema_output_always_validates(engine_name: str,
                                             request: pytest.FixtureRequest) -> None:
    engine: Engine = request.getfixturevalue(engine_name)
    spec = StructuredOutput(json=PERSON)
    prompt = engine.render_chat(ASK) if engine.chat_template else "A person as JSON: "
    outputs = []
    for temperature, seeds in ((0.0, [0]), (1.0, range(6))):
        for seed in seeds:
            r = engine.generate(prompt, temperature=temperature, seed=seed, max_tokens=120,
                                n=1 if temperature == 0 else 4, structured=spec)
            outputs += [(c.text, c.finish_reason) for c in r.choices]
    bad = [o for o in outputs if not _valid(o[0], PERSON) or o[1] != "stop"]
    assert not bad, bad
    assert len({t for t, _ in outputs}) > 10  # sampled: the seeds give different documents
    # The control: the same requests, free, do not all validate.
    free = [engine.generate(prompt, temperature=1.0, seed=s, max_tokens=60).text
            for s in range(4)]
    assert not all(_valid(t, PERSON) for t in free)


def test_regex_choice_and_grammars(smollm2_engine: Engine) -> None:
    e = smollm2_engine
    phone = r"\(\d{3}\) \d{3}-\d{4}"
    for seed in range(4):
        text = e.generate("Call me at", temperature=1.0, seed=seed, max_tokens=30,
                          structured=StructuredOutput(regex=phone)).text
        assert re.fullmatch(phone, text), text
    choices = ("yes", "no", "it depends")
    r = e.generate("Is the sky blue? Answer:", temperature=1.0, seed=3, max_tokens=10, n=8,
                   structured=StructuredOutput(choice=choices))
    assert {c.text for c in r.choices} <= set(choices)
    assert all(c.finish_reason == "stop" for c in r.choices)
    lark = 'start: "SELECT " COL " FROM t"\nCOL: "a" | "b" | "a, b"'
    gbnf = 'root ::= "SELECT " col " FROM t"\ncol ::= "a" | "b" | "a, b"'
    for grammar in (lark, gbnf):
        for seed in range(3):
            text = e.generate("SQL:", temperature=1.0, seed=seed, max_tokens=20,
                              structured=StructuredOutput(grammar=grammar)).text
            assert text in ("SELECT a FROM t", "SELECT b FROM t", "SELECT a, b FROM t")


def test_a_grammar_allowing_the_greedy_text_changes_nothing(smollm2_engine: Engine) -> None:
    """A constrained step runs as two programs (forward, then sampling with the masks), a free
    one as one: held to each other, a grammar whose only text is the free greedy text gives its
    very tokens and logprobs."""
    e = smollm2_engine
    free = e.generate("The capital of France is", temperature=0, max_tokens=10,
                      ignore_eos=True, logprobs=3).choices[0]
    bound = e.generate("The capital of France is", temperature=0, max_tokens=10,
                       ignore_eos=True, logprobs=3,
                       structured=StructuredOutput(choice=(free.text,))).choices[0]
    assert bound.token_ids == free.token_ids and bound.text == free.text
    for a, b in zip(free.logprobs, bound.logprobs, strict=True):
        assert a.token_id == b.token_id and [t for t, _ in a.top] == [t for t, _ in b.top]
        np.testing.assert_allclose([a.logprob, *(v for _, v in a.top)],
                                   [b.logprob, *(v for _, v in b.top)], atol=1e-5)
    # The control: a grammar that forbids the greedy text changes it.
    other = e.generate("The capital of France is", temperature=0, max_tokens=10,
                       structured=StructuredOutput(regex=r"[A-Z][a-z]+\.")).text
    assert other != free.text and re.fullmatch(r"[A-Z][a-z]+\.", other)


def test_constrained_and_free_streams_share_steps(smollm2_engine: Engine) -> None:
    e = smollm2_engine
    free_prompts = ["Once upon a time", "def fibonacci(n):", "List three colors:"]

    def free(p: str) -> list[int]:
        return e.generate(p, temperature=0, max_tokens=24, ignore_eos=True).choices[0].token_ids

    def bound(seed: int) -> str:
        return e.generate(e.render_chat(ASK), temperature=1.0, seed=seed, max_tokens=120,
                          structured=StructuredOutput(json=PERSON)).text

    alone = [free(p) for p in free_prompts], [bound(s) for s in range(3)]
    steps = e.stats_snapshot().decode_steps
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        f = [pool.submit(free, p) for p in free_prompts]
        b = [pool.submit(bound, s) for s in range(3)]
        together = [x.result() for x in f], [x.result() for x in b]
    assert together == alone
    assert all(_valid(t, PERSON) for t in together[1])
    n_tokens = sum(map(len, together[0])) + sum(len(e.prepare_prompt(t, False))
                                                 for t in together[1])
    assert e.stats_snapshot().decode_steps - steps < n_tokens / 2  # they shared steps


@pytest.mark.parametrize("spec,says", [
    (StructuredOutput(json={"type": "strin"}), "strin"),
    (StructuredOutput(json={"$ref": "#/nowhere"}), "nowhere"),
    (StructuredOutput(json="{not json"), "not valid JSON"),
    (StructuredOutput(regex="a(b"), "unclosed group"),
    (StructuredOutput(grammar="start: undefined_rule"), "undefined_rule"),
    (StructuredOutput(grammar='root ::= "a" ('), "GBNF"),
    (StructuredOutput(choice=()), "choices"),
    (StructuredOutput(regex="a", choice=("a",)), "exactly one"),
])
def test_a_constraint_that_cannot_compile_says_why(smollm2_engine: Engine,
                                                   spec: StructuredOutput, says: str) -> None:
    with pytest.raises(InvalidRequestError, match=re.escape(says)) as info:
        smollm2_engine.generate("hi", max_tokens=4, structured=spec)
    assert info.value.param == "structured_outputs"


# ---- over HTTP -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(smollm2_engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(smollm2_engine)) as c:
        yield c


@pytest.fixture(scope="module")
def oai(smollm2_engine: Engine) -> Iterator[openai.OpenAI]:
    with serve_in_thread(create_app(smollm2_engine)) as url:
        yield openai.OpenAI(base_url=url, api_key="unused", max_retries=0)


def test_openai_response_format_json_schema(oai: openai.OpenAI) -> None:
    for seed in range(3):
        r = oai.chat.completions.create(
            model="default", messages=ASK, temperature=1.0, seed=seed, max_tokens=120,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
        c = r.choices[0]
        assert c.finish_reason == "stop" and _valid(c.message.content, PERSON), c
    # Any JSON object, streamed: the pieces make one.
    stream = oai.chat.completions.create(model="default", messages=ASK, temperature=0,
                                         max_tokens=150, stream=True,
                                         response_format={"type": "json_object"})
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert isinstance(json.loads(text), dict)


def test_vllm_fields_on_both_routes(client: TestClient) -> None:
    r = client.post("/v1/completions", json={
        "prompt": "The answer is", "max_tokens": 10, "temperature": 1, "seed": 1, "n": 3,
        "structured_outputs": {"choice": ["42", "forty-two"]}})
    assert r.status_code == 200, r.text
    assert {c["text"] for c in r.json()["choices"]} <= {"42", "forty-two"}
    r = client.post("/v1/completions", json={"prompt": "Count:", "max_tokens": 20,
                                             "guided_regex": "[0-9]{2}(, [0-9]{2}){2}"})
    assert re.fullmatch("[0-9]{2}(, [0-9]{2}){2}", r.json()["choices"][0]["text"]), r.text
    r = client.post("/v1/chat/completions", json={
        "messages": ASK, "max_tokens": 120, "temperature": 1, "seed": 5,
        "guided_json": json.dumps(PERSON)})
    assert _valid(r.json()["choices"][0]["message"]["content"], PERSON), r.text
    r = client.post("/v1/chat/completions", json={
        "messages": ASK, "max_tokens": 120, "structured_outputs": {"json": PERSON}})
    assert _valid(r.json()["choices"][0]["message"]["content"], PERSON), r.text


@pytest.mark.parametrize("route,fields,param,says", [
    ("chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/x"}}}}}},
     "response_format", "cannot be compiled"),
    ("completions", {"guided_regex": "(("}, "guided_regex", "cannot be compiled"),
    ("completions", {"guided_json": "{"}, "guided_json", "not valid JSON"),
    ("completions", {"guided_grammar": "root ::= x"}, "guided_grammar", "x"),
    ("chat/completions", {"response_format": {"type": "json_object"},
                          "guided_choice": ["a"]}, "guided_choice", "both constrain"),
    ("completions", {"structured_outputs": {"regex": "a", "json": {}}}, "structured_outputs",
     "exactly one"),
])
def test_bad_constraints_are_400s_and_the_server_serves_on(
        client: TestClient, route: str, fields: dict, param: str, says: str) -> None:
    body = {"prompt": "hi"} if route == "completions" else {"messages": ASK}
    r = client.post(f"/v1/{route}", json={**body, "max_tokens": 4, **fields})
    assert_openai_error(r, 400, param)
    assert says in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2,
                                             "guided_choice": ["ok"]})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ok"


def test_generation_warm_up_can_compile_the_constrained_programs(tiny_llama_dir) -> None:
    """After warm-up with structured=True, neither a free nor a constrained generation (nor
    the two together) compiles anything."""
    from jaxembed import EngineBuilder

    e = EngineBuilder(model=tiny_llama_dir, warmup=False, progress=False,
                      compilation_cache=False, max_num_seqs=2, max_model_len=256).build()
    try:
        e.warmup_generation(structured=True)
        before = e.stats_snapshot().compilations
        spec = StructuredOutput(json={"type": "object", "properties": {
            "n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"],
            "additionalProperties": False})
        r = e.generate("hello", temperature=1.0, seed=0, max_tokens=40, structured=spec)
        assert json.loads(r.text)["n"] in range(10)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(e.generate, "a", temperature=0, max_tokens=8, ignore_eos=True),
                       pool.submit(e.generate, "b", max_tokens=40, structured=spec)]
            [f.result() for f in futures]
        assert e.stats_snapshot().compilations == before
    finally:
        e.shutdown()
