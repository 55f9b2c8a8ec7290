"""The OpenAI-compatible HTTP app: routing, validation, streaming and error mapping.

Every failure leaves as OpenAI's JSON error shape with the status code OpenAI would use, and
never with a stack trace: the body says what the client can fix, the log keeps the rest. The
request body is read and parsed here rather than by FastAPI's body binding, so malformed JSON,
invalid UTF-8 and wrong types all get the same precise 400 instead of framework defaults.

A chat request may name a RAG collection (`"rag": {"collection", "top_k"}`): its last user
message is then the question, the collection's pipeline lays out the messages (system prompt,
passages in canonical order, question) and the answer carries the passages as `rag_sources`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgepaged.outputs import RequestOutput, TokenLogprob
from edgepaged.errors import RequestError
from edgepaged.rag import NoRelevantChunks, RagPipeline, Source
from edgepaged.sampling import SamplingParams
from edgepaged.server.async_engine import AsyncEngine, EngineUnavailable, PreparedRequest, QueueFull, RequestStream
from edgepaged.server.metrics import CONTENT_TYPE, RequestTimer, ServerMetrics
from edgepaged.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ErrorDetail,
    ErrorResponse,
    ModelCard,
    ModelList,
    RagOptions,
    RagSource,
    Usage,
)

log = logging.getLogger(__name__)

_DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering


@dataclass(slots=True)
class RagCollections:
    """The RAG collections a server answers from, by the names clients send.

    One lock serialises retrieval across collections: they share one embedding model, whose
    tokenizer must not be called from two threads at once, and a question's retrieval is short
    next to its generation. The `pinned` collections keep their hot prefixes pinned, each under
    its own pin owner; their pipelines must have been built with pinning on.
    """

    pipelines: dict[str, RagPipeline]
    pinned: tuple[str, ...] = ()
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        unknown = [name for name in self.pinned if name not in self.pipelines]
        if unknown:
            raise ValueError(f"cannot pin unknown RAG collection(s) {unknown}")

    def build_messages(self, name: str, question: str, top_k: int) -> tuple[list[dict[str, str]], list[Source]]:
        """Blocking (embedding, SQLite): call it from a worker thread, not the event loop."""
        with self._lock:
            return self.pipelines[name].build_messages(question, top_k)

    def apply_pins(self) -> None:
        """Engine thread only, between requests (`AsyncEngine.on_idle`)."""
        for name in self.pinned:
            self.pipelines[name].apply_pins()

    def close(self) -> None:
        """Drops the pins and closes the index files; only once the engine thread has stopped."""
        for pipeline in self.pipelines.values():
            pipeline.close()


@dataclass(slots=True)
class ServerConfig:
    served_model_names: list[str]
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    rag: RagCollections | None = None


class ApiError(Exception):
    """An error the client caused or must know about, with its OpenAI status, type and code."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = headers


# Sent to nobody (the client has gone); 499 is the status nginx logs for it.
_CLIENT_GONE = ApiError(499, "the client closed the request")


def error_response(error: ApiError) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(message=error.message, type=error.type, param=error.param, code=error.code))
    return JSONResponse(body.model_dump(), status_code=error.status, headers=error.headers)


class BodyLimit:
    """Reads the whole request body up front and refuses it past `max_bytes` with 413.

    Checked on the bytes actually received, not only on Content-Length, so a chunked upload
    cannot slip past the bound; the handler then gets the body replayed from memory.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = ApiError(413, f"the request body exceeds {self.max_bytes} bytes", code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            bad = too_large if declared.isdigit() else ApiError(400, "invalid Content-Length header")
            await error_response(bad)(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await error_response(too_large)(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


_M = TypeVar("_M", bound=BaseModel)


async def _parse(request: Request, model: type[_M]) -> _M:
    body = await request.body()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{where}: {message}" if where else message, param=where or None) from None


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass(slots=True)
class _Choices:
    """Turns cumulative outputs into per-choice deltas, keeping each choice's text so far."""

    n: int
    text: list[str] = field(default_factory=list)
    finish: list[str | None] = field(default_factory=list)
    logprobs: list[list[TokenLogprob] | None] = field(default_factory=list)
    completion_tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0

    def __post_init__(self) -> None:
        self.text = [""] * self.n
        self.finish = [None] * self.n
        self.logprobs = [None] * self.n
        self.completion_tokens = [0] * self.n

    def deltas(self, out: RequestOutput) -> list[tuple[int, str, str | None]]:
        self.prompt_tokens = len(out.prompt_token_ids)
        changed = []
        for c in out.outputs:
            if self.finish[c.index] is not None:
                continue
            delta = c.text[len(self.text[c.index]) :]
            self.text[c.index] = c.text
            self.logprobs[c.index] = c.logprobs
            self.completion_tokens[c.index] = len(c.token_ids)
            self.finish[c.index] = c.finish_reason
            if delta or c.finish_reason is not None:
                changed.append((c.index, delta, c.finish_reason))
        return changed

    @property
    def all_finished(self) -> bool:
        return all(f is not None for f in self.finish)

    def usage(self) -> Usage:
        done = sum(self.completion_tokens)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=done, total_tokens=self.prompt_tokens + done)


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

    # ---- errors ----------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return error_response(ApiError(400, str(exc)))

    @app.exception_handler(QueueFull)
    async def _queue_full(_: Request, exc: QueueFull) -> JSONResponse:
        metrics.requests.labels("rejected").inc()
        return error_response(
            ApiError(
                429,
                str(exc),
                "rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(exc.retry_after)},
            )
        )

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

    # ---- auth, models, prompts -------------------------------------------------------------

    async def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise ApiError(
                401,
                "missing or invalid API key (send 'Authorization: Bearer <key>')",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def check_model(name: str) -> None:
        if name not in config.served_model_names:
            raise ApiError(
                404,
                f"the model '{name}' does not exist; this server serves {config.served_model_names}",
                code="model_not_found",
                param="model",
            )

    def sampling_params(body: CompletionRequest | ChatCompletionRequest, max_tokens: int) -> SamplingParams:
        try:
            return SamplingParams(
                n=body.n,
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=body.top_k,
                seed=body.seed,
                max_tokens=max_tokens,
                stop=body.stop,
                ignore_eos=body.ignore_eos,
                logprobs=body.num_logprobs,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                repetition_penalty=body.repetition_penalty,
            )
        except ValueError as exc:
            raise RequestError(str(exc)) from None

    def completion_prepare(body: CompletionRequest) -> Callable[[], PreparedRequest]:
        def prepare() -> PreparedRequest:
            ids = engine.engine.encode(body.prompt)  # the offline path's tokenization, for the same answers
            max_tokens = body.max_tokens if body.max_tokens is not None else _DEFAULT_COMPLETION_TOKENS
            return PreparedRequest(ids, sampling_params(body, max_tokens))

        return prepare

    async def rag_messages(options: RagOptions, question: str) -> tuple[list[dict[str, str]], list[RagSource]]:
        """The collection's layout for `question` and the passages in it, retrieved off the loop."""
        rag = config.rag
        if rag is None or options.collection not in rag.pipelines:
            served = sorted(rag.pipelines) if rag is not None else []
            raise ApiError(
                404,
                f"the RAG collection '{options.collection}' does not exist; this server serves {served}",
                code="collection_not_found",
                param="rag.collection",
            )
        try:
            messages, sources = await asyncio.to_thread(rag.build_messages, options.collection, question, options.top_k)
        except NoRelevantChunks as exc:
            # As `edgepaged rag ask` does: say so, and generate nothing.
            raise ApiError(422, str(exc), code="no_relevant_chunks", param="messages") from None
        return messages, [RagSource(path=s.path, chunk_index=s.chunk_index, score=s.score) for s in sources]

    def chat_prepare(body: ChatCompletionRequest, messages: list[dict[str, str]]) -> Callable[[], PreparedRequest]:
        def prepare() -> PreparedRequest:
            try:
                ids = engine.engine.apply_chat_template(messages)  # as the offline LLM.chat renders it
            except TemplateError as exc:
                raise RequestError(f"the chat template refused the messages: {exc}") from None
            limit = body.output_limit
            max_tokens = limit if limit is not None else max(engine.max_model_len - len(ids), 1)
            return PreparedRequest(ids, sampling_params(body, max_tokens))

        return prepare

    async def finished_output(stream: RequestStream, timer: RequestTimer, request: Request, choices: _Choices) -> bool:
        """Wait for the final output; False when the client hung up first (its request is aborted)."""

        async def consume() -> None:
            async for out in stream:
                timer.observe(out)
                choices.deltas(out)

        work = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(_until_disconnect(request))
        try:
            await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not work.done():
                work.cancel()
            stream.close()
            timer.finish()
        if not work.done() or work.cancelled():
            return False
        work.result()  # raises EngineUnavailable when the engine stopped under the request
        return True

    async def sse(events: AsyncIterator[BaseModel], stream: RequestStream, timer: RequestTimer) -> AsyncIterator[str]:
        """Frame events as SSE; on any exit (done, client gone, cancelled) close the request."""
        try:
            async for event in events:
                yield f"data: {event.model_dump_json()}\n\n"
        except EngineUnavailable as exc:
            body = ErrorResponse(error=ErrorDetail(message=str(exc), type="server_error", code="service_unavailable"))
            yield f"data: {body.model_dump_json()}\n\n"
        finally:
            stream.close()
            timer.finish()
        yield "data: [DONE]\n\n"

    v1 = [Depends(authorize)]

    # ---- endpoints -------------------------------------------------------------------------

    @app.get("/v1/models", dependencies=v1)
    async def models() -> dict[str, Any]:
        created = int(time.time())
        cards = [
            ModelCard(id=name, created=created, max_model_len=engine.max_model_len)
            for name in config.served_model_names
        ]
        return ModelList(data=cards).model_dump()

    @app.post("/v1/completions", dependencies=v1)
    async def completions(request: Request) -> Response:
        body = await _parse(request, CompletionRequest)
        check_model(body.model)
        request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        timer = metrics.start_request()
        stream = await engine.add(request_id, completion_prepare(body))
        choices = _Choices(body.n)

        def chunk(items: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
            return CompletionResponse(id=request_id, created=created, model=body.model, choices=items, usage=usage)

        if body.stream:

            async def events() -> AsyncIterator[BaseModel]:
                async for out in stream:
                    timer.observe(out)
                    items = [CompletionChoice(index=i, text=t, finish_reason=f) for i, t, f in choices.deltas(out)]
                    if items:
                        yield chunk(items)
                if body.include_usage:
                    yield chunk([], choices.usage())

            return StreamingResponse(sse(events(), stream, timer), media_type="text/event-stream", headers=_SSE_HEADERS)

        if not await finished_output(stream, timer, request, choices):
            return error_response(_CLIENT_GONE)
        items = [
            CompletionChoice(
                index=i, text=choices.text[i], finish_reason=choices.finish[i],
                logprobs=None if choices.logprobs[i] is None else CompletionLogprobs.of(choices.logprobs[i]),
            )
            for i in range(body.n)
        ]
        return JSONResponse(chunk(items, choices.usage()).model_dump())

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat_completions(request: Request) -> Response:
        body = await _parse(request, ChatCompletionRequest)
        check_model(body.model)
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        timer = metrics.start_request()
        messages, sources = [m.as_template_dict() for m in body.messages], None
        if body.rag is not None:
            messages, sources = await rag_messages(body.rag, body.rag_question)
        stream = await engine.add(request_id, chat_prepare(body, messages))
        choices = _Choices(body.n)

        if body.stream:

            def chunk(
                items: list[ChatChunkChoice], usage: Usage | None = None, last: bool = False
            ) -> ChatCompletionChunk:
                return ChatCompletionChunk(
                    id=request_id,
                    created=created,
                    model=body.model,
                    choices=items,
                    usage=usage,
                    rag_sources=sources if last else None,
                )

            async def events() -> AsyncIterator[BaseModel]:
                yield chunk(
                    [
                        ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""), finish_reason=None)
                        for i in range(body.n)
                    ]
                )
                async for out in stream:
                    timer.observe(out)
                    items = [
                        ChatChunkChoice(index=i, delta=DeltaMessage(content=t or None), finish_reason=f)
                        for i, t, f in choices.deltas(out)
                    ]
                    if items:
                        # The sources ride on the last chunk before [DONE]: this one, unless usage follows.
                        yield chunk(items, last=choices.all_finished and not body.include_usage)
                if body.include_usage:
                    yield chunk([], choices.usage(), last=True)

            return StreamingResponse(sse(events(), stream, timer), media_type="text/event-stream", headers=_SSE_HEADERS)

        if not await finished_output(stream, timer, request, choices):
            return error_response(_CLIENT_GONE)
        items = [
            ChatChoice(
                index=i, message=AssistantMessage(content=choices.text[i]), finish_reason=choices.finish[i],
                logprobs=None if choices.logprobs[i] is None else ChatLogprobs.of(choices.logprobs[i]),
            )
            for i in range(body.n)
        ]
        response = ChatCompletionResponse(
            id=request_id, created=created, model=body.model, choices=items, usage=choices.usage(), rag_sources=sources
        )
        return JSONResponse(response.model_dump())

    # ---- operations ------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.healthy()
        return JSONResponse({"status": "ok" if ok else "unhealthy"}, status_code=200 if ok else 503)

    @app.get("/ready")
    async def ready() -> JSONResponse:
        ok = engine.healthy() and engine.accepting
        return JSONResponse({"status": "ready" if ok else "not ready"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    return app
