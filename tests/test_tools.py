"""Tool calls: tools rendered by the model's own chat template (held to transformers'
`apply_chat_template(..., tools=...)`), calls read back from the text in the template's form
(Hermes `<tool_call>`, Llama 3 JSON), streamed as deltas, and tool_choice "required" or a named
function generated under a grammar so that the call always parses. The round trip runs through
the `openai` client against a tiny random model whose template defines tools.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest
from litestar.testing import TestClient

from jaxembed import Engine, EngineBuilder
from jaxembed.server.app import create_app
from jaxembed.tools import HERMES, LLAMA3_JSON, ToolStream, parse, template_format

from live import serve_in_thread
from test_server import assert_openai_error

# A Hermes template in the shape of Qwen2.5's: tools in a system turn, calls as <tool_call>.
HERMES_TEMPLATE = """\
{%- if tools %}<|im_start|>system
You may call functions. Their signatures:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Call one as:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for tc in message.tool_calls %}
<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

# Llama 3.1's form: the tools in the user turn, a call as one JSON object.
LLAMA3_TEMPLATE = """\
{%- for message in messages %}
{%- if message.role == "user" and tools and loop.last %}<|im_start|>user
Given the following functions, respond with a JSON for a function call with its proper \
arguments. Respond in the format {"name": function name, "parameters": dictionary of argument \
name and its value}.
{% for t in tools %}{{ t | tojson }}
{% endfor %}{{ message.content }}<|im_end|>
{% elif message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{{ {"name": message.tool_calls[0].function.name, \
"parameters": message.tool_calls[0].function.arguments} | tojson }}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>ipython
{{ message.content }}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "additionalProperties": False,
                   "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 12},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "integer", "minimum": -12,
                                                  "maximum": 14}},
        "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, CLOCK]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _model(base: Path, folder: Path, template: str) -> Path:
    shutil.copytree(base, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    config_path.write_text(json.dumps({**config, "chat_template": template}))
    return folder


@pytest.fixture(scope="module")
def hermes_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _model(tiny_llama_dir, tmp_path_factory.mktemp("models") / "tiny-hermes",
                  HERMES_TEMPLATE)


def _engine(path: Path) -> Engine:
    return EngineBuilder(model=path, dtype="float32", max_model_len=1024, warmup=False,
                         progress=False, compilation_cache=False).build()


@pytest.fixture(scope="module")
def hermes(hermes_dir: Path) -> Iterator[Engine]:
    engine = _engine(hermes_dir)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def llama3(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    engine = _engine(_model(tiny_llama_dir, tmp_path_factory.mktemp("models") / "tiny-llama3",
                            LLAMA3_TEMPLATE))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def oai(hermes: Engine) -> Iterator[openai.OpenAI]:
    with serve_in_thread(create_app(hermes)) as url:
        yield openai.OpenAI(base_url=url, api_key="unused", max_retries=0)


def _check_call(call: object, tools: list[dict]) -> None:
    """A call names one of the tools and its arguments follow that tool's schema."""
    fn = call.function  # type: ignore[attr-defined]
    spec = next(t["function"] for t in tools if t["function"]["name"] == fn.name)
    jsonschema.validate(json.loads(fn.arguments), spec["parameters"])
    assert call.type == "function" and call.id.startswith("call_")  # type: ignore[attr-defined]


# ---- reading calls -----------------------------------------------------------------------------


def test_the_template_says_the_form() -> None:
    assert template_format(HERMES_TEMPLATE) == HERMES
    assert template_format(LLAMA3_TEMPLATE) == LLAMA3_JSON
    assert template_format("{% for m in messages %}{{ m.content }}{% endfor %}") is None


CALL = '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}'


@pytest.mark.parametrize("text,content,calls", [
    (f"<tool_call>\n{CALL}\n</tool_call>", None, [("get_weather", {"city": "Oslo",
                                                                   "unit": "celsius"})]),
    (f"Let me look.\n<tool_call>\n{CALL}\n</tool_call>\n<tool_call>{CALL}</tool_call>",
     "Let me look.", [("get_weather", {"city": "Oslo", "unit": "celsius"})] * 2),
    ("<tool_call>\n{not json}\n</tool_call>", "<tool_call>\n{not json}\n</tool_call>", []),
    ("No call here.", "No call here.", []),
    (f"<tool_call>\n{CALL}", None, [("get_weather", {"city": "Oslo", "unit": "celsius"})]),
])
def test_hermes_calls_are_read_whole_and_in_pieces(text: str, content: str | None,
                                                   calls: list) -> None:
    got_content, got = parse(text, HERMES)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    # Streamed in pieces of every size, the same calls come out, and the content around them.
    for size in (1, 3, 7, 1000):
        split = ToolStream(HERMES)
        streamed, found = "", []
        for i in range(0, len(text), size):
            piece, new = split.add(text[i:i + size])
            streamed, found = streamed + piece, found + new
        piece, new = split.finish()
        streamed, found = streamed + piece, found + new
        assert [(c.name, c.arguments) for c in found] == [(c.name, c.arguments) for c in got]
        assert streamed.strip() == (content or "")


def test_llama3_calls_are_read() -> None:
    body = '{"name": "get_time", "parameters": {"zone": 2}}'
    for text in (body, f"<|python_tag|>{body}", f"  {body}"):
        content, calls = parse(text, LLAMA3_JSON)
        assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [
            ("get_time", {"zone": 2})]
        split = ToolStream(LLAMA3_JSON)
        pieces = [split.add(text[i:i + 4]) for i in range(0, len(text), 4)]
        assert all(p == ("", []) for p in pieces)
        assert [c.name for c in split.finish()[1]] == ["get_time"]
    assert parse("The answer is 4.", LLAMA3_JSON) == ("The answer is 4.", [])
    split = ToolStream(LLAMA3_JSON)
    assert split.add("The answer")[0] == "The answer"


# ---- rendering -----------------------------------------------------------------------------


def test_tools_render_as_transformers_renders_them(hermes: Engine, hermes_dir: Path) -> None:
    from transformers import AutoTokenizer

    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"}]
    ours = hermes.generation.render_chat(history, tool_list=TOOLS)
    # transformers takes the arguments as an object (OpenAI sends them as JSON text).
    theirs_history = json.loads(json.dumps(history))
    theirs_history[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris",
                                                                   "unit": "celsius"}
    tok = AutoTokenizer.from_pretrained(hermes_dir)
    theirs = tok.apply_chat_template(theirs_history, tools=TOOLS, tokenize=False,
                                     add_generation_prompt=True)
    assert ours == theirs
    assert '"name": "get_weather"' in ours and "<tool_response>" in ours


# ---- the routes ------------------------------------------------------------------------------


def test_openai_tool_round_trip(oai: openai.OpenAI) -> None:
    """The call (required: generated under the tools' grammar), the tool's result sent back,
    and the final answer."""
    for seed in range(4):
        r = oai.chat.completions.create(model="default", messages=ASK, tools=TOOLS,
                                        tool_choice="required", parallel_tool_calls=False,
                                        temperature=1.0, seed=seed, max_tokens=200)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None
        assert len(c.message.tool_calls) == 1
        _check_call(c.message.tool_calls[0], TOOLS)
    call = c.message.tool_calls[0]
    messages = [*ASK, c.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "21 degrees and sunny"}]
    final = oai.chat.completions.create(model="default", messages=messages, tools=TOOLS,
                                        tool_choice="none", max_tokens=8, temperature=0)
    assert final.choices[0].message.tool_calls is None
    assert isinstance(final.choices[0].message.content, str)
    assert final.choices[0].finish_reason in ("stop", "length")


def test_a_named_function_and_a_streamed_call(oai: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    for seed in range(3):
        r = oai.chat.completions.create(model="default", messages=ASK, tools=TOOLS,
                                        tool_choice=named, temperature=1.0, seed=seed,
                                        max_tokens=200, parallel_tool_calls=False)
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == "get_time"
        _check_call(call, TOOLS)
    want = oai.chat.completions.create(model="default", messages=ASK, tools=TOOLS,
                                       tool_choice="required", temperature=0, max_tokens=300)
    stream = oai.chat.completions.create(model="default", messages=ASK, tools=TOOLS,
                                         tool_choice="required", temperature=0, max_tokens=300,
                                         stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for d in choice.delta.tool_calls or []:
                calls.setdefault(d.index, {"name": "", "arguments": ""})
                calls[d.index]["name"] += d.function.name or ""
                calls[d.index]["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls" == want.choices[0].finish_reason
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == [
        (c.function.name, c.function.arguments) for c in want.choices[0].message.tool_calls]


def test_auto_reads_a_call_the_model_writes(hermes: Engine) -> None:
    """With 'auto' the text is free; a call in it comes back as tool_calls. (A random model
    writes none by itself, so a choice constraint writes one for it.)"""
    text = f"Checking.\n<tool_call>\n{CALL}\n</tool_call>"
    with TestClient(create_app(hermes)) as client:
        for stream in (False, True):
            body = {"messages": ASK, "tools": TOOLS, "max_tokens": 200, "stream": stream,
                    "guided_choice": [text]}
            r = client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            if not stream:
                msg = r.json()["choices"][0]["message"]
                assert msg["content"] == "Checking."
                assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                        for c in msg["tool_calls"]] == [("get_weather", {"city": "Oslo",
                                                                         "unit": "celsius"})]
                assert r.json()["choices"][0]["finish_reason"] == "tool_calls"
                continue
            events = [json.loads(line[6:]) for line in r.text.splitlines()
                      if line.startswith("data: {")]
            content = "".join(e["choices"][0]["delta"].get("content") or ""
                              for e in events if e["choices"])
            deltas = [d for e in events if e["choices"]
                      for d in e["choices"][0]["delta"].get("tool_calls") or []]
            assert content.strip() == "Checking." and len(deltas) == 1
            assert deltas[0]["function"]["name"] == "get_weather"
            # Without tools the same text is plain content.
            r = client.post("/v1/chat/completions", json={**body, "tools": None,
                                                          "stream": False})
            assert r.json()["choices"][0]["message"]["content"] == text


def test_llama3_json_calls(llama3: Engine) -> None:
    with TestClient(create_app(llama3)) as client:
        assert client.get("/info").json()["generation"]["tool_calls"] == LLAMA3_JSON
        for seed in range(3):
            r = client.post("/v1/chat/completions", json={
                "messages": ASK, "tools": TOOLS, "tool_choice": "required", "seed": seed,
                "temperature": 1.0, "max_tokens": 200})
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] == "tool_calls", r.text
            (call,) = choice["message"]["tool_calls"]
            spec = next(t["function"] for t in TOOLS
                        if t["function"]["name"] == call["function"]["name"])
            jsonschema.validate(json.loads(call["function"]["arguments"]), spec["parameters"])


@pytest.mark.parametrize("fields,param,says", [
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools", "letters"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "again"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "not among"),
    ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice", "one of"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format", "both constrain"),
])
def test_bad_tool_requests(hermes: Engine, fields: dict, param: str, says: str) -> None:
    with TestClient(create_app(hermes)) as client:
        r = client.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 4,
                                                      **fields})
        assert_openai_error(r, 400, param)
        assert says in r.json()["error"]["message"]


def test_a_template_without_tools_refuses_them(smollm2_engine: Engine) -> None:
    with TestClient(create_app(smollm2_engine)) as client:
        r = client.post("/v1/chat/completions", json={"messages": ASK, "tools": TOOLS})
        assert_openai_error(r, 400, "tools")
        assert "renders no tools" in r.json()["error"]["message"]
