"""Cosine top-k over the index's vectors, with a floor below which nothing counts as relevant.

Brute force in numpy: an edge knowledge base of a few hundred thousand chunks is one matrix
product per question, fast enough that an approximate index would only add moving parts.
The similarity floor is what lets a question about something the corpus never mentions be
answered "not in the documents" instead of with whatever chunk happened to score highest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgepaged.errors import EdgepagedError
from edgepaged.rag.embed import Embedder
from edgepaged.rag.store import RagStore, StoredChunk

# Measured on the fixture corpus (64-token chunks): off-topic questions reach at most 0.28 with
# all-MiniLM-L6-v2, while the chunk that answers a question scores 0.49 or more.
DEFAULT_MIN_SCORE = 0.3


class NoRelevantChunks(EdgepagedError):
    """No chunk in the index is similar enough to the question to answer from."""


@dataclass(slots=True)
class Hit:
    chunk: StoredChunk
    score: float


class Retriever:
    """Holds the index's vectors in memory and reloads them when the index file changes."""

    def __init__(self, store: RagStore, embedder: Embedder, min_score: float = DEFAULT_MIN_SCORE):
        store.bind_embedder(embedder.name, embedder.dim)
        self.store = store
        self.embedder = embedder
        self.min_score = min_score
        self._version: tuple[int, int] | None = None
        self._ids = np.zeros(0, dtype=np.int64)
        self._matrix = np.zeros((0, embedder.dim), dtype=np.float32)

    def _refresh(self) -> None:
        version = self.store.version()
        if version != self._version:
            self._ids, self._matrix = self.store.load_vectors()
            self._version = version

    def search(self, question: str, top_k: int = 4) -> list[Hit]:
        """The `top_k` most similar chunks at or above `min_score`, best first (ties by chunk id).

        Raises NoRelevantChunks, with the best score seen, when none clears the floor.
        """
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        self._refresh()
        if len(self._ids) == 0:
            raise NoRelevantChunks(f"the index {self.store.path} holds no chunks")
        query = self.embedder.embed([question])[0]
        scores = self._matrix @ query
        # Score descending, then chunk id: the same question always gets the same chunks.
        best = np.lexsort((self._ids, -scores))[:top_k].tolist()
        kept = [i for i in best if scores[i] >= self.min_score]
        if not kept:
            raise NoRelevantChunks(
                f"no indexed chunk is relevant to {question!r}: the best similarity is "
                f"{float(scores[best[0]]):.2f}, below the {self.min_score:.2f} threshold"
            )
        chunks = self.store.get_chunks([int(self._ids[i]) for i in kept])
        return [Hit(chunks[int(self._ids[i])], float(scores[i])) for i in kept]
