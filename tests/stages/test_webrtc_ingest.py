"""WHIP routes + WebRTC ingest in-process (no pipeline): a real aiortc publisher against the daemon's real
HTTP app (daemon.http.HttpServer + daemon.viewer.setup.build_web); frames come out of the source resized to
the processing size; a consumer that falls behind loses the oldest frames, counted as frames_in + dropped."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.broker import free_port
from helpers.clips import synthetic_frames
from helpers.run_daemon import base_sections, write_config
from helpers.whip import WhipClient, request

TOKEN = "s3cret-token"


def _config(tmp_path: Path, token: str = TOKEN) -> Any:
    from daemon.config import load_config

    sections = base_sections(tmp_path / "model", http_port=free_port())
    sections["http"]["token"] = token
    path = write_config(tmp_path / "cfg.toml", sections, {
        "cam": {"type": "webrtc"}, "clip": {"type": "file", "path": str(tmp_path / "x.mp4")}})
    return load_config(path)


async def _serve(cfg: Any) -> tuple[Any, Any, Any]:
    from daemon.http import HttpServer
    from daemon.metrics import Metrics
    from daemon.viewer.setup import build_web

    metrics = Metrics()
    webrtc, hub, setup = build_web(cfg, metrics)
    server = HttpServer("127.0.0.1", 0, metrics.render, lambda: {"ok": True}, cfg.http.token, setup)
    await server.__aenter__()
    return server, webrtc, metrics


def test_ice_host_addresses() -> None:
    from daemon.stages.ingest_webrtc import ice_host_addresses

    assert ice_host_addresses("127.0.0.1") == ["127.0.0.1"]
    assert ice_host_addresses("localhost") == ["127.0.0.1"]
    assert ice_host_addresses("192.0.2.7") == ["192.0.2.7"]
    assert ice_host_addresses("::1") == ["::1"]
    assert ice_host_addresses("0.0.0.0") is None and ice_host_addresses("::") is None


def test_whip_session_frames_resized_and_overflow_counted(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    frames = synthetic_frames(20, 96, 192, seed=5)  # processing size is 64x128

    async def main() -> None:
        server, webrtc, metrics = await _serve(cfg)
        src = webrtc.get("cam")
        base = f"http://127.0.0.1:{server.port}"
        client = WhipClient(base, "cam", frames)
        try:
            assert await client.start() == 201
            it = src.frames().__aiter__()
            first = await asyncio.wait_for(it.__anext__(), 20)
            assert first.image.shape == (64, 128, 3) and first.image.dtype == np.uint8
            assert first.image.std() > 10  # real picture content, not a blank frame
            # stop consuming: after the bounded queue (8) fills, the oldest frames are dropped and counted
            for _ in range(200):
                if src.dropped >= 5:
                    break
                await asyncio.sleep(0.05)
            assert src.dropped >= 5, src.dropped
            counts = metrics.source("cam")
            assert counts.dropped == {"webrtc_queue": src.dropped}
            assert counts.frames_in == src.dropped and counts.balanced()
            assert src._queue.qsize() == 8  # noqa: SLF001
            # DELETE ends the session; the source stays usable for the next one
            assert await client.stop() == 200
            assert src.session is None
            assert (await request("DELETE", base + client.location))[0] == 404  # already gone
            again = WhipClient(base, "cam", frames)
            assert await again.start() == 201
            assert await again.stop() == 200
        finally:
            await webrtc.close()
            await server.__aexit__(None, None, None)

    asyncio.run(main())


@pytest.mark.parametrize("case", ["no_video", "garbage", "not_utf8"])
def test_whip_bad_offers(tmp_path: Path, case: str) -> None:
    cfg = _config(tmp_path, token="")
    body: Any = {
        "no_video": "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n",
        "garbage": "v=0\r\nthis is not sdp\r\nm=video x y z\r\n",
        "not_utf8": b"v=0\r\n\xff\xfe",
    }[case]

    async def main() -> None:
        import aiohttp

        server, webrtc, _ = await _serve(cfg)
        try:
            async with aiohttp.ClientSession() as http:
                async with http.post(f"http://127.0.0.1:{server.port}/whip/cam", data=body,
                                     headers={"Content-Type": "application/sdp"}) as resp:
                    assert resp.status == 400, await resp.text()
            assert webrtc.get("cam").session is None
        finally:
            await server.__aexit__(None, None, None)

    asyncio.run(main())
