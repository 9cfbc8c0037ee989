"""The OpenAPI description of the request bodies, written by hand.

Each handler decodes the body itself (so it owns every error message), which leaves Litestar nothing
to derive a schema from; and msgspec's type for `input` takes a general list (a union may hold one
list type only), while the API accepts exactly four forms. So the schema is spelled out here, with
defaults and enum values read from `EmbeddingRequest` so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Any

import msgspec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Operation, RequestBody, Schema

from jaxembed.protocol import MAX_INPUTS, DetokenizeRequest, EmbeddingRequest, TokenizeRequest

_FIELDS = {f.name: f for f in msgspec.structs.fields(EmbeddingRequest)}


def _default(name: str) -> Any:
    value = _FIELDS[name].default
    if value is msgspec.NODEFAULT:
        return None
    return value.value if isinstance(value, enum.Enum) else value


def _enum(name: str, description: str) -> Schema:
    kind = _FIELDS[name].type
    if isinstance(kind, type):
        return Schema(type=OpenAPIType.STRING, enum=[v.value for v in kind],
                      default=_default(name), description=description)
    # An optional enum: null means the server's default.
    (kind,) = (t for t in kind.__args__ if t is not type(None))
    return Schema(one_of=[Schema(type=OpenAPIType.STRING, enum=[v.value for v in kind]),
                          Schema(type=OpenAPIType.NULL)], description=description)


def _optional(schema: Schema, description: str) -> Schema:
    return Schema(one_of=[schema, Schema(type=OpenAPIType.NULL)], description=description)


def _token_ids(title: str | None = None) -> Schema:
    return Schema(type=OpenAPIType.ARRAY, title=title, min_items=1,
                  items=Schema(type=OpenAPIType.INTEGER, minimum=0))


def input_schema() -> Schema:
    return Schema(
        description="Text or token ids to embed, in one of four forms; each item of a list gets "
                    "its own vector. Empty strings and empty lists are refused.",
        one_of=[
            Schema(type=OpenAPIType.STRING, title="Text", min_length=1),
            Schema(type=OpenAPIType.ARRAY, title="Texts", min_items=1, max_items=MAX_INPUTS,
                   items=Schema(type=OpenAPIType.STRING, min_length=1)),
            _token_ids("Token ids"),
            Schema(type=OpenAPIType.ARRAY, title="Token id lists", min_items=1,
                   max_items=MAX_INPUTS, items=_token_ids()),
        ],
    )


def _prompt_fields() -> dict[str, Schema]:
    """The fields that choose a prompt to prepend, shared by the embeddings and tokenize bodies."""
    return {
        "prompt_name": _optional(
            Schema(type=OpenAPIType.STRING),
            "One of the model's named prompts (its sentence-transformers 'prompts'), prepended to "
            "each text input; '' for none. Unset: the server's default, else the model's default "
            "prompt, else none. At most one of 'prompt_name', 'instruction' and 'input_type'."),
        "instruction": _optional(
            Schema(type=OpenAPIType.STRING, min_length=1),
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
        "model": Schema(type=OpenAPIType.STRING, default=_default("model"),
                        description="A served model name (see GET /v1/models) or 'default'."),
        "encoding_format": _enum(
            "encoding_format", "'float' for JSON numbers; 'base64' for little-endian float32 "
            "bytes, base64-encoded."),
        "embedding_type": _enum(
            "embedding_type", "Pooling of the final hidden states: 'mean' over all tokens, the "
            "'last' token's state, or 'cls' (the first token's; bidirectional models only). "
            "Unset: the server's default, else the model's (sentence-transformers), else 'mean'."),
        "dimensions": _optional(Schema(type=OpenAPIType.INTEGER, minimum=1),
                                "Keep only the first this many components of each vector; at "
                                "most the model's embedding size, and one of the sizes it declares "
                                "(Matryoshka) if it declares any. Re-normalized when "
                                "normalization is on."),
        "normalize": _optional(Schema(type=OpenAPIType.BOOLEAN),
                               "L2-normalize each vector. Unset: the server's default, else the "
                               "model's (a sentence-transformers Normalize module), else off."),
        "truncate_prompt_tokens": _optional(
            Schema(one_of=[Schema(type=OpenAPIType.INTEGER, minimum=1),
                           Schema(type=OpenAPIType.INTEGER, const=-1)]),
            "Keep only the last this many tokens of each input (the special tokens the "
            "tokenizer adds stay), or -1 for the model's limit; usage counts what was kept. "
            "Unset: the server's default, else over-long inputs are refused."),
        **_prompt_fields(),
        "user": Schema(one_of=[Schema(type=OpenAPIType.STRING), Schema(type=OpenAPIType.NULL)],
                       description="Accepted for compatibility with OpenAI's API; unused."),
    }
    missing = set(_FIELDS) ^ set(properties)
    assert not missing, f"the hand-written schema and EmbeddingRequest differ on {missing}"
    return Schema(
        type=OpenAPIType.OBJECT, title="EmbeddingRequest", properties=properties,
        required=sorted(n for n, f in _FIELDS.items() if f.required),
        additional_properties=False,
    )


def _model_schema() -> Schema:
    return Schema(type=OpenAPIType.STRING, default="default",
                  description="A served model name (see GET /v1/models) or 'default'.")


def tokenize_request_schema() -> Schema:
    properties = {
        "prompt": Schema(type=OpenAPIType.STRING, description="The text to tokenize."),
        "model": _model_schema(),
        "add_special_tokens": Schema(type=OpenAPIType.BOOLEAN, default=True,
                                     description="Add the special tokens (e.g. BOS) the "
                                                 "embedding path adds."),
        # The ids then include the prompt the embeddings route would prepend.
        **_prompt_fields(),
    }
    assert set(properties) == set(TokenizeRequest.__struct_fields__)
    return Schema(type=OpenAPIType.OBJECT, title="TokenizeRequest", properties=properties,
                  required=["prompt"], additional_properties=False)


def detokenize_request_schema() -> Schema:
    properties = {
        "tokens": Schema(type=OpenAPIType.ARRAY, items=Schema(type=OpenAPIType.INTEGER, minimum=0),
                         description="Token ids to turn back into text."),
        "model": _model_schema(),
    }
    assert set(properties) == set(DetokenizeRequest.__struct_fields__)
    return Schema(type=OpenAPIType.OBJECT, title="DetokenizeRequest", properties=properties,
                  required=["tokens"], additional_properties=False)


def _operation_with_body(schema: Callable[[], Schema], name: str) -> type[Operation]:
    """Litestar builds each route's Operation through its `operation_class`; this one swaps in a
    hand-written request body (decorated again so the generated __init__ calls __post_init__)."""

    @dataclasses.dataclass
    class BodyOperation(Operation):
        def __post_init__(self) -> None:
            self.request_body = RequestBody(
                content={"application/json": OpenAPIMediaType(schema=schema())}, required=True)

    BodyOperation.__name__ = BodyOperation.__qualname__ = name
    return BodyOperation


EmbeddingsOperation = _operation_with_body(embedding_request_schema, "EmbeddingsOperation")
TokenizeOperation = _operation_with_body(tokenize_request_schema, "TokenizeOperation")
DetokenizeOperation = _operation_with_body(detokenize_request_schema, "DetokenizeOperation")
