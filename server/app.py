"""The HTTP app: OpenAI's embeddings and models routes over an `LLMEngine`.

Handlers stay thin: they check the transport (content type, body size), decode the body, and hand
the request to the engine, which does all validation of what the request means.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import time

import msgspec
from litestar import Litestar, Request, get, post
from litestar.exceptions import ClientException
from litestar.handlers import HTTPRouteHandler
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.status_codes import HTTP_415_UNSUPPORTED_MEDIA_TYPE

from jaxembed.engine import LLMEngine
from jaxembed.protocol import EmbeddingResponse

from .decoding import decode_embedding_request
from .errors import ErrorResponse, add_request_id_header, exception_handlers
from .openapi import EmbeddingsOperation

DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    created: int
    object: str = "model"
    owned_by: str = "jaxembed"


class ModelList(msgspec.Struct, kw_only=True):
    data: list[ModelCard]
    object: str = "list"


class Health(msgspec.Struct, kw_only=True):
    status: str = "ok"


def _errors(*statuses: int) -> dict[int, ResponseSpec]:
    return {s: ResponseSpec(data_container=ErrorResponse, generate_examples=False,
                            description="An error, in OpenAI's shape") for s in statuses}


def _require_json(request: Request) -> None:
    # Checked before the body is read, so a wrong upload is refused without decoding it.
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        shown = repr(media_type) if media_type else "none"
        raise ClientException(
            f"the request body must be JSON, sent with 'Content-Type: application/json'; "
            f"got content type {shown}", status_code=HTTP_415_UNSUPPORTED_MEDIA_TYPE)


def _route_handlers(engine: LLMEngine, created: int) -> list[HTTPRouteHandler]:
    """The routes, closed over the engine: no dependency injection, so Litestar has nothing to
    type-check against the engine and any object with its methods (a test's stand-in) serves."""

    @post("/v1/embeddings", status_code=200, operation_class=EmbeddingsOperation,
          summary="Create embeddings", tags=["embeddings"],
          responses=_errors(400, 404, 413, 415, 500, 503))
    async def create_embeddings(request: Request) -> EmbeddingResponse:
        _require_json(request)
        body = await request.body()  # raises RequestEntityTooLarge past request_max_body_size
        return await engine.aembed(decode_embedding_request(body))

    @get("/v1/models", summary="List models", tags=["models"])
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, created=created)
                               for name in engine.served_model_names])

    @get("/health", summary="Liveness", tags=["health"])
    async def health() -> Health:
        return Health()

    return [create_embeddings, list_models, health]


def _version() -> str:
    try:
        return importlib.metadata.version("jaxembed")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def create_app(engine: LLMEngine, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               shutdown_engine: bool = False) -> Litestar:
    """An app serving `engine`. With `shutdown_engine`, the app owns the engine and stops it when
    the server shuts down (the CLI's case); otherwise the caller keeps it (tests, notebooks)."""
    created = int(time.time())

    async def stop_engine() -> None:
        # shutdown() joins the engine thread after queued work; keep the event loop free meanwhile.
        await asyncio.to_thread(engine.shutdown)

    return Litestar(
        route_handlers=_route_handlers(engine, created),
        exception_handlers=exception_handlers(),
        before_send=[add_request_id_header],
        on_shutdown=[stop_engine] if shutdown_engine else [],
        request_max_body_size=max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="jaxembed", version=_version(),
            description="Embeddings from decoder LLMs, in OpenAI's API shape."),
        # The process's logging belongs to whoever runs the server, not to the app.
        logging_config=None,
    )
