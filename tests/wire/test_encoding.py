"""Wire encodings (daemon/wire/encoding.py, docs/mqtt.md): exact f16, bounded png16, mask packing, stride."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from PIL import Image

from daemon.wire import encoding as enc

F32_EPS = 2.0**-24  # float32 rounding of the returned depth (relative)


def _depth(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    depth = (0.5 + 0.4 * np.sin(xx / 7.0) + 3.0 * yy / h + 0.05 * rng.random((h, w))).astype(np.float32)
    mask = rng.random((h, w)) > 0.2
    return depth, mask


def _png16_error_ok(depth: np.ndarray, mask: np.ndarray, decoded: np.ndarray, step: float) -> None:
    inv = 1.0 / depth[mask].astype(np.float64)
    inv_dec = 1.0 / decoded[mask].astype(np.float64)
    bound = step / 2 + 2 * F32_EPS * inv
    assert np.all(np.abs(inv_dec - inv) <= bound), float(np.max(np.abs(inv_dec - inv) - bound))


@pytest.mark.parametrize("shape", [(48, 64), (7, 13), (1, 1), (33, 1)])
def test_png16_roundtrip_within_half_step(shape: tuple[int, int]) -> None:
    depth, mask = _depth(*shape)
    mask.flat[0] = True
    payload, props = enc.encode_depth(depth, mask, "png16")
    decoded, valid = enc.decode_depth(payload, props)
    assert decoded.dtype == np.float32 and decoded.shape == shape
    np.testing.assert_array_equal(valid, mask)
    assert np.all(decoded[~mask] == 0)
    step = enc.png16_step(props)
    inv = 1.0 / depth[mask].astype(np.float64)
    assert step == pytest.approx((inv.max() - inv.min()) / 65534, rel=1e-12, abs=0)
    _png16_error_ok(depth, mask, decoded, step)
    # The documented closed form: depth = 1 / (q * scale + offset), q from any PNG decoder.
    q = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_UNCHANGED)
    assert q.dtype == np.uint16 and q.shape == shape
    np.testing.assert_array_equal(q, enc.png16_decode(payload))
    scale, offset = float(props["depth_quant_scale"]), float(props["depth_quant_offset"])
    np.testing.assert_array_equal(decoded[mask], (1.0 / (q[mask] * scale + offset)).astype(np.float32))
    if shape != (1, 1) and mask.sum() > 1:  # the extremes use the full code range
        assert q[mask].min() == 1 and q[mask].max() == 65535


def test_png16_is_standard_16bit_grayscale() -> None:
    depth, mask = _depth(20, 30)
    payload, _ = enc.encode_depth(depth, mask, "png16")
    img = Image.open(io.BytesIO(payload))
    assert img.mode in ("I;16", "I;16B", "I") and img.size == (30, 20)
    np.testing.assert_array_equal(np.asarray(img).astype(np.uint16), enc.png16_decode(payload))


def test_png16_decoder_reads_other_encoders() -> None:
    q = (np.arange(20 * 31, dtype=np.uint32) * 977 % 65536).astype(np.uint16).reshape(20, 31)
    ok, buf = cv2.imencode(".png", q)  # OpenCV's adaptive filters (Paeth, Sub, ...)
    assert ok
    np.testing.assert_array_equal(enc.png16_decode(buf.tobytes()), q)
    np.testing.assert_array_equal(enc.png16_decode(enc.png16_encode(q, text={"k": "v"})), q)
    text = {"depth_quant_scale": "0.5"}
    assert enc.png16_text(enc.png16_encode(q, text=text)) == text


def test_png16_invalid_pixels_and_degenerate_frames() -> None:
    depth = np.array([[1.0, -2.0, 0.0], [np.nan, np.inf, 2.0]], np.float32)
    decoded, valid = enc.decode_depth(*enc.encode_depth(depth, None, "png16"))
    np.testing.assert_array_equal(valid, [[True, False, False], [False, False, True]])
    np.testing.assert_allclose(decoded[valid], [1.0, 2.0], rtol=1e-6)
    # all invalid
    decoded, valid = enc.decode_depth(*enc.encode_depth(depth, np.zeros((2, 3), bool), "png16"))
    assert not valid.any() and np.all(decoded == 0)
    # constant depth: zero step, exact
    const = np.full((4, 5), 2.5, np.float32)
    payload, props = enc.encode_depth(const, None, "png16")
    decoded, valid = enc.decode_depth(payload, props)
    assert valid.all() and float(props["depth_quant_scale"]) == 0.0
    np.testing.assert_array_equal(decoded, const)


def test_f16_depth_exact_nan_invalid_saturating() -> None:
    depth, mask = _depth(9, 11, seed=3)
    depth[0, 0], mask[0, 0] = 1e6, True  # beyond float16: saturates to 65504
    payload, props = enc.encode_depth(depth, mask, "f16")
    assert len(payload) == 9 * 11 * 2 and props["dtype"] == "float16"
    decoded, valid = enc.decode_depth(payload, props)
    np.testing.assert_array_equal(valid, mask)
    expected = np.minimum(depth, 65504).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(decoded[mask], expected[mask])
    assert decoded[0, 0] == 65504.0 and np.all(decoded[~mask] == 0)
    raw = np.frombuffer(payload, "<f2").reshape(9, 11)
    assert np.all(np.isnan(raw[~mask])) and not np.isnan(raw[mask]).any()


@pytest.mark.parametrize("shape,stride", [((8, 8), 1), ((7, 13), 1), ((7, 13), 2), ((10, 9), 3), ((1, 5), 4)])
def test_points_exact_with_mask_packing_and_stride(shape: tuple[int, int], stride: int) -> None:
    rng = np.random.default_rng(1)
    points = rng.standard_normal((*shape, 3)).astype(np.float32) * 10
    mask = rng.random(shape) > 0.5
    payload, props = enc.encode_points(points, mask, stride)
    hs, ws = -(-shape[0] // stride), -(-shape[1] // stride)
    assert props["shape"] == f"{hs},{ws},3" and props["full_shape"] == f"{shape[0]},{shape[1]}"
    assert len(payload) == hs * ws * 3 * 2 + (hs * ws + 7) // 8
    xyz, valid = enc.decode_points(payload, props)
    np.testing.assert_array_equal(xyz, points[::stride, ::stride].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(valid, mask[::stride, ::stride])
    # the documented layout: first pixel in the most significant bit of the first mask byte
    first_byte = payload[hs * ws * 6]
    assert bool(first_byte & 0x80) == bool(mask[0, 0])


def test_decode_rejects_mismatched_payloads() -> None:
    depth, mask = _depth(6, 8)
    payload, props = enc.encode_depth(depth, mask, "f16")
    with pytest.raises(enc.EncodingError, match="needs 96"):
        enc.decode_depth(payload[:-2], props)
    with pytest.raises(enc.EncodingError, match="shape"):
        enc.decode_depth(*enc.encode_depth(depth, mask, "png16")[:1], {**props, "encoding": "png16"})
    payload, props = enc.encode_points(np.zeros((6, 8, 3), np.float32), mask)
    with pytest.raises(enc.EncodingError, match="bytes"):
        enc.decode_points(payload + b"\0", props)
    with pytest.raises(enc.EncodingError, match="not one of"):
        enc.encode_depth(depth, mask, "jpeg")


def test_user_properties_survive_the_wire_format() -> None:
    user = enc.frame_properties("cam-1", 42, 1.25, 3, "depth")
    props = enc.to_mqtt_properties({**user, "shape": "6,8"}, "image/png")
    packed = props.pack()
    back = Properties(PacketTypes.PUBLISH)
    back.unpack(packed)
    got = enc.from_mqtt_properties(back)
    assert got == {**user, "shape": "6,8"}
    assert got["schema"] == str(enc.SCHEMA_VERSION) and float(got["pts"]) == 1.25
    assert back.ContentType == "image/png"


def test_numpy_only_recipe_in_docs_decodes_like_the_library() -> None:
    """The decoding recipe in docs/mqtt.md is executed as written."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "mqtt.md").read_text()
    section = doc.split("## Decoding in Python with numpy only", 1)[1]
    recipe = section.split("```python", 1)[1].split("```", 1)[0]
    ns: dict = {}
    exec(compile(recipe, "docs/mqtt.md", "exec"), ns)  # noqa: S102 - our own documentation
    depth, mask = _depth(15, 22, seed=5)
    for encoding in enc.DEPTH_ENCODINGS:
        payload, props = enc.encode_depth(depth, mask, encoding)
        for got, want in zip(ns["decode_depth"](payload, props), enc.decode_depth(payload, props)):
            np.testing.assert_array_equal(got, want)
    points = np.random.default_rng(2).standard_normal((15, 22, 3)).astype(np.float32)
    payload, props = enc.encode_points(points, mask, 2)
    for got, want in zip(ns["decode_points"](payload, props), enc.decode_points(payload, props)):
        np.testing.assert_array_equal(got, want)
