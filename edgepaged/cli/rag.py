"""`edgepaged rag`: index a folder of documents, then ask questions answered from it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import typer
from tqdm import tqdm

from ..errors import EdgepagedError
from ..models.loader import load_tokenizer, resolve_model
from ..rag import (
    ChunkOrder,
    Embedder,
    NoRelevantChunks,
    RagPipeline,
    RagStore,
    Retriever,
    index_directory,
)
from ..rag.store import DEFAULT_MAX_FILE_BYTES
from ..sampling import SamplingParams

app = typer.Typer(help="Answer questions from a local folder of text, Markdown and HTML files.", no_args_is_help=True)


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
    max_file_mb: float = typer.Option(DEFAULT_MAX_FILE_BYTES / 2**20, "--max-file-mb", help="skip files larger than this"),
) -> None:
    """Index DIRECTORY into --db; a re-run only processes new and changed files and drops deleted ones."""
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


@app.command("ask")
def ask_command(
    question: str = typer.Argument(..., help="the question"),
    db: Path = typer.Option(..., "--db", help="an index built by `edgepaged rag index`"),
    top_k: int = typer.Option(4, "--top-k", min=1, help="passages to retrieve"),
    as_json: bool = typer.Option(False, "--json", help="print the answer and its sources as JSON"),
    model: Optional[str] = typer.Option(None, "--model", help="model folder or .gguf (default: the default model)"),
    profile: str = typer.Option("cpu", "--profile", help="device profile name or YAML path"),
    backend: Optional[str] = typer.Option(None, "--backend", help="attention backend (default: the profile's)"),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1, help="longest answer, in tokens"),
    order: ChunkOrder = typer.Option(ChunkOrder.CANONICAL, "--order", help="passage order in the prompt"),
) -> None:
    """Retrieve the passages relevant to QUESTION, answer from them, and list the sources."""
    from ..llm import LLM

    try:
        embedder = Embedder()
        # Retrieval first: a question the documents cannot answer is told so without loading the LLM.
        store = RagStore(db)
        try:
            Retriever(store, embedder).search(question, top_k)
        finally:
            store.close()
        llm = LLM(model=model, profile=profile, backend=backend)
        pipeline = RagPipeline(llm, db, embedder=embedder, order=order, pin_hot_prefixes=False)
        try:
            answer = pipeline.ask(question, top_k, SamplingParams(temperature=0.0, max_tokens=max_tokens))
        finally:
            pipeline.close()
    except NoRelevantChunks as exc:
        if as_json:
            typer.echo(json.dumps({"question": question, "answer": None, "sources": [], "error": str(exc)}, indent=2))
        raise _fail(str(exc)) from exc
    except (EdgepagedError, ValueError) as exc:  # ValueError: profile and memory-plan errors
        raise _fail(str(exc)) from exc
    if as_json:
        sources = [dataclasses.asdict(s) for s in answer.sources]
        typer.echo(json.dumps({"question": question, "answer": answer.text, "sources": sources}, indent=2))
        return
    typer.echo(answer.text.strip())
    typer.echo("\nSources:")
    for i, source in enumerate(answer.sources, start=1):
        typer.echo(f"  [{i}] {source.path} #{source.chunk_index} (similarity {source.score:.2f})")
