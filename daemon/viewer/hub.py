"""Results hub for the live viewer: the latest result per source, encoded once and fanned out to websockets.

``push(source, result, latency_s)`` is called by the supervisor for every published frame; it only stores a
reference and wakes the source's encoder (nothing is encoded while nobody watches). The encoder task encodes
the newest result in a worker thread (older ones are conflated away: a viewer wants the present, not a
backlog) into one binary message, and offers it to every subscriber's 2-slot queue (a slow browser loses its
oldest message, never blocks the daemon).

Message layout (little-endian): ``uint32 n`` + ``n`` bytes of JSON header (space-padded so the payload starts
4-aligned), then the payload; the header names byte ranges relative to the payload start: ``jpeg``
[offset, length] (``daemon.depth_colour.colourise``: disparity, Turbo, invalid pixels black), ``xyz``
[offset, count] (float32 x,y,z; 4-aligned), ``rgb`` [offset, count] (uint8 colour per point).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from daemon.depth_colour import colourise

log = logging.getLogger(__name__)

MAX_POINTS = 20_000


@dataclass
class _Latest:
    result: Any = None
    pts: float = 0.0
    latency_s: float | None = None
    t_push: float = 0.0
    seq: int = 0
    tier: str = "refined"


@dataclass
class _Channel:
    latest: _Latest = field(default_factory=_Latest)
    latest_refined: _Latest | None = None  # kept apart so previews never conflate a refined frame away
    sent_refined: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    subscribers: set[asyncio.Queue[bytes]] = field(default_factory=set)
    encoder: asyncio.Task[None] | None = None
    encoded: int = 0


def encode_message(source: str, latest: _Latest, max_points: int = MAX_POINTS) -> bytes:
    """One viewer message for a FrameResult (see the module docstring for the layout)."""
    import cv2

    res = latest.result
    depth = np.asarray(res.depth, np.float32)
    mask = np.asarray(res.mask, bool)
    rgb = colourise(depth, mask)
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    h, w = depth.shape
    stride = max(1, math.ceil(math.sqrt(h * w / max_points)))
    sub_mask = mask[::stride, ::stride] & np.isfinite(depth[::stride, ::stride])
    xyz = np.ascontiguousarray(np.asarray(res.point_map, np.float32)[::stride, ::stride][sub_mask])
    colors = np.ascontiguousarray(rgb[::stride, ::stride][sub_mask])
    header = {"source": source, "frame_index": int(res.frame_index), "window_id": int(res.window_id),
              "pts": float(latest.pts), "width": int(w), "height": int(h),
              "latency_ms": None if latest.latency_s is None else round(1e3 * latest.latency_s, 1),
              "intrinsics": [float(v) for v in res.intrinsics], "stride": stride, "tier": latest.tier}
    jpeg_b = jpeg.tobytes()
    xyz_off = (len(jpeg_b) + 3) & ~3
    header.update(jpeg=[0, len(jpeg_b)], xyz=[xyz_off, len(xyz)], rgb=[xyz_off + xyz.nbytes, len(colors)])
    head = json.dumps(header).encode()
    head += b" " * (-(4 + len(head)) % 4)  # the payload (and the float32 xyz in it) starts 4-aligned
    pad = b"\0" * (xyz_off - len(jpeg_b))
    return struct.pack("<I", len(head)) + head + jpeg_b + pad + xyz.tobytes() + colors.tobytes()


class ResultsHub:
    """Latest results per source for the live viewer (one per daemon)."""

    def __init__(self, sources: list[str], max_points: int = MAX_POINTS) -> None:
        self.sources = list(sources)
        self.max_points = max_points
        self._channels: dict[str, _Channel] = {}

    def _channel(self, source: str) -> _Channel:
        ch = self._channels.get(source)
        if ch is None:
            ch = self._channels[source] = _Channel()
        return ch

    def push(self, source: str, result: Any, pts: float = 0.0, latency_s: float | None = None,
             tier: str = "refined") -> None:
        """Record a published frame's result (cheap; called on the event loop for every frame). ``tier``:
        "preview" or "refined"; the newest of each tier is sent (the page decides what it shows)."""
        ch = self._channel(source)
        seq = ch.latest.seq + 1
        ch.latest = _Latest(result, pts, latency_s, time.monotonic(), seq, tier)
        if tier == "refined":
            ch.latest_refined = ch.latest
        if ch.subscribers:
            ch.wake.set()

    def subscribe(self, source: str) -> asyncio.Queue[bytes]:
        ch = self._channel(source)
        q: asyncio.Queue[bytes] = asyncio.Queue(maxsize=2)
        ch.subscribers.add(q)
        if ch.encoder is None or ch.encoder.done():
            ch.encoder = asyncio.create_task(self._encode_loop(source, ch), name=f"viewer-{source}")
        if ch.latest.result is not None:
            ch.wake.set()  # a new viewer sees the last result at once
        return q

    def unsubscribe(self, source: str, q: asyncio.Queue[bytes]) -> None:
        self._channel(source).subscribers.discard(q)

    def stats(self, source: str) -> dict[str, Any]:
        ch = self._channel(source)
        return {"viewers": len(ch.subscribers), "results": ch.latest.seq, "encoded": ch.encoded}

    async def _encode_loop(self, source: str, ch: _Channel) -> None:
        while True:
            await ch.wake.wait()
            ch.wake.clear()
            latest = ch.latest
            if latest.result is None or not ch.subscribers:
                continue
            todo = [latest]
            ref = ch.latest_refined
            if ref is not None and ref is not latest and ref.seq > ch.sent_refined:
                todo.insert(0, ref)  # a refined frame overtaken by newer previews still goes out
            for item in todo:
                try:
                    msg = await asyncio.to_thread(encode_message, source, item, self.max_points)
                except Exception:
                    log.exception("viewer encoding failed", extra={"source": source})
                    continue
                if item.tier == "refined":
                    ch.sent_refined = item.seq
                ch.encoded += 1
                for q in list(ch.subscribers):
                    if q.full():
                        with contextlib.suppress(asyncio.QueueEmpty):
                            q.get_nowait()
                    q.put_nowait(msg)

    async def close(self) -> None:
        for ch in self._channels.values():
            if ch.encoder is not None:
                ch.encoder.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ch.encoder
