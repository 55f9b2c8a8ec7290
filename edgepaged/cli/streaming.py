"""Answers written as they are generated, from a local engine or from a running server.

Both halves report text pieces to a `write` callback, so `generate`, `rag ask` and `rag chat`
print the same way whether the tokens come from this process or over HTTP.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import EdgepagedError

if TYPE_CHECKING:
    from ..engine import LLMEngine
    from ..outputs import CompletionOutput
    from ..sampling import SamplingParams


class ServerError(EdgepagedError):
    """The server could not be reached or refused the request; the message says which and why."""


def write_stdout(piece: str) -> None:
    """Show a piece at once: stdout is block-buffered when piped, and the point is to see it."""
    sys.stdout.write(piece)
    sys.stdout.flush()


def stream_local(
    engine: LLMEngine, request_id: str, prompt_ids: list[int], params: SamplingParams, write: Callable[[str], None]
) -> CompletionOutput:
    """Run one request on `engine`, writing each new piece of its text; returns its final output."""
    engine.add_request(request_id, prompt_ids, params)
    shown, final = 0, None
    while final is None:
        for out in engine.step():
            if out.request_id != request_id:
                continue
            text = out.outputs[0].text
            write(text[shown:])
            shown = len(text)
            if out.finished:
                final = out.outputs[0]
    return final


@dataclass(slots=True)
class ServerAnswer:
    text: str = ""
    sources: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass(frozen=True, slots=True)
class Server:
    """An `edgepaged serve` (or any OpenAI-compatible server) at `url`."""

    url: str
    api_key: str | None = None
    timeout_s: float = 600.0

    def _request(self, path: str, body: dict[str, Any] | None = None):
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream, application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.url.rstrip('/')}{path}", data=data, headers=headers)
        try:
            return urllib.request.urlopen(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            raise ServerError(f"{self.url}{path}: {exc.code} {_error_message(exc)}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServerError(f"cannot reach {self.url}: {reason}") from None

    def model(self) -> str:
        """The first model the server serves: what `model` must name in a request."""
        with self._request("/v1/models") as response:
            models = json.load(response).get("data") or []
        if not models:
            raise ServerError(f"{self.url}/v1/models lists no model")
        return models[0]["id"]

    def stream_chat(self, body: dict[str, Any], write: Callable[[str], None]) -> ServerAnswer:
        """POST a streamed chat completion, writing each content delta; `rag_sources` arrive on
        the last chunk before [DONE]."""
        answer = ServerAnswer()
        with self._request("/v1/chat/completions", {**body, "stream": True}) as response:
            for event in _sse_events(response):
                for choice in event.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content") or ""
                    if piece:
                        write(piece)
                        answer.text += piece
                    answer.finish_reason = choice.get("finish_reason") or answer.finish_reason
                answer.sources = event.get("rag_sources") or answer.sources
        return answer


def _sse_events(response) -> Iterator[dict[str, Any]]:
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        payload = line.removeprefix("data: ")
        if payload == "[DONE]":
            return
        event = json.loads(payload)
        if "error" in event:  # an error after the stream began
            raise ServerError(event["error"].get("message", str(event["error"])))
        yield event


def _error_message(exc: urllib.error.HTTPError) -> str:
    """OpenAI's `{"error": {"message": ...}}`, or the body as text."""
    body = exc.read().decode(errors="replace")
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body.strip() or exc.reason
