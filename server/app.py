"""The HTTP app: OpenAI's embeddings, completions, chat and models routes, tokenize/detokenize,
health, metrics, /info, and the playground page.

Handlers stay thin: they check the transport (auth, content type, body size, time, whether the
client is still there), decode the body, and hand the request to the engine, which does all
validation of what the request means.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.metadata
import importlib.resources
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from litestar import Litestar, Request, Response, get, post
from litestar.config.cors import CORSConfig
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.exceptions import ClientException, InternalServerException, NotAuthorizedException
from litestar.handlers import BaseRouteHandler, HTTPRouteHandler
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.response import Stream
from litestar.status_codes import HTTP_415_UNSUPPORTED_MEDIA_TYPE
from litestar.types import Receive, Send

from jaxembed.builder import EngineBuilder
from jaxembed.engine import Engine
from jaxembed.errors import EngineUnavailableError, RequestTimeoutError
from jaxembed.protocol import (
    ClassifyRequest,
    ClassifyResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    RerankRequest,
    RerankResponse,
    ScoreRequest,
    ScoreResponse,
    TokenizeRequest,
    TokenizeResponse,
)

from .completions import Completions
from .decoding import decode_body
from .errors import ClientDisconnected, ErrorResponse, add_request_id_header, exception_handlers
from .info import Health, ModelCard, ModelList, ServerInfo, server_info, version
from .metrics import CONTENT_TYPE, ServerMetrics
from .openapi import (
    ClassifyOperation,
    DetokenizeOperation,
    EmbeddingsOperation,
    RerankOperation,
    ScoreOperation,
    TokenizeOperation,
)
from .openapi_generation import ChatCompletionsOperation, CompletionsOperation
from .wire import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
)

log = logging.getLogger("jaxembed.server")

DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024
DEFAULT_REQUEST_TIMEOUT = 120.0
# Routes anyone may call when an API key is set: load balancers probe health without secrets.
PUBLIC = "public"

T = TypeVar("T")


# The playground's files, served from memory under fixed names: nothing in a request's path
# ever reaches the file system.
PLAYGROUND_ASSETS = {"playground.css": "text/css; charset=utf-8",
                     "playground.js": "text/javascript; charset=utf-8"}
# The page talks only to this server and runs only its own script.
PLAYGROUND_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


def _playground_handlers() -> list[HTTPRouteHandler]:
    static = importlib.resources.files(__package__) / "static"
    page = (static / "index.html").read_bytes()

    # Public even with an API key: the page itself holds no data; it asks for the key and
    # sends it with each call to the API.
    @get(["/", "/playground"], include_in_schema=False, opt={PUBLIC: True})
    async def playground() -> Response[bytes]:
        return Response(page, media_type="text/html; charset=utf-8",
                        headers=PLAYGROUND_HEADERS)

    def asset(name: str, media: str) -> HTTPRouteHandler:
        content = (static / name).read_bytes()

        @get(f"/playground/{name}", include_in_schema=False, opt={PUBLIC: True})
        async def playground_asset() -> Response[bytes]:
            return Response(content, media_type=media, headers=PLAYGROUND_HEADERS)

        return playground_asset

    return [playground, *(asset(name, media) for name, media in PLAYGROUND_ASSETS.items())]


class EngineHost:
    """The engine an app serves and its phase: loading, ready, draining, or failed to load.

    Given an engine, the app serves it at once. Given a builder, the app answers from the start
    (503 with Retry-After, /health included) while a thread loads the weights and compiles the
    warm-up steps, so orchestrators see the process alive but not ready. Given a build already
    started (`EngineBuilder.build_in_background`), it answers the same way until that is done.
    """

    def __init__(self, source: Engine | EngineBuilder | Future[Engine], *, owned: bool,
                 on_load_error: Callable[[BaseException], None] | None = None) -> None:
        # What the engine comes from while there is none yet: a builder, or a build under way.
        self._source = source if isinstance(source, EngineBuilder | Future) else None
        self.engine: Engine | None = None if self._source is not None else source
        # An engine the app built is the app's to stop; a given one only when asked.
        self.owned = owned or self._source is not None
        self.error: BaseException | None = None
        self.draining = False
        self._on_load_error = on_load_error
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._source is not None and self.engine is None and self._thread is None:
            self._thread = threading.Thread(target=self._build, name="jaxembed-load", daemon=True)
            self._thread.start()

    def _build(self) -> None:
        assert self._source is not None
        try:
            if isinstance(self._source, Future):  # a build already under way
                engine = self._source.result()
            else:
                engine = self._source.build()
        except BaseException as e:  # reported to the owner (the CLI exits); the app answers 503
            log.exception("the model failed to load")
            self.error = e
            if self._on_load_error is not None:
                self._on_load_error(e)
            return
        with self._lock:
            if not self.draining:
                self.engine = engine
                log.info("ready: serving %s as %s", engine.describe().model,
                         engine.served_model_names)
                return
        engine.shutdown()  # the server stopped while the model was loading

    @property
    def ready(self) -> bool:
        engine = self.engine
        return engine is not None and not self.draining and engine.ready

    def get(self) -> Engine:
        """The engine, or a 503 saying why there is none to serve with."""
        engine = self.engine
        if self.draining:
            raise EngineUnavailableError("the server is shutting down; retry on another replica "
                                         "or after the restart", code="draining")
        if engine is None:
            if self.error is not None:
                raise EngineUnavailableError("the model failed to load; see the server's log",
                                             code="model_load_failed", retry_after=60)
            raise EngineUnavailableError("the model is still loading; retry shortly",
                                         code="model_loading")
        if not engine.ready:
            raise EngineUnavailableError("the engine is shutting down; retry on another replica "
                                         "or after the restart", code="draining")
        return engine

    async def stop(self) -> None:
        """Stop taking requests; if the engine is the app's, let it finish its queue and stop."""
        with self._lock:
            self.draining = True
            engine = self.engine
        if engine is not None and self.owned:
            # shutdown() joins the engine thread after queued work; keep the loop free meanwhile.
            await asyncio.to_thread(engine.shutdown)


class _ObservedLitestar(Litestar):
    """Litestar, counting and timing every HTTP request it answers. Done here rather than in a
    middleware because Litestar runs middleware only for matched routes, and 404s count too."""

    metrics: ServerMetrics

    async def __call__(self, scope: Any, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what is counted if the app fails before starting a response

        async def observed(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await super().__call__(scope, receive, observed)
        finally:
            # The route's template keeps label values few; unmatched paths share one label.
            route = scope.get("path_template") if scope.get("route_handler") else None
            self.metrics.observe_request(route or "unmatched", scope.get("method", ""), status,
                                         time.perf_counter() - start)


def _errors(*statuses: int) -> dict[int, ResponseSpec]:
    return {s: ResponseSpec(data_container=ErrorResponse, generate_examples=False,
                            description="An error, in OpenAI's shape") for s in statuses}


def _generated(kind: type, what: str) -> ResponseSpec:
    # The handler's annotation includes the event stream, from which Litestar derives no schema;
    # the operation class adds the stream's media type beside this one.
    return ResponseSpec(data_container=kind, generate_examples=False,
                        description=f"{what}; with 'stream': true, an event stream of its chunks")


def _require_json(request: Request) -> None:
    # Checked before the body is read, so a wrong upload is refused without decoding it.
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        shown = repr(media_type) if media_type else "none"
        raise ClientException(
            f"the request body must be JSON, sent with 'Content-Type: application/json'; "
            f"got content type {shown}", status_code=HTTP_415_UNSUPPORTED_MEDIA_TYPE)


def _timed_out(timeout: float | None) -> RequestTimeoutError:
    return RequestTimeoutError(
        f"the request did not finish within this server's limit of {timeout:g} s and was "
        "cancelled; send fewer or shorter inputs per request, or retry when it is less busy")


async def _read_json(request: Request, deadline: float | None, timeout: float | None) -> bytes:
    _require_json(request)
    try:
        async with asyncio.timeout_at(deadline):
            return await request.body()  # raises RequestEntityTooLarge past the size limit
    except TimeoutError:
        raise _timed_out(timeout) from None
    except InternalServerException:  # Litestar's "client disconnected prematurely"
        raise ClientDisconnected() from None


async def _client_gone(request: Request) -> None:
    # Once the body is read, the ASGI server's next message is the disconnect (if it comes).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _while_connected(request: Request, work: Awaitable[T], deadline: float | None,
                           timeout: float | None) -> T:
    """Await `work` unless the client leaves or the deadline passes first; then cancel it, which
    drops the request from the engine's queue if it has not been computed yet."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_client_gone(request))
    left = None if deadline is None else max(0.0, deadline - asyncio.get_running_loop().time())
    try:
        done, _ = await asyncio.wait({task, gone}, timeout=left,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():  # the client left, the deadline passed, or we were cancelled
            task.cancel()
            # Until the cancellation has reached the engine's queue: once the answer (503, or
            # nothing for a client that left) goes out, the work is already withdrawn.
            await asyncio.wait({task})
    if task in done:
        return task.result()
    if gone in done:
        raise ClientDisconnected()
    raise _timed_out(timeout)


def _route_handlers(host: EngineHost, metrics: ServerMetrics, created: int,
                    timeout: float | None) -> list[HTTPRouteHandler]:
    """The routes, closed over the host: no dependency injection, so Litestar has nothing to
    type-check against the engine and any object with its methods (a test's stand-in) serves."""

    def deadline() -> float | None:
        return None if timeout is None else asyncio.get_running_loop().time() + timeout

    @post("/v1/embeddings", status_code=200, operation_class=EmbeddingsOperation,
          summary="Create embeddings", tags=["embeddings"],
          responses=_errors(400, 401, 404, 413, 415, 429, 500, 503))
    async def create_embeddings(request: Request) -> Response[EmbeddingResponse]:
        engine = host.get()
        end = deadline()
        body = await _read_json(request, end, timeout)
        embedding = decode_body(body, EmbeddingRequest)
        response, timing = await _while_connected(request, engine.aembed_timed(embedding), end,
                                                  timeout)
        metrics.observe_timing(timing.queue_seconds, timing.inference_seconds)
        return Response(response, headers={
            "x-queue-time": f"{timing.queue_seconds * 1e3:.3f}",
            "x-inference-time": f"{timing.inference_seconds * 1e3:.3f}",
        })

    # Generation's limit is on silence, not on length: a request that gets no token for
    # `timeout` seconds (waiting for a slot under overload) is cancelled, while an answer that
    # keeps coming may rightly take minutes. A client that leaves (mid-stream too) stops its
    # generation and frees its slots.
    @post("/v1/completions", status_code=200, operation_class=CompletionsOperation,
          summary="Create a completion", tags=["generation"],
          responses={200: _generated(CompletionResponse, "The completion"),
                     **_errors(400, 401, 404, 413, 415, 429, 500, 503)})
    async def create_completion(request: Request) -> Response[CompletionResponse] | Stream:
        engine = host.get()
        req = decode_body(await _read_json(request, deadline(), timeout), CompletionRequest)
        completions = Completions(engine, timeout)
        if req.stream:
            return _event_stream(await completions.completion_stream(req))
        return Response(await _while_connected(request, completions.completion(req), None, None))

    @post("/v1/chat/completions", status_code=200, operation_class=ChatCompletionsOperation,
          summary="Create a chat completion", tags=["generation"],
          responses={200: _generated(ChatCompletionResponse, "The chat completion"),
                     **_errors(400, 401, 404, 413, 415, 429, 500, 503)})
    async def create_chat_completion(request: Request
                                     ) -> Response[ChatCompletionResponse] | Stream:
        engine = host.get()
        req = decode_body(await _read_json(request, deadline(), timeout), ChatCompletionRequest)
        completions = Completions(engine, timeout)
        if req.stream:
            return _event_stream(await completions.chat_stream(req))
        return Response(await _while_connected(request, completions.chat(req), None, None))

    # Rerank, score and classify: prefill-only work in the embedding steps, each pair (or
    # text) one sequence read at its last token.
    async def scored(request: Request, kind: type, run: Callable[[Engine, Any], Awaitable[T]]
                     ) -> T:
        engine = host.get()
        end = deadline()
        parsed = decode_body(await _read_json(request, end, timeout), kind)
        return await _while_connected(request, run(engine, parsed), end, timeout)

    @post(["/v1/rerank", "/rerank", "/v2/rerank"], status_code=200,
          operation_class=RerankOperation, summary="Rerank documents against a query",
          tags=["scoring"], responses=_errors(400, 401, 404, 413, 415, 429, 503))
    async def rerank(request: Request) -> RerankResponse:
        return await scored(request, RerankRequest, Engine.arerank)

    @post(["/v1/score", "/score"], status_code=200, operation_class=ScoreOperation,
          summary="Score text pairs", tags=["scoring"],
          responses=_errors(400, 401, 404, 413, 415, 429, 503))
    async def score(request: Request) -> ScoreResponse:
        return await scored(request, ScoreRequest, Engine.ascore)

    @post(["/classify", "/v1/classify"], status_code=200, operation_class=ClassifyOperation,
          summary="Classify texts with the model's classification head", tags=["scoring"],
          responses=_errors(400, 401, 404, 413, 415, 429, 503))
    async def classify(request: Request) -> ClassifyResponse:
        return await scored(request, ClassifyRequest, Engine.aclassify)

    @post("/tokenize", status_code=200, operation_class=TokenizeOperation,
          summary="Tokenize a prompt as the embeddings route does", tags=["tokenizer"],
          responses=_errors(400, 401, 404, 413, 415, 503))
    async def tokenize(request: Request) -> TokenizeResponse:
        engine = host.get()
        end = deadline()
        parsed = decode_body(await _read_json(request, end, timeout), TokenizeRequest)
        return await _while_connected(
            request, asyncio.to_thread(engine.tokenize_request, parsed), end, timeout)

    @post("/detokenize", status_code=200, operation_class=DetokenizeOperation,
          summary="Turn token ids back into text", tags=["tokenizer"],
          responses=_errors(400, 401, 404, 413, 415, 503))
    async def detokenize(request: Request) -> DetokenizeResponse:
        engine = host.get()
        end = deadline()
        parsed = decode_body(await _read_json(request, end, timeout), DetokenizeRequest)
        return await _while_connected(
            request, asyncio.to_thread(engine.detokenize_request, parsed), end, timeout)

    @get("/v1/models", summary="List models", tags=["models"], responses=_errors(401, 503))
    async def list_models() -> ModelList:
        engine = host.get()
        return ModelList(data=[ModelCard(id=name, created=created, tasks=list(engine.tasks))
                               for name in engine.served_model_names])

    @get("/info", summary="The served model: family, dtype, context, pooling and generation "
                          "settings", tags=["models"], responses=_errors(401, 503))
    async def info() -> ServerInfo:
        return server_info(host.get())

    @get("/health", summary="Readiness: 200 once the model is loaded and warm", tags=["health"],
         opt={PUBLIC: True}, responses=_errors(503))
    async def health() -> Health:
        if not host.ready:
            host.get()  # raises the 503 that says why
        return Health()

    @get("/metrics", summary="Prometheus metrics", tags=["metrics"], media_type=CONTENT_TYPE,
         include_in_schema=True, responses=_errors(401))
    async def prometheus_metrics() -> str:
        return metrics.render(host.engine, host.ready)

    return [create_embeddings, create_completion, create_chat_completion, rerank, score,
            classify, tokenize, detokenize, list_models, info, health, prometheus_metrics]


def _event_stream(events: Any) -> Stream:
    # No buffering by proxies: each token should reach the client as it is made.
    return Stream(events, media_type="text/event-stream",
                  headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


def _bearer_guard(api_key: str) -> Callable[[ASGIConnection, BaseRouteHandler], None]:
    expected = api_key.encode()

    def require_api_key(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
        # CORS preflights carry no credentials by design; public routes need none.
        if handler.opt.get(PUBLIC) or connection.scope.get("method") == "OPTIONS":
            return
        scheme, _, token = connection.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise NotAuthorizedException(
                "no API key was sent; send it as 'Authorization: Bearer <key>'",
                headers={"www-authenticate": "Bearer"})
        # A constant-time comparison, so response timing does not reveal how much of a guess
        # matched.
        if not hmac.compare_digest(token.strip().encode(), expected):
            raise NotAuthorizedException(
                "the API key is not valid; send the key this server was started with as "
                "'Authorization: Bearer <key>'", headers={"www-authenticate": "Bearer"})

    return require_api_key


def create_app(source: Engine | EngineBuilder | Future[Engine], *,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               api_key: str | None = None,
               cors_origins: Sequence[str] = (),
               request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
               shutdown_engine: bool = False,
               playground: bool = True,
               on_load_error: Callable[[BaseException], None] | None = None) -> Litestar:
    """An app serving an engine, or one it builds at startup from an `EngineBuilder`, or one
    whose build is under way (a future from `EngineBuilder.build_in_background`).

    shutdown_engine: the app owns a given engine and stops it when the server shuts down (an
        engine the app built is always its own); otherwise the caller keeps it (tests, notebooks).
    api_key: required as `Authorization: Bearer <key>` on every route but /health.
    cors_origins: origins allowed to call from browsers; none means no CORS headers at all.
    request_timeout: seconds a request may take, body upload included (None: no limit).
    playground: serve the playground page at / and /playground.
    on_load_error: called (from the loading thread) if building the engine fails.

    The app's state holds the `EngineHost` as `engine_host`.
    """
    host = EngineHost(source, owned=shutdown_engine, on_load_error=on_load_error)
    metrics = ServerMetrics()
    cors = None
    if cors_origins:
        cors = CORSConfig(
            allow_origins=list(cors_origins), allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["authorization", "content-type", "x-request-id"],
            expose_headers=["x-request-id", "x-queue-time", "x-inference-time", "retry-after"])
    handlers = _route_handlers(host, metrics, int(time.time()), request_timeout)
    if playground:
        handlers += _playground_handlers()
    app = _ObservedLitestar(
        route_handlers=handlers,
        exception_handlers=exception_handlers(),
        before_send=[add_request_id_header],
        guards=[_bearer_guard(api_key)] if api_key else [],
        cors_config=cors,
        on_startup=[host.start],
        on_shutdown=[host.stop],
        request_max_body_size=max_body_bytes,
        state=State({"engine_host": host}),
        openapi_config=OpenAPIConfig(
            title="jaxembed", version=version(),
            description="Embeddings from decoder LLMs, in OpenAI's API shape."),
        # The process's logging belongs to whoever runs the server, not to the app.
        logging_config=None,
    )
    app.metrics = metrics
    return app
