"""Errors the engine raises for requests. The server turns each into OpenAI's error body.

Each carries what OpenAI's body needs (`type`, `param`, `code`) and an HTTP status, so the server
maps errors without knowing the reasons behind them.
"""

from __future__ import annotations


class EngineError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequestError(EngineError):
    """The request cannot be served as sent; the message says what to change."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_value"


class ModelNotFoundError(EngineError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class EngineUnavailableError(EngineError):
    """The engine is shutting down or not started."""

    status = 503
    type = "server_error"
    code = "engine_unavailable"
