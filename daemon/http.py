"""The daemon's small HTTP server (aiohttp): ``GET /metrics`` (Prometheus text) and ``GET /healthz`` (JSON).

Binds ``http.bind:http.port`` (127.0.0.1 by default). With ``http.token`` set, every request except
``/healthz`` (a liveness probe carries no token) needs ``Authorization: Bearer <token>`` (scheme matched
case-insensitively, RFC 7235 2.1; token compared in constant time). ``/healthz`` answers 200 while the daemon
is healthy and 503 otherwise (with the reasons in ``degraded``), so it doubles as a readiness probe.
Connections are limited by daemon/http_guard.py (header-read and idle timeouts, a connection cap).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from daemon.config import HttpConfig
from daemon.http_guard import GuardedAppRunner

HealthFn = Callable[[], dict[str, Any]]


# The viewer's built JS/CSS bundle carries no data; browsers load it from <script> tags that cannot send a
# token.
PUBLIC_PATH_PREFIXES = ("/viewer/assets/",)
PUBLIC_PATHS = frozenset({"/healthz"})  # config.toml: "every request except /healthz"


def _bearer(header: str) -> str | None:
    """The token of ``Authorization: Bearer <token>`` (any case of the scheme), else None."""
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credentials.strip()


def build_app(metrics_fn: Callable[[], bytes], health_fn: HealthFn, token: str = "",
              setup: Callable[[web.Application], None] | None = None) -> web.Application:
    @web.middleware
    async def auth(request: web.Request,
                   handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        public = request.path in PUBLIC_PATHS or request.path.startswith(PUBLIC_PATH_PREFIXES)
        if token and not public:
            header = request.headers.get("Authorization", "")
            got: str | None = _bearer(header) if header else None
            if not header and "access_token" in request.query:  # RFC 6750 2.3: browsers (viewer, websockets)
                got = request.query["access_token"]
            if not header and got is None:
                return web.json_response({"error": "unauthorized"}, status=401,
                                         headers={"WWW-Authenticate": "Bearer"})
            if got is None or not hmac.compare_digest(got.encode(), token.encode()):
                return web.json_response({"error": "forbidden"}, status=403)
        return await handler(request)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=metrics_fn(), headers={"Content-Type": "text/plain; version=0.0.4"})

    async def healthz(_: web.Request) -> web.Response:
        body = health_fn()
        return web.Response(text=json.dumps(body), content_type="application/json",
                            status=200 if body.get("ok") else 503)

    app = web.Application(middlewares=[auth])
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    if setup is not None:  # more routes (WHIP ingest, viewer)
        setup(app)
    return app


class HttpServer:
    """Async context manager: serves the app while the block runs; ``port`` is the bound port (0 -> free)."""

    def __init__(self, bind: str, port: int, metrics_fn: Callable[[], bytes], health_fn: HealthFn,
                 token: str = "", setup: Callable[[web.Application], None] | None = None,
                 limits: HttpConfig | None = None) -> None:
        self.bind, self.port = bind, port
        self.limits = limits or HttpConfig()  # its connection limits (the [http] table)
        self._app = build_app(metrics_fn, health_fn, token, setup)
        self._runner: GuardedAppRunner | None = None

    @property
    def stats(self) -> Any:
        """Connections refused by the cap, header timeouts, bad requests (daemon/http_guard.py)."""
        return self._runner.stats if self._runner is not None else None

    async def __aenter__(self) -> HttpServer:
        self._runner = GuardedAppRunner(self._app, self.limits, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.bind, self.port)
        await site.start()
        # PATCH(aiohttp==3.14.5): the site's private asyncio server, for the port bound to port 0
        sockets = getattr(site._server, "sockets", None) or []  # noqa: SLF001 (aiohttp exposes no getter)
        if sockets:
            self.port = sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
