"""Decode a request body into an `EmbeddingRequest`, turning msgspec's errors into OpenAI's.

Only the JSON shape is checked here; what the values mean (model names, token ids, lengths) is the
engine's to check.
"""

from __future__ import annotations

import enum
import re

import msgspec

from jaxembed.errors import InvalidRequestError
from jaxembed.protocol import EmbeddingRequest

# msgspec's messages end with the JSON path of the bad value, like "... - at `$.input[0]`".
_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_EXPECTED = re.compile(r"^Expected `(?P<want>[^`]+)`, got `(?P<got>[^`]+)`$")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<name>[^`]+)`$")
_MISSING = re.compile(r"^Object missing required field `(?P<name>[^`]+)`$")
_BAD_ENUM = re.compile(r"^Invalid enum value (?P<value>.+)$")
_FIRST_NAME = re.compile(r"^\.?(?P<name>[A-Za-z_][A-Za-z0-9_]*)")

# msgspec names types the Python way; clients think in JSON's names.
_JSON_NAMES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean",
               "array": "array", "object": "object", "null": "null"}

_ENUM_FIELDS: dict[str, type[enum.Enum]] = {
    f.name: f.type for f in msgspec.structs.fields(EmbeddingRequest)
    if isinstance(f.type, type) and issubclass(f.type, enum.Enum)
}


def decode_embedding_request(body: bytes) -> EmbeddingRequest:
    """Decode and type-check a JSON body; raises InvalidRequestError naming the offending field."""
    if not body.strip():
        raise InvalidRequestError("the request body is empty; send a JSON object",
                                  code="invalid_json")
    try:
        return msgspec.json.decode(body, type=EmbeddingRequest)
    except msgspec.ValidationError as e:
        raise _validation_error(str(e)) from None
    except msgspec.DecodeError as e:
        raise InvalidRequestError(
            f"the request body is not valid JSON ({_lower_first(str(e))})",
            code="invalid_json") from None


def _validation_error(text: str) -> InvalidRequestError:
    m = _AT.match(text)
    assert m is not None  # the pattern matches any string
    what, path = m["what"], m["path"] or ""
    top = _FIRST_NAME.match(path)
    param = top["name"] if top else None
    where = path.lstrip(".")

    if m2 := _UNKNOWN.match(what):
        name = f"{where}.{m2['name']}" if where else m2["name"]
        accepted = "" if where else f"; accepted: {', '.join(EmbeddingRequest.__struct_fields__)}"
        return InvalidRequestError(f"unknown parameter {name!r}{accepted}",
                                   param=param or m2["name"], code="unknown_parameter")
    if m2 := _MISSING.match(what):
        name = f"{where}.{m2['name']}" if where else m2["name"]
        return InvalidRequestError(f"missing required parameter {name!r}",
                                   param=param or m2["name"], code="missing_required_parameter")
    if m2 := _EXPECTED.match(what):
        want = " or ".join(_json_name(t) for t in m2["want"].split(" | "))
        got = _json_name(m2["got"])
        if not where:
            return InvalidRequestError(f"the request body must be a JSON {want}; got {got}",
                                       code="invalid_type")
        return InvalidRequestError(f"{where!r} must be {_article(want)}; got {got}",
                                   param=param, code="invalid_type")
    if (m2 := _BAD_ENUM.match(what)) and param in _ENUM_FIELDS:
        allowed = [v.value for v in _ENUM_FIELDS[param]]
        return InvalidRequestError(f"{where!r} must be one of {allowed}; got {m2['value']}",
                                   param=param, code="invalid_value")
    suffix = f" at {where!r}" if where else ""
    return InvalidRequestError(f"invalid request body{suffix}: {_lower_first(what)}", param=param)


def _json_name(name: str) -> str:
    return _JSON_NAMES.get(name, name)


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:]
