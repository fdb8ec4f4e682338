"""WebRTC ingest (aiortc): WHIP sessions -> ``IngestFrame`` objects, like the file and RTSP ingests.

One :class:`WebrtcSource` per ``[sources.<name>] type = "webrtc"``. It holds at most one WHIP session
(an ``RTCPeerConnection``) at a time; its ``frames()`` iterator never ends by itself: when a session ends
(DELETE, peer gone, ICE failure) the source simply waits for the next one, and the daemon keeps running.

Each received video frame is converted with ``frame.to_ndarray(format="rgb24", width=, height=)`` (swscale,
the same resize the other ingests use) in a worker thread and put into a bounded queue. When the consumer
(the supervisor's feeder) is behind, the OLDEST queued frame is dropped (a live source favours fresh
frames) and reported through ``on_dropped`` — the supervisor counts it as ``frames_in`` + ``dropped{reason=
"webrtc_queue"}`` so the frame invariant holds. A frame's pts is its wall-clock receive time, as for RTSP.

ICE stays on the configured interface: :func:`limit_ice_addresses` makes aioice gather host candidates
only for the HTTP bind address (127.0.0.1 for a loopback bind; every interface for 0.0.0.0/::), and the
peer connection has no STUN/TURN server (``RTCConfiguration(iceServers=[])``; ``None`` would add a public
STUN server). Reference: notes/streaming-recipes.md "WebRTC with aiortc on loopback".
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from daemon.frames import IngestFrame

log = logging.getLogger(__name__)

QUEUE_SIZE = 8  # frames between aiortc and the feeder (the feeder normally empties it at once)


class WhipError(Exception):
    """A WHIP request that cannot be served; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def ice_host_addresses(bind: str) -> list[str] | None:
    """Host addresses ICE may use for an HTTP bind address; ``None`` = every interface (aioice default)."""
    try:
        ip = ipaddress.ip_address(bind)
    except ValueError:  # a host name such as "localhost"
        return ["127.0.0.1"] if bind == "localhost" else None
    if ip.is_unspecified:
        return None
    return [str(ip)]


def limit_ice_addresses(bind: str) -> None:
    """Restrict aioice host candidates to the bind address (process-wide: aioice has no per-connection
    hook)."""
    addrs = ice_host_addresses(bind)
    if addrs is None:
        return
    import aioice.ice

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in addrs if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    # PATCH(aioice==0.13.0): module function replaced process-wide (aioice has no per-connection hook)
    aioice.ice.get_host_addresses = host_addresses


@dataclass
class _Session:
    id: str
    pc: Any  # aiortc.RTCPeerConnection
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    frames: int = 0
    started: float = field(default_factory=time.monotonic)


class WebrtcSource:
    """Frames of one webrtc source across WHIP sessions (at most one session at a time)."""

    live = True

    def __init__(self, name: str, height: int, width: int, *, queue_size: int = QUEUE_SIZE,
                 on_dropped: Callable[[int], None] | None = None,
                 on_up: Callable[[bool], None] | None = None) -> None:
        self.name, self.height, self.width = name, height, width
        self._queue: asyncio.Queue[IngestFrame] = asyncio.Queue(maxsize=queue_size)
        self._on_dropped = on_dropped or (lambda n: None)
        self._on_up = on_up or (lambda up: None)
        self.session: _Session | None = None
        self.sessions_total = 0
        self.frames_received = 0
        self.dropped = 0
        self._lock = asyncio.Lock()

    # ---- consumer side (supervisor feeder) --------------------------------------------------------------
    async def frames(self) -> AsyncIterator[IngestFrame]:
        while True:
            yield await self._queue.get()

    def _put(self, frame: IngestFrame) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
            self._on_dropped(1)
        self._queue.put_nowait(frame)
        self.frames_received += 1

    # ---- WHIP side ----------------------------------------------------------------------------------------
    async def open_session(self, offer_sdp: str) -> tuple[str, str]:
        """Answer an SDP offer -> (session id, answer SDP); WhipError 409 when busy, 400 on a bad offer."""
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

        async with self._lock:
            if self.session is not None:
                raise WhipError(409, f"source {self.name} already has a WHIP session")
            if "m=video" not in offer_sdp:
                raise WhipError(400, "SDP offer has no video media section")
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            session = _Session(secrets.token_urlsafe(12), pc)

            @pc.on("track")
            def on_track(track: Any) -> None:
                reader = self._read_video(session, track) if track.kind == "video" else _discard(track)
                session.tasks.append(asyncio.create_task(reader, name=f"webrtc-{self.name}-{track.kind}"))

            @pc.on("connectionstatechange")
            async def on_state() -> None:
                log.info("webrtc connection state", extra={"source": self.name, "session": session.id,
                                                           "state": pc.connectionState})
                if pc.connectionState in ("failed", "closed"):
                    await self.close_session(session.id)

            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
                await pc.setLocalDescription(await pc.createAnswer())  # gathers every candidate (no trickle)
            except Exception as exc:  # aiortc raises ValueError/KeyError/... on malformed or unsupported SDP
                with contextlib.suppress(Exception):
                    await pc.close()
                raise WhipError(400, f"bad SDP offer: {type(exc).__name__}: {exc}") from exc
            self.session = session
            self.sessions_total += 1
            log.info("whip session started", extra={"source": self.name, "session": session.id})
            return session.id, pc.localDescription.sdp

    async def close_session(self, session_id: str) -> bool:
        """End a session (idempotent); False when ``session_id`` is not the current session."""
        session = self.session
        if session is None or session.id != session_id:
            return False
        self.session = None
        current = asyncio.current_task()
        for t in session.tasks:
            if t is not current:
                t.cancel()
        with contextlib.suppress(Exception):
            await session.pc.close()
        self._on_up(False)
        log.info("whip session ended", extra={"source": self.name, "session": session.id,
                                              "frames": session.frames,
                                              "seconds": round(time.monotonic() - session.started, 1)})
        return True

    async def close(self) -> None:
        if self.session is not None:
            await self.close_session(self.session.id)

    async def _read_video(self, session: _Session, track: Any) -> None:
        from aiortc.mediastreams import MediaStreamError

        h, w = self.height, self.width
        try:
            while True:
                frame = await track.recv()
                t_ingest = time.monotonic()
                image = await asyncio.to_thread(frame.to_ndarray, format="rgb24", width=w, height=h)
                if session.frames == 0:
                    self._on_up(True)
                    log.info("webrtc first frame", extra={"source": self.name, "session": session.id,
                                                          "size": f"{frame.height}x{frame.width}"})
                session.frames += 1
                self._put(IngestFrame(image, time.time(), t_ingest, (frame.height, frame.width)))
        except MediaStreamError:  # the remote track ended
            log.info("webrtc track ended", extra={"source": self.name, "session": session.id})
            await self.close_session(session.id)


async def _discard(track: Any) -> None:
    """Read and drop a track we do not use (audio), so aiortc's unbounded track queue stays empty."""
    from aiortc.mediastreams import MediaStreamError

    with contextlib.suppress(MediaStreamError):
        while True:
            await track.recv()


class WebrtcSources:
    """The daemon's webrtc sources by name (made at startup; shared by the WHIP routes and the feeders)."""

    def __init__(self, sources: dict[str, WebrtcSource]) -> None:
        self.sources = sources

    def get(self, name: str) -> WebrtcSource:
        src = self.sources.get(name)
        if src is None:
            raise WhipError(404, f"no webrtc source named {name!r}")
        return src

    async def close(self) -> None:
        for src in self.sources.values():
            await src.close()


# ---- WHIP routes --------------------------------------------------------------------------------------
# WHIP ingest endpoint (aiohttp routes), after RFC 9725 (WebRTC-HTTP Ingestion Protocol), non-trickle.
#
# ``POST /whip/<source>`` with ``Content-Type: application/sdp`` (the offer) -> ``201`` with the answer SDP
# and
# ``Location: /whip/<source>/<session-id>``; ``DELETE`` on that location ends the session (``200``).
# Errors are clean 4xx with a one-line text body: unknown or non-webrtc source / unknown session -> 404,
# wrong content type -> 415, bad SDP -> 400, a second session for a busy source -> 409. Authentication
# (bearer token, ``http.token``) is the HTTP app's middleware (daemon/http.py: 401 missing, 403 wrong).

MAX_OFFER_BYTES = 64 * 1024


def add_whip_routes(app: web.Application, sources: WebrtcSources) -> None:
    """Register the WHIP routes on the daemon's HTTP app."""

    def error(exc: WhipError) -> web.Response:
        log.info("whip request refused", extra={"status": exc.status, "reason": str(exc)})
        return web.Response(status=exc.status, text=str(exc) + "\n")

    async def post(request: web.Request) -> web.Response:
        try:
            src = sources.get(request.match_info["source"])
            if request.content_type != "application/sdp":
                raise WhipError(415, "Content-Type must be application/sdp")
            if request.content_length is not None and request.content_length > MAX_OFFER_BYTES:
                raise WhipError(413, "SDP offer too large")
            raw = await request.content.read(MAX_OFFER_BYTES + 1)
            if len(raw) > MAX_OFFER_BYTES:
                raise WhipError(413, "SDP offer too large")
            try:
                offer = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise WhipError(400, "SDP offer is not UTF-8") from exc
            if not offer.startswith("v=0"):
                raise WhipError(400, "bad SDP offer: must start with v=0")
            session_id, answer = await src.open_session(offer)
        except WhipError as exc:
            return error(exc)
        location = f"/whip/{src.name}/{session_id}"
        return web.Response(status=201, text=answer, content_type="application/sdp",
                            headers={"Location": location, "ETag": f'"{session_id}"'})

    async def delete(request: web.Request) -> web.Response:
        try:
            src = sources.get(request.match_info["source"])
            if not await src.close_session(request.match_info["session"]):
                raise WhipError(404, "no such WHIP session")
        except WhipError as exc:
            return error(exc)
        return web.Response(status=200, text="session ended\n")

    async def options(_: web.Request) -> web.Response:
        return web.Response(status=204, headers={"Accept-Post": "application/sdp"})

    async def patch(_: web.Request) -> web.Response:
        # trickle ICE / ICE restart: aiortc gathers every candidate before it answers
        return web.Response(status=405, text="trickle ICE is not supported\n")

    app.router.add_post("/whip/{source}", post)
    app.router.add_route("OPTIONS", "/whip/{source}", options)
    app.router.add_delete("/whip/{source}/{session}", delete)
    app.router.add_route("PATCH", "/whip/{source}/{session}", patch)
