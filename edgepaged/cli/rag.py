"""`edgepaged rag`: index a folder of documents, then ask questions answered from it.

`ask` answers one question and `chat` every line of stdin; both stream the answer, then list
its sources. Locally the embedding model, the index and the LLM are loaded once per command
(retrieval runs first, so a question the documents cannot answer is told so before the LLM
loads), and the LLM's KV pool is sized to the requests the command can make, not the budget.
With `--server URL` nothing is loaded here: a running `edgepaged serve --rag NAME=DB` answers.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional

import typer

from ..errors import EdgepagedError
from .streaming import Server, stream_local, write_stdout

if TYPE_CHECKING:
    from ..engine import LLMEngine
    from ..rag import Retriever
    from ..rag.pipeline import Source
    from ..sampling import SamplingParams

app = typer.Typer(help="Answer questions from a local folder of text, Markdown and HTML files.", no_args_is_help=True)

# The values of edgepaged.rag.ChunkOrder, spelled out so that `--help` does not import the RAG
# stack (tests check they agree).
Order = Literal["canonical", "score"]
# edgepaged.rag.store.DEFAULT_MAX_FILE_BYTES in MiB, for the same reason.
MAX_FILE_MB = 5.0
# edgepaged.rag.pipeline.DEFAULT_SPECULATIVE and edgepaged.sampling.MAX_SPECULATIVE, for the same reason.
SPECULATIVE = 6
MAX_SPECULATIVE = 15
# Question tokens `rag chat` sizes its pool for; a longer question is refused with the reason.
CHAT_QUESTION_TOKENS = 256
# Tokens a passage adds beyond its chunk: its "[path #index]" header and separator, and the
# re-tokenization of the chunk's text in context.
PASSAGE_OVERHEAD_TOKENS = 48

_DB = typer.Option(None, "--db", help="an index built by `edgepaged rag index` (not with --server)")
_TOP_K = typer.Option(4, "--top-k", min=1, help="passages to retrieve")
_MODEL = typer.Option(None, "--model", help="model folder or .gguf (default: the default model)")
_PROFILE = typer.Option("cpu", "--profile", help="device profile name or YAML path")
_BACKEND = typer.Option(None, "--backend", help="attention backend (default: the profile's)")
_MAX_TOKENS = typer.Option(256, "--max-tokens", min=1, help="longest answer, in tokens")
_ORDER = typer.Option("canonical", "--order", help="passage order in the prompt")
_TEMPERATURE = typer.Option(0.0, "--temperature", "-t", min=0.0, help="0 is greedy")
_TOP_P = typer.Option(1.0, "--top-p", help="nucleus sampling mass, in (0, 1]")
_SEED = typer.Option(None, "--seed", help="seed for reproducible sampling")
_REPETITION_PENALTY = typer.Option(
    1.0, "--repetition-penalty", help="above 1 discourages tokens already in the prompt or answer (1: off)"
)
_SPECULATIVE = typer.Option(
    SPECULATIVE, "--speculative", min=0, max=MAX_SPECULATIVE, help="draft tokens per step copied from the passages (0: off); same answers"
)
_SERVER = typer.Option(None, "--server", help="ask a running `edgepaged serve` at this URL instead of loading models")
_COLLECTION = typer.Option(None, "--collection", help="with --server: the NAME the server was given with --rag NAME=DB")
_API_KEY = typer.Option(None, "--api-key", envvar="EDGEPAGED_API_KEY", help="with --server: its API key")


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


@app.command("index")
def index_command(
    directory: Path = typer.Argument(..., help="folder of .txt, .md and .html files (searched recursively)"),
    db: Path = typer.Option(..., "--db", help="the index file (SQLite); created if missing"),
    model: Optional[str] = typer.Option(None, "--model", help="LLM whose tokenizer sizes the chunks (default: the default model)"),
    chunk_tokens: int = typer.Option(192, "--chunk-tokens", help="chunk length in the LLM's tokens"),
    overlap: int = typer.Option(32, "--overlap", help="tokens each chunk shares with the one before"),
    max_file_mb: float = typer.Option(MAX_FILE_MB, "--max-file-mb", help="skip files larger than this"),
) -> None:
    """Index DIRECTORY into --db; a re-run only processes new and changed files and drops deleted ones."""
    from tqdm import tqdm

    from ..models.loader import load_tokenizer, resolve_model
    from ..rag import Embedder, RagStore, index_directory

    try:
        tokenizer = load_tokenizer(resolve_model(model))
        if tokenizer is None:
            raise _fail(f"model {model} has no tokenizer to measure chunks with")
        store = RagStore(db, create=True)
        bar: tqdm | None = None

        def progress(done: int, total: int, path: str) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(total=total, unit="file", desc="indexing")
            bar.set_postfix_str(path[-40:], refresh=False)
            bar.update()

        try:
            report = index_directory(
                store,
                directory,
                Embedder(),
                tokenizer,
                chunk_tokens=chunk_tokens,
                overlap=overlap,
                max_file_bytes=int(max_file_mb * 2**20),
                progress=progress,
            )
        finally:
            if bar is not None:
                bar.close()
            store.close()
    except (EdgepagedError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    for message in report.skipped:
        typer.echo(f"skipped {message}", err=True)
    typer.echo(
        f"{db}: {len(report.added)} added, {len(report.updated)} updated, {len(report.unchanged)} unchanged, "
        f"{len(report.removed)} removed, {len(report.skipped)} skipped; {report.embedded_chunks} chunks embedded"
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Sampling:
    """The sampling options of `ask` and `chat`, for a local engine or a server request."""

    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    repetition_penalty: float
    speculative: int

    def params(self) -> SamplingParams:
        from ..sampling import SamplingParams

        return SamplingParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed,
            repetition_penalty=self.repetition_penalty, speculative=self.speculative,
        )

    def request_fields(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        return {k: v for k, v in fields.items() if v is not None}


class LocalAnswerer:
    """The embedding model, the index, the tokenizer and (once sized) the LLM, loaded once and
    kept between questions."""

    def __init__(self, db: Path, model: str | None, top_k: int, order: Order):
        from ..models.loader import load_tokenizer, resolve_model
        from ..rag import ChunkOrder, Embedder, RagStore, Retriever

        self.model = model
        self.top_k = top_k
        self.order = ChunkOrder(order)
        self.retriever: Retriever = Retriever(RagStore(db), Embedder())
        self.tokenizer = load_tokenizer(resolve_model(model))
        if self.tokenizer is None:
            raise EdgepagedError("RAG needs the model's tokenizer and chat template; this model folder has none")
        self.engine: LLMEngine | None = None
        self._ids = itertools.count()

    def render(self, question: str) -> tuple[list[int], list[Source]]:
        """Retrieve and lay out as the server's RAG chat does; raises NoRelevantChunks."""
        from ..rag import build_prompt, render_prompt
        from ..rag.pipeline import Source

        hits = self.retriever.search(question, self.top_k)
        rendered = render_prompt(self.tokenizer, build_prompt(question, hits, order=self.order))
        return rendered.token_ids, [Source(h.chunk.path, h.chunk.chunk_index, h.score) for h in hits]

    def largest_request(self, max_tokens: int) -> int:
        """Tokens of the longest request `chat` may make: the layout around the passages, top_k
        passages of the index's chunk length, a question of CHAT_QUESTION_TOKENS, the answer."""
        chunking = json.loads(self.retriever.store.get_meta("chunking") or "{}")
        chunk_tokens = int(chunking.get("chunk_tokens", 192))
        return len(self._layout_ids()) + self.top_k * (chunk_tokens + PASSAGE_OVERHEAD_TOKENS) + CHAT_QUESTION_TOKENS + max_tokens

    def load(self, profile: str, backend: str | None, max_request_tokens: int) -> None:
        from ..llm import engine_for_job

        self.engine = engine_for_job(self.model, profile, max_request_tokens=max_request_tokens, backend=backend)

    def warm_up(self) -> None:
        """Pay the first-use costs before the first question instead of in its answer: the
        embedding weights, and a prefill as large as a step may be (the allocator's first
        growth to that size; the profile run that would have paid it is skipped once the plan is
        cached). The prompt starts with the layout every question's prompt starts with, so those
        blocks stay in the prefix cache."""
        from ..sampling import SamplingParams

        assert self.engine is not None, "load() sizes and loads the LLM first"
        self.retriever.embedder.embed(["warm-up"])
        layout = self._layout_ids()
        size = min(self.engine.config.max_num_batched_tokens, self.engine.max_model_len - 1)
        prompt = (layout * (size // len(layout) + 1))[:size]
        self.answer(prompt, SamplingParams(max_tokens=1, temperature=0.0), lambda piece: None)

    def _layout_ids(self) -> list[int]:
        """The prompt around no passage and an empty question: what every prompt starts with."""
        from ..rag import build_prompt, render_prompt

        return render_prompt(self.tokenizer, build_prompt("", [], order=self.order)).token_ids

    def answer(self, prompt_ids: list[int], params: SamplingParams, write) -> str:
        assert self.engine is not None, "load() sizes and loads the LLM first"
        return stream_local(self.engine, f"rag-{next(self._ids)}", prompt_ids, params, write).text

    def close(self) -> None:
        self.retriever.store.close()


class _LeadingSpaceTrimmer:
    """Writes an answer as it streams, without the whitespace models often start with."""

    def __init__(self):
        self.started = False

    def __call__(self, piece: str) -> None:
        if not self.started:
            piece = piece.lstrip()
            self.started = bool(piece)
        if piece:
            write_stdout(piece)


def _print_sources(sources: Iterable[tuple[str, int, float]]) -> None:
    typer.echo("\n\nSources:")
    for i, (path, chunk_index, score) in enumerate(sources, start=1):
        typer.echo(f"  [{i}] {path} #{chunk_index} (similarity {score:.2f})")


def _ask_server(
    server: Server, model: str, collection: str, question: str, top_k: int, sampling: Sampling, write
) -> tuple[str, list]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "rag": {"collection": collection, "top_k": top_k},
        **sampling.request_fields(),
    }
    answer = server.stream_chat(body, write)
    return answer.text, [(s["path"], s["chunk_index"], s["score"]) for s in answer.sources]


def _server_for(server: str, collection: str | None, db: Path | None, api_key: str | None) -> Server:
    if db is not None:
        raise typer.BadParameter("--server asks the server's own index; leave out --db", param_hint="--db")
    if not collection:
        raise typer.BadParameter("--server needs the collection the server was started with (--rag NAME=DB)", param_hint="--collection")
    return Server(server, api_key)


def _need_db(db: Path | None) -> Path:
    if db is None:
        raise typer.BadParameter("give the index to answer from (or --server URL)", param_hint="--db")
    return db


@app.command("ask")
def ask_command(
    question: str = typer.Argument(..., help="the question"),
    db: Optional[Path] = _DB,
    top_k: int = _TOP_K,
    as_json: bool = typer.Option(False, "--json", help="print the answer and its sources as JSON (not streamed)"),
    model: Optional[str] = _MODEL,
    profile: str = _PROFILE,
    backend: Optional[str] = _BACKEND,
    max_tokens: int = _MAX_TOKENS,
    order: Order = _ORDER,
    temperature: float = _TEMPERATURE,
    top_p: float = _TOP_P,
    seed: Optional[int] = _SEED,
    repetition_penalty: float = _REPETITION_PENALTY,
    speculative: int = _SPECULATIVE,
    server: Optional[str] = _SERVER,
    collection: Optional[str] = _COLLECTION,
    api_key: Optional[str] = _API_KEY,
) -> None:
    """Retrieve the passages relevant to QUESTION, stream the answer from them, then list the sources."""
    from ..rag import NoRelevantChunks

    sampling = Sampling(max_tokens, temperature, top_p, seed, repetition_penalty, speculative)
    write = (lambda piece: None) if as_json else _LeadingSpaceTrimmer()
    try:
        if server is not None:
            remote = _server_for(server, collection, db, api_key)
            text, sources = _ask_server(remote, remote.model(), collection, question, top_k, sampling, write)
        else:
            answerer = LocalAnswerer(_need_db(db), model, top_k, order)
            try:
                prompt_ids, hits = answerer.render(question)  # before the LLM loads: a miss is told at once
                answerer.load(profile, backend, len(prompt_ids) + max_tokens)
                text = answerer.answer(prompt_ids, sampling.params(), write)
            finally:
                answerer.close()
            sources = [(s.path, s.chunk_index, s.score) for s in hits]
    except NoRelevantChunks as exc:
        if as_json:
            typer.echo(json.dumps({"question": question, "answer": None, "sources": [], "error": str(exc)}, indent=2))
        raise _fail(str(exc)) from exc
    except (EdgepagedError, ValueError) as exc:  # ValueError: sampling options
        raise _fail(str(exc)) from exc
    if as_json:
        payload = [{"path": p, "chunk_index": i, "score": s} for p, i, s in sources]
        typer.echo(json.dumps({"question": question, "answer": text.strip(), "sources": payload}, indent=2))
        return
    _print_sources(sources)


@app.command("chat")
def chat_command(
    db: Optional[Path] = _DB,
    top_k: int = _TOP_K,
    model: Optional[str] = _MODEL,
    profile: str = _PROFILE,
    backend: Optional[str] = _BACKEND,
    max_tokens: int = _MAX_TOKENS,
    order: Order = _ORDER,
    temperature: float = _TEMPERATURE,
    top_p: float = _TOP_P,
    seed: Optional[int] = _SEED,
    repetition_penalty: float = _REPETITION_PENALTY,
    speculative: int = _SPECULATIVE,
    server: Optional[str] = _SERVER,
    collection: Optional[str] = _COLLECTION,
    api_key: Optional[str] = _API_KEY,
) -> None:
    """Answer each line of stdin as `ask` would, with the models loaded once for all of them.

    A question the documents cannot answer, or one too long for the pool, is told so on stderr
    and the session goes on; end it with Ctrl+D.
    """
    started = time.monotonic()
    sampling = Sampling(max_tokens, temperature, top_p, seed, repetition_penalty, speculative)
    answerer: LocalAnswerer | None = None
    try:
        if server is not None:
            remote = _server_for(server, collection, db, api_key)
            served = remote.model()
        else:
            answerer = LocalAnswerer(_need_db(db), model, top_k, order)
            answerer.load(profile, backend, answerer.largest_request(max_tokens))
            answerer.warm_up()
            params = sampling.params()
    except (EdgepagedError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    interactive = sys.stdin.isatty()
    typer.echo(f"ready in {time.monotonic() - started:.1f} s: one question per line, Ctrl+D ends", err=True)
    try:
        for line in _questions(interactive):
            try:
                if answerer is None:
                    _, sources = _ask_server(remote, served, collection, line, top_k, sampling, _LeadingSpaceTrimmer())
                else:
                    prompt_ids, hits = answerer.render(line)
                    answerer.answer(prompt_ids, params, _LeadingSpaceTrimmer())
                    sources = [(s.path, s.chunk_index, s.score) for s in hits]
            except (EdgepagedError, ValueError) as exc:  # NoRelevantChunks included: the next question may do
                typer.echo(f"error: {exc}", err=True)
                continue
            _print_sources(sources)
            typer.echo()
    finally:
        if answerer is not None:
            answerer.close()


def _questions(interactive: bool) -> Iterable[str]:
    """Non-empty lines of stdin, with a prompt on stderr when a person types them."""
    while True:
        if interactive:
            typer.echo("question> ", err=True, nl=False)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.strip()
