"""Viewer: message encoding (daemon/viewer/hub.py), websocket fan-out and the routes/auth of the pages,
in-process against the daemon's real HTTP app. The browser side is in tests/e2e/test_webrtc_daemon.py."""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from daemon.depth_colour import colourise
from daemon.frames import FrameResult
from daemon.viewer.hub import _Latest, encode_message

H, W = 48, 80


def _result(index: int = 3) -> FrameResult:
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    depth = 1.0 + xs / W  # far on the right
    mask = np.ones((H, W), bool)
    mask[:5] = False
    depth[~mask] = 0.0
    pm = np.stack([(xs / W - 0.5) * depth, (ys / H - 0.5) * depth, depth], -1).astype(np.float32)
    return FrameResult(index, 1, pm, depth, mask, (0.9, 1.5, 0.5, 0.5))


def decode(msg: bytes) -> tuple[dict[str, Any], bytes, np.ndarray, np.ndarray]:
    (n,) = struct.unpack_from("<I", msg)
    header = json.loads(msg[4:4 + n])
    base = 4 + n
    assert base % 4 == 0
    jo, jl = header["jpeg"]
    xo, count = header["xyz"]
    co, ccount = header["rgb"]
    assert count == ccount and xo % 4 == 0
    xyz = np.frombuffer(msg, np.float32, count * 3, base + xo).reshape(-1, 3)
    rgb = np.frombuffer(msg, np.uint8, count * 3, base + co).reshape(-1, 3)
    assert base + co + count * 3 == len(msg)
    return header, msg[base + jo: base + jo + jl], xyz, rgb


def test_colourise_near_is_warm_invalid_is_black() -> None:
    res = _result()
    rgb = colourise(res.depth, res.mask)
    assert rgb.shape == (H, W, 3) and rgb.dtype == np.uint8
    assert (rgb[:5] == 0).all()
    import cv2

    lut = cv2.cvtColor(cv2.applyColorMap(np.arange(256, dtype=np.uint8)[None], cv2.COLORMAP_TURBO),
                       cv2.COLOR_BGR2RGB)[0]
    # range: the 99 % quantile is the nearest column's disparity; the 1 % quantile counts the invalid rows'
    # zeros (spec 4.7 step 7), so lo = 0 and the far edge sits at its disparity's place, mid-map
    hi = 1 / (1 + 1e-4)
    for x in (0, W // 2, W - 2):
        index = int(1 / (res.depth[20, x] + 1e-4) / (hi + 1e-4) * 255)
        np.testing.assert_array_equal(rgb[20, x], lut[index])
    assert int(1 / (res.depth[20, 0] + 1e-4) / (hi + 1e-4) * 255) == 254  # near: turbo's red end


def test_encode_message_round_trip() -> None:
    import cv2

    res = _result()
    msg = encode_message("cam", _Latest(res, 12.5, 0.25, 0.0, 1), max_points=1000)
    header, jpeg, xyz, rgb = decode(msg)
    stride = header["stride"]
    assert stride == 2  # ceil(sqrt(48*80/1000))
    assert header["frame_index"] == 3 and header["window_id"] == 1 and header["pts"] == 12.5
    assert header["latency_ms"] == 250.0 and header["width"] == W and header["height"] == H
    assert header["intrinsics"] == [0.9, 1.5, 0.5, 0.5]
    sub = res.mask[::stride, ::stride]
    np.testing.assert_array_equal(xyz, res.point_map[::stride, ::stride][sub])
    np.testing.assert_array_equal(rgb, colourise(res.depth, res.mask)[::stride, ::stride][sub])
    img = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    ref = colourise(res.depth, res.mask).astype(np.float32)
    assert img.shape == (H, W, 3) and np.abs(img - ref).mean() < 6.0  # JPEG q85


def _config(tmp_path: Path, token: str) -> Any:
    from daemon.config import load_config
    from helpers.run_daemon import base_sections, write_config

    sections = base_sections(tmp_path / "model", http_port=9999)
    sections["http"]["token"] = token
    return load_config(write_config(tmp_path / "cfg.toml", sections, {
        "cam": {"type": "webrtc"}, "clip": {"type": "file", "path": "/x.mp4"}}))


def test_viewer_routes_websocket_and_auth(tmp_path: Path) -> None:
    import aiohttp

    from daemon.http import HttpServer
    from daemon.metrics import Metrics
    from daemon.viewer.setup import build_web

    cfg = _config(tmp_path, "tok")

    async def main() -> None:
        m = Metrics()
        webrtc, hub, setup = build_web(cfg, m)
        async with HttpServer("127.0.0.1", 0, m.render, lambda: {"ok": True}, "tok", setup) as srv:
            base = f"http://127.0.0.1:{srv.port}"
            q = "?access_token=tok"
            async with aiohttp.ClientSession() as http:
                async with http.get(base + "/viewer/") as r:
                    assert r.status == 401
                async with http.get(base + "/viewer/?access_token=nope") as r:
                    assert r.status == 403
                async with http.get(base + "/viewer/" + q) as r:
                    text = await r.text()
                    assert r.status == 200
                    assert f'href="/viewer/cam{q}"' in text and f'href="/viewer/publish/cam{q}"' in text
                    assert f'href="/viewer/clip{q}"' in text and "/viewer/publish/clip" not in text
                async with http.get(base + "/viewer/cam" + q) as r:
                    page = await r.text()
                    assert r.status == 200 and "/viewer/assets/" in page
                bearer = {"Authorization": "Bearer tok"}
                async with http.get(base + "/viewer/publish/cam", headers=bearer) as r:
                    assert r.status == 200 and "/viewer/assets/" in await r.text()
                async with http.get(base + "/viewer/nosuch" + q) as r:
                    assert r.status == 404
                # the built bundle is public (no data in it); pages and data are not
                asset = page.split('src="')[1].split('"')[0]
                async with http.get(base + asset) as r:
                    assert r.status == 200 and "javascript" in r.content_type
                async with http.get(base + "/metrics?access_token=tok") as r:
                    assert r.status == 200

                async with http.ws_connect(base + "/viewer/ws/cam" + q) as ws:
                    for i in range(3):  # conflated: the viewer gets the newest, not necessarily every one
                        hub.push("cam", _result(i), float(i), 0.01)
                    got = []
                    while not got or got[-1]["frame_index"] != 2:
                        msg = await ws.receive(timeout=10)
                        assert msg.type == aiohttp.WSMsgType.BINARY
                        got.append(decode(msg.data)[0])
                    assert hub.stats("cam")["viewers"] == 1
                # a late viewer gets the last result at once
                async with http.ws_connect(base + "/viewer/ws/cam" + q) as ws:
                    msg = await ws.receive(timeout=10)
                    assert decode(msg.data)[0]["frame_index"] == 2
                for _ in range(50):
                    if hub.stats("cam")["viewers"] == 0:
                        break
                    await asyncio.sleep(0.02)
                assert hub.stats("cam")["viewers"] == 0
        await hub.close()
        await webrtc.close()

    asyncio.run(main())
