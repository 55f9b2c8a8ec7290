"""An asyncio front over the synchronous `LLMEngine`: one engine thread serves every client.

The engine is not thread-safe and `step()` blocks for a whole forward pass, so it lives on one
dedicated thread that owns it completely: HTTP handlers send it commands (add, abort) through
a queue, and it hands each step's outputs back to the event loop in one callback per step. That
single owner is what gives continuous batching across HTTP clients, and it is why the prompt is
tokenized on that thread too (a transformers tokenizer shared with the engine's detokenizer is
not safe to call from two threads).

Admission is decided on the engine thread as well, so the bound is exact: a request counts as
waiting, with its prompt tokens, from admission until it produces its first token. Past
`max_waiting_requests` or `max_waiting_tokens` it is refused with `QueueFull`, which the app
answers with 429; a request alone in the queue is always admitted, so one long prompt cannot be
starved by a token bound smaller than the context.

Work that must touch the engine between requests rather than between steps (pinning hot RAG
prefixes, which runs prefills of its own and would swallow other requests' outputs) goes in
`on_idle`: the engine thread calls it each time the engine has drained, after the last
outputs are on their way to the clients.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from edgepaged.engine import LLMEngine
from edgepaged.outputs import EngineStats, RequestOutput
from edgepaged.sampling import SamplingParams
from edgepaged.server.metrics import QueueState

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.25  # how often an idle engine thread wakes to refresh its heartbeat


class QueueFull(Exception):
    """The waiting queue is at its bound; the client should retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class EngineUnavailable(RuntimeError):
    """The engine is draining for shutdown or its loop has died; nothing new can run."""


@dataclass(slots=True)
class AdmissionLimits:
    max_waiting_requests: int
    max_waiting_tokens: int
    retry_after_s: int = 1


@dataclass(slots=True)
class PreparedRequest:
    prompt_token_ids: list[int]
    params: SamplingParams


# A request's preparation runs on the engine thread (tokenizer, chat template, parameters that
# depend on the prompt length); it raises RequestError for input the server must refuse.
Prepare = Callable[[], PreparedRequest]


@dataclass(slots=True)
class _Add:
    request_id: str
    prepare: Prepare
    admitted: asyncio.Future[None]


@dataclass(slots=True)
class _Abort:
    request_id: str


@dataclass(slots=True)
class _Live:
    """Engine-thread bookkeeping of one admitted, unfinished request."""

    prompt_tokens: int
    waiting: bool = True


class RequestStream:
    """The outputs of one request, as an async iterator; `close()` aborts it if unfinished.

    Outputs are cumulative, so when the consumer falls behind only the newest one matters:
    each step returns the latest output queued, and a slow client never makes the queue grow.
    """

    def __init__(self, owner: AsyncEngine, request_id: str, outputs: asyncio.Queue[RequestOutput | BaseException]):
        self.request_id = request_id
        self._owner = owner
        self._outputs = outputs
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self._outputs.get()
        while not self._outputs.empty() and not isinstance(item, BaseException):
            item = self._outputs.get_nowait()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._done = item.finished
        return item

    def close(self) -> None:
        """Abort the request unless it finished; its KV blocks are freed on the next loop turn."""
        if not self._done:
            self._done = True
            self._owner.abort(self.request_id)


class AsyncEngine:
    """Owns the engine thread; every public method is called from the event loop."""

    def __init__(self, engine: LLMEngine, limits: AdmissionLimits):
        self.engine = engine
        self.limits = limits
        self.model_name: str = engine.model_name
        self.max_model_len: int = engine.max_model_len
        self.on_failure: Callable[[BaseException], None] | None = None  # e.g. stop the HTTP server
        self.on_idle: Callable[[], object] | None = None  # engine thread, each time the engine drains
        self._commands: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._admissions: dict[str, asyncio.Future[None]] = {}  # sent to the engine thread, not answered yet
        self._live: dict[str, _Live] = {}  # engine thread only
        self._waiting_requests = 0  # written by the engine thread, read anywhere
        self._waiting_tokens = 0
        self._stats = engine.stats()
        self._heartbeat = time.monotonic()
        self._failure: BaseException | None = None
        self._accepting = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="edgepaged-engine", daemon=True)

    # ---- event-loop side -------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        self._thread.start()

    async def stop(self) -> None:
        """Stop the engine thread; requests still unfinished are aborted and their streams fail."""
        self._accepting = False
        if self._thread.is_alive():
            self._commands.put(None)
            await asyncio.to_thread(self._thread.join)
        self._fail_streams(EngineUnavailable("the server stopped before the request finished"))

    def stop_accepting(self) -> None:
        """Refuse new requests from now on (graceful shutdown); running ones go on."""
        self._accepting = False

    @property
    def accepting(self) -> bool:
        return self._accepting and self._failure is None

    async def add(self, request_id: str, prepare: Prepare) -> RequestStream:
        """Admit a request, or raise QueueFull, RequestError or EngineUnavailable."""
        if not self.accepting:
            raise EngineUnavailable("the server is shutting down" if self._failure is None else "the engine has failed")
        assert self._loop is not None and request_id not in self._streams
        outputs: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        admitted = self._loop.create_future()
        self._streams[request_id] = outputs
        self._admissions[request_id] = admitted
        self._commands.put(_Add(request_id, prepare, admitted))
        try:
            await admitted
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        finally:
            self._admissions.pop(request_id, None)
        return RequestStream(self, request_id, outputs)

    def abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self._commands.put(_Abort(request_id))

    def stats(self) -> EngineStats:
        return self._stats

    def queue_state(self) -> QueueState:
        return QueueState(self._waiting_requests, self._waiting_tokens, self.healthy())

    def healthy(self, max_stall_s: float = 60.0) -> bool:
        """The loop is alive and has turned within `max_stall_s` (safe from any thread)."""
        return self._failure is None and self._thread.is_alive() and time.monotonic() - self._heartbeat < max_stall_s

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted by its client while the step ran
            stream.put_nowait(out)
            if out.finished:
                del self._streams[out.request_id]

    def _fail_streams(self, error: BaseException) -> None:
        """End every request the engine thread will no longer serve, admitted or still queued."""
        for admitted in self._admissions.values():
            _settle(admitted, error)
        for stream in self._streams.values():
            stream.put_nowait(error)
        self._streams.clear()

    def _on_loop_failure(self, error: BaseException) -> None:
        self._fail_streams(EngineUnavailable(f"the engine failed: {type(error).__name__}"))
        if self.on_failure is not None:
            self.on_failure(error)

    # ---- engine-thread side ----------------------------------------------------------------

    def _post(self, callback: Callable[..., None], *args: object) -> None:
        assert self._loop is not None
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(callback, *args)

    def _run(self) -> None:
        try:
            while self._handle_commands():
                if self.engine.has_unfinished_requests():
                    outputs = self.engine.step()
                    self._track(outputs)
                    self._post(self._deliver, outputs)
                    if not self.engine.has_unfinished_requests():
                        self._drained()
                self._stats = self.engine.stats()
                self._heartbeat = time.monotonic()
        except BaseException as exc:  # the loop must report any death, not vanish silently
            log.exception("engine loop failed")
            self._failure = exc
            self._post(self._on_loop_failure, exc)
            return
        for request_id in list(self._live):
            self.engine.abort_request(request_id)
        self._live.clear()

    def _drained(self) -> None:
        """Run `on_idle`; its failure is logged, not fatal: serving matters more than upkeep, and
        a broken engine shows itself at the next step anyway."""
        if self.on_idle is None:
            return
        try:
            self.on_idle()
        except Exception:
            log.exception("idle hook failed")

    def _handle_commands(self) -> bool:
        """Apply queued commands; block briefly only when the engine has nothing to do."""
        block = not self.engine.has_unfinished_requests()
        while True:
            try:
                command = self._commands.get(timeout=_IDLE_WAIT_S) if block else self._commands.get_nowait()
            except queue.Empty:
                return True
            block = False
            if command is None:
                return False
            if isinstance(command, _Abort):
                live = self._live.pop(command.request_id, None)
                if live is not None:
                    self._leave_queue(live)
                    self.engine.abort_request(command.request_id)
            else:
                self._admit(command)

    def _admit(self, command: _Add) -> None:
        try:
            prepared = command.prepare()
            tokens = len(prepared.prompt_token_ids)
            limits = self.limits
            if self._waiting_requests and (
                self._waiting_requests >= limits.max_waiting_requests
                or self._waiting_tokens + tokens > limits.max_waiting_tokens
            ):
                raise QueueFull(
                    f"the server is at capacity ({self._waiting_requests} requests, "
                    f"{self._waiting_tokens} prompt tokens waiting); retry later",
                    limits.retry_after_s,
                )
            self.engine.add_request(command.request_id, prepared.prompt_token_ids, prepared.params)
        except Exception as exc:  # a request's own failure is its answer, not the loop's death
            self._post(_settle, command.admitted, exc)
            return
        self._live[command.request_id] = _Live(tokens)
        self._waiting_requests += 1
        self._waiting_tokens += tokens
        self._post(_settle, command.admitted, None)

    def _track(self, outputs: list[RequestOutput]) -> None:
        """Move requests out of the waiting count at their first token, forget finished ones."""
        for out in outputs:
            live = self._live.get(out.request_id)
            if live is None:
                continue
            if live.waiting and (out.finished or any(c.token_ids for c in out.outputs)):
                self._leave_queue(live)
            if out.finished:
                del self._live[out.request_id]

    def _leave_queue(self, live: _Live) -> None:
        if live.waiting:
            live.waiting = False
            self._waiting_requests -= 1
            self._waiting_tokens -= live.prompt_tokens


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    """Resolve an admission future unless its handler was cancelled meanwhile."""
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
