"""The OpenAPI description of `POST /v1/embeddings`'s body, written by hand.

The handler decodes the body itself (so it owns every error message), which leaves Litestar nothing
to derive a schema from; and msgspec's type for `input` takes a general list (a union may hold one
list type only), while the API accepts exactly four forms. So the schema is spelled out here, with
defaults and enum values read from `EmbeddingRequest` so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import msgspec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Operation, RequestBody, Schema

from jaxembed.protocol import MAX_INPUTS, EmbeddingRequest

_FIELDS = {f.name: f for f in msgspec.structs.fields(EmbeddingRequest)}


def _default(name: str) -> Any:
    value = _FIELDS[name].default
    if value is msgspec.NODEFAULT:
        return None
    return value.value if isinstance(value, enum.Enum) else value


def _enum(name: str, description: str) -> Schema:
    return Schema(type=OpenAPIType.STRING, enum=[v.value for v in _FIELDS[name].type],
                  default=_default(name), description=description)


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


def embedding_request_schema() -> Schema:
    properties = {
        "input": input_schema(),
        "model": Schema(type=OpenAPIType.STRING, default=_default("model"),
                        description="A served model name (see GET /v1/models) or 'default'."),
        "encoding_format": _enum(
            "encoding_format", "'float' for JSON numbers; 'base64' for little-endian float32 "
            "bytes, base64-encoded."),
        "embedding_type": _enum(
            "embedding_type", "Pooling of the final hidden states: 'mean' over all tokens, or "
            "the 'last' token's state."),
        "dimensions": Schema(one_of=[Schema(type=OpenAPIType.INTEGER, minimum=1),
                                     Schema(type=OpenAPIType.NULL)],
                             description="Keep only the first this many components of each "
                                         "vector; at most the model's embedding size."),
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


@dataclasses.dataclass
class EmbeddingsOperation(Operation):
    """Litestar builds each route's Operation through its `operation_class`; this one swaps in the
    hand-written request body (decorated again so the generated __init__ calls __post_init__)."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            content={"application/json": OpenAPIMediaType(schema=embedding_request_schema())},
            required=True,
        )
