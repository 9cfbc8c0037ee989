"""The OpenAPI description of the request bodies, written by hand (the generation routes' in
`openapi_generation.py`).

Each handler decodes the body itself (so it owns every error message), which leaves Litestar nothing
to derive a schema from; and msgspec's types are looser than what the API accepts (a union may hold
one list type only, so `input` and `prompt` are general lists, and `messages` are checked by the
engine to name the bad one). So the schemas are spelled out here: the field names, defaults and
enum values are read from the request structs, and the ranges and forms are the ones the engine
checks (`EmbeddingFrontend.resolve`, `split_input`), held to that validation by the tests. What
depends on the served model (its vocabulary, context, prompts) is said in the descriptions and in
GET /info.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Any

import msgspec
from litestar.openapi.spec import (
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
)

from jaxembed.protocol import (
    MAX_INPUTS,
    ClassifyRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    RerankRequest,
    ScoreRequest,
    TokenizeRequest,
)

STRING, INTEGER, NUMBER = OpenAPIType.STRING, OpenAPIType.INTEGER, OpenAPIType.NUMBER
BOOLEAN, ARRAY, OBJECT, NULL = (OpenAPIType.BOOLEAN, OpenAPIType.ARRAY, OpenAPIType.OBJECT,
                                OpenAPIType.NULL)


def _default(kind: type[msgspec.Struct], name: str) -> Any:
    """A field's default as JSON has it; None where it has none (or it is null)."""
    value = {f.name: f for f in msgspec.structs.fields(kind)}[name].default
    if value is msgspec.NODEFAULT:
        return None
    return value.value if isinstance(value, enum.Enum) else value


def request_object(kind: type[msgspec.Struct], properties: dict[str, Schema],
                   rules: list[Schema] | None = None) -> Schema:
    """The body's schema: exactly the struct's fields, its required ones, its defaults (where the
    schema gives none of its own), and nothing else. rules: what one field's value asks of
    others (`only_with`, `excludes`)."""
    fields = msgspec.structs.fields(kind)
    differ = {f.name for f in fields} ^ set(properties)
    assert not differ, f"the hand-written schema and {kind.__name__} differ on {differ}"
    for f in fields:
        schema = properties[f.name]
        if schema.default is None and _default(kind, f.name) is not None:
            properties[f.name] = dataclasses.replace(schema, default=_default(kind, f.name))
    return Schema(type=OBJECT, title=kind.__name__, properties=properties,
                  required=sorted(f.name for f in fields if f.required),
                  additional_properties=False, all_of=rules or None)


def _given(name: str) -> Schema:
    # Null means unset, for every optional field here.
    return Schema(required=[name], properties={name: Schema(schema_not=Schema(type=NULL))})


def only_with(name: str, other: str, value: Any) -> Schema:
    """`name`, when given, needs `other` to be `value`."""
    return Schema(schema_if=_given(name),
                  then=Schema(required=[other], properties={other: Schema(const=value)}))


def excludes(name: str, *others: str) -> Schema:
    """`name`, when given, leaves `others` unset (absent or null)."""
    return Schema(schema_if=_given(name),
                  then=Schema(properties={o: Schema(type=NULL) for o in others}))


def _one_prompt_field() -> list[Schema]:
    """At most one of the prompt fields is given."""
    return [excludes("instruction", "prompt_name", "input_type"),
            excludes("prompt_name", "input_type")]


def _enum(name: str, description: str) -> Schema:
    kind = {f.name: f for f in msgspec.structs.fields(EmbeddingRequest)}[name].type
    if isinstance(kind, type):
        return Schema(type=STRING, enum=[v.value for v in kind], description=description)
    # An optional enum: null means the server's default.
    (kind,) = (t for t in kind.__args__ if t is not type(None))
    return Schema(one_of=[Schema(type=STRING, enum=[v.value for v in kind]), Schema(type=NULL)],
                  description=description)


def optional(schema: Schema, description: str) -> Schema:
    return Schema(one_of=[schema, Schema(type=NULL)], description=description)


def _token_ids(title: str | None = None, max_items: int | None = None) -> Schema:
    return Schema(type=ARRAY, title=title, min_items=1, max_items=max_items,
                  items=Schema(type=INTEGER, minimum=0))


def texts_or_token_ids(description: str) -> Schema:
    """The four forms of `input` (and of `prompt`). A list of any form holds at most MAX_INPUTS
    items, a flat list of token ids included (`split_input` counts items before their kind)."""
    return Schema(
        description=description,
        one_of=[
            Schema(type=STRING, title="Text", min_length=1),
            Schema(type=ARRAY, title="Texts", min_items=1, max_items=MAX_INPUTS,
                   items=Schema(type=STRING, min_length=1)),
            _token_ids("Token ids", MAX_INPUTS),
            Schema(type=ARRAY, title="Token id lists", min_items=1, max_items=MAX_INPUTS,
                   items=_token_ids()),
        ],
    )


def input_schema() -> Schema:
    return texts_or_token_ids(
        "Text or token ids to embed, in one of four forms; each item of a list gets its own "
        "vector. Empty strings and empty lists are refused, and token ids must be within the "
        "model's vocabulary.")


def _prompt_fields() -> dict[str, Schema]:
    """The fields that choose a prompt to prepend, shared by the embeddings and tokenize bodies."""
    return {
        "prompt_name": optional(
            Schema(type=STRING),
            "One of the model's named prompts (its sentence-transformers 'prompts'), prepended to "
            "each text input; '' for none. Unset: the server's default, else the model's default "
            "prompt, else none. At most one of 'prompt_name', 'instruction' and 'input_type'."),
        "instruction": optional(
            Schema(type=STRING, min_length=1, pattern=r"\S"),
            "A task instruction, placed before each text input by the model's instruction "
            "template (Qwen3-Embedding: 'Instruct: {instruction}\\nQuery:{text}'); a model with "
            "no known template answers 400."),
        "input_type": _enum(
            "input_type", "'query' or 'document': use the model's prompt for that kind of input "
            "(none if the model has no such prompt). Unset: the server's default, if any."),
    }


def embedding_request_schema() -> Schema:
    properties = {
        "input": input_schema(),
        "model": model_schema(),
        "encoding_format": _enum(
            "encoding_format", "'float' for JSON numbers; 'base64' for little-endian float32 "
            "bytes, base64-encoded; 'ubinary' and 'binary' for one sign bit per component "
            "(set where it is positive), packed 8 to a byte with the first component in the "
            "high bit, base64-encoded: as uint8 bytes, or as int8 (each byte minus 128), as "
            "sentence-transformers' quantize_embeddings gives them."),
        "embedding_type": _enum(
            "embedding_type", "Pooling of the final hidden states: 'mean' over all tokens, the "
            "'last' token's state, or 'cls' (the first token's; bidirectional models only); "
            "or 'none': no pooling, every token's final hidden state, a list of vectors an "
            "input (with encoding_format 'float' and no 'dimensions'; normalized only if "
            "'normalize' says so). Unset: the server's default, else the model's "
            "(sentence-transformers), else 'mean'."),
        "dimensions": optional(Schema(type=INTEGER, minimum=1),
                               "Keep only the first this many components of each vector; at "
                               "most the model's embedding size, and one of the sizes it declares "
                               "(Matryoshka) if it declares any. Re-normalized when "
                               "normalization is on."),
        "normalize": optional(Schema(type=BOOLEAN),
                              "L2-normalize each vector. Unset: the server's default, else the "
                              "model's (a sentence-transformers Normalize module), else off."),
        "truncate_prompt_tokens": optional(
            Schema(one_of=[Schema(type=INTEGER, minimum=1), Schema(type=INTEGER, const=-1)]),
            "Keep only the last this many tokens of each input (the special tokens the "
            "tokenizer adds stay), at most the model's context, or -1 for the model's limit; "
            "usage counts what was kept. Unset: the server's default, else over-long inputs are "
            "refused."),
        **_prompt_fields(),
        "chunked": optional(
            Schema(type=BOOLEAN),
            "Embed an input past the model's limit in windows of the limit's length and combine "
            "them (vLLM's chunked processing): 'mean' weights each window's mean by its tokens, "
            "each token pooled once (--chunk-overlap gives later windows context they do not "
            "pool); 'last' takes the last window's, 'cls' the first's. usage counts every token "
            "run. Unset: the server's default, else such inputs are refused (400)."),
        "user": optional(Schema(type=STRING),
                         "Accepted for compatibility with OpenAI's API; unused."),
    }
    return request_object(EmbeddingRequest, properties, _one_prompt_field())


def model_schema() -> Schema:
    return Schema(type=STRING, description="A served model name (see GET /v1/models) or "
                                           "'default'; another name answers 404.")


def tokenize_request_schema() -> Schema:
    properties = {
        "prompt": Schema(type=STRING, description="The text to tokenize."),
        "model": model_schema(),
        "add_special_tokens": Schema(type=BOOLEAN, description="Add the special tokens (e.g. "
                                                               "BOS) the embedding path adds."),
        # The ids then include the prompt the embeddings route would prepend.
        **_prompt_fields(),
    }
    return request_object(TokenizeRequest, properties, _one_prompt_field())


def detokenize_request_schema() -> Schema:
    properties = {
        "tokens": Schema(type=ARRAY, items=Schema(type=INTEGER, minimum=0),
                         description="Token ids to turn back into text, each within the model's "
                                     "vocabulary."),
        "model": model_schema(),
    }
    return request_object(DetokenizeRequest, properties)


def _text_or_texts(description: str) -> Schema:
    return Schema(description=description, one_of=[
        Schema(type=STRING, title="Text", min_length=1),
        Schema(type=ARRAY, title="Texts", min_items=1, max_items=MAX_INPUTS,
               items=Schema(type=STRING, min_length=1))])


def _pair_instruction() -> Schema:
    return optional(Schema(type=STRING, min_length=1, pattern=r"\S"),
                    "Fills the {instruction} of the model's rerank prompt (Qwen3-Reranker's); "
                    "a model without one answers 400. Unset: the prompt's default.")


def rerank_request_schema() -> Schema:
    document = Schema(one_of=[
        Schema(type=STRING, title="Text", min_length=1),
        Schema(type=OBJECT, title="Document", required=["text"], additional_properties=False,
               properties={"text": Schema(type=STRING, min_length=1)})])
    properties = {
        "query": Schema(type=STRING, min_length=1, description="The query."),
        "documents": Schema(type=ARRAY, min_items=1, max_items=MAX_INPUTS, items=document,
                            description="The texts to score against the query, each a pair "
                                        "with it (a document past the model's limit is cut "
                                        "from its end, unless the server refuses them)."),
        "model": model_schema(),
        "top_n": optional(Schema(type=INTEGER, minimum=1),
                          "Return the best this many. Unset: all, best first."),
        "return_documents": Schema(type=BOOLEAN, description="Return each document's text "
                                                            "beside its score (default true)."),
        "instruction": _pair_instruction(),
        "user": optional(Schema(type=STRING), "Accepted for compatibility; unused."),
    }
    return request_object(RerankRequest, properties)


def score_request_schema() -> Schema:
    properties = {
        "text_1": _text_or_texts("One text, scored against each text_2; or a list as long as "
                                 "text_2, scored pairwise."),
        "text_2": _text_or_texts("The texts to score against text_1."),
        "model": model_schema(),
        "instruction": _pair_instruction(),
        "user": optional(Schema(type=STRING), "Accepted for compatibility; unused."),
    }
    return request_object(ScoreRequest, properties)


def classify_request_schema() -> Schema:
    properties = {
        "input": _text_or_texts("The texts to classify (a text past the model's limit is cut "
                                "from its end, unless the server refuses them)."),
        "model": model_schema(),
        "user": optional(Schema(type=STRING), "Accepted for compatibility; unused."),
    }
    return request_object(ClassifyRequest, properties)


# ---- operations ----------------------------------------------------------------------------------


def operation_with_body(schema: Callable[[], Schema], name: str,
                        events: Callable[[], Schema] | None = None) -> type[Operation]:
    """Litestar builds each route's Operation through its `operation_class`; this one swaps in a
    hand-written request body (decorated again so the generated __init__ calls __post_init__).
    events: for a route that can stream, the schema of one event, added beside the JSON of its
    200 as `text/event-stream` (Litestar derives nothing from a `Stream`)."""

    @dataclasses.dataclass
    class BodyOperation(Operation):
        def __post_init__(self) -> None:
            self.request_body = RequestBody(
                content={"application/json": OpenAPIMediaType(schema=schema())}, required=True)
            ok = (self.responses or {}).get("200")
            if events is not None and isinstance(ok, OpenAPIResponse):
                ok.content = {**(ok.content or {}),
                              "text/event-stream": OpenAPIMediaType(schema=events())}

    BodyOperation.__name__ = BodyOperation.__qualname__ = name
    return BodyOperation


EmbeddingsOperation = operation_with_body(embedding_request_schema, "EmbeddingsOperation")
TokenizeOperation = operation_with_body(tokenize_request_schema, "TokenizeOperation")
DetokenizeOperation = operation_with_body(detokenize_request_schema, "DetokenizeOperation")
RerankOperation = operation_with_body(rerank_request_schema, "RerankOperation")
ScoreOperation = operation_with_body(score_request_schema, "ScoreOperation")
ClassifyOperation = operation_with_body(classify_request_schema, "ClassifyOperation")
