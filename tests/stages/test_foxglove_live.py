"""The live Foxglove view: foxglove-sdk's WebSocket server, a real WebSocket client (aiohttp) speaking the
Foxglove WebSocket protocol (subprotocol ``foxglove.sdk.v1``): advertise -> subscribe -> binary message data,
decoded with the protobuf schemas the server advertised. In-process server tests, the token gate, and the
daemon serving a real clip."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import numpy as np
import pytest

from daemon.broker import free_port
from daemon.config import default_config
from daemon.metrics import Metrics
from daemon.stages.publish_foxglove import SUBPROTOCOL, FoxgloveLive
from helpers.clips import make_clip
from helpers.foxglove_decode import SchemaDecoder, cloud_xyz, depth_array
from helpers.mqtt import make_frame
from helpers.run_daemon import DaemonProcess, base_sections, daemon_procs, tiny_model, write_config  # noqa: F401 (fixtures)

H, W = 12, 20


class LiveClient:
    """A Foxglove WebSocket client: channels from ``advertise``, decoded messages per topic."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.channels: dict[int, dict[str, Any]] = {}
        self.subs: dict[int, int] = {}  # subscription id -> channel id
        self.decoder = SchemaDecoder()
        self.messages: list[tuple[str, int, Any]] = []

    async def advertised(self, topics: set[str], timeout: float = 10) -> None:
        end = time.monotonic() + timeout
        while not topics <= {c["topic"] for c in self.channels.values()}:
            await self._read(end)

    async def subscribe(self, topics: set[str]) -> None:
        subs = []
        for cid, ch in self.channels.items():
            if ch["topic"] in topics:
                sid = len(self.subs) + 1
                self.subs[sid] = cid
                subs.append({"id": sid, "channelId": cid})
        await self.ws.send_str(json.dumps({"op": "subscribe", "subscriptions": subs}))

    async def until(self, pred: Any, timeout: float) -> None:
        end = time.monotonic() + timeout
        while not pred():
            await self._read(end)

    async def _read(self, end: float) -> None:
        msg = await self.ws.receive(timeout=max(0.01, end - time.monotonic()))
        if msg.type == aiohttp.WSMsgType.TEXT:
            data = json.loads(msg.data)
            if data["op"] == "advertise":
                for ch in data["channels"]:
                    assert ch["encoding"] == "protobuf" and ch["schemaEncoding"] == "protobuf"
                    self.decoder.add(ch["schemaName"], base64.b64decode(ch["schema"]))
                    self.channels[ch["id"]] = ch
        elif msg.type == aiohttp.WSMsgType.BINARY:
            if msg.data[0] == 0x01:  # message data: op, u32 subscription id, u64 log time, payload
                sid, log_ns = struct.unpack_from("<IQ", msg.data, 1)
                ch = self.channels[self.subs[sid]]
                self.messages.append((ch["topic"], log_ns, self.decoder.decode(ch["schemaName"], msg.data[13:])))
        else:
            raise ConnectionError(f"websocket closed: {msg.type} {msg.data}")

    def topic(self, name: str) -> list[tuple[int, Any]]:
        return [(t, m) for top, t, m in self.messages if top == name]


def _cfg(**fox: Any) -> Any:
    cfg = default_config()
    return msgspec.structs.replace(cfg, foxglove=msgspec.structs.replace(cfg.foxglove, enabled=True, port=0,
                                                                         **fox))


TOPICS = {"/cam/depth", "/cam/color", "/cam/points", "/cam/calibration", "/tf"}


async def _session(url: str) -> tuple[aiohttp.ClientSession, aiohttp.ClientWebSocketResponse]:
    s = aiohttp.ClientSession()
    try:
        ws = await s.ws_connect(url, protocols=(SUBPROTOCOL,), max_msg_size=0)
    except BaseException:
        await s.close()
        raise
    return s, ws


def test_subscribe_receive_decode() -> None:
    async def main() -> None:
        metrics = Metrics()
        async with FoxgloveLive(_cfg(points_stride=2), ["cam", "other"], metrics) as live:
            frame = make_frame(3, H, W)
            assert not live.write_frame("cam", frame, 2.5)  # nobody watches: nothing encoded
            s, ws = await _session(f"ws://127.0.0.1:{live.port}/")
            try:
                c = LiveClient(ws)
                await c.advertised(TOPICS | {"/other/depth"})
                meta = {ch["topic"]: ch.get("metadata") for ch in c.channels.values()}
                assert meta["/cam/depth"] == {"units": "relative"}
                await c.subscribe(TOPICS)
                end = time.monotonic() + 5
                while not live.watched("cam") and time.monotonic() < end:
                    await asyncio.sleep(0.02)
                assert not live.watched("other")
                image = np.full((H, W, 3), (10, 200, 30), np.uint8)
                assert await asyncio.to_thread(live.write_frame, "cam", frame, 2.5, image)
                await c.until(lambda: {t for t, _, _ in c.messages} == TOPICS, 10)
            finally:
                await ws.close()
                await s.close()
        (t, depth), = c.topic("/cam/depth")
        assert t == 2_500_000_000
        np.testing.assert_array_equal(depth_array(depth)[frame.mask], frame.depth[frame.mask])
        (_, cloud), = c.topic("/cam/points")
        np.testing.assert_array_equal(cloud_xyz(cloud), frame.point_map[::2, ::2][frame.mask[::2, ::2]])
        rgba = np.frombuffer(cloud.data, np.uint8).reshape(-1, 16)[:, 12:]
        assert np.abs(rgba[:, :3].astype(int) - (10, 200, 30)).max() <= 12  # colour via JPEG
        (_, cal), = c.topic("/cam/calibration")
        assert (cal.width, cal.height) == (W, H) and cal.K[0] == pytest.approx(0.8 * W)
        assert 'geometryd_sink_frames_total{sink="foxglove",source="cam"} 1.0' in metrics.render().decode()

    asyncio.run(main())


def test_token_gate() -> None:
    async def main() -> None:
        async with FoxgloveLive(_cfg(token="s3cr3t"), ["cam"]) as live:
            assert live.gate is not None and live.port == live.gate.port != live.server.port
            for url in (f"ws://127.0.0.1:{live.port}/", f"ws://127.0.0.1:{live.port}/?token=wrong"):
                with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                    await _session(url)
                assert e.value.status == 401
            for url, headers in ((f"ws://127.0.0.1:{live.port}/?token=s3cr3t", None),
                                 (f"ws://127.0.0.1:{live.port}/", {"Authorization": "Bearer s3cr3t"})):
                async with aiohttp.ClientSession(headers=headers) as s:
                    async with s.ws_connect(url, protocols=(SUBPROTOCOL,), max_msg_size=0) as ws:
                        c = LiveClient(ws)
                        await c.advertised(TOPICS)
                        await c.subscribe({"/cam/depth"})
                        end = time.monotonic() + 5
                        while not live.watched("cam") and time.monotonic() < end:
                            await asyncio.sleep(0.02)
                        frame = make_frame(0, H, W)
                        assert await asyncio.to_thread(live.write_frame, "cam", frame, 1.0)
                        await c.until(lambda c=c: c.topic("/cam/depth"), 10)
                        d = depth_array(c.topic("/cam/depth")[0][1])
                        np.testing.assert_array_equal(d[frame.mask], frame.depth[frame.mask])
                end = time.monotonic() + 5
                while live.watched("cam") and time.monotonic() < end:  # the relay closed upstream too
                    await asyncio.sleep(0.02)
                assert not live.watched("cam")

    asyncio.run(main())


def test_daemon_serves_live_frames(tiny_model: Path, tmp_path: Path, daemon_procs: list) -> None:
    clip = make_clip(tmp_path / "clip.mp4", n_frames=30)
    port = free_port()
    sections = base_sections(tiny_model, foxglove={"enabled": True, "port": port})
    cfg = write_config(tmp_path / "cfg.toml", sections,
                       {"cam": {"type": "file", "path": str(clip), "loop": True, "realtime": True}})
    d = DaemonProcess(cfg, tmp_path, exit_when_done=False, extra_args=["--plumbing-identity-delay", "0.05"])
    daemon_procs.append(d)
    assert d.wait_log("foxglove live server listening", 600), d.log_text()[-4000:]

    async def main() -> LiveClient:
        s, ws = await _session(f"ws://127.0.0.1:{port}/")
        try:
            c = LiveClient(ws)
            await c.advertised(TOPICS)
            await c.subscribe(TOPICS)
            await c.until(lambda: len(c.topic("/cam/depth")) >= 5 and len(c.topic("/cam/color")) >= 5, 300)
            return c
        finally:
            await ws.close()
            await s.close()

    c = asyncio.run(main())
    d.terminate()
    assert d.wait(120) == 0, d.log_text()[-4000:]
    times = [t for t, _ in c.topic("/cam/depth")]
    assert times == sorted(times) and len(set(times)) == len(times)
    for _, msg in c.topic("/cam/depth"):
        depth = depth_array(msg)
        assert depth.shape == (64, 128) and np.isfinite(depth).any()  # the prior of the tiny MoGe
    _, jpg = c.topic("/cam/color")[0]
    assert jpg.format == "jpeg" and jpg.data[:2] == b"\xff\xd8"
    summary = d.summary()["sources"]["cam"]
    assert summary["frames_in"] == summary["frames_out"] + summary["skipped"] + sum(summary["dropped"].values())
