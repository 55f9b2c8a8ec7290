"""The OpenAI-compatible HTTP app: the routes (routes.py) behind middleware and error mapping.

Every failure leaves as OpenAI's JSON error shape with the status code OpenAI would use, and
never with a stack trace: the body says what the client can fix, the log keeps the rest. The
request body is read and parsed by the routes rather than by FastAPI's body binding, so
malformed JSON, invalid UTF-8 and wrong types all get the same precise 400 instead of
framework defaults.

A chat request may name a RAG collection (`"rag": {"collection", "top_k"}`): its last user
message is then the question, the collection's pipeline lays out the messages (system prompt,
passages in canonical order, question) and the answer carries the passages as `rag_sources`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgepaged.errors import RequestError
from edgepaged.server.async_engine import AsyncEngine, EngineUnavailable, QueueFull
from edgepaged.server.errors import ApiError, error_response
from edgepaged.server.metrics import ServerMetrics
from edgepaged.server.middleware import AccessLog, AdmissionGate, BodyLimit, HostCheck
from edgepaged.server.routes import Served, has_key, operations, v1
from edgepaged.server.settings import RagCollections, ServerConfig

__all__ = ["RagCollections", "ServerConfig", "create_app"]

log = logging.getLogger(__name__)


def create_app(engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    """Build the app around a started-on-lifespan AsyncEngine (and hand it the RAG pin upkeep)."""
    metrics = ServerMetrics(engine.stats, engine.queue_state)
    if config.rag is not None and config.rag.pinned:
        engine.on_idle = config.rag.apply_pins

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await engine.stop()
        if config.rag is not None:
            config.rag.close()  # only now: closing unpins, which is the engine thread's business

    app = FastAPI(title="edgepaged", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served = Served(engine, config, metrics)
    app.include_router(v1)
    app.include_router(operations)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return error_response(ApiError(400, str(exc)))

    def rate_limited(exc: QueueFull) -> ApiError:
        metrics.requests.labels("rejected").inc()
        headers = {"Retry-After": str(exc.retry_after)}
        return ApiError(429, str(exc), "rate_limit_error", code="rate_limit_exceeded", headers=headers)

    def refusal(headers: dict[bytes, bytes]) -> ApiError | None:
        """The gate's 429: only while accepting (a draining server answers 503) and only to a
        client with the key (anyone else gets the route's 401, and learns nothing of the queue)."""
        if not engine.accepting or not has_key(headers.get(b"authorization", b"").decode("latin-1"), config.api_key):
            return None
        refused = engine.refusal()
        return None if refused is None else rate_limited(refused)

    @app.exception_handler(QueueFull)
    async def _queue_full(_: Request, exc: QueueFull) -> JSONResponse:
        return error_response(rate_limited(exc))

    @app.exception_handler(EngineUnavailable)
    async def _unavailable(_: Request, exc: EngineUnavailable) -> JSONResponse:
        return error_response(ApiError(503, str(exc), "server_error", code="service_unavailable"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(ApiError(exc.status_code, str(exc.detail), headers=exc.headers))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        metrics.requests.labels("error").inc()
        return error_response(ApiError(500, "internal server error", "server_error"))

    # Added innermost first: a request meets the access log, the Host check, CORS, the admission
    # gate (every POST under /v1 generates), the body limit.
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes, timeout_s=config.body_timeout_s)
    generation = [route.path for route in v1.routes if "POST" in getattr(route, "methods", ())]
    app.add_middleware(AdmissionGate, paths=generation, refusal=refusal)
    if config.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(HostCheck, allowed=config.allowed_hosts)
    app.add_middleware(AccessLog)
    return app
