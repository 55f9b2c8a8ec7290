"""The `edgepaged` command: each subcommand lives in its own module."""

from __future__ import annotations

import typer

from .build import build
from .doctor import doctor
from .generate import generate
from .profile import app as profile_app
from .rag import app as rag_app
from .serve import serve

app = typer.Typer(
    name="edgepaged",
    help="LLM inference for edge boxes: paged KV cache, prefix sharing, continuous batching.",
    no_args_is_help=True,
    add_completion=False,
)
app.command()(generate)
app.command()(serve)
app.command()(build)
app.command()(doctor)
app.add_typer(profile_app, name="profile", help="Device profiles and the memory plan they give.")
app.add_typer(rag_app, name="rag", help="Answer questions from a local folder of documents.")


@app.callback()
def _root() -> None:
    """LLM inference for edge boxes: paged KV cache, prefix sharing, continuous batching."""


def main() -> None:
    app()
