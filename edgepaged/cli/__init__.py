"""The `edgepaged` command: each subcommand lives in its own module.

The subcommand modules import only typer and the standard library at the top; torch, the
engine and the RAG stack are imported inside the commands, so `edgepaged --help` and
`--version` answer without loading any of them.
"""

from __future__ import annotations

import sys

import typer

from .. import __version__
from ..errors import EdgepagedError
from .build import build
from .doctor import doctor
from .generate import generate
from .profile import app as profile_app
from .rag import app as rag_app
from .serve import serve

# The exit status of an expected error (a model that is not installed, a bad profile, a budget
# too small): what a usage error gets, so scripts and systemd tell it from a crash (1).
EXPECTED_ERROR_EXIT = 2

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


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"edgepaged {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """LLM inference for edge boxes: paged KV cache, prefix sharing, continuous batching."""


def main() -> None:
    """The console script: an expected error is one line on stderr and exit status 2, not a
    traceback panel; anything else is a bug and keeps its traceback."""
    try:
        app()
    except EdgepagedError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        sys.exit(EXPECTED_ERROR_EXIT)
