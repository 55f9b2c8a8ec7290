"""The RAG workload: readers, chunking, the index, retrieval, the prompt layout, the pipeline, the CLI.

Retrieval runs the real embedding model (all-MiniLM-L6-v2, small enough for CPU tests) over the
fixture corpus, whose facts are known; engine-level tests use the tiny random-weight model, so
they check what the engine *does* with the prompts (prefix hits, pinning), not answer quality.
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgepaged.rag import (
    DEFAULT_SYSTEM_PROMPT,
    ChunkOrder,
    CorpusError,
    Embedder,
    EmbeddingModelMismatch,
    Hit,
    HotPrefixes,
    NoRelevantChunks,
    RagIndexError,
    RagPipeline,
    RagStore,
    RenderedPrompt,
    Retriever,
    StoredChunk,
    build_prompt,
    chunk_text,
    document_text,
    index_directory,
    render_prompt,
)
from edgepaged.errors import ModelLoadError
from edgepaged.rag.chunking import html_to_text, markdown_to_text
from edgepaged.rag.embed import DEFAULT_EMBEDDING_MODEL, EMBEDDING_MODEL_ENV, write_half_precision_copy

CORPUS = Path(__file__).parent / "fixtures" / "rag_corpus"
CHUNK_TOKENS, OVERLAP = 64, 8


class MemoEmbedder:
    """The real embedder, remembering vectors so the many re-indexes here embed each text once."""

    def __init__(self, inner: Embedder):
        self.inner = inner
        self.name, self.dim = inner.name, inner.dim
        self.memo: dict[str, np.ndarray] = {}

    def embed(self, texts):
        todo = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if todo:
            self.memo.update(zip(todo, self.inner.embed(todo)))
        return np.stack([self.memo[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)


class CountingEmbedder:
    """Counts the texts the indexer asks to embed."""

    def __init__(self, inner):
        self.inner = inner
        self.name, self.dim = inner.name, inner.dim
        self.calls = 0
        self.texts = 0

    def embed(self, texts):
        self.calls += 1
        self.texts += len(texts)
        return self.inner.embed(texts)


@pytest.fixture(scope="module")
def embedder() -> MemoEmbedder:
    return MemoEmbedder(Embedder())


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture()
def corpus(tmp_path) -> Path:
    root = tmp_path / "docs"
    shutil.copytree(CORPUS, root)
    return root


def _index(db: Path, root: Path, embedder, tokenizer, **kw):
    store = RagStore(db, create=True)
    try:
        return index_directory(store, root, embedder, tokenizer, chunk_tokens=CHUNK_TOKENS, overlap=OVERLAP, **kw)
    finally:
        store.close()


@pytest.fixture(scope="module")
def index_db(tmp_path_factory, embedder, tokenizer) -> Path:
    db = tmp_path_factory.mktemp("rag") / "index.db"
    _index(db, CORPUS, embedder, tokenizer)
    return db


@pytest.fixture()
def retriever(index_db, embedder):
    store = RagStore(index_db)
    yield Retriever(store, embedder)
    store.close()


# -- readers and chunking --------------------------------------------------------------------


def test_html_reader_keeps_visible_text_and_structure():
    text = document_text((CORPUS / "lighthouse.html").read_bytes(), Path("lighthouse.html"))
    assert "tracking pixel" not in text and "font-family" not in text and "cookie banner" not in text
    assert "# Skerry Point Lighthouse" in text and "## Keepers" in text
    assert "- Ada Morrow was the first keeper" in text
    assert "1 November 1874" in text.replace("\xa0", " ")
    assert "Barbier & Fenestre" in text  # entity decoded
    assert html_to_text("<pre>a  b\n  c</pre><p>x   y</p>") == "\na  b\n  c\n\nx y\n"


def test_markdown_reader_drops_urls_comments_and_front_matter():
    text = document_text((CORPUS / "greenhouse.md").read_bytes(), Path("greenhouse.md"))
    assert "title: Verdant-3" not in text and "internal note" not in text
    assert "See the wiring guide\nfor the terminal layout" in text and "example.invalid" not in text
    assert markdown_to_text("![diagram](d.png) here\n[ref]: http://a.b/c\n") == "diagram here\n\n"


def test_chunks_are_bounded_overlapping_and_cover_the_text(tokenizer):
    text = document_text((CORPUS / "bakery.txt").read_bytes(), Path("bakery.txt"))
    chunks = chunk_text(text, tokenizer, chunk_tokens=48, overlap=8)
    assert len(chunks) >= 4
    assert [c.index for c in chunks] == list(range(len(chunks)))
    for chunk in chunks:
        assert chunk.token_count <= 48
        assert chunk.text in text  # an exact slice of the document
        assert len(tokenizer(chunk.text, add_special_tokens=False).input_ids) <= 48
    for before, after in itertools.pairwise(chunks):
        # The next chunk starts inside the previous one: the overlap.
        assert text.index(after.text) < text.index(before.text) + len(before.text)
    covered = np.zeros(len(text), dtype=bool)
    for chunk in chunks:
        start = text.index(chunk.text)
        covered[start : start + len(chunk.text)] = True
    assert all(covered[i] for i, ch in enumerate(text) if not ch.isspace())
    # Most chunks end at a sentence or line break rather than mid-sentence.
    assert sum(c.text[-1] in ".!?:" for c in chunks[:-1]) >= len(chunks[:-1]) // 2


def test_chunk_text_rejects_bad_sizes(tokenizer):
    with pytest.raises(ValueError):
        chunk_text("some text", tokenizer, chunk_tokens=16, overlap=8)
    assert chunk_text("", tokenizer) == []


# -- indexing --------------------------------------------------------------------------------


def test_reindexing_does_only_the_work_that_changed(tmp_path, corpus, embedder, tokenizer):
    db = tmp_path / "index.db"
    counting = CountingEmbedder(embedder)
    first = _index(db, corpus, counting, tokenizer)
    assert sorted(first.added) == ["bakery.txt", "greenhouse.md", "guides/bicycle.md", "lighthouse.html"]
    assert first.embedded_chunks == counting.texts > 0

    counting.calls = 0
    again = _index(db, corpus, counting, tokenizer)
    assert again.embedded_chunks == 0 and counting.calls == 0
    assert len(again.unchanged) == 4 and not (again.added or again.updated or again.removed)

    # A new timestamp on the same bytes is not a change.
    (corpus / "bakery.txt").touch()
    touched = _index(db, corpus, counting, tokenizer)
    assert counting.calls == 0 and "bakery.txt" in touched.unchanged

    (corpus / "bakery.txt").write_text("The bakery now opens at 7:00 every day, Mondays included.\n")
    (corpus / "guides" / "bicycle.md").unlink()
    (corpus / "new.md").write_text("# New\n\nThe new staff room is on the second floor.\n")
    changed = _index(db, corpus, counting, tokenizer)
    assert changed.updated == ["bakery.txt"] and changed.added == ["new.md"]
    assert changed.removed == ["guides/bicycle.md"]
    assert changed.embedded_chunks == counting.texts - first.embedded_chunks == 2

    store = RagStore(db)
    docs = store.documents()
    assert sorted(docs) == ["bakery.txt", "greenhouse.md", "lighthouse.html", "new.md"]
    paths = {p for (p,) in store.conn.execute("SELECT d.path FROM chunks c JOIN documents d ON d.id = c.doc_id")}
    assert "guides/bicycle.md" not in paths
    _, vectors = store.load_vectors()
    assert vectors.shape == (store.num_chunks(), embedder.dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    store.close()


def test_changed_chunk_settings_rechunk_everything(tmp_path, corpus, embedder, tokenizer):
    db = tmp_path / "index.db"
    _index(db, corpus, embedder, tokenizer)
    store = RagStore(db)
    report = index_directory(store, corpus, embedder, tokenizer, chunk_tokens=128, overlap=16)
    assert len(report.updated) == 4 and report.embedded_chunks > 0
    assert max(n for (n,) in store.conn.execute("SELECT token_count FROM chunks")) > CHUNK_TOKENS
    store.close()


def test_a_crash_mid_document_leaves_the_old_version_whole(tmp_path, corpus, embedder, tokenizer):
    db = tmp_path / "index.db"
    _index(db, corpus, embedder, tokenizer)
    store = RagStore(db)
    before = store.conn.execute(
        "SELECT c.chunk_index, c.text FROM chunks c JOIN documents d ON d.id = c.doc_id "
        "WHERE d.path = 'greenhouse.md' ORDER BY c.chunk_index"
    ).fetchall()
    old_hash = store.documents()["greenhouse.md"].content_hash
    # The disk "fills up" while the third chunk of the new version is being written.
    store.conn.execute(
        "CREATE TEMP TRIGGER disk_full BEFORE INSERT ON chunks WHEN NEW.chunk_index = 2 "
        "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
    )
    path = corpus / "greenhouse.md"
    path.write_text(path.read_text().replace("28 °C", "30 °C"))
    with pytest.raises(sqlite3.DatabaseError, match="disk full"):
        index_directory(store, corpus, embedder, tokenizer, chunk_tokens=CHUNK_TOKENS, overlap=OVERLAP)
    after = store.conn.execute(
        "SELECT c.chunk_index, c.text FROM chunks c JOIN documents d ON d.id = c.doc_id "
        "WHERE d.path = 'greenhouse.md' ORDER BY c.chunk_index"
    ).fetchall()
    assert after == before and store.documents()["greenhouse.md"].content_hash == old_hash
    store.conn.execute("DROP TRIGGER disk_full")
    report = index_directory(store, corpus, embedder, tokenizer, chunk_tokens=CHUNK_TOKENS, overlap=OVERLAP)
    assert report.updated == ["greenhouse.md"]
    assert any("30 °C" in t for (t,) in store.conn.execute("SELECT text FROM chunks"))
    store.close()


def test_missing_empty_and_non_directory_inputs_are_refused(tmp_path, embedder, tokenizer):
    db = tmp_path / "index.db"
    with pytest.raises(CorpusError, match="does not exist"):
        _index(db, tmp_path / "nowhere", embedder, tokenizer)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "picture.png").write_bytes(b"\x89PNG")
    (tmp_path / "empty" / ".hidden.md").write_text("hidden notes")
    with pytest.raises(CorpusError, match="holds no document"):
        _index(db, tmp_path / "empty", embedder, tokenizer)
    (tmp_path / "file.txt").write_text("text")
    with pytest.raises(CorpusError, match="not a directory"):
        _index(db, tmp_path / "file.txt", embedder, tokenizer)


def test_binary_huge_and_undecodable_files_are_skipped_with_a_reason(tmp_path, corpus, embedder, tokenizer):
    db = tmp_path / "index.db"
    _index(db, corpus, embedder, tokenizer)
    (corpus / "bakery.txt").write_bytes(b"\x00\x01\x02 binary blob " * 100)  # an indexed file turns binary
    (corpus / "huge.md").write_text("word " * 2000)
    (corpus / "empty.md").write_text("<!-- nothing but a comment -->\n")
    (corpus / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me br\xfbl\xe9e \xe0 la carte ".encode("latin-1") * 20)
    report = _index(db, corpus, embedder, tokenizer, max_file_bytes=4096)
    reasons = "\n".join(report.skipped)
    assert "bakery.txt: binary file" in reasons
    assert "huge.md" in reasons and "limit" in reasons
    assert "latin1.txt: not UTF-8 text" in reasons
    assert "empty.md: no text" in reasons
    store = RagStore(db)
    assert "bakery.txt" not in store.documents()  # no answer may cite what the folder no longer says
    assert not any("Gertrude" in t for (t,) in store.conn.execute("SELECT text FROM chunks"))
    store.close()


def test_an_index_from_another_embedding_model_is_refused(index_db, embedder):
    store = RagStore(index_db)
    with pytest.raises(EmbeddingModelMismatch, match="all-MiniLM-L6-v2.*other-model"):
        store.bind_embedder("other-model", 768)

    class OtherModel:
        name, dim = "sentence-transformers/all-MiniLM-L6-v2-finetuned", 384

    with pytest.raises(EmbeddingModelMismatch, match="index into a new --db"):
        Retriever(store, OtherModel())
    store.close()


def test_the_embedding_model_folder_comes_from_the_environment(tmp_path, monkeypatch, embedder):
    """A half-precision copy named by $EDGEPAGED_EMBEDDING_MODEL replaces the packaged model
    (what a GPU machine that cannot receive the 90 MB original gets), with the same vectors."""
    copy = write_half_precision_copy(tmp_path / "minilm-fp16")
    from safetensors import safe_open

    with safe_open(copy / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} <= {"F16", "I64"}
    assert (copy / "model.safetensors").stat().st_size < 50e6
    monkeypatch.setenv(EMBEDDING_MODEL_ENV, str(copy))
    from_env = Embedder()
    assert from_env.path == copy
    assert from_env.name == "minilm-fp16"  # not the packaged model's name: an index remembers which
    texts = ["How do I reset the greenhouse controller?", (CORPUS / "greenhouse.md").read_text()[:600]]
    cosine = np.sum(from_env.embed(texts) * embedder.embed(texts), axis=1)
    assert cosine.min() > 0.999
    monkeypatch.setenv(EMBEDDING_MODEL_ENV, "")
    assert Embedder().name == DEFAULT_EMBEDDING_MODEL


def test_a_missing_embedding_model_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(EMBEDDING_MODEL_ENV, str(tmp_path / "absent"))
    with pytest.raises(ModelLoadError, match=rf"absent.*from \${EMBEDDING_MODEL_ENV}.*does not exist"):
        Embedder()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        Embedder(tmp_path / "empty")


def test_missing_or_foreign_index_files_are_refused(tmp_path):
    with pytest.raises(RagIndexError, match="edgepaged rag index"):
        RagStore(tmp_path / "absent.db")
    (tmp_path / "notes.db").write_text("this is not a database, just text that happens to be long enough " * 20)
    with pytest.raises(RagIndexError, match="not an edgepaged RAG index"):
        RagStore(tmp_path / "notes.db")


# -- retrieval -------------------------------------------------------------------------------

KNOWN_ANSWERS = [
    ("When does the greenhouse controller open the roof vents?", "greenhouse.md", "28 °C"),
    ("What is the name of the bakery's sourdough starter?", "bakery.txt", "Gertrude"),
    ("Who was the first keeper of the lighthouse?", "lighthouse.html", "Ada Morrow"),
    ("What pressure should touring bike tyres have?", "guides/bicycle.md", "4.5 bar"),
    ("How do I restore the controller's factory settings?", "greenhouse.md", "MODE and SET"),
    ("Where does unsold bread go at closing time?", "bakery.txt", "Harbour Food Bank"),
]


@pytest.mark.parametrize("question,path,phrase", KNOWN_ANSWERS)
def test_known_questions_retrieve_the_chunk_that_answers_them(retriever, question, path, phrase):
    hits = retriever.search(question, top_k=4)
    assert hits[0].chunk.path == path and phrase in hits[0].chunk.text
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert all(h.score >= retriever.min_score for h in hits)


@pytest.mark.parametrize("question", ["What is the capital of Mongolia?", "Explain the offside rule in football."])
def test_a_question_with_no_relevant_chunk_is_reported(retriever, question):
    with pytest.raises(NoRelevantChunks, match="below the 0.30 threshold"):
        retriever.search(question, top_k=4)


def test_retriever_sees_a_reindex_without_restarting(tmp_path, corpus, embedder, tokenizer):
    db = tmp_path / "index.db"
    _index(db, corpus, embedder, tokenizer)
    store = RagStore(db)
    retriever = Retriever(store, embedder)
    with pytest.raises(NoRelevantChunks):
        retriever.search("What colour is the submarine's periscope?")
    (corpus / "submarine.md").write_text("# Submarine\n\nThe periscope of the submarine Nautilus is painted matte grey.\n")
    _index(db, corpus, embedder, tokenizer)  # another connection, as `edgepaged rag index` would be
    assert retriever.search("What colour is the submarine's periscope?")[0].chunk.path == "submarine.md"
    store.close()


# -- layout ----------------------------------------------------------------------------------


_chunk_ids = itertools.count(1)


def _hit(path: str, index: int, score: float, text: str | None = None) -> Hit:
    return Hit(StoredChunk(next(_chunk_ids), path, index, text or f"Passage {index} of {path}.", 5), score)


HITS = [_hit("b.md", 3, 0.9), _hit("a.md", 7, 0.8), _hit("b.md", 1, 0.7), _hit("a.md", 2, 0.6)]


def test_canonical_layout_is_deterministic_and_independent_of_score_order(tokenizer):
    reference = build_prompt("Which passage?", HITS)
    user = reference.messages[1]["content"]
    assert reference.messages[0] == {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}
    positions = [user.index(f"[{p} #{i}]") for p, i in [("a.md", 2), ("a.md", 7), ("b.md", 1), ("b.md", 3)]]
    assert positions == sorted(positions)
    assert user.endswith("Question: Which passage?")
    rng = random.Random(0)
    for _ in range(5):
        shuffled = [Hit(h.chunk, rng.random()) for h in rng.sample(HITS, len(HITS))]
        again = build_prompt("Which passage?", shuffled)
        assert again.messages == reference.messages
        assert render_prompt(tokenizer, again).token_ids == render_prompt(tokenizer, reference).token_ids


def test_score_layout_puts_the_best_match_first():
    user = build_prompt("q", HITS, order=ChunkOrder.SCORE).messages[1]["content"]
    positions = [user.index(f"[{h.chunk.path} #{h.chunk.chunk_index}]") for h in HITS]
    assert positions == sorted(positions)


def test_rendered_prefixes_end_at_passage_boundaries(tokenizer):
    rendered = render_prompt(tokenizer, build_prompt("Which passage?", HITS))
    text = tokenizer.apply_chat_template(build_prompt("Which passage?", HITS).messages, tokenize=False, add_generation_prompt=True)
    assert rendered.token_ids == tokenizer(text, add_special_tokens=False).input_ids
    assert len(rendered.prefix_ends) == len(HITS) + 1
    assert rendered.prefix_ends == sorted(set(rendered.prefix_ends))
    head = tokenizer.decode(rendered.token_ids[: rendered.prefix_ends[0]])
    assert DEFAULT_SYSTEM_PROMPT in head and head.endswith("Context:\n\n")
    assert tokenizer.decode(rendered.token_ids[: rendered.prefix_ends[1]]).endswith("Passage 2 of a.md.")
    assert tokenizer.decode(rendered.token_ids[: rendered.prefix_ends[4]]).endswith("Passage 3 of b.md.")
    # Another question over other passages shares the whole head, token for token.
    other = render_prompt(tokenizer, build_prompt("Something else entirely?", [_hit("z.md", 0, 0.5)]))
    assert other.token_ids[: other.prefix_ends[0]] == rendered.token_ids[: rendered.prefix_ends[0]]


# -- hot prefixes ----------------------------------------------------------------------------


def _rendered(n_tokens_per_part: list[int]) -> RenderedPrompt:
    ends = list(np.cumsum(n_tokens_per_part))
    return RenderedPrompt(list(range(ends[-1] + 5)), [int(e) for e in ends])


def test_hot_prefixes_pin_the_system_prompt_then_repeated_passage_prefixes():
    hot = HotPrefixes(pin_after=2, budget=0.5)
    hot.record([11, 12], _rendered([40, 20, 20]))
    assert hot.wanted(num_blocks=100, block_size=16) == [()]
    hot.record([11, 13], _rendered([40, 20, 30]))
    # (11,) was laid out twice; (11, 12) and (11, 13) once. Pinning (11,) covers () too.
    assert hot.wanted(num_blocks=100, block_size=16) == [(11,)]
    hot.record([11, 12], _rendered([40, 20, 20]))
    assert hot.wanted(num_blocks=100, block_size=16) == [(11, 12)]
    # A budget too small for the longer prefixes keeps only the system prompt's blocks.
    assert hot.wanted(num_blocks=5, block_size=16) == [()]
    # A prefix shorter than one block has nothing to pin.
    assert HotPrefixes().wanted(100, 64) == []


def test_hot_prefix_bookkeeping_stays_bounded():
    hot = HotPrefixes(max_tracked=8)
    for i in range(50):
        hot.record([i], _rendered([16, 16]))
    assert len(hot.counts) <= 8 and hot.counts[()] == 50 and set(hot.counts) == set(hot.tokens)


# -- the engine ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from edgepaged.engine import LLMEngine

    return LLMEngine.from_model(tiny_model_dir, profile="cpu", max_kv_blocks=96)


@pytest.fixture()
def pipeline(engine, index_db, embedder):
    engine.unpin_all()
    rag = RagPipeline(engine, index_db, embedder=embedder)
    yield rag
    rag.close()


def _run(engine, prompts: list[list[int]], max_tokens: int = 2) -> list[int]:
    """Run prompts one after another; return the prefix-hit tokens each one got."""
    from edgepaged import SamplingParams

    hits = []
    for i, ids in enumerate(prompts):
        before = engine.stats().prefix_hit_tokens
        rid = f"t-{random.random()}-{i}"
        engine.add_request(rid, ids, SamplingParams(temperature=0.0, max_tokens=max_tokens))
        engine.run_to_completion([rid])
        hits.append(engine.stats().prefix_hit_tokens - before)
    return hits


def test_same_passages_in_another_score_order_share_the_whole_context_only_when_canonical(engine, tokenizer):
    texts = [" ".join(f"fact{n}-{k}" for k in range(30)) + "." for n in range(4)]
    hits = [_hit(f"doc{n}.md", n, 0.9 - n / 10, texts[n]) for n in range(4)]
    reordered = [Hit(h.chunk, s) for h, s in zip(hits, [0.5, 0.9, 0.6, 0.8])]
    block = engine.stats().block_size
    for order, expect_context in [(ChunkOrder.CANONICAL, True), (ChunkOrder.SCORE, False)]:
        first = render_prompt(tokenizer, build_prompt(f"First {order.value} question?", hits, order=order))
        second = render_prompt(tokenizer, build_prompt(f"Second {order.value} one?", reordered, order=order))
        _, hit = _run(engine, [first.token_ids, second.token_ids])
        context_end = first.prefix_ends[-1]
        if expect_context:
            assert hit >= (context_end // block) * block
        else:
            assert hit < first.prefix_ends[1] and hit >= (first.prefix_ends[0] // block) * block


def test_repeated_questions_over_the_same_documents_hit_the_prefix_cache(engine, pipeline):
    from edgepaged import SamplingParams

    question_a = "At what temperature does the controller open the roof vents?"
    question_b = "When are the greenhouse roof vents opened?"
    chunks_a = {h.chunk.chunk_id for h in pipeline.retrieve(question_a, top_k=2)}
    assert chunks_a == {h.chunk.chunk_id for h in pipeline.retrieve(question_b, top_k=2)}
    params = SamplingParams(temperature=0.0, max_tokens=4)
    pipeline.ask(question_a, top_k=2, params=params)
    before = engine.stats()
    answer = pipeline.ask(question_b, top_k=2, params=params)
    after = engine.stats()
    _, rendered, _ = pipeline.prompt(question_b, top_k=2)
    block = after.block_size
    assert after.prefix_hit_tokens - before.prefix_hit_tokens >= (rendered.prefix_ends[-1] // block) * block
    assert after.prefix_hit_rate > 0
    assert {s.path for s in answer.sources} == {"greenhouse.md"} and isinstance(answer.text, str)


def test_build_messages_gives_chat_messages_and_sources(engine, pipeline):
    messages, sources = pipeline.build_messages("Who was the first keeper of the lighthouse?", top_k=3)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert sources[0].path == "lighthouse.html" and "Ada Morrow" in messages[1]["content"]
    assert messages[1]["content"].endswith("Question: Who was the first keeper of the lighthouse?")
    # The chat endpoint's own tokenization of these messages is the prompt the pipeline lays out.
    _, rendered, _ = pipeline.prompt("Who was the first keeper of the lighthouse?", top_k=3)
    assert engine.apply_chat_template(messages) == rendered.token_ids
    with pytest.raises(NoRelevantChunks):
        pipeline.build_messages("What is the capital of Mongolia?")


def test_pinned_prefixes_survive_cache_pressure(engine, index_db, embedder):
    from edgepaged import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=2)
    question = "What is the name of the bakery's sourdough starter?"
    flood = [[random.Random(i).randrange(100, 40000) for _ in range(15 * 16)] for i in range(8)]
    gained = {}
    for pin in (False, True):
        engine.unpin_all()
        rag = RagPipeline(engine, index_db, embedder=embedder, pin_hot_prefixes=pin, pin_after=1, pin_budget=0.5)
        rag.ask(question, top_k=2, params=params)
        pinned = rag.apply_pins()
        assert (pinned > 0) == pin
        _run(engine, flood)  # other traffic pushes every unpinned block out of the LRU cache
        before = engine.stats().prefix_hit_tokens
        rag.ask(question, top_k=2, params=params)
        gained[pin] = engine.stats().prefix_hit_tokens - before
        rag.close()
    _, rendered, _ = RagPipeline(engine, index_db, embedder=embedder, pin_hot_prefixes=False).prompt(question, 2)
    assert gained[False] == 0
    assert gained[True] >= (rendered.prefix_ends[-1] // engine.stats().block_size) * engine.stats().block_size


def test_two_pipelines_keep_each_others_pins(engine, index_db, embedder):
    """Two collections pinning on one engine: re-pinning one leaves the other's blocks held."""
    from edgepaged import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=2)
    engine.unpin_all()
    first, second = (
        RagPipeline(engine, index_db, embedder=embedder, system_prompt=prompt, pin_after=1, pin_budget=0.25)
        for prompt in ("Answer from the passages only.", "You are the bakery's archivist; cite the passages.")
    )
    first.ask("What is the name of the bakery's sourdough starter?", top_k=2, params=params)
    held = first.apply_pins()
    assert held > 0
    first_blocks = list(engine.kv.pins[first.pin_owner])
    second.ask("Who was the first keeper of the lighthouse?", top_k=2, params=params)
    assert second.apply_pins() > 0
    assert engine.kv.pins[first.pin_owner] == first_blocks, "the second pipeline's pins undid the first's"
    first.close()
    assert first.pin_owner not in engine.kv.pins and engine.kv.pins[second.pin_owner]
    second.close()
    assert engine.kv.num_pinned_blocks == 0


# -- the CLI ---------------------------------------------------------------------------------


def test_cli_index_and_ask(tmp_path, corpus, tiny_model_dir):
    from edgepaged.cli.rag import app

    runner = CliRunner()
    db = tmp_path / "cli.db"
    model = str(tiny_model_dir)
    profile = tmp_path / "small.yaml"  # the tiny model would get a needlessly huge pool from `cpu`
    profile.write_text("extends: cpu\nbudget:\n  max_gb: 1.5\n")
    result = runner.invoke(app, ["index", str(corpus), "--db", str(db), "--model", model, "--chunk-tokens", "64", "--overlap", "8"])
    assert result.exit_code == 0, result.output
    assert "4 added" in result.output
    result = runner.invoke(app, ["index", str(corpus), "--db", str(db), "--model", model, "--chunk-tokens", "64", "--overlap", "8"])
    assert "4 unchanged" in result.output and "0 chunks embedded" in result.output

    result = runner.invoke(
        app,
        ["ask", "Who was the first keeper of the lighthouse?", "--db", str(db), "--model", model, "--profile", str(profile), "--json", "--max-tokens", "3"],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["sources"][0]["path"] == "lighthouse.html" and isinstance(payload["answer"], str)

    result = runner.invoke(app, ["ask", "What is the capital of Mongolia?", "--db", str(db), "--model", model])
    assert result.exit_code == 1 and "no indexed chunk is relevant" in result.output
    result = runner.invoke(app, ["ask", "anything", "--db", str(tmp_path / "none.db"), "--model", model])
    assert result.exit_code == 1 and "no index at" in result.output
    result = runner.invoke(app, ["index", str(tmp_path / "nowhere"), "--db", str(db), "--model", model])
    assert result.exit_code == 1 and "does not exist" in result.output
