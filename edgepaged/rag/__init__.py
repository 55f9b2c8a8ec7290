"""Local retrieval-augmented generation: index a folder, retrieve, answer with shared KV prefixes.

Layering: chunking -> embed -> store (index) -> retrieve -> layout -> pipeline. Only the
pipeline touches the engine, and only through its public request and pinning API.
"""

from .chunking import (
    CorpusError,
    SkippedFile,
    TextChunk,
    chunk_text,
    collect_files,
    document_text,
)
from .embed import DEFAULT_EMBEDDING_MODEL, Embedder
from .layout import (
    DEFAULT_SYSTEM_PROMPT,
    ChunkOrder,
    RagPrompt,
    RenderedPrompt,
    build_prompt,
    render_prompt,
)
from .pipeline import DEFAULT_PIN_BUDGET, HotPrefixes, RagAnswer, RagPipeline, Source
from .retrieve import DEFAULT_MIN_SCORE, Hit, NoRelevantChunks, Retriever
from .store import (
    EmbeddingModelMismatch,
    IndexReport,
    RagIndexError,
    RagStore,
    StoredChunk,
    index_directory,
)

__all__ = [
    "DEFAULT_EMBEDDING_MODEL",
    "DEFAULT_MIN_SCORE",
    "DEFAULT_SYSTEM_PROMPT",
    "ChunkOrder",
    "CorpusError",
    "Embedder",
    "EmbeddingModelMismatch",
    "Hit",
    "DEFAULT_PIN_BUDGET",
    "HotPrefixes",
    "IndexReport",
    "NoRelevantChunks",
    "RagAnswer",
    "RagIndexError",
    "RagPipeline",
    "RagPrompt",
    "RagStore",
    "RenderedPrompt",
    "Retriever",
    "SkippedFile",
    "Source",
    "StoredChunk",
    "TextChunk",
    "build_prompt",
    "chunk_text",
    "collect_files",
    "document_text",
    "index_directory",
    "render_prompt",
]
