"""What every connection and request passes before a route sees it.

A server on 127.0.0.1 is still reachable from any web page its user opens: a page can POST to
it (a "simple" request needs no CORS preflight) and, by rebinding its own hostname to
127.0.0.1, read the answers. So the Host header must name this server (`HostCheck`), JSON
endpoints take only `application/json` (checked by the routes), and CORS stays off unless
origins are listed. Slow clients are cut off: request headers must arrive within a deadline
(`HeaderDeadline`, at the protocol level, since no ASGI app runs before the headers are in) and
the body within another (`BodyLimit`). `AccessLog` gives every request an id and one log line
with its status and duration, never its body, which holds the user's prompt. `AdmissionGate`
answers 429 while the queue is full before any of the request's body is read or parsed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
import uuid
from collections.abc import Callable, Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from edgepaged.server.errors import ApiError, error_response

access_log = logging.getLogger("edgepaged.server.access")

# Names that always mean this machine; IP literals always pass too (see `HostCheck`).
LOOPBACK_NAMES = ("localhost",)


class AccessLog:
    """Tags each request with an id (`scope["state"]["request_id"]`, the `X-Request-Id`
    response header, the completion id's suffix) and logs id, method, path, status, duration."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 0
        start = time.perf_counter()

        async def tagged(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, tagged)
        except Exception:
            status = status or 500  # answered by the error handler outside this middleware
            raise
        finally:
            access_log.info(
                "%s %s %s %d %.1f ms",
                request_id, scope["method"], scope["path"], status, (time.perf_counter() - start) * 1000,
            )


class HostCheck:
    """Refuses (403) a Host header that names neither this server nor an allowed name.

    DNS rebinding needs a hostname the attacker controls; a page reaching the server by an IP
    address or by `localhost` is not such an attack, so those always pass, and hostnames pass
    only when listed (`--allowed-host`; `*` turns the check off, e.g. behind a proxy that
    checks names itself). A request without Host (HTTP/1.0) comes from no browser and passes.
    """

    def __init__(self, app: ASGIApp, allowed: Iterable[str]):
        self.app = app
        names = {name.lower().rstrip(".") for name in allowed}
        self.any_host = "*" in names
        self.names = names | set(LOOPBACK_NAMES)

    def allows(self, host: str) -> bool:
        name = host[1 : host.find("]")] if host.startswith("[") else host.rpartition(":")[0] or host
        name = name.lower().rstrip(".")
        if self.any_host or name in self.names:
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host")
            if host is not None and not self.allows(host.decode("latin-1")):
                refusal = ApiError(
                    403,
                    "the Host header does not name this server; add the name with --allowed-host",
                    code="host_not_allowed",
                )
                await error_response(refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class AdmissionGate:
    """Refuses a request to one of `paths` with the ApiError `refusal` gives for its headers
    (a 429 while the queue is full), before its body is read, parsed or routed.

    Under a burst most requests are refused, and each refusal used to wait behind the others'
    body reading, JSON validation and FastAPI routing on the one event loop (a 429 took
    80-150 ms at p50/p99 on the H200 host); here it costs the HTTP parsing and this check.
    """

    def __init__(self, app: ASGIApp, paths: Iterable[str], refusal: Callable[[dict[bytes, bytes]], ApiError | None]):
        self.app = app
        self.paths = frozenset(paths)
        self.refusal = refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.paths:
            refused = self.refusal(dict(scope["headers"]))
            if refused is not None:
                await error_response(refused)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """Reads the whole request body up front: past `max_bytes` it is refused with 413, and a
    body still incomplete after `timeout_s` with 408.

    Checked on the bytes actually received, not only on Content-Length, so a chunked upload
    cannot slip past the bound; the handler then gets the body replayed from memory.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = ApiError(413, f"the request body exceeds {self.max_bytes} bytes", code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            bad = too_large if declared.isdigit() else ApiError(400, "invalid Content-Length header")
            await error_response(bad)(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > self.max_bytes:
                        await error_response(too_large)(scope, receive, send)
                        return
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            slow = ApiError(408, f"the request body did not arrive within {self.timeout_s:g} s", code="request_timeout")
            await error_response(slow)(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers are not all in within
    `header_timeout` seconds of its opening or of its previous response.

    uvicorn's keep-alive timeout only covers a connection that sends nothing; one that sends a
    byte now and then, never finishing its headers, would be held open forever.
    """

    def __init__(self, *args: object, header_timeout: float, **kwargs: object):
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_request():
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._in_request():  # a pipelined request may have begun
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _in_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self._header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()
