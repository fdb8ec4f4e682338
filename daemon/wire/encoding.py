"""Wire encodings of geometryd's MQTT messages (schema in ``docs/mqtt.md``; architecture.md "Outputs").

Depth
  ``png16``: inverse depth quantised to 16 bits like ROS ``compressedDepth``: q = 0 marks an invalid pixel,
  q in 1..65535 decodes as ``depth = 1 / (q * scale + offset)``. ``scale``/``offset`` travel as user
  properties ``depth_quant_scale``/``depth_quant_offset`` (float64 repr). The frame's valid inverse depths
  [inv_min, inv_max] map to q = 1..65535, so the decoded inverse depth is within half a step
  (``scale / 2``) of the original: ``|1/d' - 1/d| <= scale / 2`` (plus the float32 rounding of the returned
  depth, relative 2**-24). The PNG is 16-bit grayscale, written with
  PNG filter type 2 ("Up") on every row, so numpy + zlib alone can decode it (any PNG decoder also can).
  ``f16``: raw little-endian float16, row major; invalid = NaN; valid depths above 65504 saturate to 65504.
Points
  ``f16``: XYZ (H', W', 3) little-endian float16, row major, then the validity mask of the same (H', W')
  grid packed with ``np.packbits(mask.ravel(), bitorder="big")`` (ceil(H'*W'/8) bytes, first pixel in the
  most significant bit). With a spatial stride s: H' = ceil(H/s), W' = ceil(W/s) (``[::s, ::s]``).

Every encoder returns ``(payload, props)``: props are the encoding-specific user properties as strings.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import numpy as np
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

SCHEMA_VERSION = 1
DEPTH_ENCODINGS = ("png16", "f16")
POINTS_ENCODINGS = ("f16",)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_Q_MAX = 65535
F16_MAX = float(np.finfo(np.float16).max)

CONTENT_TYPES = {"png16": "image/png", "f16": "application/octet-stream", "json": "application/json"}


class EncodingError(ValueError):
    """A payload or its properties do not match the schema (message names the bad value)."""


# --- user properties ---------------------------------------------------------------------------------


def frame_properties(
    source: str, frame_index: int, pts: float, window_id: int, kind: str
) -> dict[str, str]:
    """The properties common to every per-frame message (depth and points)."""
    return {
        "schema": str(SCHEMA_VERSION),
        "kind": kind,
        "source": source,
        "frame_index": str(int(frame_index)),
        "pts": repr(float(pts)),
        "window_id": str(int(window_id)),
    }


def to_mqtt_properties(user: dict[str, str], content_type: str, *, utf8_payload: bool = False) -> Any:
    """paho ``Properties(PacketTypes.PUBLISH)`` with the user properties in insertion order."""
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = content_type
    if utf8_payload:
        props.PayloadFormatIndicator = 1
    props.UserProperty = [(str(k), str(v)) for k, v in user.items()]
    return props


def from_mqtt_properties(props: Any) -> dict[str, str]:
    """User properties of a received message as a dict (later duplicates win)."""
    pairs = getattr(props, "UserProperty", None) or []
    return {str(k): str(v) for k, v in pairs}


def _shape(value: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in value.split(","))
    except ValueError:
        raise EncodingError(f"bad shape property {value!r} (want comma-separated ints)") from None
    if not shape or any(n <= 0 for n in shape):
        raise EncodingError(f"bad shape property {value!r} (want positive sizes)")
    return shape


def _shape_str(shape: tuple[int, ...]) -> str:
    return ",".join(str(int(n)) for n in shape)


def _prop(props: dict[str, str], key: str) -> str:
    try:
        return props[key]
    except KeyError:
        raise EncodingError(f"missing user property {key!r} (have {sorted(props)})") from None


# --- 16-bit grayscale PNG (filter "Up" on every row) -------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16_encode(image: np.ndarray, level: int = 1, text: dict[str, str] | None = None) -> bytes:
    """(H, W) uint16 -> 16-bit grayscale PNG bytes; every row uses filter type 2 ("Up").

    ``text`` adds Latin-1 tEXt chunks (keyword -> value), e.g. the quantisation parameters in files.
    """
    if image.ndim != 2 or image.dtype != np.uint16:
        raise EncodingError(f"png16 wants (H,W) uint16, got {image.shape} {image.dtype}")
    h, w = image.shape
    raw = np.ascontiguousarray(image, dtype=">u2").view(np.uint8).reshape(h, 2 * w)
    rows = np.empty((h, 2 * w + 1), np.uint8)
    rows[:, 0] = 2
    rows[0, 1:] = raw[0]
    np.subtract(raw[1:], raw[:-1], out=rows[1:, 1:])  # wraps mod 256 as PNG requires
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0)
    chunks = [PNG_SIGNATURE, _png_chunk(b"IHDR", ihdr)]
    for key, value in (text or {}).items():
        chunks.append(_png_chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1")))
    chunks += [_png_chunk(b"IDAT", zlib.compress(rows.tobytes(), level)), _png_chunk(b"IEND", b"")]
    return b"".join(chunks)


def png16_text(data: bytes) -> dict[str, str]:
    """The tEXt chunks of a PNG as a dict."""
    out, pos = {}, len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"tEXt":
            key, _, value = data[pos + 8 : pos + 8 + length].partition(b"\0")
            out[key.decode("latin-1")] = value.decode("latin-1")
        elif kind == b"IEND":
            break
        pos += 12 + length
    return out


def png16_decode(data: bytes) -> np.ndarray:
    """16-bit grayscale PNG -> (H, W) uint16. numpy + zlib for filters 0/2 (ours); OpenCV for any other."""
    if not data.startswith(PNG_SIGNATURE):
        raise EncodingError("payload is not a PNG (bad signature)")
    pos, idat, header = len(PNG_SIGNATURE), [], None
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None:
        raise EncodingError("PNG without IHDR")
    w, h, depth, color, _, _, interlace = header
    if depth != 16 or color != 0:
        raise EncodingError(f"PNG is not 16-bit grayscale (bit depth {depth}, color type {color})")
    rows = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8)
    if interlace == 0 and rows.size == h * (2 * w + 1):
        rows = rows.reshape(h, 2 * w + 1)
        filters, scanlines = rows[:, 0], rows[:, 1:]
        out = None
        if np.all(filters == 2):  # "Up": each row adds the row above (row 0's "above" is zeros)
            out = np.cumsum(scanlines, axis=0, dtype=np.uint8)  # uint8 accumulator wraps mod 256
        elif np.all(filters == 0):
            out = scanlines
        if out is not None:
            return np.ascontiguousarray(out).view(">u2").astype(np.uint16).reshape(h, w)
    import cv2

    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.dtype != np.uint16 or img.ndim != 2:
        raise EncodingError("PNG could not be decoded as 16-bit grayscale")
    return img


# --- depth -------------------------------------------------------------------------------------------


def _valid_depth(depth: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    valid = np.isfinite(depth) & (depth > 0)
    if mask is not None:
        if mask.shape != depth.shape:
            raise EncodingError(f"mask shape {mask.shape} != depth shape {depth.shape}")
        valid &= mask.astype(bool)
    return valid


def encode_depth(
    depth: np.ndarray, mask: np.ndarray | None, encoding: str = "png16", png_level: int = 1
) -> tuple[bytes, dict[str, str]]:
    """(H, W) depth (+ validity) -> payload and its encoding properties.

    Invalid pixels: mask False, depth <= 0 or not finite."""
    depth = np.asarray(depth)
    if depth.ndim != 2:
        raise EncodingError(f"depth must be (H,W), got shape {depth.shape}")
    if encoding == "png16":
        q, props = quantize_depth(depth, mask)
        return png16_encode(q, png_level), props
    if encoding == "f16":
        valid = _valid_depth(depth, mask)
        d = np.where(valid, np.minimum(depth, F16_MAX), np.nan).astype("<f2")
        return d.tobytes(), {"encoding": encoding, "shape": _shape_str(depth.shape), "dtype": "float16"}
    raise EncodingError(f"depth encoding {encoding!r} not one of {DEPTH_ENCODINGS}")


def quantize_depth(depth: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, dict[str, str]]:
    """(H, W) depth -> (H, W) uint16 q of the png16 encoding (0 = invalid) and its properties."""
    depth = np.asarray(depth)
    if depth.ndim != 2:
        raise EncodingError(f"depth must be (H,W), got shape {depth.shape}")
    valid = _valid_depth(depth, mask)
    props = {"encoding": "png16", "shape": _shape_str(depth.shape)}
    if valid.any():
        d_valid = depth[valid]
        # 1/x is monotonic and float64 division correctly rounded: these equal min/max of the inverses.
        lo, hi = 1.0 / float(d_valid.max()), 1.0 / float(d_valid.min())
    else:
        lo = hi = 0.0
    scale = (hi - lo) / (_Q_MAX - 1)
    offset = lo - scale  # q = 1 decodes to lo, q = 65535 to hi
    if scale > 0:
        # q = rint((1/d - lo) / scale) + 1, in float64 (the error bound needs it), in place on the whole
        # frame; invalid pixels may produce inf/NaN here and are zeroed below.
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            t = np.divide(1.0, depth, dtype=np.float64)
            t -= lo
            t /= scale
            np.rint(t, out=t)
            t += 1
            np.clip(t, 1, _Q_MAX, out=t)
            q = t.astype(np.uint16)
    else:
        q = np.ones(depth.shape, np.uint16)
    q[~valid] = 0
    props.update(
        dtype="uint16",
        depth_quant_scale=repr(scale),
        depth_quant_offset=repr(offset),
    )
    return q, props


def decode_depth(payload: bytes, props: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Payload + user properties -> (depth (H,W) float32 with 0 where invalid, valid (H,W) bool)."""
    encoding = _prop(props, "encoding")
    shape = _shape(_prop(props, "shape"))
    if len(shape) != 2:
        raise EncodingError(f"depth shape {shape} is not (H,W)")
    if encoding == "png16":
        q = png16_decode(payload)
        if q.shape != shape:
            raise EncodingError(f"PNG is {q.shape}, shape property says {shape}")
        scale = float(_prop(props, "depth_quant_scale"))
        offset = float(_prop(props, "depth_quant_offset"))
        valid = q > 0
        depth = np.zeros(shape, np.float32)
        depth[valid] = 1.0 / (q[valid].astype(np.float64) * scale + offset)
        return depth, valid
    if encoding == "f16":
        expected = shape[0] * shape[1] * 2
        if len(payload) != expected:
            raise EncodingError(f"f16 depth payload is {len(payload)} bytes, shape {shape} needs {expected}")
        d = np.frombuffer(payload, "<f2").reshape(shape).astype(np.float32)
        valid = ~np.isnan(d)
        d[~valid] = 0.0
        return d, valid
    raise EncodingError(f"depth encoding {encoding!r} not one of {DEPTH_ENCODINGS}")


def png16_step(props: dict[str, str]) -> float:
    """The inverse-depth quantisation step of a png16 depth message (decoded error <= step / 2)."""
    return float(_prop(props, "depth_quant_scale"))


# --- points ------------------------------------------------------------------------------------------


def encode_points(
    points: np.ndarray, mask: np.ndarray, stride: int = 1, encoding: str = "f16"
) -> tuple[bytes, dict[str, str]]:
    """(H, W, 3) XYZ + (H, W) validity -> f16 XYZ of the strided grid followed by the packed mask."""
    if encoding not in POINTS_ENCODINGS:
        raise EncodingError(f"points encoding {encoding!r} not one of {POINTS_ENCODINGS}")
    points = np.asarray(points)
    if points.ndim != 3 or points.shape[2] != 3:
        raise EncodingError(f"points must be (H,W,3), got shape {points.shape}")
    if mask.shape != points.shape[:2]:
        raise EncodingError(f"mask shape {mask.shape} != points grid {points.shape[:2]}")
    if stride < 1:
        raise EncodingError(f"points stride must be >= 1, got {stride}")
    p = points[::stride, ::stride]
    m = np.asarray(mask[::stride, ::stride], bool)
    with np.errstate(over="ignore"):
        xyz = np.ascontiguousarray(p, dtype="<f2")
    payload = xyz.tobytes() + np.packbits(m.ravel(), bitorder="big").tobytes()
    props = {
        "encoding": encoding,
        "dtype": "float16",
        "shape": _shape_str(xyz.shape),
        "stride": str(stride),
        "full_shape": _shape_str(points.shape[:2]),
    }
    return payload, props


def decode_points(payload: bytes, props: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Payload + user properties -> (XYZ (H',W',3) float32, exact float16 values; valid (H',W') bool)."""
    encoding = _prop(props, "encoding")
    if encoding not in POINTS_ENCODINGS:
        raise EncodingError(f"points encoding {encoding!r} not one of {POINTS_ENCODINGS}")
    shape = _shape(_prop(props, "shape"))
    if len(shape) != 3 or shape[2] != 3:
        raise EncodingError(f"points shape {shape} is not (H,W,3)")
    h, w, _ = shape
    n_xyz = h * w * 3 * 2
    n_mask = (h * w + 7) // 8
    if len(payload) != n_xyz + n_mask:
        raise EncodingError(f"points payload is {len(payload)} bytes, shape {shape} needs {n_xyz + n_mask}")
    xyz = np.frombuffer(payload, "<f2", count=h * w * 3).reshape(shape).astype(np.float32)
    bits = np.frombuffer(payload, np.uint8, offset=n_xyz)
    valid = np.unpackbits(bits, count=h * w, bitorder="big").astype(bool).reshape(h, w)
    return xyz, valid
