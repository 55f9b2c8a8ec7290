"""An asyncio front over the synchronous `LLMEngine`: one engine thread serves every client.

The engine is not thread-safe and `step()` blocks for a whole forward pass, so it lives on one
dedicated thread that owns it completely: HTTP handlers send it commands (add, abort) through
a queue, and it hands each step's outputs back to the event loop in one callback per step,
which wakes only the consumers that wait (`RequestStream`). That single owner is what gives
continuous batching across HTTP clients.

A request's preparation (tokenizing, rendering the chat template) runs on a third thread, the
tokenizer thread, so neither the event loop nor the engine loop waits for a multi-megabyte
prompt: the running streams keep their pace while it is tokenized. Encoding and decoding only
read the tokenizer, so the tokenizer thread and the engine thread's detokenizer may use it at
once; one tokenizer thread keeps encodes from overlapping one another.

Admission is decided on the event loop, before anything slow: a request counts as waiting from
its admission until it produces its first token (or ends). Past `max_waiting_requests` it is
refused with `QueueFull` at once, which the app answers with 429 before it even reads the
request's body (`refusal`, asked by the app's admission gate); past `max_waiting_tokens` once
its prompt length is known. A request alone in the
queue is always admitted, so one long prompt cannot be starved by a token bound smaller than
the context. `Retry-After` is the queue's recent wait, measured on the requests that left it.

Work that must touch the engine between requests rather than between steps (pinning hot RAG
prefixes, which runs prefills of its own and would swallow other requests' outputs) goes in
`on_idle`: the engine thread calls it each time the engine has drained, after the last
outputs are on their way to the clients.

The event loop outranks both threads for the CPU: they run at a lower priority (a higher nice
value, which the engine's torch worker threads inherit), so on a box whose cores the engine
keeps busy, a 429, a health check or the next SSE chunk waits for no forward pass, and a huge
prompt being tokenized takes its CPU from the engine last.

An exception from `step()` is an engine fault, not a request's: the engine's state is then
unknown, so every request in flight (queued, tokenizing or running) is failed with
`EngineUnavailable` and `on_failure` is told, which ends the process for systemd to restart.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from edgepaged.engine import LLMEngine
from edgepaged.outputs import EngineStats, RequestOutput, merge_deltas
from edgepaged.sampling import SamplingParams
from edgepaged.server.metrics import QueueState

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.25  # how often an idle engine thread wakes to refresh its heartbeat
ENGINE_NICE = 5  # added to the process's nice value on the engine thread
TOKENIZER_NICE = 10  # and on the tokenizer thread
_WAIT_SMOOTHING = 0.2  # weight of the newest queue wait in the Retry-After estimate


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


@dataclass(slots=True)
class PreparedRequest:
    prompt_token_ids: list[int]
    params: SamplingParams


# A request's preparation runs on the tokenizer thread (tokenizer, chat template, parameters
# that depend on the prompt length); it raises RequestError for input the server must refuse.
Prepare = Callable[[], PreparedRequest]


@dataclass(slots=True)
class _Add:
    request_id: str
    prepared: PreparedRequest
    admitted: asyncio.Future[None]


@dataclass(slots=True)
class _Abort:
    request_id: str


@dataclass(slots=True)
class _Waiting:
    """A request admitted to the queue that has not produced a token yet (event loop only)."""

    since: float
    prompt_tokens: int = 0  # known once tokenized


class RequestStream:
    """The outputs of one request, as an async iterator; `close()` aborts it if unfinished.

    Outputs are deltas (OutputKind.DELTA). The engine thread's one callback per step appends
    each request's output here and wakes its consumer only if it is waiting; a consumer that
    fell behind (a slow client, a busy loop) takes everything queued meanwhile as one merged
    output, so it sends fewer, larger chunks instead of falling further behind.
    """

    __slots__ = ("request_id", "_owner", "_pending", "_error", "_wake", "_done")

    def __init__(self, owner: AsyncEngine, request_id: str):
        self.request_id = request_id
        self._owner = owner
        self._pending: list[RequestOutput] = []
        self._error: BaseException | None = None
        self._wake: asyncio.Future[None] | None = None
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        while not self._pending and self._error is None:
            if self._done:
                raise StopAsyncIteration
            self._wake = asyncio.get_running_loop().create_future()
            try:
                await self._wake
            finally:
                self._wake = None
        if not self._pending:
            self._done = True
            raise self._error
        pending, self._pending = self._pending, []
        out = functools.reduce(merge_deltas, pending) if len(pending) > 1 else pending[0]
        self._done = self._done or out.finished
        return out

    def close(self) -> None:
        """Abort the request unless it finished; its KV blocks are freed on the next loop turn.
        A consumer waiting for the next output ends its iteration."""
        if not self._done:
            self._done = True
            self._owner.abort(self.request_id)
            self._wake_consumer()

    def _push(self, output: RequestOutput) -> None:
        self._pending.append(output)
        self._wake_consumer()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._wake_consumer()

    def _wake_consumer(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)


class EngineThread:
    """The one thread that builds the engine and then runs its loop (a daemon, as before).

    Built on one thread and stepped on another, the CPU engine ran a decode step in 24-27 ms
    instead of 12 (2-core x86, torch 2.13, two intra-op threads: the thread that made the model
    keeps its OpenMP team). So the server builds the engine here, where it will run."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], object], Future] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="edgepaged-engine", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], object]) -> Future:
        done: Future = Future()
        self._jobs.put((fn, done))
        return done

    def call(self, fn: Callable[[], object]):
        """Run `fn` on the engine thread and wait for its result (or its exception)."""
        return self.submit(fn).result()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, done = job
            if done.set_running_or_notify_cancel():
                try:
                    done.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    done.set_exception(exc)


class AsyncEngine:
    """Owns the engine and tokenizer threads; every public method is called from the event loop."""

    def __init__(self, engine: LLMEngine, limits: AdmissionLimits, thread: EngineThread | None = None):
        self.engine = engine
        self.limits = limits
        self.model_name: str = engine.model_name
        self.max_model_len: int = engine.max_model_len
        self.vocab_size: int = engine.model_config.vocab_size
        self.on_failure: Callable[[BaseException], None] | None = None  # e.g. stop the HTTP server
        self.on_idle: Callable[[], object] | None = None  # engine thread, each time the engine drains
        self._commands: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._admissions: dict[str, asyncio.Future[None]] = {}  # sent to the engine thread, not answered yet
        self._waiting: dict[str, _Waiting] = {}
        self._waiting_tokens = 0
        self._recent_wait_s = 1.0  # smoothed seconds from admission to first token
        self._stats = engine.stats()
        self._heartbeat = time.monotonic()
        self._failure: BaseException | None = None
        self._accepting = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = thread or EngineThread()  # the engine's loop runs there from start()
        self._loop_done: Future | None = None
        self._tokenizer = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="edgepaged-tokenize", initializer=_lower_priority, initargs=(TOKENIZER_NICE,)
        )

    # ---- event-loop side -------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        self._loop_done = self._thread.submit(self._run)

    async def stop(self) -> None:
        """Stop the engine thread; requests still unfinished are aborted and their streams fail."""
        self._accepting = False
        if self._running():
            self._commands.put(None)
            await asyncio.to_thread(self._loop_done.result)
        self._tokenizer.shutdown(wait=False, cancel_futures=True)
        self._fail_streams(EngineUnavailable("the server stopped before the request finished"))

    def _running(self) -> bool:
        return self._loop_done is not None and not self._loop_done.done()

    def stop_accepting(self) -> None:
        """Refuse new requests from now on (graceful shutdown); running ones go on."""
        self._accepting = False

    @property
    def accepting(self) -> bool:
        return self._accepting and self._failure is None

    def _check_accepting(self) -> None:
        if not self.accepting:
            raise EngineUnavailable("the server is shutting down" if self._failure is None else "the engine has failed")

    async def add(self, request_id: str, prepare: Prepare) -> RequestStream:
        """Admit a request, or raise QueueFull, RequestError or EngineUnavailable."""
        self._check_accepting()
        assert self._loop is not None and request_id not in self._waiting and request_id not in self._streams
        refused = self.refusal()
        if refused is not None:
            raise refused
        waiting = self._waiting[request_id] = _Waiting(time.monotonic())
        try:
            prepared = await self._loop.run_in_executor(self._tokenizer, prepare)
            tokens = len(prepared.prompt_token_ids)
            if len(self._waiting) > 1 and self._waiting_tokens + tokens > self.limits.max_waiting_tokens:
                raise self._queue_full()
            self._check_accepting()  # the engine may have failed or begun draining meanwhile
            waiting.prompt_tokens = tokens
            self._waiting_tokens += tokens
            admitted = self._loop.create_future()
            self._streams[request_id] = stream = RequestStream(self, request_id)
            self._admissions[request_id] = admitted
            self._commands.put(_Add(request_id, prepared, admitted))
            await admitted
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        except BaseException:
            self._streams.pop(request_id, None)
            self._leave_queue(request_id)
            raise
        finally:
            self._admissions.pop(request_id, None)
        return stream

    def abort(self, request_id: str) -> None:
        self._leave_queue(request_id)
        if self._streams.pop(request_id, None) is not None:
            self._commands.put(_Abort(request_id))

    def stats(self) -> EngineStats:
        return self._stats

    def queue_state(self) -> QueueState:
        return QueueState(len(self._waiting), self._waiting_tokens, self.healthy())

    def healthy(self, max_stall_s: float = 60.0) -> bool:
        """The loop is alive and has turned within `max_stall_s` (safe from any thread)."""
        return self._failure is None and self._running() and time.monotonic() - self._heartbeat < max_stall_s

    def refusal(self) -> QueueFull | None:
        """The 429 a new request gets now, or None: the request-count bound, which needs nothing
        of the request, so the app can answer it before reading the body (`AdmissionGate`)."""
        if self._waiting and len(self._waiting) >= self.limits.max_waiting_requests:
            return self._queue_full()
        return None

    def _queue_full(self) -> QueueFull:
        return QueueFull(
            f"the server is at capacity ({len(self._waiting)} requests, "
            f"{self._waiting_tokens} prompt tokens waiting); retry later",
            max(1, math.ceil(self._recent_wait_s)),
        )

    def _leave_queue(self, request_id: str) -> None:
        waiting = self._waiting.pop(request_id, None)
        if waiting is not None:
            self._waiting_tokens -= waiting.prompt_tokens

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted by its client while the step ran
            waiting = self._waiting.get(out.request_id)
            if waiting is not None and (out.finished or any(c.token_ids for c in out.outputs)):
                self._leave_queue(out.request_id)
                wait = now - waiting.since
                self._recent_wait_s += _WAIT_SMOOTHING * (wait - self._recent_wait_s)
            stream._push(out)
            if out.finished:
                del self._streams[out.request_id]

    def _fail_streams(self, error: BaseException) -> None:
        """End every request the engine thread will no longer serve, admitted or still queued."""
        for admitted in self._admissions.values():
            _settle(admitted, error)
        for stream in self._streams.values():
            stream._fail(error)
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
        _lower_priority(ENGINE_NICE)
        live: set[str] = set()  # admitted to the engine and not finished
        try:
            while self._handle_commands(live):
                if self.engine.has_unfinished_requests():
                    outputs = self.engine.step()
                    live.difference_update(out.request_id for out in outputs if out.finished)
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
        for request_id in live:
            self.engine.abort_request(request_id)

    def _drained(self) -> None:
        """Run `on_idle`; its failure is logged, not fatal: serving matters more than upkeep, and
        a broken engine shows itself at the next step anyway."""
        if self.on_idle is None:
            return
        try:
            self.on_idle()
        except Exception:
            log.exception("idle hook failed")

    def _handle_commands(self, live: set[str]) -> bool:
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
                if command.request_id in live:
                    live.discard(command.request_id)
                    self.engine.abort_request(command.request_id)
                continue
            try:
                self.engine.add_request(command.request_id, command.prepared.prompt_token_ids, command.prepared.params)
            except Exception as exc:  # noqa: BLE001 - a request's own failure is its answer, not the loop's death
                self._post(_settle, command.admitted, exc)
                continue
            live.add(command.request_id)
            self._post(_settle, command.admitted, None)


def _lower_priority(increment: int) -> None:
    """Raise the calling thread's nice value (Linux gives each thread its own; threads it
    starts inherit it). Lowering priority needs no privilege; where it fails, nothing does."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + increment)
    except OSError:
        log.debug("could not lower the priority of %s", threading.current_thread().name)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    """Resolve an admission future unless its handler was cancelled meanwhile."""
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
