"""OpenAI's completions and chat completions over the engine: requests to sampling settings and
prompts, engine deltas to responses and server-sent-event chunks.

Nothing here computes; it validates, submits to `Engine`, and shapes what comes back. A stream
ends with `data: [DONE]`; usage rides in a last chunk of its own when `stream_options` asks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec
import numpy as np

from jaxembed import tools
from jaxembed.engine import Engine
from jaxembed.errors import EngineError, InvalidRequestError
from jaxembed.generation import Delta, GenerationResult, GenerationStream, TokenLogprob
from jaxembed.grammar import KINDS, StructuredOutput
from jaxembed.protocol import (
    split_input,
)
from jaxembed.sampling import SamplingParams
from jaxembed.work import EmbeddingFuture

from .wire import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionUsage,
    FunctionCall,
    ToolCallDelta,
    ToolCallOut,
    TopLogprob,
)

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for the completions route
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for the completions route
DONE = b"data: [DONE]\n\n"


def sse(payload: msgspec.Struct | dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


def _usage(prompt: int, completion: int) -> CompletionUsage:
    return CompletionUsage(prompt_tokens=prompt, completion_tokens=completion,
                           total_tokens=prompt + completion)


@dataclasses.dataclass
class _Started:
    """A completion request once validated and submitted."""

    model: str
    streams: list[GenerationStream]  # one a prompt; none when max_tokens 0 scores the prompts
    echoes: list[str]  # each prompt as sent, or "" without echo
    ids: list[np.ndarray]  # each prompt's token ids
    scores: EmbeddingFuture | None  # the prompts' PromptScores, when echo asks for logprobs


def _unsupported(param: str, why: str) -> InvalidRequestError:
    return InvalidRequestError(why, param=param, code="unsupported_parameter")


RESPONSE_FORMATS = ("text", "json_object", "json_schema")
# vLLM's older names of structured_outputs' keys.
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}


def _response_format(raw: dict[str, Any]) -> StructuredOutput | None:
    """OpenAI's response_format: text (free), any JSON object, or a JSON schema."""
    kind = raw.get("type", "text")
    if kind not in RESPONSE_FORMATS:
        raise InvalidRequestError(f"'response_format.type' must be one of {list(RESPONSE_FORMATS)}"
                                  f"; got {kind!r}", param="response_format")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput(json_object=True, param="response_format")
    spec = raw.get("json_schema")
    if not isinstance(spec, dict) or "schema" not in spec:
        raise InvalidRequestError(
            "'response_format' of type 'json_schema' needs 'json_schema': {'name': ..., "
            "'schema': {...}}, the schema the answer must follow", param="response_format")
    return StructuredOutput(json=spec["schema"], param="response_format")


def _structured(req: CompletionRequest | ChatCompletionRequest) -> StructuredOutput | None:
    """What the request constrains its text to, from whichever field sets it (at most one)."""
    found: list[StructuredOutput] = []
    if req.response_format is not None:
        spec = _response_format(req.response_format)
        if spec is not None:
            found.append(spec)
    if req.structured_outputs is not None:
        so = req.structured_outputs
        unknown = sorted(set(so) - set(KINDS))
        if unknown:
            raise InvalidRequestError(f"'structured_outputs' does not take {unknown[0]!r}; it "
                                      f"takes one of {list(KINDS)}", param="structured_outputs")
        set_ = [k for k in KINDS if so.get(k) not in (None, False)]
        if len(set_) != 1:
            raise InvalidRequestError(f"'structured_outputs' must set exactly one of "
                                      f"{list(KINDS)}", param="structured_outputs")
        value = so[set_[0]]
        found.append(StructuredOutput(**{set_[0]: tuple(value) if isinstance(value, list)
                                         else value}, param="structured_outputs"))
    for name, kind in GUIDED_FIELDS.items():
        value = getattr(req, name)
        if value is not None:
            found.append(StructuredOutput(**{kind: tuple(value) if isinstance(value, list)
                                             else value}, param=name))
    if len(found) > 1:
        raise InvalidRequestError(
            f"'{found[0].param}' and '{found[1].param}' both constrain the output; send one",
            param=found[1].param)
    return found[0] if found else None


@dataclasses.dataclass(frozen=True)
class _ToolUse:
    """A chat request's tools: the form calls are read in (None: no calls are read), and the
    grammar tool_choice 'required' or a named function generates under."""

    tools: list[dict[str, Any]]
    fmt: str | None
    grammar: StructuredOutput | None


def _tool_use(engine: Engine, req: ChatCompletionRequest) -> _ToolUse:
    offered = tools.check_tools(req.tools) if req.tools else []
    mode, callable_ = tools.chosen_tools(offered, req.tool_choice)
    fmt = engine.generation.tool_format if offered else None
    grammar = None
    if mode == "required" and fmt is not None:
        grammar = tools.call_grammar(callable_, fmt, req.parallel_tool_calls is not False)
    return _ToolUse(offered, fmt if mode != "none" else None, grammar)


def _constraint(req: CompletionRequest | ChatCompletionRequest,
                tool_use: _ToolUse | None) -> StructuredOutput | None:
    """The request's one constraint: its structured-output field's, or its required call's."""
    structured = _structured(req)
    if tool_use is None or tool_use.grammar is None:
        return structured
    if structured is not None:
        raise InvalidRequestError(f"'tool_choice' and '{structured.param}' both constrain the "
                                  "output; send one", param=structured.param)
    return tool_use.grammar


def _sampling(engine: Engine, req: CompletionRequest | ChatCompletionRequest,
              max_tokens: int | None, logprobs: int | None,
              structured: StructuredOutput | None = None, reads_calls: bool = False
              ) -> SamplingParams:
    """reads_calls: tool calls are read from the text."""
    if req.stream_options is not None and not req.stream:
        raise InvalidRequestError("'stream_options' is only allowed with 'stream': true",
                                  param="stream_options")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    fields: dict[str, Any] = dict(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k, min_p=req.min_p,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty, seed=req.seed, n=req.n, stop=tuple(stop),
        stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=req.ignore_eos,
        logprobs=logprobs, skip_special_tokens=req.skip_special_tokens,
        logit_bias=req.logit_bias, structured=structured)
    if reads_calls:
        # A call's markers may be special tokens: they stay in the text the calls are read from.
        fields["skip_special_tokens"] = False
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens
    return engine.sampling_params(**fields)


async def _sampling_off_loop(engine: Engine, req: CompletionRequest | ChatCompletionRequest,
                             max_tokens: int | None, logprobs: int | None,
                             tool_use: _ToolUse | None = None) -> SamplingParams:
    """`_sampling`, in a thread when a grammar is compiled (1-2 ms; the first also builds the
    grammar engine's view of the vocabulary: 0.4 s for 49k tokens)."""
    structured = _constraint(req, tool_use)
    args = (engine, req, max_tokens, logprobs, structured,
            tool_use is not None and tool_use.fmt is not None)
    if structured is None:
        return _sampling(*args)
    return await asyncio.to_thread(_sampling, *args)


def _tool_finish(reason: str | None, calls: Sequence[tools.ToolCall]) -> str | None:
    """OpenAI's finish reason: 'tool_calls' where the answer ended with calls."""
    return "tool_calls" if calls and reason == "stop" else reason


def _room(engine: Engine, prompt: np.ndarray) -> int:
    """The default length of a chat answer: the rest of the context."""
    return max(1, engine.max_model_len - len(prompt))


def _prompts(raw: object) -> list[str | list[int]]:
    """The prompts of a request: the embeddings input forms, one choice set per prompt."""
    try:
        texts, seqs = split_input(raw)
    except InvalidRequestError as e:
        e.message = e.message.replace("'input'", "'prompt'").replace("input[", "prompt[")
        e.param = "prompt"
        raise
    return list(texts) if texts is not None else list(seqs or [])


async def _merge(streams: Sequence[GenerationStream]) -> AsyncIterator[tuple[int, Delta]]:
    """Deltas of several streams as they come, tagged with the stream's position."""
    if len(streams) == 1:
        async for d in streams[0]:
            yield 0, d
        return
    iters = [aiter(s) for s in streams]
    tasks = {asyncio.ensure_future(anext(it)): i for i, it in enumerate(iters)}
    try:
        while tasks:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                i = tasks.pop(t)
                try:
                    delta = t.result()
                except StopAsyncIteration:
                    continue
                tasks[asyncio.ensure_future(anext(iters[i]))] = i
                yield i, delta
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.cancel()


def _token_text(engine: Engine, token: int) -> str:
    return engine.tokenizer.decode([token], skip_special_tokens=False)


class Completions:
    """The two generation routes of one engine."""

    def __init__(self, engine: Engine, idle_timeout: float | None = None) -> None:
        self.engine = engine
        self.idle_timeout = idle_timeout  # see GenerationStream.idle_timeout

    def _submit(self, ids: np.ndarray, params: SamplingParams) -> GenerationStream:
        stream = self.engine.submit_generation(ids, params, asyncio.get_running_loop())
        stream.idle_timeout = self.idle_timeout
        return stream

    # ---- /v1/completions ----

    async def _start_completion(self, req: CompletionRequest) -> _Started:
        engine = self.engine
        model = engine.resolve_model(req.model)
        engine.require("generate")
        if req.suffix:
            raise _unsupported("suffix", "'suffix' (insertion) is not supported; leave it out")
        if req.best_of is not None and req.best_of != req.n:
            raise _unsupported("best_of", "'best_of' is not supported beyond 'n'; leave it out")
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise InvalidRequestError(f"'logprobs' must be between 0 and {MAX_COMPLETION_LOGPROBS}"
                                      f"; got {req.logprobs}", param="logprobs")
        # max_tokens 0 scores the prompt without generating (as vLLM): only with echo, which
        # returns the prompt and, with logprobs, its tokens' log-probabilities.
        if req.max_tokens == 0 and not req.echo:
            raise InvalidRequestError(
                "'max_tokens' 0 scores the prompt without generating, which needs 'echo': true "
                "(with 'logprobs' for the prompt's log-probabilities); otherwise ask for at "
                "least 1 token", param="max_tokens")
        score_only = req.max_tokens == 0
        params = await _sampling_off_loop(
            engine, req, 1 if score_only else DEFAULT_COMPLETION_TOKENS
            if req.max_tokens is None else req.max_tokens, req.logprobs)
        prompts = _prompts(req.prompt)
        ids = [await asyncio.to_thread(engine.prepare_prompt, p) for p in prompts]
        if score_only:
            for i in ids:
                engine.generation.check_length(i, 0)
        # The prompt as sent: a text as it is (the tokenizer's round trip may differ, and a
        # special token written in it stays), token ids decoded as the request decodes text.
        echoes = [("" if not req.echo else p if isinstance(p, str) else engine.tokenizer.decode(
            list(map(int, p)), skip_special_tokens=req.skip_special_tokens)) for p in prompts]
        # An echoed prompt's log-probabilities come from a prefill-only step of their own,
        # batched with the embeddings, while the generation runs.
        scores = engine.submit_scores(ids) if req.echo and req.logprobs is not None else None
        streams: list[GenerationStream] = []
        try:
            if not score_only:
                for i in ids:
                    streams.append(self._submit(i, params))
        except EngineError:
            for s in streams:
                s.cancel()
            if scores is not None:
                scores.cancel()
            raise
        return _Started(model, streams, echoes, ids, scores)

    async def _prompt_logprobs(self, req: CompletionRequest, started: _Started
                               ) -> list[CompletionLogprobs | None]:
        """Each echoed prompt's tokens with their log-probabilities (None where not asked)."""
        if started.scores is None:
            return [None] * len(started.ids)
        try:
            scores = await asyncio.wrap_future(started.scores)
        finally:
            started.scores.cancel()  # when the client left first
        top = req.logprobs or 0
        out = []
        for ids, sc in zip(started.ids, scores, strict=True):
            first = _token_text(self.engine, int(ids[0]))
            head = CompletionLogprobs(tokens=[first], token_logprobs=[None], top_logprobs=[None],
                                      text_offset=[0])
            out.append(head + self._completion_logprobs(sc.entries(ids, top), len(first)))
        return out

    async def completion(self, req: CompletionRequest) -> CompletionResponse:
        started = await self._start_completion(req)
        streams = started.streams
        try:
            prompt_lps = await self._prompt_logprobs(req, started)
            results = [s.collect([d async for d in s]) for s in streams]
        finally:
            # Reading stops at the first stream that fails or is cancelled (the client left):
            # the prompts not yet read must stop too, or they run on and hold their slots.
            for s in streams:
                s.cancel()
        return self._completion_response(req, started, results, prompt_lps)

    def _completion_response(self, req: CompletionRequest, started: _Started,
                             results: list[GenerationResult],
                             prompt_lps: list[CompletionLogprobs | None]) -> CompletionResponse:
        echoes = started.echoes
        choices = []
        if not results:  # the prompts scored alone (max_tokens 0)
            for p in range(len(started.ids)):
                for c in range(req.n):
                    choices.append(CompletionChoice(
                        index=p * req.n + c, text=echoes[p], logprobs=prompt_lps[p],
                        finish_reason="length"))
            n = sum(len(i) for i in started.ids)
            return CompletionResponse(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()),
                                      model=started.model, choices=choices, usage=_usage(n, 0))
        for p, result in enumerate(results):
            for c in result.choices:
                lp = None
                if req.logprobs is not None:
                    lp = self._completion_logprobs(c.logprobs, len(echoes[p]))
                    lp = lp if prompt_lps[p] is None else prompt_lps[p] + lp
                choices.append(CompletionChoice(
                    index=p * req.n + c.index, text=echoes[p] + c.text, logprobs=lp,
                    finish_reason=c.finish_reason))
        usage = _usage(sum(r.prompt_tokens for r in results),
                       sum(r.completion_tokens for r in results))
        return CompletionResponse(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()),
                                  model=started.model, choices=choices, usage=usage)

    def _completion_logprobs(self, entries: Sequence[TokenLogprob], offset: int = 0
                             ) -> CompletionLogprobs:
        tokens, lps, tops, offsets = [], [], [], []
        for e in entries:
            text = _token_text(self.engine, e.token_id)
            tokens.append(text)
            lps.append(e.logprob)
            tops.append({_token_text(self.engine, t): lp for t, lp in e.top})
            offsets.append(offset)
            offset += len(text)
        return CompletionLogprobs(tokens=tokens, token_logprobs=lps, top_logprobs=tops,
                                  text_offset=offsets)

    async def completion_stream(self, req: CompletionRequest) -> AsyncIterator[bytes]:
        """Validate and start now (errors raise before any byte is sent); iterate for SSE."""
        started = await self._start_completion(req)
        return self._completion_events(req, started)

    async def _completion_events(self, req: CompletionRequest, started: _Started
                                 ) -> AsyncIterator[bytes]:
        rid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), started.model
        streams, echoes = started.streams, started.echoes
        offsets: dict[int, int] = {}
        try:
            prompt_lps = await self._prompt_logprobs(req, started)
            for p, echo in enumerate(echoes):
                for j in range(req.n):
                    if echo or prompt_lps[p] is not None:
                        yield sse(CompletionResponse(
                            id=rid, created=created, model=model,
                            choices=[CompletionChoice(
                                index=p * req.n + j, text=echo, logprobs=prompt_lps[p],
                                finish_reason=None if streams else "length")]))
            async for p, d in _merge(streams):
                index = p * req.n + d.index
                if not (d.text or d.finish_reason or d.logprobs):
                    continue
                lp = None
                if req.logprobs is not None:
                    lp = self._completion_logprobs(d.logprobs, offsets.get(index, len(echoes[p])))
                    offsets[index] = (lp.text_offset[-1] + len(lp.tokens[-1]) if lp.tokens
                                      else offsets.get(index, 0))
                yield sse(CompletionResponse(
                    id=rid, created=created, model=model,
                    choices=[CompletionChoice(index=index, text=d.text, logprobs=lp,
                                              finish_reason=d.finish_reason)]))
            if req.stream_options and req.stream_options.include_usage:
                prompt = (sum(s.prompt_tokens for s in streams) if streams
                          else sum(len(i) for i in started.ids))
                yield sse(CompletionResponse(
                    id=rid, created=created, model=model, choices=[],
                    usage=_usage(prompt, sum(s.completion_tokens for s in streams))))
        except EngineError as e:
            yield sse({"error": e.to_dict()})
        finally:
            for s in streams:
                s.cancel()
        yield DONE

    # ---- /v1/chat/completions ----

    async def _start_chat(self, req: ChatCompletionRequest
                          ) -> tuple[str, GenerationStream, str | None]:
        """(model, stream, the form tool calls are read in, or None)."""
        engine = self.engine
        model = engine.resolve_model(req.model)
        engine.require("generate")
        tool_use = _tool_use(engine, req)
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidRequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        # The older name is checked even where the newer one wins: a value sent is never ignored.
        if req.max_completion_tokens is not None and req.max_tokens is not None \
                and req.max_tokens < 1:
            raise InvalidRequestError(f"'max_tokens' must be an integer of at least 1; got "
                                      f"{req.max_tokens}", param="max_tokens")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        ids = await asyncio.to_thread(engine.chat_prompt, req.messages,
                                      req.add_generation_prompt, req.chat_template_kwargs or {},
                                      tool_use.tools or None)
        limit = req.max_completion_tokens if req.max_completion_tokens is not None \
            else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        try:
            params = await _sampling_off_loop(
                engine, req, _room(engine, ids) if limit is None else limit, logprobs, tool_use)
        except InvalidRequestError as e:
            if e.param == "max_tokens":
                e.param = param
                e.message = e.message.replace("'max_tokens'", f"'{param}'")
            raise
        return model, self._submit(ids, params), tool_use.fmt

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        model, stream, fmt = await self._start_chat(req)
        result = stream.collect([d async for d in stream])
        choices = []
        for c in result.choices:
            content, calls = tools.parse(c.text, fmt) if fmt else (c.text, [])
            message = ChatMessageOut(content=content, tool_calls=[
                ToolCallOut(id=t.id, function=FunctionCall(name=t.name, arguments=t.arguments))
                for t in calls] or None)
            choices.append(ChatChoice(
                index=c.index, message=message,
                logprobs=self._chat_logprobs(c.logprobs) if req.logprobs else None,
                finish_reason=_tool_finish(c.finish_reason, calls)))
        return ChatCompletionResponse(
            id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model,
            choices=choices, usage=_usage(result.prompt_tokens, result.completion_tokens))

    def _chat_logprobs(self, entries: Sequence[TokenLogprob]) -> ChatLogprobs:
        def top(token: int, lp: float) -> TopLogprob:
            text = _token_text(self.engine, token)
            return TopLogprob(token=text, logprob=lp, bytes=list(text.encode()))

        return ChatLogprobs(content=[
            ChatTokenLogprob(**msgspec.structs.asdict(top(e.token_id, e.logprob)),
                             top_logprobs=[top(t, lp) for t, lp in e.top]) for e in entries])

    async def chat_stream(self, req: ChatCompletionRequest) -> AsyncIterator[bytes]:
        model, stream, fmt = await self._start_chat(req)
        return self._chat_events(req, model, stream, fmt)

    async def _chat_events(self, req: ChatCompletionRequest, model: str,
                           stream: GenerationStream, fmt: str | None) -> AsyncIterator[bytes]:
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        # Each choice's text split into content and tool calls as they complete.
        splitters = [tools.ToolStream(fmt) for _ in range(req.n)] if fmt else None

        def chunk(choice: ChatChunkChoice) -> bytes:
            return sse(ChatCompletionChunk(id=rid, created=created, model=model,
                                           choices=[choice]))
        try:
            for i in range(req.n):
                yield chunk(ChatChunkChoice(index=i, delta=ChatDelta(role="assistant",
                                                                    content="")))
            async for d in stream:
                text, calls, finish = d.text, [], d.finish_reason
                if splitters is not None:
                    split = splitters[d.index]
                    text, calls = split.add(d.text)
                    if finish is not None:
                        more, last = split.finish()
                        text, calls = text + more, calls + last
                        finish = _tool_finish(finish, split.calls)
                if not (text or calls or finish or d.logprobs):
                    continue
                first = len(splitters[d.index].calls) - len(calls) if splitters else 0
                delta = ChatDelta(content=text or None, tool_calls=[
                    ToolCallDelta(index=first + k, id=t.id,
                                  function=FunctionCall(name=t.name, arguments=t.arguments))
                    for k, t in enumerate(calls)] or None)
                yield chunk(ChatChunkChoice(
                    index=d.index, delta=delta,
                    logprobs=self._chat_logprobs(d.logprobs) if req.logprobs else None,
                    finish_reason=finish))
            if req.stream_options and req.stream_options.include_usage:
                yield sse(ChatCompletionChunk(
                    id=rid, created=created, model=model, choices=[],
                    usage=_usage(stream.prompt_tokens, stream.completion_tokens)))
        except EngineError as e:
            yield sse({"error": e.to_dict()})
        finally:
            stream.cancel()
        yield DONE
