"""`edgepaged serve`: the OpenAI-compatible server (the [serve] extra).

Every option can also come from an EDGEPAGED_* environment variable, which is how the systemd
unit configures it (deploy/edgepaged.env.example). The server package is imported inside the
command, so `edgepaged generate` and the other commands keep working on an install without
FastAPI and uvicorn.
"""

from __future__ import annotations

from typing import Optional

import typer


def serve(
    model: Optional[str] = typer.Option(
        None, "--model", envvar="EDGEPAGED_MODEL", help="model folder or .gguf (default: the default model)"
    ),
    profile: str = typer.Option(
        "cpu", "--profile", envvar="EDGEPAGED_PROFILE", help="shipped profile name or YAML path"
    ),
    host: str = typer.Option(
        "127.0.0.1",
        "--host",
        envvar="EDGEPAGED_HOST",
        help="address to bind; keep loopback unless a proxy or firewall fronts it",
    ),
    port: int = typer.Option(8000, "--port", envvar="EDGEPAGED_PORT", min=1, max=65535),
    api_key: Optional[str] = typer.Option(
        None,
        "--api-key",
        envvar="EDGEPAGED_API_KEY",
        help="require 'Authorization: Bearer KEY' on /v1 (prefer the environment variable: argv is visible in ps)",
    ),
    backend: Optional[str] = typer.Option(
        None, "--backend", envvar="EDGEPAGED_BACKEND", help="attention backend (default: the profile's)"
    ),
    max_kv_blocks: Optional[int] = typer.Option(
        None,
        "--max-kv-blocks",
        envvar="EDGEPAGED_MAX_KV_BLOCKS",
        min=1,
        help="cap the KV pool (testing, sharing a box)",
    ),
    served_model_name: Optional[str] = typer.Option(
        None, "--served-model-name", envvar="EDGEPAGED_SERVED_MODEL_NAME", help="the name clients send as 'model'"
    ),
    max_waiting_requests: Optional[int] = typer.Option(
        None,
        "--max-waiting-requests",
        envvar="EDGEPAGED_MAX_WAITING_REQUESTS",
        min=1,
        help="queued requests before 429 (default: the profile's)",
    ),
    max_waiting_tokens: Optional[int] = typer.Option(
        None,
        "--max-waiting-tokens",
        envvar="EDGEPAGED_MAX_WAITING_TOKENS",
        min=1,
        help="queued prompt tokens before 429 (default: the profile's)",
    ),
    max_body_mb: float = typer.Option(
        4.0, "--max-body-mb", envvar="EDGEPAGED_MAX_BODY_MB", min=0.001, help="largest request body accepted"
    ),
    drain_timeout: float = typer.Option(
        30.0,
        "--drain-timeout",
        envvar="EDGEPAGED_DRAIN_TIMEOUT",
        min=0,
        help="seconds SIGTERM waits for running requests",
    ),
    log_level: str = typer.Option(
        "info", "--log-level", envvar="EDGEPAGED_LOG_LEVEL", help="critical, error, warning, info or debug"
    ),
) -> None:
    """Serve the OpenAI API (completions, chat, models) with metrics, health and systemd notify."""
    from edgepaged.server import ServeOptions, run

    run(
        ServeOptions(
            model=model,
            profile=profile,
            host=host,
            port=port,
            api_key=api_key,
            backend=backend,
            max_kv_blocks=max_kv_blocks,
            served_model_name=served_model_name,
            max_waiting_requests=max_waiting_requests,
            max_waiting_tokens=max_waiting_tokens,
            max_body_bytes=int(max_body_mb * 1024 * 1024),
            drain_timeout=drain_timeout,
            log_level=log_level,
        )
    )
