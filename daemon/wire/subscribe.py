"""Reference subscriber: ``geometryd subscribe`` and the ``iter_frames`` library API (schema: docs/mqtt.md).

Depth and points of one frame are separate MQTT messages; ``iter_frames`` joins them by (source,
frame_index) using each message's ``frame_parts`` property and yields one ``ReceivedFrame`` per frame.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from paho.mqtt.properties import Properties, VariableByteIntegers

from daemon.wire import encoding

log = logging.getLogger(__name__)

_ABSOLUTE_PTS_MIN = 1e9  # a pts above this is read as a unix timestamp (latency from pts is meaningful)


@dataclass
class ReceivedFrame:
    """One decoded frame. Depth: float32 with 0 where invalid; points: float32 (exact float16 values)."""

    source: str
    frame_index: int
    window_id: int
    pts: float
    received_at: float
    depth: np.ndarray | None = None
    depth_valid: np.ndarray | None = None
    points: np.ndarray | None = None
    points_valid: np.ndarray | None = None
    points_stride: int = 1
    intrinsics: tuple[float, ...] | None = None
    created_at: float | None = None
    properties: dict[str, dict[str, str]] = field(default_factory=dict)  # kind -> user properties

    @property
    def latency_s(self) -> float | None:
        """Receive time minus the publisher's message creation time (queueing + transport)."""
        return None if self.created_at is None else self.received_at - self.created_at

    @property
    def pts_latency_s(self) -> float | None:
        """Receive time minus pts, when pts is a wall-clock timestamp (live sources)."""
        return self.received_at - self.pts if self.pts > _ABSOLUTE_PTS_MIN else None

    def summary(self) -> dict[str, Any]:
        """The one-line report of ``geometryd subscribe`` as a dict."""
        out: dict[str, Any] = {"source": self.source, "frame_index": self.frame_index,
                               "window_id": self.window_id, "pts": self.pts}
        if self.depth is not None and self.depth_valid is not None:
            valid = self.depth[self.depth_valid]
            out["depth_shape"] = list(self.depth.shape)
            out["depth_encoding"] = self.properties["depth"].get("encoding")
            out["valid_fraction"] = round(float(self.depth_valid.mean()), 4)
            if valid.size:
                out["depth_min"], out["depth_median"], out["depth_max"] = (
                    float(valid.min()), float(np.median(valid)), float(valid.max()))
        if self.points is not None:
            out["points_shape"] = list(self.points.shape)
            out["points_stride"] = self.points_stride
        for name, value in (("latency_ms", self.latency_s), ("pts_latency_ms", self.pts_latency_s)):
            if value is not None:
                out[name] = round(value * 1000, 2)
        return out


def install_fast_properties_unpack() -> None:
    """Make paho-mqtt parse MQTT v5 properties without copying the payload (process-wide, idempotent).

    paho-mqtt 2.2 ``Properties.unpack`` re-slices the whole rest of the packet, payload included, for every
    property: ~100 ms per 3.6 MB points message with ~17 properties (measured). Unpacking a buffer cut to the
    properties' own length returns the same result, so the wrapper only does that.
    """
    # PATCH(paho-mqtt==2.2.0): Properties.unpack replaced process-wide (copies the payload per property)
    if getattr(Properties.unpack, "_geometryd_fast", False):
        return
    original = Properties.unpack

    def unpack(self: Any, buffer: bytes) -> Any:
        length, length_size = VariableByteIntegers.decode(buffer[:4])
        return original(self, buffer[: length_size + length])

    unpack._geometryd_fast = True  # type: ignore[attr-defined]
    unpack._geometryd_original = original  # type: ignore[attr-defined]
    Properties.unpack = unpack  # type: ignore[method-assign]


def _decode_part(frame: ReceivedFrame, kind: str, payload: bytes, props: dict[str, str]) -> None:
    if kind == "depth":
        frame.depth, frame.depth_valid = encoding.decode_depth(payload, props)
    elif kind == "points":
        frame.points, frame.points_valid = encoding.decode_points(payload, props)
        frame.points_stride = int(props.get("stride", "1"))
    frame.properties[kind] = props


def _new_frame(props: dict[str, str], received_at: float) -> ReceivedFrame:
    intr = props.get("intrinsics")
    created = props.get("created_at")
    return ReceivedFrame(
        source=props["source"],
        frame_index=int(props["frame_index"]),
        window_id=int(props.get("window_id", "-1")),
        pts=float(props.get("pts", "nan")),
        received_at=received_at,
        intrinsics=tuple(float(x) for x in intr.split(",")) if intr else None,
        created_at=float(created) if created else None,
    )


async def iter_frames(
    host: str,
    port: int,
    prefix: str = "geometry",
    source: str = "+",
    *,
    qos: int = 1,
    username: str | None = None,
    password: str | None = None,
    tls_context: Any = None,
    identifier: str | None = None,
    ready: asyncio.Event | None = None,
    max_pending: int = 64,
) -> AsyncGenerator[ReceivedFrame, None]:
    """Yield decoded frames of ``source`` (``+`` = all) as they complete; ``ready`` is set once subscribed.

    A frame is complete when every part named by its ``frame_parts`` property arrived. Incomplete frames
    (a part lost with QoS 0) are forgotten after ``max_pending`` newer ones. Raises ``aiomqtt.MqttError``
    when the broker connection fails.
    """
    import aiomqtt

    install_fast_properties_unpack()
    pending: OrderedDict[tuple[str, int], ReceivedFrame] = OrderedDict()
    async with aiomqtt.Client(
        host, port, username=username, password=password, tls_context=tls_context, identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:
        for kind in ("depth", "points"):
            await client.subscribe(f"{prefix}/{source}/{kind}", qos=qos)
        if ready is not None:
            ready.set()
        async for message in client.messages:
            received_at = time.time()
            props = encoding.from_mqtt_properties(message.properties)
            kind = props.get("kind") or str(message.topic).rsplit("/", 1)[-1]
            try:
                key = (props["source"], int(props["frame_index"]))
                frame = pending.get(key)
                if frame is None:
                    frame = pending[key] = _new_frame(props, received_at)
                else:
                    frame.received_at = received_at
                _decode_part(frame, kind, bytes(message.payload), props)
            except (KeyError, ValueError) as exc:  # EncodingError is a ValueError
                log.warning("subscribe: undecodable message on %s: %s", message.topic, exc)
                continue
            parts = set(props.get("frame_parts", kind).split(","))
            if parts <= set(frame.properties):
                del pending[key]
                yield frame
            while len(pending) > max_pending:
                lost_key, _ = pending.popitem(last=False)
                log.debug("subscribe: frame %s incomplete, forgotten", lost_key)


def save_frame(frame: ReceivedFrame, out_dir: Path) -> Path:
    """Write one received frame as ``<source>_<frame_index>.npz`` (arrays as decoded)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{frame.source}_{frame.frame_index:06d}.npz"
    named = (("depth", frame.depth), ("depth_valid", frame.depth_valid), ("points", frame.points),
             ("points_valid", frame.points_valid))
    arrays = {k: v for k, v in named if v is not None}
    if frame.intrinsics is not None:
        arrays["intrinsics"] = np.asarray(frame.intrinsics, np.float64)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path
