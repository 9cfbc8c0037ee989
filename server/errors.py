"""OpenAI-shaped error bodies, request ids, and the app's exception handlers.

Every failure (the engine's, the request decoding's, Litestar's routing, or a bug) leaves the server
as `{"error": {"message", "type", "param", "code"}}`, since OpenAI's clients parse only that shape.
"""

from __future__ import annotations

import logging
import math
import re
import uuid
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import (
    HTTPException,
    MethodNotAllowedException,
    NotFoundException,
    ValidationException,
)
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.types import ExceptionHandlersMap, Message, Scope

from jaxembed.errors import EngineError

log = logging.getLogger("jaxembed.server")

REQUEST_ID_HEADER = "x-request-id"
_STATE_KEY = "jaxembed.request_id"
# A client's id is echoed into logs and headers, so only short, plain ones are taken as they are.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


class ErrorDetail(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct, kw_only=True):
    error: ErrorDetail


# Codes for errors Litestar raises itself, which carry only a status.
_STATUS_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
    429: "rate_limit_exceeded",
    503: "service_unavailable",
}


def request_id(scope: Scope) -> str:
    """The request's id: the client's `x-request-id` if usable, else a fresh one, fixed per request.

    Kept in the scope's state so the exception handlers and the response hook agree on one id.
    """
    state = scope.setdefault("state", {})  # type: ignore[typeddict-item]
    rid = state.get(_STATE_KEY)
    if rid is None:
        sent = next((v for k, v in scope.get("headers", ()) if k.lower() == REQUEST_ID_HEADER.encode()),
                     b"").decode("latin-1")
        rid = sent if _CLIENT_ID.fullmatch(sent) else uuid.uuid4().hex
        state[_STATE_KEY] = rid
    return rid


async def add_request_id_header(message: Message, scope: Scope) -> None:
    """`before_send` hook: stamp the request id on every HTTP response, errors and 404s included.

    A hook rather than a middleware, because app middleware runs only for matched routes.
    """
    if message["type"] != "http.response.start":
        return
    headers = list(message.get("headers", ()))
    name = REQUEST_ID_HEADER.encode()
    if not any(k.lower() == name for k, _ in headers):
        headers.append((name, request_id(scope).encode("latin-1")))
        message["headers"] = headers  # type: ignore[typeddict-item]


def error_response(request: Request, status: int, message: str, *, type: str,
                   param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> Response[ErrorResponse]:
    body = ErrorResponse(error=ErrorDetail(message=message, type=type, param=param, code=code))
    return Response(body, status_code=status,
                    headers={**(headers or {}), REQUEST_ID_HEADER: request_id(request.scope)})


# Not a status any client sees: it labels, in logs and metrics, requests whose client went away.
CLIENT_CLOSED_REQUEST = 499


class ClientDisconnected(Exception):
    """The client closed the connection before its response was ready; its work was cancelled."""


def _engine_error(request: Request, exc: EngineError) -> Response[ErrorResponse]:
    headers = None
    if exc.retry_after is not None:
        headers = {"retry-after": str(max(1, math.ceil(exc.retry_after)))}
    return error_response(request, exc.status, exc.message, type=exc.type, param=exc.param,
                          code=exc.code, headers=headers)


def _client_disconnected(request: Request, exc: ClientDisconnected) -> Response[ErrorResponse]:
    log.info("client went away before %s %s finished [request id %s]", request.method,
             request.url.path, request_id(request.scope))
    return error_response(request, CLIENT_CLOSED_REQUEST, "the client closed the connection",
                          type="invalid_request_error", code="client_closed_request")


def _http_error(request: Request, exc: HTTPException) -> Response[ErrorResponse]:
    status = exc.status_code
    if status >= 500:
        # Litestar raises these for faults on our side (e.g. a response it cannot serialize).
        return _internal_error(request, exc, status=status)
    return error_response(request, status, exc.detail, type="invalid_request_error",
                          code=_STATUS_CODES.get(status), headers=exc.headers)


def _validation_error(request: Request, exc: ValidationException) -> Response[ErrorResponse]:
    # Litestar's own parameter validation; its details sit in `extra` as [{"key", "message"}].
    extra = exc.extra if isinstance(exc.extra, list) else []
    first = extra[0] if extra and isinstance(extra[0], dict) else {}
    detail = "; ".join(f"{e.get('key')}: {e.get('message')}" for e in extra if isinstance(e, dict))
    message = f"{exc.detail} ({detail})" if detail else exc.detail
    return error_response(request, exc.status_code, message, type="invalid_request_error",
                          param=first.get("key"), code=_STATUS_CODES.get(exc.status_code))


def _not_found(request: Request, exc: NotFoundException) -> Response[ErrorResponse]:
    return error_response(
        request, 404, f"no route matches {request.method} {request.url.path}; the API is under /v1",
        type="invalid_request_error", code="not_found")


def _method_not_allowed(request: Request, exc: MethodNotAllowedException
                        ) -> Response[ErrorResponse]:
    allowed = (exc.headers or {}).get("allow", "")
    hint = f"; allowed: {allowed}" if allowed else ""
    return error_response(
        request, 405, f"method {request.method} is not allowed on {request.url.path}{hint}",
        type="invalid_request_error", code="method_not_allowed", headers=exc.headers)


def _too_large(request: Request, exc: RequestEntityTooLarge) -> Response[ErrorResponse]:
    limit = request.route_handler.resolve_request_max_body_size()
    return error_response(
        request, 413, f"the request body is larger than this server's limit of {limit} bytes; "
        "split the input into several requests", type="invalid_request_error",
        code="request_too_large")


def _internal_error(request: Request, exc: Exception, *, status: int = 500
                    ) -> Response[ErrorResponse]:
    # The traceback stays in the server's log under the id; the client gets only the id to quote.
    rid = request_id(request.scope)
    log.error("unhandled error in %s %s [request id %s]", request.method, request.url.path, rid,
              exc_info=exc)
    return error_response(
        request, status, f"internal server error; quote request id {rid} when reporting it",
        type="server_error", code=_STATUS_CODES.get(status, "internal_error"))


def exception_handlers() -> ExceptionHandlersMap:
    """Handlers keyed by class; Litestar picks the nearest class in the exception's MRO."""
    handlers: dict[type[Exception], Any] = {
        EngineError: _engine_error,
        HTTPException: _http_error,
        ValidationException: _validation_error,
        NotFoundException: _not_found,
        MethodNotAllowedException: _method_not_allowed,
        RequestEntityTooLarge: _too_large,
        ClientDisconnected: _client_disconnected,
        Exception: _internal_error,
    }
    return handlers
