"""WHIP ingest endpoint (aiohttp routes), after RFC 9725 (WebRTC-HTTP Ingestion Protocol), non-trickle.

``POST /whip/<source>`` with ``Content-Type: application/sdp`` (the offer) -> ``201`` with the answer SDP and
``Location: /whip/<source>/<session-id>``; ``DELETE`` on that location ends the session (``200``).
Errors are clean 4xx with a one-line text body: unknown or non-webrtc source / unknown session -> 404,
wrong content type -> 415, bad SDP -> 400, a second session for a busy source -> 409. Authentication
(bearer token, ``http.token``) is the HTTP app's middleware (daemon/http.py: 401 missing, 403 wrong).
"""

from __future__ import annotations

import logging

from aiohttp import web

from daemon.stages.ingest_webrtc import WebrtcSources, WhipError

log = logging.getLogger(__name__)

MAX_OFFER_BYTES = 64 * 1024


def add_routes(app: web.Application, sources: WebrtcSources) -> None:
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
