"""Connection limits for the aiohttp server: a header-read timeout, an idle (keep-alive) timeout, a cap on
open connections, and bad requests answered 400/431 with one debug line instead of an ERROR traceback.

aiohttp's defaults keep an idle connection for 3630 s and wait for headers forever, so any peer that can
reach the port holds file descriptors before the token is even checked. ``GuardedAppRunner`` is an
``AppRunner`` whose connections are ``GuardedHandler`` s:

- ``idle_timeout_s``: aiohttp's keep-alive timer, which also runs from the moment a connection opens (a
  client that connects and sends nothing, or a partial request, is closed when it expires);
- ``header_timeout_s``: from the first byte of a request until its headers are complete (slow-header
  clients are closed even while the idle timer is longer);
- ``max_connections``: a connection beyond the cap is closed at once (counted in ``refused``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong

from daemon.config import HttpConfig

log = logging.getLogger(__name__)


@dataclass
class GuardStats:
    refused: int = 0  # connections closed because of max_connections
    header_timeouts: int = 0
    bad_requests: int = 0


class GuardedHandler(web.RequestHandler):
    """A RequestHandler with a header-read deadline, a connection cap and quiet bad-request handling."""

    limits: HttpConfig  # header_timeout_s, idle_timeout_s, max_connections
    stats: GuardStats

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._header_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        manager = self._manager
        if manager is not None and len(manager.connections) > self.limits.max_connections:
            self.stats.refused += 1
            log.debug("http: connection cap reached (%d): closing a new one", self.limits.max_connections)
            self.force_close()
            transport.close()

    def data_received(self, data: bytes) -> None:
        awaiting_headers = (not self._messages and not self._request_in_progress
                            and self._payload_parser is None and not self._upgraded)
        if awaiting_headers and self._header_deadline is None:
            self._header_deadline = self._loop.call_later(self.limits.header_timeout_s, self._headers_late)
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            self._cancel_header_deadline()

    def _headers_late(self) -> None:
        self._header_deadline = None
        if not self._request_in_progress and not self._messages:
            self.stats.header_timeouts += 1
            log.debug("http: headers not complete after %.1f s: closing", self.limits.header_timeout_s)
            self.force_close()
            if self.transport is not None:
                self.transport.close()

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if isinstance(exc, HttpProcessingError):
            self.stats.bad_requests += 1
            too_big = isinstance(exc, LineTooLong) or (isinstance(exc, BadHttpMessage)
                                                      and "too many headers" in str(exc).lower())
            status = 431 if too_big else 400
            message = "Request Header Fields Too Large" if too_big else "Bad Request"
        return super().handle_error(request, status, exc, message)

    def log_exception(self, *args: Any, **kw: Any) -> None:
        exc = kw.get("exc_info")
        if isinstance(exc, HttpProcessingError):  # a client's malformed or oversized request: not our error
            log.debug("http: bad request: %s", str(exc)[:200])
            return
        super().log_exception(*args, **kw)


class GuardedAppRunner(web.AppRunner):
    """``web.AppRunner`` whose protocol is ``GuardedHandler`` with ``limits`` (idle = keep-alive timeout)."""

    def __init__(self, app: web.Application, limits: HttpConfig, **kwargs: Any) -> None:
        super().__init__(app, keepalive_timeout=limits.idle_timeout_s, **kwargs)
        self.limits = limits
        self.stats = GuardStats()

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        handler = type("BoundGuardedHandler", (GuardedHandler,), {"limits": self.limits, "stats": self.stats})
        # PATCH(aiohttp==3.14.5): the private kwargs aiohttp passes to each RequestHandler
        kwargs = server._kwargs  # noqa: SLF001 (what aiohttp passes to each RequestHandler)

        class _Server(web.Server):
            def __call__(self) -> web.RequestHandler:
                return handler(self, loop=self._loop, **kwargs)

        server.__class__ = _Server  # same object and state; only the protocol factory changes
        return server
