"""The host side of generation: streams of results, incremental text, stop strings, chat templates.

The engine thread samples token ids; everything here turns them into what a caller reads. Text is
decoded incrementally against a little context, so a character spread over several tokens (an emoji
in byte-level BPE) is emitted whole once its last byte arrives, never as U+FFFD; text that could be
the start of a stop string is held back until it either completes the stop string (and is dropped)
or cannot anymore (and is released).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import queue
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

from tokenizers import Tokenizer

from jaxembed.errors import InvalidRequestError, RequestTimeoutError

# Roles a chat message may take.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class FinishReason:
    STOP = "stop"  # a stop token or stop string
    LENGTH = "length"  # max_tokens, or the end of the model's context


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's logprob and the top alternatives (most likely first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class Delta:
    """What one choice produced since its last delta. `finish_reason` is set on its last one."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None


@dataclasses.dataclass
class Choice:
    index: int
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None


@dataclasses.dataclass
class GenerationResult:
    """A whole generation: one choice per `n`, and the token counts."""

    choices: list[Choice]
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)

    @property
    def text(self) -> str:
        return self.choices[0].text


class GenerationStream:
    """Deltas of one request as the engine produces them, to read from a thread (iterate) or an
    event loop (async iterate). Closing or cancelling it tells the engine to stop the request
    and free its slots at its next step."""

    _END = object()

    def __init__(self, n: int, prompt_tokens: int,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.n = n
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self._loop = loop
        self._sync: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._async: asyncio.Queue[Any] | None = asyncio.Queue() if loop else None
        self._cancelled = threading.Event()
        self._open = n
        # Async readers only: seconds without a delta before the request is cancelled (None:
        # wait forever). A limit on silence, not on length: under overload a request may wait
        # for a slot, and an answer that keeps coming may rightly take minutes.
        self.idle_timeout: float | None = None

    # ---- the engine's side ----

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _put(self, item: Any) -> None:
        if self._loop is None:
            self._sync.put(item)
            return
        assert self._async is not None
        try:
            self._loop.call_soon_threadsafe(self._async.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening anymore
            self._cancelled.set()

    def push(self, delta: Delta) -> None:
        self.completion_tokens += len(delta.token_ids)
        self._put(delta)
        if delta.finish_reason is not None:
            self._open -= 1
            if self._open == 0:
                self._put(self._END)

    def fail(self, error: BaseException) -> None:
        self._put(error)

    # ---- the caller's side ----

    def cancel(self) -> None:
        self._cancelled.set()

    close = cancel

    def __iter__(self) -> Iterator[Delta]:
        while True:
            item = self._sync.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def __aiter__(self) -> AsyncIterator[Delta]:
        assert self._async is not None, "this stream was made for a thread; iterate it plainly"
        try:
            while True:
                try:
                    async with asyncio.timeout(self.idle_timeout):
                        item = await self._async.get()
                except TimeoutError:
                    raise RequestTimeoutError(
                        f"no token came within this server's limit of {self.idle_timeout:g} s, "
                        "so the request was cancelled: the server is too busy (the request may "
                        "have waited that long for a free sequence slot); retry later or on "
                        "another replica"
                    ) from None
                if item is self._END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # the reader stopped early (or was cancelled): the engine can stop too
            self.cancel()

    def collect(self, deltas: Sequence[Delta]) -> GenerationResult:
        choices = [Choice(i) for i in range(self.n)]
        for d in deltas:
            c = choices[d.index]
            c.text += d.text
            c.token_ids.extend(d.token_ids)
            c.logprobs.extend(d.logprobs)
            c.finish_reason = d.finish_reason or c.finish_reason
        return GenerationResult(choices, self.prompt_tokens)


class IncrementalDetokenizer:
    """Text of generated ids as they come, decoded against the tokens just before them.

    Decoding a lone token loses what depends on its neighbours (SentencePiece's leading space,
    bytes of a character split over tokens); decoding the window [prefix, new) and subtracting
    the text of [prefix, read) keeps both right. A window that ends mid-character (U+FFFD at its
    end) waits for more tokens.
    """

    CONTEXT = 6  # prompt tokens to start from

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special: bool) -> None:
        self.tok = tokenizer
        self.skip = skip_special
        self.ids = [int(i) for i in prompt_ids[-self.CONTEXT:]]
        self.prefix = 0
        self.read = len(self.ids)

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end: whatever is still held (an incomplete character stays U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=self.skip)
        now = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=self.skip)
        if len(now) <= len(before) and not final:
            return ""
        if now.endswith("\ufffd") and not final:
            return ""
        # Keep the window short: the new text starts a fresh prefix.
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before):] if now.startswith(before) else now


class StopStrings:
    """Releases text as it grows, holding back a tail that could still begin a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""
        self.sent = 0

    def add(self, piece: str) -> tuple[str, bool]:
        """(text to release now, whether a stop string was hit). On a hit the text ends before
        the stop string, which is not sent."""
        start = max(0, self.sent - max((len(s) for s in self.stops), default=0))
        self.text += piece
        if not self.stops:
            return self._release(len(self.text)), False
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            return self._release(min(hits)), True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:n]):
                    hold = n
                    break
        return self._release(len(self.text) - hold), False

    def flush(self) -> str:
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        end = max(end, self.sent)
        out = self.text[self.sent:end]
        self.sent = end
        return out


# ---- chat templates --------------------------------------------------------------------------


def _raise(message: str) -> None:
    raise InvalidRequestError(f"the chat template refused the messages: {message}",
                              param="messages", code="invalid_value")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


# The names a chat template is rendered with: the renderer's own arguments and helpers.
RESERVED_TEMPLATE_NAMES = frozenset({"messages", "bos_token", "eos_token", "add_generation_prompt",
                                     "raise_exception", "strftime_now"})


class ChatTemplate:
    """A model's Jinja chat template, rendered as transformers renders it (sandboxed, trimmed
    blocks, `raise_exception`, `strftime_now`, `tojson`)."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        env.filters["tojson"] = _tojson
        self.template = env.from_string(source)
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               variables: Mapping[str, Any] | None = None,
               tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt text. variables: more names for the template (a request's
        `chat_template_kwargs`, such as `enable_thinking`); those the renderer sets itself are
        refused, since a value of the caller's would replace the conversation or a helper.
        tools: OpenAI's function tools, passed as `tools` (as transformers passes them)."""
        variables = dict(variables or {})
        taken = sorted(RESERVED_TEMPLATE_NAMES & variables.keys())
        if taken:
            raise InvalidRequestError(
                f"'chat_template_kwargs' may not set {taken[0]!r}: the server sets "
                f"{sorted(RESERVED_TEMPLATE_NAMES)} itself; leave it out (send the messages as "
                "'messages', and 'add_generation_prompt' as a field of its own)",
                param="chat_template_kwargs", code="invalid_value")
        if tools:
            variables["tools"] = tools
        try:
            return self.template.render(messages=messages, bos_token=self.bos_token,
                                        eos_token=self.eos_token,
                                        add_generation_prompt=add_generation_prompt, **variables)
        except InvalidRequestError:
            raise
        except Exception as e:  # a template is code: whatever it raises is about this request
            raise InvalidRequestError(
                f"the chat template failed on these messages: {type(e).__name__}: {e}",
                param="messages", code="invalid_value") from None


def normalize_messages(messages: object) -> list[dict[str, Any]]:
    """Check chat messages and flatten list-of-parts content into text."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("'messages' must be a non-empty list of messages",
                                  param="messages", code="invalid_value")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequestError(f"messages[{i}] must be an object with 'role' and "
                                      "'content'", param="messages", code="invalid_type")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise InvalidRequestError(f"messages[{i}].role must be one of {list(CHAT_ROLES)}; got "
                                      f"{role!r}", param="messages", code="invalid_value")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                        part.get("text"), str):
                    raise InvalidRequestError(
                        f"messages[{i}].content[{j}] must be a text part "
                        "({'type': 'text', 'text': ...}); this model reads text only",
                        param="messages", code="invalid_value")
                parts.append(part["text"])
            content = "\n".join(parts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise InvalidRequestError(f"messages[{i}].content must be a string or a list of text "
                                      "parts", param="messages", code="invalid_type")
        out.append({**m, "role": role, "content": content})
    return out
