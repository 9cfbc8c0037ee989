"""Tool calls: tools offered through the model's own chat template, calls read back from its text
in the form that template teaches, and `tool_choice` "required" or a named function enforced by
the structured-output grammar engine so that the call always parses.

Two forms cover the supported families' templates:
- `hermes` (Qwen2.5, Qwen3, SmolLM3, Hermes): `<tool_call>{"name": ..., "arguments": {...}}
  </tool_call>`, any number of them, with text around;
- `llama3_json` (Llama 3.1+): the whole answer is `{"name": ..., "parameters": {...}}`, maybe
  after `<|python_tag|>`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from jaxembed.errors import InvalidRequestError
from jaxembed.grammar import StructuredOutput

HERMES, LLAMA3_JSON = "hermes", "llama3_json"
TOOL_CHOICES = ("none", "auto", "required")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"


def template_format(source: str | None) -> str | None:
    """The tool-call form a chat template teaches (None: it renders no tools)."""
    if not source or "tools" not in source:
        return None
    if _OPEN in source:
        return HERMES
    if "parameters" in source and ("python_tag" in source or "ipython" in source
                                   or '"name"' in source):
        return LLAMA3_JSON
    return None


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A call the model wrote: its id, the function's name and its arguments as JSON text."""

    name: str
    arguments: str
    id: str = dataclasses.field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def _refuse(message: str, param: str = "tools") -> InvalidRequestError:
    return InvalidRequestError(message, param=param, code="invalid_value")


def check_tools(tools: object) -> list[dict[str, Any]]:
    """OpenAI's function tools, checked: [{'type': 'function', 'function': {'name', ...}}]."""
    if not isinstance(tools, list):
        raise _refuse("'tools' must be a list of function tools")
    names = set()
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(
                fn, dict):
            raise _refuse(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                          "'parameters': {...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise _refuse(f"tools[{i}].function.name must be 1 to 64 letters, digits, '_', '.' "
                          f"or '-'; got {name!r}")
        if name in names:
            raise _refuse(f"tools[{i}] names function {name!r} again")
        names.add(name)
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise _refuse(f"tools[{i}].function.parameters must be a JSON schema object")
    return tools


def chosen_tools(tools: list[dict[str, Any]], choice: object) -> tuple[str, list[dict]]:
    """What tool_choice asks for: ('none' | 'auto' | 'required', the tools a call may use)."""
    if choice is None:
        return ("auto" if tools else "none"), tools
    if isinstance(choice, str):
        if choice not in TOOL_CHOICES:
            raise _refuse(f"'tool_choice' must be one of {list(TOOL_CHOICES)} or "
                          f"{{'type': 'function', 'function': {{'name': ...}}}}; got {choice!r}",
                          "tool_choice")
        if choice != "none" and not tools:
            raise _refuse(f"'tool_choice' {choice!r} needs 'tools'", "tool_choice")
        return choice, tools
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and isinstance(
        choice.get("function"), dict) and choice.get("type") == "function" else None
    if name is None:
        raise _refuse("'tool_choice' must be a string or {'type': 'function', 'function': "
                      "{'name': ...}}", "tool_choice")
    named = [t for t in tools if t["function"]["name"] == name]
    if not named:
        raise _refuse(f"'tool_choice' names function {name!r}, which is not among 'tools' "
                      f"({[t['function']['name'] for t in tools]})", "tool_choice")
    return "required", named


def _call_schema(tool: dict[str, Any], args_key: str) -> dict[str, Any]:
    fn = tool["function"]
    return {"type": "object", "additionalProperties": False, "required": ["name", args_key],
            "properties": {"name": {"const": fn["name"]},
                           args_key: fn.get("parameters") or {"type": "object"}}}


def call_grammar(tools: list[dict[str, Any]], fmt: str, parallel: bool) -> StructuredOutput:
    """A grammar whose every text is a call (or, parallel, several) of one of `tools`, in the
    template's form: what tool_choice "required" or a named function generates under."""
    key = "arguments" if fmt == HERMES else "parameters"
    schema = {"anyOf": [_call_schema(t, key) for t in tools]} if len(tools) > 1 else \
        _call_schema(tools[0], key)
    # Compact JSON, as structured outputs write it.
    schema = {**schema, "x-guidance": {"whitespace_flexible": False}}
    call = "%json " + json.dumps(schema)
    if fmt == HERMES:  # Lark string literals, with JSON's escapes
        call = f"{json.dumps(_OPEN + chr(10))} {call} {json.dumps(chr(10) + _CLOSE)}"
    more = ' ("\\n" call)*' if parallel and fmt == HERMES else ""
    return StructuredOutput(grammar=f"start: call{more}\ncall: {call}", param="tool_choice")


def _as_call(obj: Any, args_keys: Sequence[str]) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    for key in args_keys:
        if key in obj:
            args = obj[key]
            return ToolCall(obj["name"], args if isinstance(args, str) else json.dumps(
                args, ensure_ascii=False))
    return None


def parse(text: str, fmt: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a finished answer; a call that does not parse stays in the content,
    as vLLM's parsers leave it."""
    if fmt == HERMES:
        calls: list[ToolCall] = []
        kept: list[str] = []
        pos = 0
        for m in re.finditer(re.escape(_OPEN) + r"(.*?)(?:" + re.escape(_CLOSE) + r"|$)", text,
                             re.S):
            try:
                call = _as_call(json.loads(m.group(1)), ("arguments", "parameters"))
            except ValueError:
                call = None
            if call is None:
                continue
            kept.append(text[pos:m.start()])
            pos = m.end()
            calls.append(call)
        kept.append(text[pos:])
        content = "".join(kept).strip() if calls else text
        return (content or None), calls
    body = text.strip().removeprefix(_PYTHON_TAG).strip()
    if body.startswith("{"):
        try:
            objs = [json.loads(part) for part in body.split(";") if part.strip()]
        except ValueError:
            objs = []
        calls = [c for c in (_as_call(o, ("parameters", "arguments")) for o in objs)
                 if c is not None]
        if calls and len(calls) == len(objs):
            return None, calls
    return text, []


class ToolStream:
    """Splits a streamed answer into content pieces and whole tool calls as they complete:
    text that might begin a call is held back until it does (or cannot anymore)."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.text = ""  # everything so far
        self.sent = 0  # content released up to here
        self.calls: list[ToolCall] = []
        self._json = False  # llama3_json: the answer is a call; hold it all

    def add(self, piece: str) -> tuple[str, list[ToolCall]]:
        """(content to send now, calls completed now)."""
        self.text += piece
        if self.fmt == LLAMA3_JSON:
            head = self.text.lstrip()
            if not head:
                return "", []
            if self._json or head.startswith(("{", _PYTHON_TAG)):
                self._json = True
                return "", []
            if _PYTHON_TAG.startswith(head):  # perhaps the tag, not all here yet
                return "", []
            return self._release(len(self.text)), []
        out, calls = [], []
        while True:
            start = self.text.find(_OPEN, self.sent)
            if start < 0:
                # Hold back a tail that could still begin '<tool_call>'.
                hold = next((n for n in range(min(len(_OPEN) - 1, len(self.text) - self.sent),
                                              0, -1) if self.text.endswith(_OPEN[:n])), 0)
                out.append(self._release(len(self.text) - hold))
                break
            out.append(self._release(start))
            end = self.text.find(_CLOSE, start)
            if end < 0:
                break  # inside a call: wait for its end
            _, found = parse(self.text[start:end + len(_CLOSE)], HERMES)
            self.sent = end + len(_CLOSE)
            if found:
                calls += found
            else:  # not a call after all: it is content
                out.append(self.text[start:self.sent])
        self.calls += calls
        return "".join(out), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the end: what is held back, as calls if it parses as them, else as content."""
        rest = self.text[self.sent:]
        self.sent = len(self.text)
        if not rest.strip():
            return rest if not self.calls else "", []
        content, calls = parse(rest, self.fmt)
        self.calls += calls
        return content or "", calls

    def _release(self, end: int) -> str:
        end = max(end, self.sent)
        out = self.text[self.sent:end]
        self.sent = end
        return out


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates read them: an assistant's tool calls with their arguments
    as objects (OpenAI sends them as JSON text; transformers' templates index into them)."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if m.get("role") == "assistant" and isinstance(calls, list):
            fixed = []
            for c in calls:
                fn = c.get("function") if isinstance(c, Mapping) else None
                if isinstance(fn, Mapping) and isinstance(fn.get("arguments"), str):
                    with contextlib.suppress(ValueError):  # not JSON: the template gets it
                        fn = {**fn, "arguments": json.loads(fn["arguments"])}
                    c = {**c, "function": fn}
                fixed.append(c)
            m = {**m, "tool_calls": fixed}
        out.append(m)
    return out
