"""`edgepaged build`: the TensorRT engine for a model under a device profile, built once and cached."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import EdgepagedError


def build(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model folder or .gguf file (default: SmolLM2-135M-Instruct)."),
    profile: str = typer.Option(..., "--profile", "-p", help="Device profile name or YAML path (a CUDA profile)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where engines are kept (default: $EDGEPAGED_CACHE/engines)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even when a matching engine is cached."),
) -> None:
    """Build (or find in the cache) the TensorRT engine for MODEL under PROFILE; prints its folder."""
    from ..backends.tensorrt.build import build_engine

    def log(line: str) -> None:
        typer.echo(line, err=True)

    try:
        engine_dir = build_engine(model, profile, cache_dir=cache_dir, force=force, log=log)
    except (EdgepagedError, ValueError) as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    typer.echo(str(engine_dir))
