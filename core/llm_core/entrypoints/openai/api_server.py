"""The OpenAI-compatible HTTP server: the FastAPI app factory and the uvicorn runner.

``create_app(llm, config)`` wires the endpoints over an :class:`AsyncLLM`; ``run_server``
loads the engine and serves it with uvicorn until SIGINT/SIGTERM, then shuts down gracefully:
it stops accepting connections, lets in-flight requests finish (up to a timeout, after which
they are aborted and their KV blocks freed) and stops the engine thread.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from llm_hal import HAL_API_VERSION
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from llm_core.config import EngineArgs
from llm_core.engine.async_llm import AsyncLLM
from llm_core.engine.llm_engine import LLMEngine
from llm_core.entrypoints.openai.config import DEFAULT_MAX_QUEUE, ServerConfig
from llm_core.entrypoints.openai.errors import APIError
from llm_core.entrypoints.openai.middleware import RequestGuard
from llm_core.entrypoints.openai.openapi import openapi_document, request_body, responses
from llm_core.entrypoints.openai.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    VersionResponse,
)
from llm_core.entrypoints.openai.serving import OpenAIServing
from llm_core.entrypoints.openai.serving_chat import OpenAIServingChat
from llm_core.entrypoints.openai.serving_completions import OpenAIServingCompletion
from llm_core.entrypoints.openai.serving_tokenization import OpenAIServingTokenization
from llm_core.metrics import EngineMetrics

log = logging.getLogger("llm_core.server")

#: The request bodies the routes read, whose schemas the OpenAPI document carries.
REQUEST_MODELS = (
    CompletionRequest,
    ChatCompletionRequest,
    TokenizeCompletionRequest,
    TokenizeChatRequest,
    DetokenizeRequest,
)
#: The chunks of the event streams (the same model as the whole answer, for completions).
STREAM_CHUNKS = (CompletionResponse, ChatCompletionChunk)


def _version() -> str:
    try:
        return importlib.metadata.version("llm-core")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def create_app(llm: AsyncLLM, config: ServerConfig) -> FastAPI:
    """The FastAPI application serving ``llm`` under ``config.model_name``.

    Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, POST /tokenize,
    POST /detokenize, GET /health, GET /version, GET /metrics (404 unless ``llm.metrics`` is
    set), and GET /openapi.json, which describes them all. Stopping the app (its lifespan)
    shuts ``llm`` down.
    """
    serving = OpenAIServing(llm, config, llm.metrics)
    completions = OpenAIServingCompletion(serving)
    chat = OpenAIServingChat(serving)
    tokenization = OpenAIServingTokenization(serving)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await asyncio.to_thread(llm.shutdown)
            serving.close()

    app = FastAPI(
        title="llm-core",
        version=_version(),
        description="OpenAI-compatible server of llm-core (see docs/server.md).",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.openapi = openapi_document(  # type: ignore[method-assign]
        app, REQUEST_MODELS, STREAM_CHUNKS
    )
    app.add_middleware(
        RequestGuard, api_key=config.api_key, max_body_bytes=config.max_request_bytes
    )
    #: The API key's 401, on the routes that need the key.
    locked = (401,) if config.api_key else ()

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            message = f"there is no route {request.url.path}; see GET /v1/models and docs/server.md"
            return APIError(404, message, code="unknown_route").response()
        if exc.status_code == 405:
            # Starlette's exception carries the route's methods in Allow (RFC 9110, 15.5.6).
            allowed = (exc.headers or {}).get("Allow", "")
            message = f"{request.method} is not allowed on {request.url.path}; use {allowed}"
            return APIError(405, message, code="method_not_allowed", headers=exc.headers).response()
        return APIError.from_status(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return APIError(400, f"invalid request: {exc.errors()}").response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal server error: {exc!r}").response()

    @app.get("/health", response_model=None, responses=responses(HealthResponse, 500, 503))
    async def health() -> Response:
        """200 while the engine runs, 503 once it has stopped."""
        if not llm.is_alive:
            raise APIError(503, f"the engine is not running: {llm.dead_reason}")
        return JSONResponse(HealthResponse().model_dump())

    @app.get("/version", response_model=None, responses=responses(VersionResponse, 500))
    async def version() -> Response:
        """The server's version and the HAL API version it implements."""
        body = VersionResponse(version=_version(), hal_api_version=HAL_API_VERSION)
        return JSONResponse(body.model_dump())

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses=responses(None, 404, 500, description="The Prometheus text format"),
    )
    async def metrics() -> Response:
        """Prometheus metrics (404 when the server runs without them)."""
        if llm.metrics is None:
            raise APIError(404, "metrics are off for this server")
        content, content_type = llm.metrics.render()
        return Response(content, media_type=content_type)

    @app.get("/v1/models", response_model=None, responses=responses(ModelList, *locked, 500))
    async def models() -> Response:
        """The served model."""
        card = ModelCard(
            id=config.model_name, root=config.model_path, max_model_len=llm.max_model_len
        )
        return JSONResponse(ModelList(data=[card]).model_dump())

    generation_errors = (400, *locked, 404, 413, 500, 503)

    @app.post(
        "/v1/completions",
        response_model=None,
        openapi_extra=request_body(CompletionRequest),
        responses=responses(CompletionResponse, *generation_errors, stream=CompletionResponse),
    )
    async def create_completion(request: Request) -> Response:
        """Text completion, whole or streamed."""
        return await completions.create(request)

    @app.post(
        "/v1/chat/completions",
        response_model=None,
        openapi_extra=request_body(ChatCompletionRequest),
        responses=responses(ChatCompletionResponse, *generation_errors, stream=ChatCompletionChunk),
    )
    async def create_chat_completion(request: Request) -> Response:
        """Chat completion through the chat template, whole or streamed."""
        return await chat.create(request)

    tokenizer_errors = (400, *locked, 404, 413, 500)

    @app.post(
        "/tokenize",
        response_model=None,
        openapi_extra=request_body(TokenizeCompletionRequest, TokenizeChatRequest),
        responses=responses(TokenizeResponse, *tokenizer_errors),
    )
    async def tokenize(request: Request) -> Response:
        """A prompt's token ids, or those of messages through the chat template."""
        return JSONResponse((await tokenization.tokenize(request)).model_dump())

    @app.post(
        "/detokenize",
        response_model=None,
        openapi_extra=request_body(DetokenizeRequest),
        responses=responses(DetokenizeResponse, *tokenizer_errors),
    )
    async def detokenize(request: Request) -> Response:
        """The text of token ids."""
        return JSONResponse((await tokenization.detokenize(request)).model_dump())

    return app


def run_server(
    engine_args: EngineArgs,
    config: ServerConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_queue: int = DEFAULT_MAX_QUEUE,
    shutdown_timeout: int = 30,
    log_level: str = "warning",
) -> None:
    """Load the engine and serve it until interrupted.

    At most ``max_num_seqs + max_queue`` requests are in flight; beyond that the server answers
    503 with ``Retry-After``. On SIGINT/SIGTERM in-flight requests get ``shutdown_timeout``
    seconds to finish.
    """
    import prometheus_client
    import uvicorn

    prometheus_client.disable_created_metrics()  # the *_created series only add noise
    if max_queue < 0:
        raise ValueError(f"max_queue must be >= 0, got {max_queue}")
    engine = LLMEngine(engine_args)
    metrics = EngineMetrics(config.model_name)
    # A first snapshot before the engine thread starts (and owns the engine): /metrics shows
    # the KV-cache size and, with speculation on, its counters before the first request.
    metrics.update_engine_state(engine)
    llm = AsyncLLM(engine, max_pending=engine_args.max_num_seqs + max_queue, metrics=metrics)
    app = create_app(llm, config)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            timeout_graceful_shutdown=max(1, shutdown_timeout),
            server_header=False,
        )
    )
    server.run()
