"""The OpenAPI description of the completions and chat routes: their request bodies, written by
hand as those of the other routes are (see `openapi.py`), and their event streams.

The ranges are the ones `GenerationFrontend.sampling_params` and the routes check, the message
forms the ones `normalize_messages` takes; the tests hold the schema to that validation at each
bound. What depends on the served model (its context, slots, vocabulary, chat template) is said in
the descriptions and in GET /info.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar.openapi.spec import Reference, Schema

from jaxembed.generation import CHAT_ROLES, RESERVED_TEMPLATE_NAMES
from jaxembed.sampling import MAX_LOGIT_BIAS, TOP_LOGPROBS

from .completions import DEFAULT_COMPLETION_TOKENS, MAX_COMPLETION_LOGPROBS
from .openapi import (
    ARRAY,
    BOOLEAN,
    INTEGER,
    NULL,
    NUMBER,
    OBJECT,
    STRING,
    model_schema,
    only_with,
    operation_with_body,
    optional,
    request_object,
    texts_or_token_ids,
)
from .wire import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    CompletionRequest,
)

# As GenerationFrontend.sampling_params checks them.
MAX_STOP_STRINGS = 16
UNUSED = "Accepted for compatibility with OpenAI's API; unused."


def _integer(**bounds: Any) -> Schema:
    return Schema(type=INTEGER, **bounds)


def _number(**bounds: Any) -> Schema:
    return Schema(type=NUMBER, **bounds)


def _flag(description: str) -> Schema:
    return Schema(type=BOOLEAN, description=description)


def _sampling_properties(max_tokens: str, least: int = 1) -> dict[str, Schema]:
    """The fields both generation routes take (`_SamplingFields`); max_tokens: what it means,
    least: its smallest value."""
    return {
        "model": model_schema(),
        "max_tokens": optional(_integer(minimum=least), max_tokens),
        "temperature": optional(
            _number(minimum=0, maximum=100),
            "Sampling temperature, between 0 and 100; 0 is greedy (always the likeliest token). "
            "Unset: 1."),
        "top_p": optional(
            _number(exclusive_minimum=0, maximum=1),
            "Nucleus sampling: draw only from the likeliest tokens that hold this share of the "
            "probability, in (0, 1]. Unset: 1 (off)."),
        "n": _integer(minimum=1, description="Choices to generate for each prompt; at most this "
                                             "server's sequence slots (GET /info: "
                                             "generation.max_num_seqs)."),
        "stream": _flag("Send the result as server-sent events (text/event-stream), a chunk per "
                        "event, ending with 'data: [DONE]'."),
        "stream_options": optional(
            Schema(type=OBJECT, title="StreamOptions", additional_properties=False, properties={
                "include_usage": Schema(type=BOOLEAN, default=False, description=(
                    "Send the token counts in a last chunk of their own."))}),
            "Options of a stream; only with 'stream': true."),
        "stop": Schema(
            one_of=[Schema(type=STRING, title="Stop string", min_length=1),
                    Schema(type=ARRAY, title="Stop strings", max_items=MAX_STOP_STRINGS,
                           items=Schema(type=STRING, min_length=1)),
                    Schema(type=NULL)],
            description=f"Text that ends a choice where it appears (and is left out of it): a "
                        f"non-empty string or a list of at most {MAX_STOP_STRINGS}."),
        "presence_penalty": _number(
            minimum=-2, maximum=2, description="Lowers (or, negative, raises) the logits of the "
                                               "tokens generated so far by this much, once each."),
        "frequency_penalty": _number(
            minimum=-2, maximum=2, description="Lowers (or, negative, raises) the logits of the "
                                               "tokens generated so far by this much per use."),
        "seed": optional(_integer(minimum=-2**63, maximum=2**63 - 1),
                         "Makes sampling repeatable: the same seed, prompt and settings give "
                         "the same text, alone or among other requests. Unset: random."),
        "user": optional(Schema(type=STRING), UNUSED),
        "logit_bias": optional(
            Schema(type=OBJECT, max_properties=MAX_LOGIT_BIAS,
                   property_names=Schema(type=STRING, pattern=r"^[0-9]+$"),
                   additional_properties=_number(minimum=-100, maximum=100)),
            f"Token id (as a string) -> a bias in [-100, 100] added to that token's logit "
            f"before sampling and before log-probabilities are taken, as OpenAI does: -100 "
            f"bans the token, 100 makes it all but certain. At most {MAX_LOGIT_BIAS} tokens, "
            f"each in the vocabulary."),
        "top_k": _integer(minimum=-1, description="Draw only from the k likeliest tokens; 0 or "
                                                  "-1 (or k at least the vocabulary) is off."),
        "min_p": _number(minimum=0, maximum=1, description=(
            "Draw only from tokens at least this fraction as likely as the likeliest, in [0, 1]; "
            "0 is off.")),
        "repetition_penalty": _number(exclusive_minimum=0, maximum=100, description=(
            "Divides the positive logits (multiplies the negative ones) of the tokens in the "
            "prompt or generated so far, in (0, 100]; 1 is off.")),
        "stop_token_ids": optional(
            Schema(type=ARRAY, items=_integer(minimum=0)),
            "Token ids that end a choice, besides the model's own end tokens; each within "
            "the model's vocabulary."),
        "ignore_eos": _flag("Go on past the model's end tokens, up to the length limit."),
        "skip_special_tokens": _flag("Leave special tokens out of the text."),
        **_structured_properties(),
    }


def _structured_properties() -> dict[str, Schema]:
    """Structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older
    guided_* fields. At most one of them may constrain a request (else 400)."""
    json_schema = Schema(one_of=[Schema(type=OBJECT, title="JSON schema"),
                                 Schema(type=STRING, title="JSON schema as a string")])
    regex = Schema(type=STRING, min_length=1)
    choice = Schema(type=ARRAY, min_items=1, items=Schema(type=STRING, min_length=1))
    grammar = Schema(type=STRING, min_length=1)
    formats = [
        Schema(type=OBJECT, title="Text", required=["type"],
               properties={"type": Schema(type=STRING, enum=["text"])}),
        Schema(type=OBJECT, title="JSON object", required=["type"],
               properties={"type": Schema(type=STRING, enum=["json_object"])}),
        Schema(type=OBJECT, title="JSON schema", required=["type", "json_schema"], properties={
            "type": Schema(type=STRING, enum=["json_schema"]),
            "json_schema": Schema(type=OBJECT, required=["schema"], properties={
                "name": Schema(type=STRING), "description": Schema(type=STRING),
                "schema": Schema(type=OBJECT), "strict": optional(
                    Schema(type=BOOLEAN), "Accepted: the schema is always followed.")})}),
    ]
    how = (" The text then always follows it (unless 'max_tokens' or a stop string cuts it "
           "short): each token is drawn among those that keep it valid. A constraint the "
           "grammar engine cannot compile is a 400 saying why.")
    return {
        "response_format": optional(Schema(one_of=formats), (
            "OpenAI's: plain text, any JSON object, or JSON that follows a schema "
            "({'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}). JSON "
            "is written compactly (no whitespace between tokens of its syntax)." + how)),
        "structured_outputs": optional(
            Schema(type=OBJECT, title="StructuredOutputs", additional_properties=False,
                   min_properties=1, max_properties=1, properties={
                       "json": json_schema, "regex": regex, "choice": choice,
                       "grammar": grammar, "json_object": Schema(type=BOOLEAN, enum=[True])}),
            "vLLM's: exactly one of a JSON schema, a regular expression, a list of strings to "
            "choose from, a grammar (Lark as llguidance reads it, or GBNF as llama.cpp "
            "writes it) or any JSON object." + how),
        "guided_json": optional(json_schema, "vLLM's older name of structured_outputs.json."),
        "guided_regex": optional(regex, "vLLM's older name of structured_outputs.regex."),
        "guided_choice": optional(choice, "vLLM's older name of structured_outputs.choice."),
        "guided_grammar": optional(grammar, "vLLM's older name of structured_outputs.grammar."),
    }


def completion_request_schema() -> Schema:
    properties = {
        "prompt": texts_or_token_ids(
            "Text or token ids to continue, in one of four forms; each item of a list is a prompt "
            "of its own, answered with 'n' choices. Empty strings and empty lists are refused, "
            "and token ids must be within the model's vocabulary."),
        **_sampling_properties(
            f"The most tokens to generate for each choice; with the prompt, at most the model's "
            f"context (GET /info: max_model_len). Unset: {DEFAULT_COMPLETION_TOKENS}. 0, with "
            f"'echo', scores the prompt without generating.", least=0),
        "logprobs": optional(
            _integer(minimum=0, maximum=MAX_COMPLETION_LOGPROBS),
            f"Return each generated token's logprob and those of this many likeliest "
            f"alternatives (at most {MAX_COMPLETION_LOGPROBS}); with 'echo', each prompt "
            f"token's too (given the tokens before it; null for the first). Unset: none."),
        "echo": _flag("Start each choice's text with its prompt's, as sent."),
        "best_of": optional(_integer(minimum=1),
                             "Accepted only equal to 'n': no more choices are generated than "
                             "returned."),
        "suffix": optional(Schema(type=STRING, max_length=0),
                           "Not supported (no insertion): only '' (or null) is accepted."),
    }
    # max_tokens 0 only scores an echoed prompt.
    zero = Schema(schema_if=Schema(required=["max_tokens"],
                                   properties={"max_tokens": Schema(const=0)}),
                  then=Schema(required=["echo"], properties={"echo": Schema(const=True)}))
    return request_object(CompletionRequest, properties,
                          [only_with("stream_options", "stream", True), zero])


def _message_schema() -> Schema:
    part = Schema(type=OBJECT, title="Text part", required=["type", "text"], properties={
        "type": Schema(type=STRING, enum=["text"]), "text": Schema(type=STRING)})
    content = [Schema(type=STRING, title="Text"),
               Schema(type=ARRAY, title="Text parts", items=part)]
    others = [r for r in CHAT_ROLES if r != "assistant"]
    return Schema(
        description="A message: its role and content, a text or a list of text parts (joined "
                    "by newlines); only an assistant's content may be null or left out. Other "
                    "fields (such as 'name') are passed to the chat template as they are.",
        one_of=[
            Schema(type=OBJECT, title="Message", required=["role", "content"], properties={
                "role": Schema(type=STRING, enum=others), "content": Schema(one_of=content)}),
            Schema(type=OBJECT, title="Assistant message", required=["role"], properties={
                "role": Schema(type=STRING, enum=["assistant"]),
                "content": Schema(one_of=[*content, Schema(type=NULL)])}),
        ])


def _tool_schema() -> Schema:
    return Schema(type=OBJECT, title="Tool", required=["type", "function"], properties={
        "type": Schema(type=STRING, enum=["function"]),
        "function": Schema(type=OBJECT, required=["name"], properties={
            "name": Schema(type=STRING, pattern=r"^[A-Za-z0-9_.-]{1,64}$"),
            "description": Schema(type=STRING),
            "parameters": Schema(type=OBJECT, description="A JSON schema of the arguments."),
            "strict": optional(Schema(type=BOOLEAN), "Accepted: required calls always follow "
                                                     "the schema.")})})


def chat_completion_request_schema() -> Schema:
    limit = ("The most tokens to generate for each choice; with the prompt, at most the model's "
             "context (GET /info: max_model_len). Unset: the rest of the context.")
    properties = {
        "messages": Schema(type=ARRAY, min_items=1, items=_message_schema(), description=(
            "The conversation, rendered into a prompt by the model's own chat template (GET "
            "/info: generation.chat_template); a model without one answers 400.")),
        **_sampling_properties(f"The older name of 'max_completion_tokens'. {limit}"),
        "max_completion_tokens": optional(_integer(minimum=1),
                                          f"{limit} Wins over 'max_tokens'."),
        "logprobs": _flag("Return each generated token's logprob."),
        "top_logprobs": optional(
            _integer(minimum=0, maximum=TOP_LOGPROBS),
            f"With 'logprobs': true, return this many likeliest alternatives of each token "
            f"too (at most {TOP_LOGPROBS})."),
        "tools": optional(Schema(type=ARRAY, items=_tool_schema()), (
            "Functions the model may call, rendered into the prompt by its chat template (GET "
            "/info: generation.tool_calls says in which form it writes calls; a template that "
            "renders no tools answers 400). Calls come back in the message's 'tool_calls', "
            "streamed as one delta each, with finish_reason 'tool_calls'.")),
        "tool_choice": optional(Schema(one_of=[
            Schema(type=STRING, enum=["none", "auto", "required"]),
            Schema(type=OBJECT, title="Named function", required=["type", "function"],
                   properties={"type": Schema(type=STRING, enum=["function"]),
                               "function": Schema(type=OBJECT, required=["name"], properties={
                                   "name": Schema(type=STRING)})})]), (
            "'auto' (with tools, the default): the model may answer or call; 'none': calls are "
            "not read; 'required' or a named function: the answer is a call, generated under a "
            "grammar of the tools' parameter schemas, so it always parses.")),
        "parallel_tool_calls": optional(Schema(type=BOOLEAN), (
            "With 'required': false allows exactly one call. Unset: true.")),
        "add_generation_prompt": _flag("End the prompt with the template's opening of an "
                                       "assistant message; false leaves it out (to continue the "
                                       "last message)."),
        "chat_template_kwargs": optional(
            Schema(type=OBJECT, property_names=Schema(
                schema_not=Schema(enum=sorted(RESERVED_TEMPLATE_NAMES)))),
            f"More names for the chat template (such as 'enable_thinking'); the names the server "
            f"sets itself ({', '.join(sorted(RESERVED_TEMPLATE_NAMES))}) are refused."),
    }
    return request_object(ChatCompletionRequest, properties,
                          [only_with("stream_options", "stream", True),
                           only_with("top_logprobs", "logprobs", True)])


# ---- the event streams ---------------------------------------------------------------------------


def _ref(name: str) -> Reference:
    """A component Litestar registers from the routes' response types."""
    return Reference(ref=f"#/components/schemas/{name}")


def _nullable(schema: Schema | Reference) -> Schema:
    return Schema(one_of=[schema, Schema(type=NULL)])


def _exactly(kind: type[msgspec.Struct], schema: Schema) -> Schema:
    differ = set(kind.__struct_fields__) ^ set(schema.properties or {})
    assert not differ, f"the hand-written schema and {kind.__name__} differ on {differ}"
    return schema


def _chat_chunk_schema() -> Schema:
    """`ChatCompletionChunk`, which no route returns as JSON, so Litestar registers no component
    for it; the parts it shares with the JSON response are referenced."""
    delta = _exactly(ChatDelta, Schema(
        type=OBJECT, title="ChatDelta", description="What the choice added; empty on its last "
                                                    "chunk.",
        properties={"role": Schema(type=STRING), "content": Schema(type=STRING),
                    "tool_calls": Schema(type=ARRAY, items=Schema(
                        type=OBJECT, title="ToolCallDelta",
                        required=["index", "id", "type", "function"], properties={
                            "index": Schema(type=INTEGER), "id": Schema(type=STRING),
                            "type": Schema(type=STRING, enum=["function"]),
                            "function": _ref("FunctionCall")}))}))
    choice = _exactly(ChatChunkChoice, Schema(
        type=OBJECT, title="ChatChunkChoice", required=["index", "delta"], properties={
            "index": Schema(type=INTEGER), "delta": delta,
            "logprobs": _nullable(_ref("ChatLogprobs")),
            "finish_reason": _nullable(Schema(type=STRING))}))
    return _exactly(ChatCompletionChunk, Schema(
        type=OBJECT, title="ChatCompletionChunk", required=["id", "created", "model", "choices"],
        properties={
            "id": Schema(type=STRING), "object": Schema(type=STRING, enum=["chat.completion.chunk"]),
            "created": Schema(type=INTEGER), "model": Schema(type=STRING),
            "choices": Schema(type=ARRAY, items=choice),
            "usage": _nullable(_ref("CompletionUsage"))}))


def _event_schema(chunk: Schema | Reference) -> Schema:
    """One server-sent event of a stream, as parsed (`data`, and `event`, `id`, `retry` if sent):
    its data a JSON chunk, an error, or the end."""
    return Schema(
        type=OBJECT, required=["data"],
        description="Each server-sent event of a stream ('stream': true): 'data: <JSON chunk>' "
                    "per piece of text, then 'data: [DONE]'. A failure after the stream began "
                    "comes as a last 'data: {\"error\": {...}}' event, before 'data: [DONE]'.",
        properties={"data": Schema(any_of=[
            Schema(type=STRING, title="Chunk", content_media_type="application/json",
                   content_schema=Schema(one_of=[chunk, _ref("ErrorResponse")])),
            Schema(type=STRING, title="End of the stream", enum=["[DONE]"]),
        ])})


CompletionsOperation = operation_with_body(
    completion_request_schema, "CompletionsOperation",
    events=lambda: _event_schema(_ref("CompletionResponse")))
ChatCompletionsOperation = operation_with_body(
    chat_completion_request_schema, "ChatCompletionsOperation",
    events=lambda: _event_schema(_chat_chunk_schema()))
