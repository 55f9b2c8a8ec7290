"""`edgepaged serve`: load the engine, warm it up, and run the OpenAI-compatible app under uvicorn.

This is where the pieces meet the process: systemd hears READY=1 only once the model is loaded,
warmed up and the socket is listening; SIGTERM starts a drain (stop accepting, finish what is
running, up to `drain_timeout` seconds) and the process then exits 0, so `systemctl stop` and a
deploy restart never cut an answer short. A dead engine loop ends the process with status 1, so
Restart=on-failure brings the box back without waiting for the watchdog.

RAG collections (`--rag NAME=DB_PATH`) are checked before the model loads, so a wrong path
fails the start in a second instead of after the load; they share one embedding model, warmed
up with the engine before READY=1.

The warm-up also times a decode step with the profile's full batch running, and the default
cap on waiting requests follows from it: a box that decodes slowly refuses early with 429
instead of queueing requests for minutes (`queue_bound`).
"""

from __future__ import annotations

import functools
import logging
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import uvicorn

from edgepaged.engine import LLMEngine
from edgepaged.profiles import DeviceProfile, load_profile
from edgepaged.rag import (
    DEFAULT_PIN_BUDGET,
    Embedder,
    RagIndexError,
    RagPipeline,
    RagStore,
)
from edgepaged.sampling import SamplingParams
from edgepaged.server import systemd
from edgepaged.server.app import RagCollections, ServerConfig, create_app
from edgepaged.server.async_engine import AdmissionLimits, AsyncEngine, EngineThread
from edgepaged.server.middleware import HeaderDeadline
from edgepaged.server.protocol import RequestLimits

log = logging.getLogger(__name__)

# The answer length the default queue bound assumes: a chat reply of a paragraph or two.
TYPICAL_ANSWER_TOKENS = 128
_WARMUP_TOKENS = 8


@dataclass(slots=True)
class ServeOptions:
    model: str | None
    profile: str | DeviceProfile = "cpu"  # a name, a YAML path or a loaded profile
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    backend: str | None = None
    max_kv_blocks: int | None = None
    served_model_name: str | None = None
    max_waiting_requests: int | None = None  # None: what `max_queue_wait` allows (`queue_bound`)
    max_waiting_tokens: int | None = None  # None: the profile's scheduler bound
    max_queue_wait: float = 30.0
    max_body_bytes: int = 4 * 1024 * 1024
    limits: RequestLimits = field(default_factory=RequestLimits)
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    drain_timeout: float = 30.0
    log_level: str = "info"
    rag: dict[str, Path] = field(default_factory=dict)  # collection name -> index file
    rag_pin: tuple[str, ...] = ()  # the collections whose hot prefixes stay pinned


def warm_up(engine: LLMEngine, batch: int) -> float:
    """Pay first-use costs (kernel compiles, allocator growth) before READY=1, not with the first
    clients: one request alone, then `batch` at once; return the seconds of a decode step with
    `batch` sequences running, timed on the last steps of the second round."""
    block, vocab = engine.config.block_size, engine.model_config.vocab_size
    params = SamplingParams(max_tokens=_WARMUP_TOKENS, temperature=0.0, ignore_eos=True)
    engine.add_request("edgepaged-warmup", list(range(1, 2 * block + 9)), params)
    engine.run_to_completion(["edgepaged-warmup"])
    for i in range(batch):
        # Distinct first tokens, so no sequence shares another's prefix blocks.
        engine.add_request(f"edgepaged-warmup-{i}", [1 + i * 31 % (vocab - 1), *range(2, block + 2)], params)
    steps = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - start)
    return statistics.median(steps[-_WARMUP_TOKENS // 2 :])  # by then every sequence only decodes


def queue_bound(max_num_seqs: int, step_s: float, max_wait_s: float, cap: int) -> int:
    """How many requests may wait when each should start within `max_wait_s`.

    A waiting request starts when a running one finishes: with `max_num_seqs` running, a
    decode step of `step_s` and answers of TYPICAL_ANSWER_TOKENS, a slot frees every
    TYPICAL_ANSWER_TOKENS * step_s / max_num_seqs seconds, so that many fit in the wait bound.
    Prefill time is left out (it is short next to an answer's decode), and `cap` (the
    profile's bound) still holds on a fast box.
    """
    starts_per_s = max_num_seqs / (TYPICAL_ANSWER_TOKENS * step_s)
    return max(1, min(cap, int(max_wait_s * starts_per_s)))


def check_rag_indexes(paths: dict[str, Path], embedder: Embedder) -> None:
    """Refuse an index that is missing, not an index, empty or embedded with another model,
    naming the collection, before anything slow happens."""
    for name, path in paths.items():
        try:
            store = RagStore(path)
            try:
                if store.num_chunks() == 0:
                    raise RagIndexError(f"{path} holds no chunks: run `edgepaged rag index DIR --db {path}`")
                store.bind_embedder(embedder.name, embedder.dim)  # with chunks present, this only compares
            finally:
                store.close()
        except RagIndexError as exc:
            raise RagIndexError(f"--rag {name}: {exc}") from exc


def open_rag(
    engine: LLMEngine, paths: dict[str, Path], pins: tuple[str, ...], embedder: Embedder
) -> RagCollections:
    """One pipeline per collection over the shared embedder. Only those in `pins` record hot
    prefixes; they pin apart from one another and share a quarter of the pool between them."""
    budget = DEFAULT_PIN_BUDGET / max(len(pins), 1)
    pipelines = {
        name: RagPipeline(engine, path, embedder=embedder, pin_hot_prefixes=name in pins, pin_budget=budget)
        for name, path in paths.items()
    }
    return RagCollections(pipelines, pins)


class _SystemdServer(uvicorn.Server):
    """uvicorn with systemd's notifications and a drain that ends in exit status 0.

    uvicorn re-raises a caught SIGTERM after its graceful shutdown, which would end the process
    by the signal; our handler starts the same graceful shutdown but leaves the exit to us.
    """

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, where: str):
        super().__init__(config)
        self.engine = engine
        self.where = where
        self.engine_failed = False

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets)
        if self.started and not self.should_exit:
            systemd.notify_ready(f"serving {self.engine.model_name} on {self.where}")

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            self.force_exit = self.force_exit or sig == signal.SIGINT  # a second Ctrl+C: stop now
            return
        log.info(
            "signal %s: draining in-flight requests (up to %.0f s)",
            signal.Signals(sig).name,
            self.config.timeout_graceful_shutdown or 0,
        )
        self.engine.stop_accepting()
        systemd.notify_stopping("draining in-flight requests")
        self.should_exit = True

    def on_engine_failure(self, error: BaseException) -> None:
        self.engine_failed = True
        self.engine.stop_accepting()
        systemd.notify_stopping(f"engine failed: {type(error).__name__}")
        self.should_exit = True


def run(opts: ServeOptions) -> None:
    """Serve until SIGTERM/SIGINT; raises SystemExit(1) if the engine loop died."""
    logging.basicConfig(level=opts.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    period = systemd.watchdog_period()
    async_engine: AsyncEngine | None = None

    def healthy() -> bool:
        # While the model loads there is no loop to judge; TimeoutStartSec covers a hung load.
        return async_engine is None or async_engine.healthy(max_stall_s=2 * period)

    watchdog = systemd.Watchdog(period, healthy) if period else None
    if watchdog is not None:
        watchdog.start()
    try:
        embedder = Embedder() if opts.rag else None
        if embedder is not None:
            check_rag_indexes(opts.rag, embedder)
        systemd.notify("STATUS=loading the model")
        profile = load_profile(opts.profile)
        scheduler = profile.scheduler
        # Built, warmed up and (with RAG) pinned on the thread that will step it (EngineThread).
        engine_thread = EngineThread()
        engine = engine_thread.call(
            lambda: LLMEngine.from_model(opts.model, profile, max_kv_blocks=opts.max_kv_blocks, backend=opts.backend)
        )
        systemd.notify("STATUS=warming up")
        step_s = engine_thread.call(lambda: warm_up(engine, scheduler.max_num_seqs))
        rag = None
        if embedder is not None:
            rag = engine_thread.call(lambda: open_rag(engine, opts.rag, opts.rag_pin, embedder))
            embedder.embed(["warm-up"])  # loads the embedding weights now, not at the first question
        bound = queue_bound(scheduler.max_num_seqs, step_s, opts.max_queue_wait, scheduler.max_waiting_requests)
        limits = AdmissionLimits(
            max_waiting_requests=opts.max_waiting_requests or bound,
            max_waiting_tokens=opts.max_waiting_tokens or scheduler.max_waiting_tokens,
        )
        log.info(
            "decode step %.0f ms with %d sequences: up to %d requests wait (%d for a %.0f s wait)",
            step_s * 1000, scheduler.max_num_seqs, limits.max_waiting_requests, bound, opts.max_queue_wait,
        )
        async_engine = AsyncEngine(engine, limits, engine_thread)
        config = ServerConfig(
            served_model_names=[opts.served_model_name or engine.model_name],
            api_key=opts.api_key,
            max_body_bytes=opts.max_body_bytes,
            body_timeout_s=opts.body_timeout,
            limits=opts.limits,
            allowed_hosts=(*opts.allowed_hosts, opts.host),
            cors_origins=opts.cors_origins,
            rag=rag,
        )
        uv_config = uvicorn.Config(
            create_app(async_engine, config),
            host=opts.host,
            port=opts.port,
            log_level=opts.log_level,
            timeout_graceful_shutdown=opts.drain_timeout,
            lifespan="on",
            access_log=False,  # the app's own access log has the request id and never the body
            http=functools.partial(HeaderDeadline, header_timeout=opts.header_timeout),
        )
        server = _SystemdServer(uv_config, async_engine, f"http://{opts.host}:{opts.port}")
        async_engine.on_failure = server.on_engine_failure
        server.run()
    finally:
        if watchdog is not None:
            watchdog.stop()
    if server.engine_failed:
        raise SystemExit(1)
