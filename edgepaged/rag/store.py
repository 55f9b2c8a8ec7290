"""The RAG index: one SQLite file holding documents, their chunks and the chunk vectors.

One file so an edge box can copy, back up or delete a knowledge base as a unit. Every change
to one document (its row, its old chunks gone, its new chunks in) is a single transaction, so
a crash or a full disk mid-run leaves each document either fully old or fully new; the next
run picks up from there because the content hash is written with the chunks it describes.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgepaged.errors import EdgepagedError
from edgepaged.rag.chunking import (
    SkippedFile,
    TextChunk,
    Tokenizer,
    chunk_text,
    collect_files,
    document_text,
)
from edgepaged.rag.embed import Embedder

DEFAULT_MAX_FILE_BYTES = 5 * 1024 * 1024  # ~1.3M tokens of English: beyond that, likely a log or a dump

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    content_hash TEXT NOT NULL,
    mtime_ns INTEGER NOT NULL,
    size INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY,
    doc_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    chunk_index INTEGER NOT NULL,
    text TEXT NOT NULL,
    token_count INTEGER NOT NULL,
    vector BLOB NOT NULL,
    UNIQUE (doc_id, chunk_index)
);
"""


class RagIndexError(EdgepagedError):
    """An index that cannot be used as asked: missing, not an index, or built differently."""


class EmbeddingModelMismatch(RagIndexError):
    """The index's vectors come from another embedding model than the one in use."""


@dataclass(slots=True)
class StoredChunk:
    chunk_id: int
    path: str
    chunk_index: int
    text: str
    token_count: int


@dataclass(slots=True)
class _DocRow:
    doc_id: int
    content_hash: str
    mtime_ns: int
    size: int


@dataclass(slots=True)
class IndexReport:
    """What one `index_directory` run did; `embedded_chunks == 0` means it did no model work."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # one message per file left out
    embedded_chunks: int = 0


class RagStore:
    """Typed access to the index file; knows SQL, not models."""

    def __init__(self, db_path: str | Path, *, create: bool = False):
        self.path = Path(db_path)
        if not create and not self.path.is_file():
            raise RagIndexError(f"no index at {self.path}: build one with `edgepaged rag index DIR --db {self.path}`")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are explicit (see `transaction`), never implicit. The
        # connection may be used from more than one thread; its users serialise their calls.
        self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self.conn.execute("PRAGMA foreign_keys = ON")
            self.conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            self.conn.close()
            raise RagIndexError(f"{self.path} is not an edgepaged RAG index ({exc})") from exc

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, key: str, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def bind_embedder(self, name: str, dim: int) -> None:
        """Record the embedding model on first use; refuse any other model afterwards."""
        stored_name, stored_dim = self.get_meta("embedding_model"), self.get_meta("embedding_dim")
        if stored_name is None:
            with self.transaction():
                self._set_meta("embedding_model", name)
                self._set_meta("embedding_dim", str(dim))
            return
        if stored_name != name or int(stored_dim or 0) != dim:
            raise EmbeddingModelMismatch(
                f"{self.path} was built with embedding model {stored_name} ({stored_dim}-d), "
                f"but this run uses {name} ({dim}-d); vectors from different models cannot be "
                f"compared. Use the same embedding model, or index into a new --db."
            )

    @property
    def embedding_dim(self) -> int:
        dim = self.get_meta("embedding_dim")
        if dim is None:
            raise RagIndexError(f"{self.path} holds no embeddings yet: run `edgepaged rag index DIR --db {self.path}`")
        return int(dim)

    def documents(self) -> dict[str, _DocRow]:
        rows = self.conn.execute("SELECT path, id, content_hash, mtime_ns, size FROM documents")
        return {path: _DocRow(doc_id, h, mtime, size) for path, doc_id, h, mtime, size in rows}

    def num_chunks(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]

    def replace_document(
        self, path: str, content_hash: str, mtime_ns: int, size: int, chunks: Sequence[TextChunk], vectors: np.ndarray
    ) -> None:
        """Swap in a document's new chunks and vectors, all or nothing."""
        assert vectors.shape == (len(chunks), self.embedding_dim), (vectors.shape, len(chunks))
        blobs = vectors.astype("<f4", copy=False)
        with self.transaction() as conn:
            conn.execute("DELETE FROM documents WHERE path = ?", (path,))
            doc_id = conn.execute(
                "INSERT INTO documents (path, content_hash, mtime_ns, size) VALUES (?, ?, ?, ?)",
                (path, content_hash, mtime_ns, size),
            ).lastrowid
            conn.executemany(
                "INSERT INTO chunks (doc_id, chunk_index, text, token_count, vector) VALUES (?, ?, ?, ?, ?)",
                ((doc_id, c.index, c.text, c.token_count, blobs[i].tobytes()) for i, c in enumerate(chunks)),
            )

    def touch_document(self, path: str, mtime_ns: int) -> None:
        """A file whose timestamp moved but whose bytes did not: remember the new time only."""
        with self.transaction() as conn:
            conn.execute("UPDATE documents SET mtime_ns = ? WHERE path = ?", (mtime_ns, path))

    def remove_documents(self, paths: Sequence[str]) -> None:
        with self.transaction() as conn:
            conn.executemany("DELETE FROM documents WHERE path = ?", ((p,) for p in paths))

    def version(self) -> tuple[int, int]:
        """Changes whenever any connection commits, so a long-lived reader knows to reload."""
        return self.conn.execute("PRAGMA data_version").fetchone()[0], self.conn.total_changes

    def load_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """All chunk ids `[N]` and their vectors `[N, dim]`, in chunk-id order."""
        dim = self.embedding_dim
        rows = self.conn.execute("SELECT id, vector FROM chunks ORDER BY id").fetchall()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), dim)
        return ids, matrix

    def get_chunks(self, chunk_ids: Sequence[int]) -> dict[int, StoredChunk]:
        marks = ",".join("?" * len(chunk_ids))
        rows = self.conn.execute(
            "SELECT c.id, d.path, c.chunk_index, c.text, c.token_count FROM chunks c "
            f"JOIN documents d ON d.id = c.doc_id WHERE c.id IN ({marks})",
            list(chunk_ids),
        )
        return {row[0]: StoredChunk(*row) for row in rows}


@dataclass(slots=True)
class ChunkSettings:
    """How documents were cut: chunks made with other settings are not comparable, so a change
    here makes the next run re-chunk every file."""

    tokenizer: str
    chunk_tokens: int
    overlap: int

    def to_json(self) -> str:
        return json.dumps({"tokenizer": self.tokenizer, "chunk_tokens": self.chunk_tokens, "overlap": self.overlap})


def index_directory(
    store: RagStore,
    root: str | Path,
    embedder: Embedder,
    tokenizer: Tokenizer,
    *,
    chunk_tokens: int = 192,
    overlap: int = 32,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    progress: Callable[[int, int, str], None] | None = None,
) -> IndexReport:
    """Bring the index in line with the files under `root`.

    A file is re-read only when its size or modification time changed, and re-embedded only
    when its content hash changed too; files gone from `root` (or now unreadable) leave the
    index. `progress(done, total, path)` is called after each file.
    """
    root = Path(root)
    files = collect_files(root)
    store.bind_embedder(embedder.name, embedder.dim)
    settings = ChunkSettings(getattr(tokenizer, "name_or_path", type(tokenizer).__name__), chunk_tokens, overlap)
    rechunk_all = store.get_meta("chunking") not in (None, settings.to_json())
    known = store.documents()
    report = IndexReport()
    seen: set[str] = set()
    for done, file in enumerate(files, start=1):
        rel = file.relative_to(root).as_posix()
        seen.add(rel)
        _index_file(store, file, rel, known.get(rel), rechunk_all, embedder, tokenizer, settings, max_file_bytes, report)
        if progress is not None:
            progress(done, len(files), rel)
    gone = sorted(p for p in known if p not in seen)
    with store.transaction():
        store.conn.executemany("DELETE FROM documents WHERE path = ?", ((p,) for p in gone))
        store._set_meta("chunking", settings.to_json())
    report.removed.extend(gone)
    return report


def _index_file(
    store: RagStore,
    file: Path,
    rel: str,
    known: _DocRow | None,
    rechunk_all: bool,
    embedder: Embedder,
    tokenizer: Tokenizer,
    settings: ChunkSettings,
    max_file_bytes: int,
    report: IndexReport,
) -> None:
    stat = file.stat()
    fresh = known is not None and not rechunk_all
    if fresh and known.size == stat.st_size and known.mtime_ns == stat.st_mtime_ns:
        report.unchanged.append(rel)
        return
    if stat.st_size > max_file_bytes:
        # Checked before reading: a huge file is never pulled into memory.
        _skip(store, rel, known, report, f"{rel}: {stat.st_size / 2**20:.1f} MiB is over the {max_file_bytes / 2**20:.1f} MiB limit")
        return
    data = file.read_bytes()
    content_hash = hashlib.sha256(data).hexdigest()
    if fresh and known.content_hash == content_hash:
        store.touch_document(rel, stat.st_mtime_ns)
        report.unchanged.append(rel)
        return
    try:
        text = document_text(data, Path(rel))
    except SkippedFile as exc:
        _skip(store, rel, known, report, str(exc))
        return
    chunks = chunk_text(text, tokenizer, settings.chunk_tokens, settings.overlap)
    if not chunks:
        _skip(store, rel, known, report, f"{rel}: no text")
        return
    vectors = embedder.embed([c.text for c in chunks])
    store.replace_document(rel, content_hash, stat.st_mtime_ns, stat.st_size, chunks, vectors)
    report.embedded_chunks += len(chunks)
    (report.added if known is None else report.updated).append(rel)


def _skip(store: RagStore, rel: str, known: _DocRow | None, report: IndexReport, message: str) -> None:
    """Leave a file out; if an earlier version of it was indexed, that version goes too, so
    answers never cite text the folder no longer holds."""
    if known is not None:
        store.remove_documents([rel])
    report.skipped.append(message)
