"""Errors the engine raises for requests. The server turns each into OpenAI's error body.

Each carries what OpenAI's body needs (`type`, `param`, `code`) and an HTTP status, so the server
maps errors without knowing the reasons behind them. `retry_after` (seconds) marks the errors a
client should simply retry later; the server sends it as `Retry-After`.
"""

from __future__ import annotations


class EngineError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None
    retry_after: float | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if retry_after is not None:
            self.retry_after = retry_after

    def to_dict(self) -> dict[str, str | None]:
        """OpenAI's error object (the value of the body's `error`)."""
        return {"message": self.message, "type": self.type, "param": self.param,
                "code": self.code}


class InvalidRequestError(EngineError):
    """The request cannot be served as sent; the message says what to change."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_value"


class ModelNotFoundError(EngineError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class EngineOverloadedError(EngineError):
    """The queue is full: the request was refused before any work, so retrying is safe."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"
    retry_after = 1.0


class EngineUnavailableError(EngineError):
    """The engine is loading, draining before shutdown, or stopped."""

    status = 503
    type = "server_error"
    code = "engine_unavailable"
    retry_after = 5.0


class RequestTimeoutError(EngineError):
    """The request did not finish in the time allowed; its work was cancelled."""

    status = 503
    type = "server_error"
    code = "timeout"
