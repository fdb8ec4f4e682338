"""One output frame -> Foxglove well-known messages (protobuf), shared by the MCAP recorder and the live
server.

Topics per source ``<s>`` (frame_id ``<s>/camera``: the camera's optical frame, x right, y down, z forward):

==========================  ===========================  ==================================================
topic                       schema                       content
==========================  ===========================  ==================================================
``/<s>/depth``              ``foxglove.RawImage``        ``32FC1``, depth along z in the output's units
                                                         (``units`` in the channel metadata: ``relative``
                                                         unless metric), invalid pixels NaN
``/<s>/color``              ``foxglove.CompressedImage`` the input frame as JPEG (optional)
``/<s>/points``             ``foxglove.PointCloud``      x, y, z float32 (+ red, green, blue, alpha uint8
                                                         with colour) of valid pixels on a ``[::s, ::s]`` grid
``/<s>/calibration``        ``foxglove.CameraCalibration`` K, P in pixels of the published size
``/tf``                     ``foxglove.FrameTransform``  ``world`` -> ``<s>/camera`` (x forward, z up)
==========================  ===========================  ==================================================

Intrinsics arrive normalised (``daemon/frames.py``: ``u_n = (u + 0.5) / W``); Foxglove/ROS put pixel centres
at integers, so ``fx_px = fx * W`` and ``cx_px = cx * W - 0.5`` (likewise y with H).
Timestamps are the frame's pts in nanoseconds (the recorder's log time too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from foxglove.messages import (
    CameraCalibration,
    CompressedImage,
    FrameTransform,
    PackedElementField,
    PackedElementFieldNumericType,
    PointCloud,
    Quaternion,
    RawImage,
    Timestamp,
    Vector3,
)

from daemon.wire.jpeg import decode_jpeg, encode_jpeg

WORLD_FRAME = "world"
# camera optical (x right, y down, z forward) -> world (x forward, y left, z up): rotation (x, y, z, w)
_OPTICAL_TO_WORLD = (-0.5, 0.5, -0.5, 0.5)


@dataclass(frozen=True)
class Message:
    """One Foxglove message ready for a channel: its topic, message object and schema class."""

    topic: str
    message: Any
    schema: Any  # the foxglove.messages class (get_schema, encode)


def topics(source: str, *, colour: bool) -> list[tuple[str, type]]:
    """The (topic, schema class) pairs a source publishes, in publication order."""
    out: list[tuple[str, type]] = [(f"/{source}/depth", RawImage)]
    if colour:
        out.append((f"/{source}/color", CompressedImage))
    out += [(f"/{source}/points", PointCloud), (f"/{source}/calibration", CameraCalibration),
            ("/tf", FrameTransform)]
    return out


def camera_frame(source: str) -> str:
    return f"{source}/camera"


def stamp(pts: float) -> tuple[int, Timestamp]:
    """pts seconds -> (nanoseconds, Timestamp)."""
    ns = max(0, round(pts * 1e9))
    return ns, Timestamp(sec=ns // 1_000_000_000, nsec=ns % 1_000_000_000)


def pixel_k(intrinsics: tuple[float, float, float, float], width: int, height: int) -> list[float]:
    """Normalised (fx, fy, cx, cy) -> row-major 3x3 K in pixels (integer pixel centres)."""
    fx, fy, cx, cy = (float(v) for v in intrinsics)
    return [fx * width, 0.0, cx * width - 0.5, 0.0, fy * height, cy * height - 0.5, 0.0, 0.0, 1.0]


def depth_image(result: Any, frame_id: str, ts: Timestamp) -> RawImage:
    depth = np.asarray(result.depth, np.float32)
    h, w = depth.shape
    data = np.where(np.asarray(result.mask, bool), depth, np.float32(np.nan)).astype("<f4")
    return RawImage(timestamp=ts, frame_id=frame_id, width=w, height=h, encoding="32FC1", step=4 * w,
                    data=data.tobytes())


def point_cloud(result: Any, stride: int, frame_id: str, ts: Timestamp,
                image: np.ndarray | None) -> PointCloud:
    pm = np.asarray(result.point_map, np.float32)[::stride, ::stride]
    valid = np.asarray(result.mask, bool)[::stride, ::stride] & np.isfinite(pm).all(-1)
    xyz = pm[valid].astype("<f4")  # (N, 3)
    f32, u8 = PackedElementFieldNumericType.Float32, PackedElementFieldNumericType.Uint8
    fields = [PackedElementField(name=n, offset=4 * i, type=f32) for i, n in enumerate("xyz")]
    if image is None:
        data, point_stride = xyz.tobytes(), 12
    else:
        rgb = np.asarray(image, np.uint8)[::stride, ::stride][valid]  # (N, 3)
        rec = np.empty((len(xyz), 4), "<f4")  # x, y, z, then the 4 colour bytes in the 4th float's place
        rec[:, :3] = xyz
        raw = rec.view(np.uint8)  # (N, 16)
        raw[:, 12:15] = rgb
        raw[:, 15] = 255
        fields += [PackedElementField(name=n, offset=12 + i, type=u8)
                   for i, n in enumerate(("red", "green", "blue", "alpha"))]
        data, point_stride = raw.tobytes(), 16
    return PointCloud(timestamp=ts, frame_id=frame_id, point_stride=point_stride, fields=fields, data=data)


def calibration(result: Any, frame_id: str, ts: Timestamp) -> CameraCalibration:
    h, w = np.asarray(result.depth).shape
    k = pixel_k(result.intrinsics, w, h)
    p = [k[0], k[1], k[2], 0.0, k[3], k[4], k[5], 0.0, k[6], k[7], k[8], 0.0]
    return CameraCalibration(timestamp=ts, frame_id=frame_id, width=w, height=h, distortion_model="plumb_bob",
                             D=[0.0] * 5, K=k, R=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0], P=p)


def camera_transform(source: str, ts: Timestamp) -> FrameTransform:
    x, y, z, w = _OPTICAL_TO_WORLD
    return FrameTransform(timestamp=ts, parent_frame_id=WORLD_FRAME, child_frame_id=camera_frame(source),
                          translation=Vector3(x=0.0, y=0.0, z=0.0), rotation=Quaternion(x=x, y=y, z=z, w=w))


def frame_messages(source: str, result: Any, pts: float, *, stride: int = 1, image: np.ndarray | None = None,
                   jpeg: bytes | None = None) -> tuple[int, list[Message]]:
    """Every message of one ``FrameResult`` (duck-typed): (log time ns, messages in ``topics`` order).
    ``image`` (H, W, 3) uint8 RGB of the output size colours the points and, with ``jpeg`` (its encoding,
    made from ``image`` when not given; ``jpeg`` alone is decoded for the points) fills ``/<s>/color``;
    without either there is no colour topic."""
    if stride < 1:
        raise ValueError(f"point stride must be >= 1, got {stride}")
    ns, ts = stamp(pts)
    fid = camera_frame(source)
    if image is None and jpeg is not None:
        image = decode_jpeg(jpeg)
    if image is not None and np.asarray(image).shape[:2] != np.asarray(result.depth).shape:
        image = cv2.resize(np.asarray(image), np.asarray(result.depth).shape[::-1],
                           interpolation=cv2.INTER_AREA)
        jpeg = None
    out = [Message(f"/{source}/depth", depth_image(result, fid, ts), RawImage)]
    if image is not None:
        data = jpeg if jpeg is not None else encode_jpeg(np.asarray(image))
        out.append(Message(f"/{source}/color", CompressedImage(timestamp=ts, frame_id=fid, data=data,
                                                               format="jpeg"), CompressedImage))
    out += [Message(f"/{source}/points", point_cloud(result, stride, fid, ts, image), PointCloud),
            Message(f"/{source}/calibration", calibration(result, fid, ts), CameraCalibration),
            Message("/tf", camera_transform(source, ts), FrameTransform)]
    return ns, out


def channel_metadata(result: Any) -> dict[str, str]:
    """Metadata of a source's channels: the depth units (``relative`` unless the result says metric)."""
    return {"units": str(getattr(result, "units", "relative") or "relative")}
