"""Viewer routes on the daemon's aiohttp app.

``GET /viewer/`` index of sources; ``GET /viewer/<source>`` live depth image + WebGL point cloud (three.js)
with FPS/latency overlays; ``GET /viewer/publish/<source>`` publishes the browser camera through WHIP;
``GET /viewer/ws/<source>`` websocket of binary result messages (:mod:`daemon.viewer.hub`);
``GET /viewer/assets/*`` the built bundle. With ``http.token`` set a browser passes the token as
``?access_token=`` (RFC 6750 section 2.3; daemon/http.py accepts it); the pages forward it.
"""

from __future__ import annotations

import asyncio
import html
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from daemon.viewer.hub import ResultsHub

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")


def _index_html(sources: dict[str, str], token_qs: str) -> str:
    rows = []
    for name, kind in sources.items():
        n = html.escape(name)
        publish = (f' &middot; <a href="/viewer/publish/{n}{token_qs}">publish camera</a>'
                   if kind == "webrtc" else "")
        rows.append(f'<li><a href="/viewer/{n}{token_qs}">{n}</a> <small>({html.escape(kind)})</small>'
                    f"{publish}</li>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>geometryd viewer</title>"
            "<style>body{font:15px system-ui;margin:2em;background:#111;color:#ddd}a{color:#7cf}</style>"
            "</head><body><h1>geometryd sources</h1><ul id='sources'>" + "".join(rows)
            + "</ul></body></html>")


def add_routes(app: web.Application, hub: ResultsHub, source_types: Callable[[], dict[str, str]]) -> None:
    """Register the viewer on the daemon's HTTP app; ``source_types()`` -> {name: "file"|"rtsp"|"webrtc"}."""

    def known(request: web.Request) -> str:
        name = request.match_info["source"]
        if name not in source_types():
            raise web.HTTPNotFound(text=f"no source named {name!r}\n")
        return name

    def page(file: str) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.StreamResponse:
            known(request)
            path = STATIC / file
            if not path.exists():
                raise web.HTTPServiceUnavailable(
                    text="viewer bundle not built (daemon/viewer/web: npm run build)\n")
            return web.FileResponse(path, headers={"Cache-Control": "no-cache"})
        return handler

    async def index(request: web.Request) -> web.Response:
        token = request.query.get("access_token")
        qs = f"?access_token={html.escape(token)}" if token else ""
        return web.Response(text=_index_html(source_types(), qs), content_type="text/html")

    async def index_redirect(_: web.Request) -> web.Response:
        raise web.HTTPFound("/viewer/")

    async def ws(request: web.Request) -> web.WebSocketResponse:
        name = known(request)
        sock = web.WebSocketResponse(heartbeat=20)
        await sock.prepare(request)
        q = hub.subscribe(name)
        log.info("viewer connected", extra={"source": name})

        async def drain_incoming() -> None:
            async for msg in sock:  # the client sends nothing; this notices the close
                if msg.type == WSMsgType.ERROR:
                    break

        reader = asyncio.create_task(drain_incoming())
        try:
            while not sock.closed and not reader.done():
                getter = asyncio.create_task(q.get())
                await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    break
                await sock.send_bytes(getter.result())
        except (ConnectionResetError, RuntimeError):  # the browser went away mid-send
            pass
        finally:
            hub.unsubscribe(name, q)
            reader.cancel()
            await sock.close()
            log.info("viewer disconnected", extra={"source": name})
        return sock

    app.router.add_get("/viewer", index_redirect)
    app.router.add_get("/viewer/", index)
    app.router.add_get("/viewer/ws/{source}", ws)
    app.router.add_get("/viewer/publish/{source}", page("publish.html"))
    app.router.add_get("/viewer/{source}", page("viewer.html"))
    if (STATIC / "assets").is_dir():
        app.router.add_static("/viewer/assets", STATIC / "assets")
