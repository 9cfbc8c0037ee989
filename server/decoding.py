"""Decode a request body into one of the protocol's structs, turning msgspec's errors into OpenAI's.

Only the JSON shape is checked here; what the values mean (model names, token ids, lengths) is the
engine's to check.
"""

from __future__ import annotations

import enum
import functools
import re
import types
import typing
from typing import TypeVar

import msgspec

from jaxembed.errors import InvalidRequestError

S = TypeVar("S", bound=msgspec.Struct)

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


@functools.cache
def _enum_fields(kind: type[msgspec.Struct]) -> dict[str, type[enum.Enum]]:
    """The struct's fields typed as an enum (or an optional one), by name."""
    out = {}
    for f in msgspec.structs.fields(kind):
        options = typing.get_args(f.type) if isinstance(f.type, types.UnionType) else (f.type,)
        for t in options:
            if isinstance(t, type) and issubclass(t, enum.Enum):
                out[f.name] = t
    return out


def decode_body(body: bytes, kind: type[S]) -> S:
    """Decode and type-check a JSON body; raises InvalidRequestError naming the offending field."""
    if not body.strip():
        raise InvalidRequestError("the request body is empty; send a JSON object",
                                  code="invalid_json")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as e:
        raise _validation_error(str(e), kind) from None
    except msgspec.DecodeError as e:
        raise InvalidRequestError(
            f"the request body is not valid JSON ({_lower_first(str(e))})",
            code="invalid_json") from None
    except UnicodeDecodeError as e:  # msgspec raises this for bad UTF-8 inside a string
        raise InvalidRequestError(
            f"the request body is not valid JSON: it is not UTF-8 (byte {e.object[e.start]:#04x} "
            "cannot start or continue a character there); send the body encoded as UTF-8",
            code="invalid_json") from None


def _validation_error(text: str, kind: type[msgspec.Struct]) -> InvalidRequestError:
    m = _AT.match(text)
    assert m is not None  # the pattern matches any string
    what, path = m["what"], m["path"] or ""
    top = _FIRST_NAME.match(path)
    param = top["name"] if top else None
    where = path.lstrip(".")

    if m2 := _UNKNOWN.match(what):
        name = f"{where}.{m2['name']}" if where else m2["name"]
        accepted = "" if where else f"; accepted: {', '.join(kind.__struct_fields__)}"
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
    enums = _enum_fields(kind)
    if (m2 := _BAD_ENUM.match(what)) and param in enums:
        allowed = [v.value for v in enums[param]]
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
