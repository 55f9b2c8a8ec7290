"""What a server is configured with: its names, limits, browser-facing policy and RAG collections."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from edgepaged.rag import RagPipeline, Source
from edgepaged.server.protocol import RequestLimits


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
    """`allowed_hosts` are hostnames the Host header may carry besides `localhost` and IP
    addresses (`*`: any); `cors_origins` the browser origins allowed to read answers (none:
    CORS stays off, and browsers keep other sites' pages from reading them)."""

    served_model_names: list[str]
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    body_timeout_s: float = 30.0
    limits: RequestLimits = field(default_factory=RequestLimits)
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    rag: RagCollections | None = None
