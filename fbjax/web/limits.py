"""HTTP limits that keep one client from holding a server: a header-read timeout, a cap on
open connections, a request-body limit (413 before the body is read) and a bounded
graceful shutdown. uvicorn has none of the first three, so they are added here, for the
server and the router alike.

* :func:`guarded_h11_protocol` is uvicorn's h11 protocol that closes a connection whose
  request headers have not all arrived ``header_timeout_s`` after it opened or after its
  previous response (slowloris, silent sockets), and closes at once any connection
  beyond ``max_connections``.
* :class:`BodyLimitMiddleware` answers 413 to a declared ``Content-Length`` over the
  limit without reading the body, and to a chunked body as soon as it passes the limit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from fbjax.web.errors import OpenAIError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class HttpLimits:
    """The limits one listening server enforces (flags of the server and the router)."""

    header_timeout_s: float = 10.0  # headers must arrive within this
    max_connections: int = 1024  # open connections; more are closed at once
    max_body_bytes: int = 16 << 20  # request bodies; larger get 413
    shutdown_timeout_s: float = 15.0  # how long a graceful shutdown may wait in all

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "max_connections", "max_body_bytes",
                     "shutdown_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    def uvicorn_kwargs(self) -> dict[str, Any]:
        """What uvicorn.Config takes for these limits."""
        return {"http": guarded_h11_protocol(self),
                "timeout_graceful_shutdown": max(1, round(self.shutdown_timeout_s))}


def guarded_h11_protocol(limits: HttpLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a header-read timeout and a connection cap."""

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                log.warning("connection refused: %d open, the limit is %d",
                            len(self.connections) - 1, limits.max_connections)
                transport.close()
                return
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and self._between_requests():
                self._arm_header_timer()
            super().data_received(data)
            if not self._between_requests():
                self._cancel_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # The keep-alive timeout now watches the idle connection; the header timer
            # starts again with the next request's first bytes.

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm_header_timer(self) -> None:
            self._header_timer = self.loop.call_later(limits.header_timeout_s,
                                                      self._header_timeout)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self._between_requests() and not self.transport.is_closing():
                log.info("closing a connection whose request headers took over %.0f s",
                         limits.header_timeout_s)
                self.transport.close()

    return GuardedH11Protocol


class _BodyTooLarge(HTTPException):
    """Raised from ``receive`` mid-body: an HTTPException, because FastAPI turns anything
    else raised while it parses a body into a 400; its handler answers the 413."""


class BodyLimitMiddleware:
    """413 (OpenAI error body) for a request body over ``max_bytes``, before reading a
    declared one and as soon as a chunked one passes the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int, on_reject: Any = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_reject = on_reject  # called with the status, for metrics

    def _message(self) -> str:
        return f"the request body is larger than the server's limit of {self.max_bytes} bytes"

    def _too_large(self) -> JSONResponse:
        if self.on_reject is not None:
            self.on_reject(413)
        err = OpenAIError(413, self._message(), None, "request_too_large")
        # No "Connection: close": uvicorn then discards the rest of the body as it
        # arrives (nothing is buffered) and the client, still uploading, reads a clean
        # 413 instead of a connection reset.
        return JSONResponse(err.body(), status_code=413)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        try:
            if declared is not None and int(declared) > self.max_bytes:
                await self._too_large()(scope, receive, send)
                return
        except ValueError:
            pass  # a malformed length is the HTTP parser's to refuse
        seen = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge(413, self._message())
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await self._too_large()(scope, receive, send)
