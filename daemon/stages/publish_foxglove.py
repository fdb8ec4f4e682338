"""Live Foxglove view: foxglove-sdk's WebSocket server (subprotocol ``foxglove.sdk.v1``, the Foxglove
WebSocket protocol) publishing the recording's channels (daemon/wire/foxglove.py) as frames are refined.

Every source's channels are advertised at start, so a client can subscribe before the first frame; a frame
is encoded only while some client subscribes to one of its source's topics. A slow client loses its oldest
messages (``foxglove.backlog`` per client, the SDK's policy); the frame itself still counts as out (a live
view is best effort, the recording and MQTT are the sinks that account for frames).

The SDK's server has no authentication. With ``foxglove.token`` set, it listens on an ephemeral loopback port
and :class:`TokenGate` (aiohttp) listens on ``bind:port``: it accepts a WebSocket upgrade only with the token
(``?token=`` in the URL, which the Foxglove app can send, or ``Authorization: Bearer``) and relays frames both
ways; anything else gets 401. Without a token the bind must be loopback (daemon/config.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
from typing import Any

import aiohttp
import foxglove
from aiohttp import web
from foxglove import channels as fx_channels
from foxglove.websocket import Capability, ServerListener

from daemon.wire import foxglove as fx

log = logging.getLogger(__name__)

SUBPROTOCOL = "foxglove.sdk.v1"  # what the SDK server speaks (the foxglove.websocket.v1 protocol, renamed)


def _units(cfg: Any) -> str:
    return "metric" if getattr(getattr(cfg, "geometry", None), "metric", False) else "relative"


class _Subscriptions(ServerListener):
    """Topics with at least one subscribed client (callbacks arrive on the SDK's threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count: dict[str, int] = {}

    def on_subscribe(self, client: Any, channel: Any) -> None:
        with self._lock:
            self._count[channel.topic] = self._count.get(channel.topic, 0) + 1

    def on_unsubscribe(self, client: Any, channel: Any) -> None:
        with self._lock:
            n = self._count.get(channel.topic, 0) - 1
            if n > 0:
                self._count[channel.topic] = n
            else:
                self._count.pop(channel.topic, None)

    def any(self, topics: list[str]) -> bool:
        with self._lock:
            return any(t in self._count for t in topics)

    def total(self) -> int:
        with self._lock:
            return sum(self._count.values())


class FoxgloveLive:
    """The live server for ``sources`` (``cfg``: the whole ``config.Config``; its ``[foxglove]`` table)."""

    name = "foxglove"

    def __init__(self, cfg: Any, sources: list[str], metrics: Any = None) -> None:
        self.fcfg = cfg.foxglove
        self.colour = bool(self.fcfg.colour)
        self.metrics = metrics
        self.sources = list(sources)
        self.context = foxglove.Context()
        self.subs = _Subscriptions()
        self._channels: dict[str, Any] = {}
        self._topics: dict[str, list[str]] = {}
        metadata = {"units": _units(cfg)}
        for source in self.sources:
            pairs = fx.topics(source, colour=self.colour)
            self._topics[source] = [t for t, _ in pairs if t != "/tf"]
            for topic, schema in pairs:
                if topic not in self._channels:
                    kind = getattr(fx_channels, f"{schema.__name__}Channel")
                    self._channels[topic] = kind(topic, metadata=metadata if topic != "/tf" else None,
                                                 context=self.context)
        self.server: Any = None
        self.gate: TokenGate | None = None
        self.port: int | None = None

    async def __aenter__(self) -> FoxgloveLive:
        token = self.fcfg.token
        host = "127.0.0.1" if token else self.fcfg.bind
        port = 0 if token else self.fcfg.port
        self.server = foxglove.start_server(name="geometryd", host=host, port=port, context=self.context,
                                            server_listener=self.subs, capabilities=[Capability.Time],
                                            message_backlog_size=self.fcfg.backlog)
        self.port = self.server.port
        if token:
            self.gate = TokenGate(self.fcfg.bind, self.fcfg.port, token, self.server.port)
            await self.gate.start()
            self.port = self.gate.port
        log.info("foxglove live server listening", extra={"bind": self.fcfg.bind, "port": self.port,
                                                           "token_required": bool(token)})
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.gate is not None:
            await self.gate.stop()
        if self.server is not None:
            await asyncio.to_thread(self.server.stop)
            self.server = None

    def watched(self, source: str) -> bool:
        if self.metrics is not None:
            self.metrics.foxglove_subscriptions.set(self.subs.total())
        return self.subs.any(self._topics.get(source, []))

    def write_frame(self, source: str, result: Any, pts: float, image: Any = None,
                    jpeg: bytes | None = None) -> bool:
        """Publish one frame if anyone watches its source (True when it was sent). Blocks on encoding:
        call it from a worker thread in async code."""
        if not self.watched(source):
            return False
        try:
            log_ns, messages = fx.frame_messages(source, result, pts, stride=self.fcfg.points_stride,
                                                 image=image if self.colour else None,
                                                 jpeg=jpeg if self.colour else None)
            for msg in messages:
                self._channels[msg.topic].log(msg.message, log_time=log_ns)
            if self.server is not None:
                self.server.broadcast_time(log_ns)
        except Exception:
            if self.metrics is not None:
                self.metrics.sink_fail(self.name, source)
            raise
        if self.metrics is not None:
            self.metrics.sink_wrote(self.name, source, 0)
        return True


class TokenGate:
    """A WebSocket relay in front of the SDK server that admits only clients with the token."""

    def __init__(self, bind: str, port: int, token: str, upstream_port: int) -> None:
        self.bind, self.want_port, self.token, self.upstream_port = bind, port, token, upstream_port
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    def _authorised(self, request: web.Request) -> bool:
        given = request.query.get("token", "")
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            given = auth[len("Bearer "):]
        return hmac.compare_digest(given.encode(), self.token.encode())

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if not self._authorised(request):
            return web.Response(status=401, text="foxglove: a token is required (?token=...)\n")
        ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,), max_msg_size=0)
        await ws.prepare(request)
        assert self._session is not None
        async with self._session.ws_connect(f"ws://127.0.0.1:{self.upstream_port}/", protocols=(SUBPROTOCOL,),
                                            max_msg_size=0) as up:
            async def pipe(src: Any, dst: Any) -> None:
                async for msg in src:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        await dst.send_str(msg.data)
                    elif msg.type == aiohttp.WSMsgType.BINARY:
                        await dst.send_bytes(msg.data)
                    else:
                        break

            tasks = [asyncio.create_task(pipe(ws, up)), asyncio.create_task(pipe(up, ws))]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await ws.close()
        return ws

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.bind, self.want_port)
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self.want_port

    async def stop(self) -> None:
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
