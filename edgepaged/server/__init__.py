"""`edgepaged serve`: load the engine, warm it up, and run the OpenAI-compatible app under uvicorn.

This is where the pieces meet the process: systemd hears READY=1 only once the model is loaded,
warmed up and the socket is listening; SIGTERM starts a drain (stop accepting, finish what is
running, up to `drain_timeout` seconds) and the process then exits 0, so `systemctl stop` and a
deploy restart never cut an answer short. A dead engine loop ends the process with status 1, so
Restart=on-failure brings the box back without waiting for the watchdog.

RAG collections (`--rag NAME=DB_PATH`) are checked before the model loads, so a wrong path
fails the start in a second instead of after the load; they share one embedding model, warmed
up with the engine before READY=1.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import uvicorn

from edgepaged.engine import LLMEngine
from edgepaged.profiles import load_profile
from edgepaged.rag import DEFAULT_PIN_BUDGET, Embedder, RagIndexError, RagPipeline, RagStore
from edgepaged.sampling import SamplingParams
from edgepaged.server import systemd
from edgepaged.server.app import RagCollections, ServerConfig, create_app
from edgepaged.server.async_engine import AdmissionLimits, AsyncEngine

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ServeOptions:
    model: str | None
    profile: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    backend: str | None = None
    max_kv_blocks: int | None = None
    served_model_name: str | None = None
    max_waiting_requests: int | None = None  # None: the profile's scheduler bound
    max_waiting_tokens: int | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    drain_timeout: float = 30.0
    log_level: str = "info"
    rag: dict[str, Path] = field(default_factory=dict)  # collection name -> index file
    rag_pin: tuple[str, ...] = ()  # the collections whose hot prefixes stay pinned


def warm_up(engine: LLMEngine) -> None:
    """Run one short request through prefill and decode so first-use costs (kernel compiles,
    allocator growth) are paid before READY=1, not by the first client."""
    prompt = list(range(1, 2 * engine.config.block_size + 9))
    engine.add_request("edgepaged-warmup", prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    engine.run_to_completion(["edgepaged-warmup"])


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
        engine = LLMEngine.from_model(opts.model, profile, max_kv_blocks=opts.max_kv_blocks, backend=opts.backend)
        systemd.notify("STATUS=warming up")
        warm_up(engine)
        rag = None
        if embedder is not None:
            rag = open_rag(engine, opts.rag, opts.rag_pin, embedder)
            embedder.embed(["warm-up"])  # loads the embedding weights now, not at the first question
        limits = AdmissionLimits(
            max_waiting_requests=opts.max_waiting_requests or profile.scheduler.max_waiting_requests,
            max_waiting_tokens=opts.max_waiting_tokens or profile.scheduler.max_waiting_tokens,
        )
        async_engine = AsyncEngine(engine, limits)
        config = ServerConfig(
            served_model_names=[opts.served_model_name or engine.model_name],
            api_key=opts.api_key,
            max_body_bytes=opts.max_body_bytes,
            rag=rag,
        )
        uv_config = uvicorn.Config(
            create_app(async_engine, config),
            host=opts.host,
            port=opts.port,
            log_level=opts.log_level,
            timeout_graceful_shutdown=opts.drain_timeout,
            lifespan="on",
        )
        server = _SystemdServer(uv_config, async_engine, f"http://{opts.host}:{opts.port}")
        async_engine.on_failure = server.on_engine_failure
        server.run()
    finally:
        if watchdog is not None:
            watchdog.stop()
    if server.engine_failed:
        raise SystemExit(1)
