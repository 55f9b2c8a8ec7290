"""The HTTP routes, on APIRouters: the OpenAI API under /v1, health and metrics beside it.

The engine, the settings and the metrics reach every route as one FastAPI dependency
(`served`), set on the app by `create_app`, so the routes hold no closure state. Completions
and chat share one request skeleton, `_generate`: parse the body, check the model, admit the
request (tokenized off the event loop), then stream or collect. An endpoint adds only what is
its own: how its prompt becomes token ids, and how its answers and chunks look (`_Shape`).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from jinja2 import TemplateError
from pydantic import BaseModel, ValidationError
from starlette.types import Message, Receive, Scope, Send

from edgepaged.errors import RequestError
from edgepaged.outputs import RequestOutput, TokenLogprob
from edgepaged.rag import NoRelevantChunks, Source
from edgepaged.sampling import OutputKind, SamplingParams
from edgepaged.server.async_engine import (
    AsyncEngine,
    EngineUnavailable,
    Prepare,
    PreparedRequest,
    RequestStream,
)
from edgepaged.server.chunks import Delta, TextChunks, chat_choice, completion_choice
from edgepaged.server.errors import ApiError, error_response
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
    ModelCard,
    ModelList,
    RequestLimits,
    SamplingRequest,
    Usage,
)
from edgepaged.server.settings import ServerConfig

log = logging.getLogger(__name__)

_DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering

# Sent to nobody (the client has gone); 499 is the status nginx logs for it.
_CLIENT_GONE = ApiError(499, "the client closed the request")


@dataclass(slots=True)
class Served:
    """What the routes serve from: the engine front, the settings and the metrics."""

    engine: AsyncEngine
    config: ServerConfig
    metrics: ServerMetrics

    def check_model(self, name: str) -> None:
        names = self.config.served_model_names
        if name not in names:
            raise ApiError(
                404,
                f"the model '{name}' does not exist; this server serves {names}",
                code="model_not_found",
                param="model",
            )


async def served(request: Request) -> Served:
    # async on purpose: FastAPI runs a plain `def` dependency on a worker thread, a thread hop
    # per request that made every 429 of a burst wait behind the others.
    return request.app.state.served


ServedDep = Annotated[Served, Depends(served)]


def has_key(authorization: str, key: str | None) -> bool:
    """Whether an Authorization header carries the API key (any header does without a key)."""
    if key is None:
        return True
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


async def authorize(request: Request, app: ServedDep) -> None:
    if not has_key(request.headers.get("authorization", ""), app.config.api_key):
        raise ApiError(
            401,
            "missing or invalid API key (send 'Authorization: Bearer <key>')",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])
operations = APIRouter()

_M = TypeVar("_M", bound=SamplingRequest)


async def parse_json(request: Request, model: type[_M], limits: RequestLimits) -> _M:
    """The body as `model`: JSON only (a text/plain POST is what a cross-site form sends),
    UTF-8, and the first validation error as a 400 naming its field."""
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media != "application/json":
        raise ApiError(
            415,
            f"send the body as JSON with 'Content-Type: application/json' (got {media[:64] or 'none'!r})",
            code="unsupported_media_type",
        )
    body = await request.body()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        return model.model_validate_json(text, context=limits)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{where}: {message}" if where else message, param=where or None) from None


# ---- turning a body into an engine request (on the tokenizer thread) -------------------------


def _prepared(engine: AsyncEngine, body: SamplingRequest, ids: list[int], default_tokens: int | None) -> PreparedRequest:
    """The request for a tokenized prompt. An output bound the context cannot hold is refused,
    naming both numbers, rather than silently cut to the context; with none sent the output
    gets `default_tokens` (None: the rest of the context), as far as the context allows."""
    context = engine.max_model_len
    room = context - len(ids)
    if room < 1:
        raise ApiError(
            400,
            f"the prompt has {len(ids)} tokens but the context holds {context} "
            "(prompt plus at least one generated token)",
        )
    asked = body.output_limit
    if asked is not None and asked[1] > room:
        raise ApiError(
            400,
            f"{asked[0]} is {asked[1]} but the context of {context} tokens leaves {room} "
            f"after the prompt's {len(ids)}",
            param=asked[0],
        )
    max_tokens = asked[1] if asked is not None else min(default_tokens or room, room)
    try:
        params = SamplingParams(
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
            beam_width=body.beam_width,
            length_penalty=body.length_penalty,
            early_stopping=body.early_stopping,
            speculative=body.speculative,
            # Each step hands over only what is new: building 256 cumulative outputs a step was
            # most of the engine thread's update at large batches.
            output_kind=OutputKind.DELTA,
        )
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    return PreparedRequest(ids, params)


def _completion_prepare(engine: AsyncEngine, body: CompletionRequest) -> Prepare:
    # The offline path's tokenization, for the same answers.
    return lambda: _prepared(engine, body, engine.engine.encode(body.prompt), _DEFAULT_COMPLETION_TOKENS)


def _chat_prepare(engine: AsyncEngine, body: ChatCompletionRequest, messages: list[dict[str, str]]) -> Prepare:
    def prepare() -> PreparedRequest:
        try:
            ids = engine.engine.apply_chat_template(messages)  # as the offline LLM.chat renders it
        except TemplateError as exc:
            raise RequestError(f"the chat template refused the messages: {exc}") from None
        return _prepared(engine, body, ids, None)

    return prepare


# ---- the shared skeleton ---------------------------------------------------------------------


@dataclass(slots=True)
class _Choices:
    """Gathers each choice's text, log-probabilities and token count from the engine's delta
    outputs (OutputKind.DELTA), and hands out what changed."""

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

    def deltas(self, out: RequestOutput) -> list[Delta]:
        self.prompt_tokens = len(out.prompt_token_ids)
        changed = []
        for c in out.outputs:
            if self.finish[c.index] is not None:
                continue
            delta = c.text
            self.text[c.index] += delta
            if c.logprobs is not None:
                self.logprobs[c.index] = (self.logprobs[c.index] or []) + c.logprobs
            self.completion_tokens[c.index] += len(c.token_ids)
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


class _Shape(Protocol):
    """How one endpoint's answer looks, whole and streamed (chunks as their JSON text)."""

    request_id: str

    def opening(self) -> list[str]:
        """Chunks sent before any text."""

    def chunk(self, deltas: list[Delta], last: bool) -> str:
        """A chunk of new text; `last` when nothing but [DONE] follows it."""

    def usage_chunk(self, usage: Usage) -> str: ...

    def whole(self, choices: _Choices) -> BaseModel: ...


@dataclass(slots=True)
class _Plan:
    prepare: Prepare
    shape: _Shape


async def _generate(
    request: Request, app: Served, schema: type[_M], plan: Callable[[_M], Awaitable[_Plan]]
) -> Response:
    """The one request skeleton: parse, check the model, admit, then stream or collect."""
    body = await parse_json(request, schema, app.config.limits)
    app.check_model(body.model)
    if body.top_k > app.engine.vocab_size:
        raise ApiError(
            400,
            f"top_k is {body.top_k} but the vocabulary has {app.engine.vocab_size} tokens (-1 or 0: off)",
            param="top_k",
        )
    timer = app.metrics.start_request()
    job = await plan(body)
    stream = await app.engine.add(job.shape.request_id, job.prepare)
    choices = _Choices(body.n)
    if body.stream:
        return _EventStream(stream, timer, choices, job.shape, body.include_usage)
    if not await _finished_output(stream, timer, request, choices):
        return error_response(_CLIENT_GONE)
    return JSONResponse(job.shape.whole(choices).model_dump())


def _event(data: str) -> Message:
    return {"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True}


class _EventStream(Response):
    """The answer as server-sent events, sent by one coroutine straight from the request's
    stream: no generator layers between an engine output and its chunk, one send per output
    (tokens that queued while the client or the loop lagged go out as one chunk).

    A client that disconnects ends the request at once, whether or not a chunk is due (a
    watcher on `receive` closes the stream). The status line went out with the first byte, so
    a failure after it is sent as an error event before [DONE]: the client always learns how
    its request ended."""

    media_type = "text/event-stream"

    def __init__(self, stream: RequestStream, timer: RequestTimer, choices: _Choices, shape: _Shape, include_usage: bool):
        self.status_code = 200
        self.background = None
        self.init_headers(_SSE_HEADERS)
        self.stream, self.timer, self.choices, self.shape, self.include_usage = stream, timer, choices, shape, include_usage

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.ensure_future(self._close_on_disconnect(receive))
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            try:
                await self._send_chunks(send)
            except EngineUnavailable as exc:
                await send(_event(ApiError(503, str(exc), "server_error", code="service_unavailable").body().model_dump_json()))
            except Exception:
                log.exception("stream %s failed", self.stream.request_id)
                await send(_event(ApiError(500, "internal server error", "server_error").body().model_dump_json()))
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        finally:
            watcher.cancel()
            self.stream.close()
            self.timer.finish()

    async def _send_chunks(self, send: Send) -> None:
        shape, choices, timer = self.shape, self.choices, self.timer
        for opening in shape.opening():
            await send(_event(opening))
        async for out in self.stream:
            timer.observe(out)
            deltas = choices.deltas(out)
            if deltas:
                await send(_event(shape.chunk(deltas, last=choices.all_finished and not self.include_usage)))
        if self.include_usage:
            await send(_event(shape.usage_chunk(choices.usage())))

    async def _close_on_disconnect(self, receive: Receive) -> None:
        await _until_disconnect(receive)
        self.stream.close()


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _finished_output(stream: RequestStream, timer: RequestTimer, request: Request, choices: _Choices) -> bool:
    """Wait for the final output; False when the client hung up first (its request is aborted)."""

    async def consume() -> None:
        async for out in stream:
            timer.observe(out)
            choices.deltas(out)

    work = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(_until_disconnect(request.receive))
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


def _logprobs(entries: list[TokenLogprob] | None, shape: type[CompletionLogprobs | ChatLogprobs]) -> Any:
    return None if entries is None else shape.of(entries)


# ---- the endpoints ---------------------------------------------------------------------------


@dataclass(slots=True)
class _CompletionShape:
    request_id: str
    created: int
    body: CompletionRequest
    _text_chunks: TextChunks = field(init=False)

    def __post_init__(self) -> None:
        self._text_chunks = TextChunks.around(self._response([]).model_dump_json(), completion_choice)

    def _response(self, items: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(
            id=self.request_id, created=self.created, model=self.body.model, choices=items, usage=usage
        )

    def opening(self) -> list[str]:
        return []

    def chunk(self, deltas: list[Delta], last: bool) -> str:
        return self._text_chunks(deltas)

    def usage_chunk(self, usage: Usage) -> str:
        return self._response([], usage).model_dump_json()

    def whole(self, choices: _Choices) -> BaseModel:
        items = [
            CompletionChoice(
                index=i, text=choices.text[i], finish_reason=choices.finish[i],
                logprobs=_logprobs(choices.logprobs[i], CompletionLogprobs),
            )
            for i in range(self.body.n)
        ]
        return self._response(items, choices.usage())


@dataclass(slots=True)
class _ChatShape:
    request_id: str
    created: int
    body: ChatCompletionRequest
    sources: list[Source] | None  # RAG passages, on the last chunk or the whole answer
    _text_chunks: TextChunks = field(init=False)

    def __post_init__(self) -> None:
        self._text_chunks = TextChunks.around(self._chunk([]), chat_choice)

    def _chunk(self, items: list[ChatChunkChoice], usage: Usage | None = None, last: bool = False) -> str:
        return ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.body.model, choices=items, usage=usage,
            rag_sources=self.sources if last else None,
        ).model_dump_json()

    def opening(self) -> list[str]:
        delta = DeltaMessage(role="assistant", content="")
        return [self._chunk([ChatChunkChoice(index=i, delta=delta, finish_reason=None) for i in range(self.body.n)])]

    def chunk(self, deltas: list[Delta], last: bool) -> str:
        if last and self.sources is not None:
            items = [ChatChunkChoice(index=i, delta=DeltaMessage(content=t or None), finish_reason=f) for i, t, f in deltas]
            return self._chunk(items, last=True)
        return self._text_chunks(deltas)

    def usage_chunk(self, usage: Usage) -> str:
        return self._chunk([], usage, last=True)

    def whole(self, choices: _Choices) -> BaseModel:
        items = [
            ChatChoice(
                index=i, message=AssistantMessage(content=choices.text[i]), finish_reason=choices.finish[i],
                logprobs=_logprobs(choices.logprobs[i], ChatLogprobs),
            )
            for i in range(self.body.n)
        ]
        return ChatCompletionResponse(
            id=self.request_id, created=self.created, model=self.body.model, choices=items, usage=choices.usage(),
            rag_sources=self.sources,
        )


def _request_id(request: Request, prefix: str) -> str:
    return f"{prefix}-{request.state.request_id}"  # the id in the access log and X-Request-Id


@v1.get("/models")
async def models(app: ServedDep) -> dict[str, Any]:
    created = int(time.time())
    names = app.config.served_model_names
    cards = [ModelCard(id=name, created=created, max_model_len=app.engine.max_model_len) for name in names]
    return ModelList(data=cards).model_dump()


@v1.post("/completions")
async def completions(request: Request, app: ServedDep) -> Response:
    async def plan(body: CompletionRequest) -> _Plan:
        shape = _CompletionShape(_request_id(request, "cmpl"), int(time.time()), body)
        return _Plan(_completion_prepare(app.engine, body), shape)

    return await _generate(request, app, CompletionRequest, plan)


@v1.post("/chat/completions")
async def chat_completions(request: Request, app: ServedDep) -> Response:
    async def plan(body: ChatCompletionRequest) -> _Plan:
        messages, sources = [m.as_template_dict() for m in body.messages], None
        if body.rag is not None:
            messages, sources = await _rag_messages(app, body)
        shape = _ChatShape(_request_id(request, "chatcmpl"), int(time.time()), body, sources)
        return _Plan(_chat_prepare(app.engine, body, messages), shape)

    return await _generate(request, app, ChatCompletionRequest, plan)


async def _rag_messages(app: Served, body: ChatCompletionRequest) -> tuple[list[dict[str, str]], list[Source]]:
    """The collection's layout for the question and the passages in it, retrieved off the loop."""
    options, rag = body.rag, app.config.rag
    assert options is not None
    if rag is None or options.collection not in rag.pipelines:
        names = sorted(rag.pipelines) if rag is not None else []
        raise ApiError(
            404,
            f"the RAG collection '{options.collection}' does not exist; this server serves {names}",
            code="collection_not_found",
            param="rag.collection",
        )
    try:
        return await asyncio.to_thread(rag.build_messages, options.collection, body.rag_question, options.top_k)
    except NoRelevantChunks as exc:
        # As `edgepaged rag ask` does: say so, and generate nothing.
        raise ApiError(422, str(exc), code="no_relevant_chunks", param="messages") from None


@operations.get("/health")
async def health(app: ServedDep) -> JSONResponse:
    ok = app.engine.healthy()
    return JSONResponse({"status": "ok" if ok else "unhealthy"}, status_code=200 if ok else 503)


@operations.get("/ready")
async def ready(app: ServedDep) -> JSONResponse:
    ok = app.engine.healthy() and app.engine.accepting
    return JSONResponse({"status": "ready" if ok else "not ready"}, status_code=200 if ok else 503)


@operations.get("/metrics")
async def prometheus(app: ServedDep) -> Response:
    return Response(app.metrics.render(), media_type=CONTENT_TYPE)
