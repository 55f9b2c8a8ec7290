"""RAG through the OpenAI chat endpoint, tested live: uvicorn on loopback, the official client
sending `extra_body={"rag": ...}`, a real index of the fixture corpus (real embedding model) and
the tiny random-weight model. What is checked is what the server adds: the prompt is the RAG
layout, the sources come back, the layout shares KV blocks, pins are kept by the engine thread,
and every way a `rag` request can go wrong has its own clean answer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from test_server import AUTH, KEY, MODEL, LiveServer, live_server
from transformers import AutoTokenizer
from typer.testing import CliRunner

from edgepaged.cli import app as cli
from edgepaged.engine import LLMEngine
from edgepaged.rag import (
    Embedder,
    RagIndexError,
    RagPipeline,
    RagStore,
    index_directory,
)
from edgepaged.server import check_rag_indexes, open_rag
from edgepaged.server.app import RagCollections
from edgepaged.server.async_engine import AdmissionLimits

CORPUS = Path(__file__).parent / "fixtures" / "rag_corpus"


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture(scope="module")
def index_db(tmp_path_factory, tiny_model_dir, embedder) -> Path:
    db = tmp_path_factory.mktemp("rag-server") / "corpus.rag.db"
    store = RagStore(db, create=True)
    try:
        index_directory(store, CORPUS, embedder, AutoTokenizer.from_pretrained(tiny_model_dir), chunk_tokens=64, overlap=8)
    finally:
        store.close()
    return db


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> LLMEngine:
    return LLMEngine.from_model(str(tiny_model_dir), "cpu", max_kv_blocks=512)


@pytest.fixture(scope="module")
def collections(engine, index_db, embedder) -> RagCollections:
    # Two names over one index: "corpus" as plain retrieval, "pinned" with hot-prefix pinning.
    return open_rag(engine, {"corpus": index_db, "pinned": index_db}, ("pinned",), embedder)


@pytest.fixture(scope="module")
def live(engine, collections) -> Iterator[LiveServer]:
    with live_server(engine, AdmissionLimits(64, 1 << 20), api_key=KEY, rag=collections) as server:
        yield server


@pytest.fixture(scope="module")
def reference(engine, index_db, embedder) -> Iterator[RagPipeline]:
    """A pipeline of the test's own, for the retrieval and layout the server should have used."""
    pipeline = RagPipeline(engine, index_db, embedder=embedder, pin_hot_prefixes=False)
    yield pipeline
    pipeline.close()


def rag_chat(live: LiveServer, question: str, collection: str = "corpus", top_k: int = 2, **kw):
    return live.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": question}],
        max_tokens=4,
        temperature=0,
        extra_body={"rag": {"collection": collection, "top_k": top_k}, "ignore_eos": True},
        **kw,
    )


def source_keys(sources: list[dict]) -> list[tuple[str, int]]:
    return [(s["path"], s["chunk_index"]) for s in sources]


def test_answer_comes_from_the_rag_layout_with_its_sources(live, reference):
    question = "Who was the first keeper of the lighthouse?"
    got = live.client().chat.completions.create(
        model=MODEL,
        # Only the last user message counts: the layout's own system prompt replaces this one.
        messages=[{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": question}],
        max_tokens=4,
        temperature=0,
        extra_body={"rag": {"collection": "corpus", "top_k": 3}, "ignore_eos": True},
    )
    sources = got.model_extra["rag_sources"]
    want = reference.retrieve(question, top_k=3)
    assert source_keys(sources) == [(h.chunk.path, h.chunk.chunk_index) for h in want]
    assert [s["score"] for s in sources] == pytest.approx([h.score for h in want])
    assert sources[0]["path"] == "lighthouse.html"
    _, rendered, _ = reference.prompt(question, top_k=3)
    assert got.usage.prompt_tokens == len(rendered.token_ids)  # the RAG prompt, not the pirate one
    assert got.usage.completion_tokens == 4 and isinstance(got.choices[0].message.content, str)

    plain = httpx.post(
        f"{live.url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": 2},
        headers=AUTH,
        timeout=60,
    )
    assert plain.status_code == 200 and "rag_sources" not in plain.json()  # OpenAI's shape, untouched


def test_questions_retrieving_the_same_chunks_share_the_prefix_cache(live, reference):
    block = live.engine.config.block_size

    def hit_tokens(question: str) -> tuple[float, list[tuple[str, int]]]:
        before = live.wait_until(lambda m: m["edgepaged_requests_running"] == 0)
        sources = rag_chat(live, question).model_extra["rag_sources"]
        after = live.wait_until(lambda m: m["edgepaged_requests_running"] == 0)
        hit = after["edgepaged_prefix_cache_hit_tokens_total"] - before["edgepaged_prefix_cache_hit_tokens_total"]
        return hit, source_keys(sources)

    _, first = hit_tokens("At what temperature does the controller open the roof vents?")
    hit, second = hit_tokens("When are the greenhouse roof vents opened?")
    assert sorted(first) == sorted(second)  # same chunks, in another score order
    _, rendered, _ = reference.prompt("When are the greenhouse roof vents opened?", top_k=2)
    assert hit >= (rendered.prefix_ends[-1] // block) * block  # every passage came from the cache

    # Control: other passages share the system prompt only.
    hit, _ = hit_tokens("What pressure should touring bike tyres have?")
    _, rendered, _ = reference.prompt("What pressure should touring bike tyres have?", top_k=2)
    assert (rendered.prefix_ends[0] // block) * block <= hit < rendered.prefix_ends[1]


@pytest.mark.parametrize("include_usage", [False, True], ids=["plain", "with-usage"])
def test_a_stream_carries_the_sources_in_its_last_chunk(live, include_usage):
    question = "What is the name of the bakery's sourdough starter?"
    whole = rag_chat(live, question)
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = list(rag_chat(live, question, stream=True, **options))
    carrying = [i for i, c in enumerate(chunks) if (c.model_extra or {}).get("rag_sources") is not None]
    assert carrying == [len(chunks) - 1]
    assert chunks[-1].model_extra["rag_sources"] == whole.model_extra["rag_sources"]
    assert source_keys(whole.model_extra["rag_sources"])[0] == ("bakery.txt", 1)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content  # greedy: the same answer either way
    if include_usage:
        assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    else:
        assert chunks[-1].choices[0].finish_reason == "length"


def test_unknown_collection_is_404(live):
    with pytest.raises(openai.NotFoundError) as caught:
        rag_chat(live, "Who was the first keeper of the lighthouse?", collection="manuals")
    error = caught.value.body
    assert error["code"] == "collection_not_found" and error["param"] == "rag.collection"
    assert "'manuals'" in error["message"] and "['corpus', 'pinned']" in error["message"]


def test_a_question_nothing_is_relevant_to_gets_422_and_generates_nothing(live):
    before = live.wait_until(lambda m: m["edgepaged_requests_running"] == 0)
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        rag_chat(live, "What is the capital of Mongolia?")
    error = caught.value.body
    assert error["code"] == "no_relevant_chunks" and "below the 0.30 threshold" in error["message"]
    after = live.metrics()
    assert after["edgepaged_prompt_tokens_total"] == before["edgepaged_prompt_tokens_total"]


_QUESTION = [{"role": "user", "content": "Who was the first keeper of the lighthouse?"}]

BAD_RAG = [
    # (name, path, body, message fragment)
    ("not an object", "chat", {"rag": "corpus"}, "rag: Input should be an object"),
    ("no collection", "chat", {"rag": {"top_k": 2}}, "rag.collection: Field required"),
    ("empty collection", "chat", {"rag": {"collection": ""}}, "rag.collection"),
    ("top_k zero", "chat", {"rag": {"collection": "corpus", "top_k": 0}}, "rag.top_k"),
    ("top_k too large", "chat", {"rag": {"collection": "corpus", "top_k": 1000}}, "rag.top_k"),
    ("top_k as string", "chat", {"rag": {"collection": "corpus", "top_k": "2"}}, "rag.top_k"),
    ("misspelt key", "chat", {"rag": {"collection": "corpus", "topk": 2}}, "rag.topk"),
    (
        "no user message",
        "chat",
        {"rag": {"collection": "corpus"}, "messages": [{"role": "system", "content": "hi"}]},
        "last user message",
    ),
    (
        "blank question",
        "chat",
        {"rag": {"collection": "corpus"}, "messages": [{"role": "user", "content": "   "}]},
        "last user message",
    ),
    ("on completions", "completions", {"prompt": "x", "rag": {"collection": "corpus"}}, "/v1/chat/completions only"),
]


@pytest.mark.parametrize("name,path,fields,fragment", BAD_RAG, ids=[b[0] for b in BAD_RAG])
def test_a_malformed_rag_field_is_400(live, name, path, fields, fragment):
    body = {"model": MODEL, "messages": _QUESTION, "max_tokens": 2, **fields}
    if path == "completions":
        body.pop("messages")
    r = httpx.post(f"{live.url}/v1/{path.replace('chat', 'chat/completions')}", json=body, headers=AUTH, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and fragment in error["message"]
    assert "Traceback" not in r.text


def test_hot_prefixes_are_pinned_on_the_engine_thread(live, engine, collections, reference, monkeypatch):
    pinning_threads: set[str] = set()
    pin_prefix = engine.pin_prefix

    def recording_pin_prefix(token_ids, owner=""):
        pinning_threads.add(threading.current_thread().name)
        return pin_prefix(token_ids, owner)

    monkeypatch.setattr(engine, "pin_prefix", recording_pin_prefix)
    question = "Where does unsold bread go at closing time?"
    answers = [rag_chat(live, question, collection="pinned") for _ in range(2)]  # hot after two layouts
    assert all(a.usage.completion_tokens == 4 for a in answers)  # pinning swallowed no output
    _, rendered, _ = reference.prompt(question, top_k=2)
    whole_prefix = rendered.prefix_ends[-1] // engine.config.block_size
    live.wait_until(lambda m: engine.kv.num_pinned_blocks >= whole_prefix)
    assert engine.kv.num_pinned_blocks >= whole_prefix  # system prompt and both passages survive eviction
    assert pinning_threads == {"edgepaged-engine"}

    # The unpinned collection records nothing: asking it leaves the pins as they are.
    pinned = {owner: list(blocks) for owner, blocks in engine.kv.pins.items()}
    rag_chat(live, "What pressure should touring bike tyres have?")
    live.wait_until(lambda m: m["edgepaged_requests_running"] == 0)
    assert engine.kv.pins == pinned


# ---- startup -------------------------------------------------------------------------------


def test_startup_refuses_an_unusable_index_naming_the_collection(tmp_path, index_db, embedder):
    not_sqlite = tmp_path / "notes.db"
    not_sqlite.write_text("just some notes\n" * 100)
    empty = tmp_path / "empty.db"
    RagStore(empty, create=True).close()
    check_rag_indexes({"docs": index_db}, embedder)  # a good index passes
    for path, fragment in [
        (tmp_path / "missing.db", "no index at"),
        (not_sqlite, "not an edgepaged RAG index"),
        (empty, "holds no chunks"),
    ]:
        with pytest.raises(RagIndexError, match=f"--rag docs: .*{fragment}"):
            check_rag_indexes({"good": index_db, "docs": path}, embedder)


def test_serve_cli_fails_fast_on_bad_rag_settings(tmp_path, index_db):
    runner = CliRunner()
    missing = tmp_path / "missing.db"
    # The environment variable takes several collections, separated by spaces.
    result = runner.invoke(cli, ["serve"], env={"EDGEPAGED_RAG": f"docs={index_db} manuals={missing}"})
    assert result.exit_code == 1
    assert f"error: --rag manuals: no index at {missing}" in result.output and "Traceback" not in result.output
    for args, fragment in [
        (["--rag", "docs"], "is not NAME=DB_PATH"),
        (["--rag", f"docs={index_db}", "--rag", f"docs={index_db}"], "given twice"),
        (["--rag", f"docs={index_db}", "--rag-pin", "manuals"], "not a collection given with --rag"),
        (["--rag", f"docs={index_db}", "--rag-pin", "docs,manuals"], "'manuals' is not a collection given with --rag"),
    ]:
        result = runner.invoke(cli, ["serve", *args])
        assert result.exit_code == 2 and fragment in result.output, result.output
