"""`edgepaged serve`: the OpenAI-compatible server (the [serve] extra).

Every option can also come from an EDGEPAGED_* environment variable, which is how the systemd
unit configures it (deploy/edgepaged.env.example). The server package is imported inside the
command, so `edgepaged generate` and the other commands keep working on an install without
FastAPI and uvicorn.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Optional

import typer

from .. import __version__
from ..errors import EdgepagedError
from .device import profile_here

log = logging.getLogger(__name__)

_COLLECTION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def parse_rag_collections(specs: list[str], pins: tuple[str, ...]) -> dict[str, Path]:
    """`NAME=DB_PATH` specs as a name -> path map; refuses bad syntax, a name given twice and a
    --rag-pin that names no collection (usage errors, before anything loads)."""
    collections: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path or not _COLLECTION_NAME.fullmatch(name):
            raise typer.BadParameter(
                f"{spec!r} is not NAME=DB_PATH (NAME: letters, digits, '.', '_', '-')", param_hint="--rag"
            )
        if name in collections:
            raise typer.BadParameter(f"the collection {name!r} is given twice", param_hint="--rag")
        collections[name] = Path(path)
    for pin in pins:
        if pin not in collections:
            raise typer.BadParameter(f"{pin!r} is not a collection given with --rag", param_hint="--rag-pin")
    return collections


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
        help="queued requests before 429 (default: as many as --max-queue-wait allows, at most the profile's)",
    ),
    max_queue_wait: float = typer.Option(
        30.0,
        "--max-queue-wait",
        envvar="EDGEPAGED_MAX_QUEUE_WAIT",
        min=0.1,
        help="seconds a request should wait at most before it starts: sizes the default --max-waiting-requests",
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
    max_stop_strings: int = typer.Option(
        16, "--max-stop-strings", envvar="EDGEPAGED_MAX_STOP_STRINGS", min=0, help="stop strings one request may send"
    ),
    max_stop_chars: int = typer.Option(
        256, "--max-stop-chars", envvar="EDGEPAGED_MAX_STOP_CHARS", min=1, help="longest stop string accepted"
    ),
    allowed_host: list[str] | None = typer.Option(  # noqa: B008 - a repeatable option, as --rag
        None,
        "--allowed-host",
        envvar="EDGEPAGED_ALLOWED_HOSTS",
        help="a hostname clients may reach the server by, besides localhost, IP addresses and --host "
        "(repeatable; '*' for any; in the variable, separated by spaces)",
    ),
    cors_origin: list[str] | None = typer.Option(  # noqa: B008 - a repeatable option, as --rag
        None,
        "--cors-origin",
        envvar="EDGEPAGED_CORS_ORIGINS",
        help="a browser origin (https://app.example) allowed to read answers; none: CORS off (repeatable)",
    ),
    header_timeout: float = typer.Option(
        10.0, "--header-timeout", envvar="EDGEPAGED_HEADER_TIMEOUT", min=0.1,
        help="seconds a connection has to send its request headers",
    ),
    body_timeout: float = typer.Option(
        30.0, "--body-timeout", envvar="EDGEPAGED_BODY_TIMEOUT", min=0.1,
        help="seconds a request has to send its body",
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
    rag: list[str] = typer.Option(
        [],
        "--rag",
        envvar="EDGEPAGED_RAG",
        help="answer chat requests naming collection NAME from the index DB_PATH: NAME=DB_PATH "
        "(repeatable; in the variable, separated by spaces)",
    ),
    rag_pin: Optional[str] = typer.Option(
        None,
        "--rag-pin",
        envvar="EDGEPAGED_RAG_PIN",
        help="keep the hot prompt prefixes of these --rag collections pinned in the KV cache: NAME[,NAME...]",
    ),
    emulate: bool = typer.Option(
        False,
        "--emulate",
        help="plan as on the profile's device: budget and figures from the profile, allocator capped to them",
    ),
) -> None:
    """Serve the OpenAI API (completions, chat, models) with metrics, health and systemd notify."""
    from edgepaged.models.loader import DEFAULT_MODEL
    from edgepaged.server import ServeOptions, run
    from edgepaged.server.protocol import RequestLimits

    # The start-up report begins before run(), whose identical basicConfig then changes nothing;
    # the memory plan table follows from edgepaged.planning once the model is measured.
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    chosen = profile_here(profile, emulate, log.warning)
    log.info(
        "edgepaged %s: model %s, profile %s (%s), %s weights, %s backend; will listen on http://%s:%d once loaded",
        __version__, model or DEFAULT_MODEL, chosen.name, chosen.description or chosen.device.kind,
        chosen.model.dtype, backend or chosen.backend, host, port,
    )

    # An empty EDGEPAGED_RAG_PIN= means none, as in the settings file.
    pins = tuple(dict.fromkeys(name.strip() for name in (rag_pin or "").split(",") if name.strip()))
    options = ServeOptions(
        model=model,
        profile=chosen,
        host=host,
        port=port,
        api_key=api_key,
        backend=backend,
        max_kv_blocks=max_kv_blocks,
        served_model_name=served_model_name,
        max_waiting_requests=max_waiting_requests,
        max_waiting_tokens=max_waiting_tokens,
        max_queue_wait=max_queue_wait,
        max_body_bytes=int(max_body_mb * 1024 * 1024),
        limits=RequestLimits(max_stop_strings=max_stop_strings, max_stop_chars=max_stop_chars),
        allowed_hosts=tuple(allowed_host or ()),
        cors_origins=tuple(cors_origin or ()),
        header_timeout=header_timeout,
        body_timeout=body_timeout,
        drain_timeout=drain_timeout,
        log_level=log_level,
        rag=parse_rag_collections(rag, pins),
        rag_pin=pins,
    )
    try:
        run(options)
    except EdgepagedError as exc:  # a startup refusal (model, RAG index): the message says what to fix
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
