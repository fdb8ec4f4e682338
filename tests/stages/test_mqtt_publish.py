"""MqttPublisher -> real mosquitto -> iter_frames: delivery, properties, retained messages, size limits."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest

from daemon.broker import Mosquitto
from daemon.stages.publish_mqtt import MqttPublisher
from daemon.wire import encoding as enc
from daemon.wire.subscribe import ReceivedFrame, iter_frames
from helpers.mosquitto import mosquitto  # noqa: F401 (fixture)
from helpers.mqtt import Collector, make_frame, mqtt_config, noisy_frame

N_FRAMES = 6


async def _collect_frames(
    broker: Mosquitto, prefix: str, n: int, ready: asyncio.Event
) -> list[ReceivedFrame]:
    out: list[ReceivedFrame] = []
    async for frame in iter_frames(broker.host, broker.port, prefix, "cam", ready=ready):
        out.append(frame)
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("depth_encoding", ["png16", "f16"])
def test_frames_arrive_exactly_once_and_decode(mosquitto: Mosquitto, depth_encoding: str) -> None:
    prefix = f"t/{depth_encoding}"
    cfg = mqtt_config(mosquitto.port, topic_prefix=prefix, depth_encoding=depth_encoding, points_stride=2)
    frames = [make_frame(i, window_id=i // 4) for i in range(N_FRAMES)]
    pts = [10.0 + i / 30 for i in range(N_FRAMES)]

    async def scenario() -> tuple[list[ReceivedFrame], Collector, MqttPublisher]:
        ready = asyncio.Event()
        receiver = asyncio.create_task(_collect_frames(mosquitto, prefix, N_FRAMES, ready))
        collector = Collector(mosquitto.host, mosquitto.port, prefix)
        raw = asyncio.create_task(collector.run())
        await asyncio.wait_for(ready.wait(), 5)
        await asyncio.wait_for(collector.ready.wait(), 5)
        async with MqttPublisher(cfg, ["cam"]) as pub:
            assert await pub.wait_connected(5)
            if depth_encoding == "png16":
                for frame, t in zip(frames, pts):
                    await pub.publish_frame("cam", frame, t)
            else:  # the batch API: parallel encoding, in-order delivery
                done: list[tuple[int, bool, str]] = []
                await pub.publish_frames("cam", frames, pts,
                                         on_done=lambda r, ok, why: done.append((r.frame_index, ok, why)))
            received = await asyncio.wait_for(receiver, 10)
            if depth_encoding == "f16":
                assert await pub.flush(5)
                assert done == [(i, True, "") for i in range(N_FRAMES)]
            await collector.wait_for(lambda m: m.topic == f"{prefix}/cam/intrinsics")
            await collector.wait_for(lambda m: m.topic == f"{prefix}/status")
        await collector.wait_for(lambda m: m.topic == f"{prefix}/status" and b'"offline"' in m.payload)
        await asyncio.sleep(0.2)  # nothing more may arrive (exactly once)
        raw.cancel()
        return received, collector, pub

    received, collector, pub = asyncio.run(scenario())

    assert [f.frame_index for f in received] == list(range(N_FRAMES))
    for got, frame, t in zip(received, frames, pts):
        assert got.source == "cam" and got.window_id == frame.window_id and got.pts == t
        assert got.intrinsics == frame.intrinsics
        # arrays decode equal to what was published (png16: the decode of the same encoding)
        want_depth, want_valid = enc.decode_depth(*enc.encode_depth(frame.depth, frame.mask, depth_encoding))
        np.testing.assert_array_equal(got.depth, want_depth)
        np.testing.assert_array_equal(got.depth_valid, frame.mask)
        want_points = frame.point_map[::2, ::2].astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(got.points, want_points)
        np.testing.assert_array_equal(got.points_valid, frame.mask[::2, ::2])
        assert got.points_stride == 2 and got.latency_s is not None and 0 <= got.latency_s < 10
        d = got.properties["depth"]
        assert d["schema"] == str(enc.SCHEMA_VERSION) and d["source"] == "cam" and d["kind"] == "depth"
        assert d["frame_index"] == str(frame.frame_index) and float(d["pts"]) == t
        assert d["window_id"] == str(frame.window_id) and d["encoding"] == depth_encoding
        assert d["shape"] == "24,32" and d["dtype"] == ("uint16" if depth_encoding == "png16" else "float16")
        p = got.properties["points"]
        assert p["shape"] == "12,16,3" and p["dtype"] == "float16" and p["stride"] == "2"

    data = [m for m in collector.messages if m.topic.endswith(("/depth", "/points"))]
    assert len(data) == 2 * N_FRAMES  # exactly once each
    assert len({(m.topic, m.user["frame_index"]) for m in data}) == 2 * N_FRAMES
    depth_ct = "image/png" if depth_encoding == "png16" else "application/octet-stream"
    assert {m.content_type for m in data if m.topic.endswith("/depth")} == {depth_ct}
    assert not any(m.retain for m in data)

    intr = [m for m in collector.messages if m.topic == f"{prefix}/cam/intrinsics"]
    assert len(intr) == 1  # published once: the intrinsics never changed
    body = json.loads(intr[0].payload)
    assert (body["fx"], body["fy"], body["cx"], body["cy"]) == frames[0].intrinsics
    assert body["width"] == 32 and body["height"] == 24 and intr[0].content_type == "application/json"

    states = [json.loads(m.payload)["state"] for m in collector.messages if m.topic == f"{prefix}/status"]
    assert states[0] == "online" and states[-1] == "offline"
    cam_status = [json.loads(m.payload) for m in collector.messages if m.topic == f"{prefix}/cam/status"]
    assert cam_status[-1]["state"] == "offline"
    assert cam_status[-1]["mqtt"]["published"] == 2 * N_FRAMES
    assert pub.published == pub.offered == 2 * N_FRAMES and pub.dropped == 0 and pub.reconnects == 0


def test_offline_status_counts_a_publish_still_in_flight_at_close(
    mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() right after the outbox empties: the last frame is still on the (slow) wire. The retained
    offline status must count it; it once said 1 published of 2 while the final count was 2."""
    prefix = "t/inflight"
    cfg = mqtt_config(mosquitto.port, topic_prefix=prefix)
    real_publish = aiomqtt.Client.publish

    async def slow_publish(self: aiomqtt.Client, topic: str, *args: Any, **kwargs: Any) -> None:
        if topic.endswith(("/depth", "/points")):
            await asyncio.sleep(0.15)  # a slow uplink: the publish is in flight, the outbox already empty
        await real_publish(self, topic, *args, **kwargs)

    monkeypatch.setattr(aiomqtt.Client, "publish", slow_publish)

    async def scenario() -> tuple[Collector, MqttPublisher]:
        collector = Collector(mosquitto.host, mosquitto.port, prefix)
        raw = asyncio.create_task(collector.run())
        await asyncio.wait_for(collector.ready.wait(), 5)
        pub = MqttPublisher(cfg, ["cam"])
        async with pub:
            assert await pub.wait_connected(5)
            await pub.publish_frame("cam", make_frame(0), 0.0)
            while pub.queued:  # taken from the outbox, not yet acknowledged
                await asyncio.sleep(0.001)
            assert pub._inflight == 1
        await collector.wait_for(
            lambda m: m.topic == f"{prefix}/cam/status" and b'"offline"' in m.payload
        )
        raw.cancel()
        return collector, pub

    collector, pub = asyncio.run(scenario())
    assert pub.published == pub.offered == 2 and pub.dropped == 0
    offline = [json.loads(m.payload) for m in collector.messages if m.topic == f"{prefix}/cam/status"][-1]
    assert offline["state"] == "offline" and offline["mqtt"]["published"] == 2


def test_retained_status_and_intrinsics_for_late_subscribers(mosquitto: Mosquitto) -> None:
    prefix = "t/retained"
    cfg = mqtt_config(mosquitto.port, topic_prefix=prefix, publish_points=False)

    async def scenario() -> Collector:
        async with MqttPublisher(cfg, ["a", "b"]) as pub:
            assert await pub.wait_connected(5)
            await pub.publish_frame("a", make_frame(0), 0.0)
            await pub.publish_status("b", {"state": "online", "fps": 12.5, "lag_s": float("nan")})
            assert await pub.flush(5)  # on the broker: the late subscriber gets them as retained
            late = Collector(mosquitto.host, mosquitto.port, prefix)
            task = asyncio.create_task(late.run())
            status_b = await late.wait_for(lambda m: m.topic == f"{prefix}/b/status")
            await late.wait_for(lambda m: m.topic == f"{prefix}/a/intrinsics")
            avail = await late.wait_for(lambda m: m.topic == f"{prefix}/status")
            task.cancel()
            body = json.loads(status_b.payload)
            assert status_b.retain and body["fps"] == 12.5 and body["lag_s"] is None  # JSON has no NaN
            assert body["state"] == "online" and body["mqtt"] == {"offered": 0, "published": 0, "dropped": {}}
            assert json.loads(avail.payload)["state"] == "online" and avail.retain
            assert json.loads(avail.payload)["sources"] == ["a", "b"]
            assert not any(m.topic.endswith("/depth") for m in late.messages)  # frames are not retained
            return late

    asyncio.run(scenario())


def test_oversize_refused_by_publisher_never_hangs(tmp_path: Path) -> None:
    """Broker max_packet_size 8 KiB (announced in CONNACK): big frames are refused and counted."""
    prefix = "t/big"

    async def scenario(broker: Mosquitto) -> MqttPublisher:
        cfg = mqtt_config(broker.port, topic_prefix=prefix, publish_timeout_s=1.0)
        collector = Collector(broker.host, broker.port, prefix)
        task = asyncio.create_task(collector.run())
        await asyncio.wait_for(collector.ready.wait(), 5)
        async with MqttPublisher(cfg, ["cam"]) as pub:
            assert await pub.wait_connected(5)
            assert pub.max_packet_size == 8192  # learnt from the broker
            t0 = time.monotonic()
            outcomes: list[tuple[int, bool, str]] = []
            await pub.publish_frame("cam", noisy_frame(0, 64, 96), 0.0,  # ~12 KiB depth, ~37 KiB points
                                    on_done=lambda ok, why: outcomes.append((0, ok, why)))
            await pub.publish_frame("cam", make_frame(1, 8, 8), 0.1,  # fits
                                    on_done=lambda ok, why: outcomes.append((1, ok, why)))
            await collector.wait_for(
                lambda m: m.topic == f"{prefix}/cam/points" and m.user["frame_index"] == "1"
            )
            assert time.monotonic() - t0 < 5.0  # refused locally: no broker round trip, no hang
            assert pub.connected and pub.reconnects == 0  # the broker never had to cut us off
            assert await pub.flush(5)
            assert outcomes == [(0, False, "oversize"), (1, True, "")]
        task.cancel()
        return pub

    with Mosquitto(tmp_path, max_packet_size=8192) as broker:
        pub = asyncio.run(scenario(broker))
    assert pub.dropped_by_reason() == {"oversize": 2}
    assert pub.published == 2 and pub.offered == 4
    assert "Packet too large" not in broker.log() and "exceeded" not in broker.log().lower()


def test_config_limit_applies_without_broker_limit(mosquitto: Mosquitto) -> None:
    cfg = mqtt_config(mosquitto.port, topic_prefix="t/cfglimit", max_payload_bytes=2048)

    async def scenario() -> MqttPublisher:
        async with MqttPublisher(cfg, ["cam"]) as pub:
            assert await pub.wait_connected(5)
            assert pub.max_packet_size == 2048
            await pub.publish_frame("cam", noisy_frame(0, 32, 32), 0.0)  # depth ~2 KiB+, points ~6 KiB
        return pub

    pub = asyncio.run(scenario())
    assert pub.stats["cam"].dropped["oversize"] >= 1
    assert pub.published + pub.dropped == pub.offered == 2


def test_tls_with_username_and_password(tmp_path: Path) -> None:
    """A TLS-only broker with a password file: the config's tls/ca_file/username/password are used."""
    import ssl

    async def scenario(broker: Mosquitto) -> tuple[list[ReceivedFrame], MqttPublisher, MqttPublisher]:
        assert broker.ca_file is not None
        common = dict(topic_prefix="t/tls", tls=True, ca_file=str(broker.ca_file), username="geo",
                      publish_points=False)
        ready = asyncio.Event()
        got: list[ReceivedFrame] = []

        async def receive() -> None:
            ctx = ssl.create_default_context(cafile=str(broker.ca_file))
            async for frame in iter_frames(broker.host, broker.port, "t/tls", "cam", username="geo",
                                           password="s3cret", tls_context=ctx, ready=ready):
                got.append(frame)
                if len(got) == 2:
                    return

        receiver = asyncio.create_task(receive())
        await asyncio.wait_for(ready.wait(), 10)
        async with MqttPublisher(mqtt_config(broker.port, password="s3cret", **common), ["cam"]) as good:
            assert await good.wait_connected(10)
            for i in range(2):
                await good.publish_frame("cam", make_frame(i), float(i))
            await asyncio.wait_for(receiver, 10)
        bad_cfg = mqtt_config(broker.port, password="wrong", outbox_size=2, publish_timeout_s=0.5, **common)
        async with MqttPublisher(bad_cfg, ["cam"]) as bad:
            for i in range(3):
                await bad.publish_frame("cam", make_frame(i), float(i))
            assert not await bad.wait_connected(1.0)
        return got, good, bad

    with Mosquitto(tmp_path, tls=True, users={"geo": "s3cret"}) as broker:
        got, good, bad = asyncio.run(scenario(broker))
    assert [f.frame_index for f in got] == [0, 1] and good.published == 2 and good.dropped == 0
    assert bad.connect_failures >= 1 and bad.published == 0
    # refused credentials: the drops carry the cause (an overflow before the first refusal stays outbox_full)
    dropped = bad.dropped_by_reason()
    assert set(dropped) <= {"outbox_full", "auth"} and dropped.get("auth", 0) >= 2 and bad.offered == 3, dropped
