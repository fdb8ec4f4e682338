"""Broker loss: restart on the same port, a frozen broker (publish timeout), last will of a killed publisher.

Invariant everywhere: offered == published + dropped (after close), nothing silent.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from daemon.broker import Mosquitto
from daemon.metrics import Metrics
from daemon.stages.publish_mqtt import DROP_REASONS, MqttPublisher
from daemon.wire.subscribe import iter_frames
from helpers.mosquitto import mosquitto  # noqa: F401 (fixture)
from helpers.mqtt import Collector, make_frame, mqtt_config

REPO = Path(__file__).resolve().parents[2]


def test_broker_restart_reconnects_and_counts_everything(mosquitto: Mosquitto) -> None:
    prefix = "t/restart"
    cfg = mqtt_config(mosquitto.port, topic_prefix=prefix, outbox_size=8, publish_points=False,
                      publish_timeout_s=1.0)

    metrics = Metrics()
    outcomes: dict[int, list[tuple[bool, str]]] = {}

    async def scenario() -> tuple[MqttPublisher, list[int]]:
        async with MqttPublisher(cfg, ["cam"], metrics) as pub:
            assert await pub.wait_connected(5)
            index = 0

            async def offer(n: int) -> None:
                nonlocal index
                for _ in range(n):
                    outcomes[index] = []
                    await pub.publish_frame("cam", make_frame(index, 8, 8), index / 30,
                                            on_done=lambda ok, why, i=index: outcomes[i].append((ok, why)))
                    index += 1
                    await asyncio.sleep(0.005)

            await offer(10)
            await asyncio.to_thread(mosquitto.stop)
            await offer(30)  # during the outage: outbox of 8 -> the oldest are dropped
            assert not pub.connected
            await asyncio.to_thread(mosquitto.start)  # same port
            assert await pub.wait_connected(5)
            assert await pub.flush(5), pub.snapshot()  # the outbox kept during the outage is delivered now
            # a new subscriber after the restart gets new frames and the re-sent retained availability
            ready = asyncio.Event()
            got: list[int] = []

            async def receive() -> None:
                async for frame in iter_frames(mosquitto.host, mosquitto.port, prefix, "cam", ready=ready):
                    got.append(frame.frame_index)
                    if len(got) == 5:
                        return

            receiver = asyncio.create_task(receive())
            late = Collector(mosquitto.host, mosquitto.port, prefix)
            late_task = asyncio.create_task(late.run())
            await asyncio.wait_for(ready.wait(), 5)
            avail = await late.wait_for(lambda m: m.topic == f"{prefix}/status")
            assert json.loads(avail.payload)["state"] == "online"
            await offer(5)
            await asyncio.wait_for(receiver, 5)
            late_task.cancel()
        return pub, got

    pub, got = asyncio.run(scenario())
    assert pub.reconnects >= 1
    assert got == list(range(40, 45))
    assert pub.queued == 0
    assert pub.offered == 45 and pub.published + pub.dropped == pub.offered
    reasons = pub.dropped_by_reason()
    assert set(reasons) <= set(DROP_REASONS)
    # at most the outbox (+ one in flight) survives; once a reconnect failed, the cause is the outage
    assert reasons.get("outbox_full", 0) + reasons.get("unreachable", 0) >= 30 - 8 - 1
    assert pub.published >= 8 + 5  # the surviving outbox and the frames after the restart
    # per-frame outcome callbacks: exactly one per frame, agreeing with the counters (one message per frame)
    assert all(len(v) == 1 for v in outcomes.values()) and len(outcomes) == 45
    assert sum(v[0][0] for v in outcomes.values()) == pub.published
    assert {v[0][1] for v in outcomes.values() if not v[0][0]} == set(reasons)
    assert all(outcomes[i] == [(True, "")] for i in range(40, 45))
    sample = metrics.registry.get_sample_value
    assert sample("geometryd_mqtt_published") == pub.published
    assert sample("geometryd_mqtt_dropped") == pub.dropped
    assert sample("geometryd_mqtt_reconnects") == pub.reconnects


def test_frozen_broker_publish_times_out_then_recovers(mosquitto: Mosquitto) -> None:
    """SIGSTOP: the TCP connection stays open but no PUBACK ever comes -> timeout, reset, reconnect."""
    prefix = "t/frozen"
    cfg = mqtt_config(mosquitto.port, topic_prefix=prefix, publish_points=False, publish_timeout_s=0.5)

    async def scenario() -> MqttPublisher:
        async with MqttPublisher(cfg, ["cam"]) as pub:
            assert await pub.wait_connected(5)
            await pub.publish_frame("cam", make_frame(0, 8, 8), 0.0)
            while pub.published < 1:
                await asyncio.sleep(0.01)
            assert mosquitto.process is not None
            os.kill(mosquitto.process.pid, signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                await pub.publish_frame("cam", make_frame(1, 8, 8), 0.1)
                # the caller never waits for the broker: back before the publish completed or timed out
                assert pub.published == 1 and pub.dropped == 0 and pub.queued + pub._inflight == 1
                while pub.stats["cam"].dropped["timeout"] < 1:
                    assert time.monotonic() - t0 < 5, pub.snapshot()
                    await asyncio.sleep(0.02)
            finally:
                os.kill(mosquitto.process.pid, signal.SIGCONT)
            t0 = time.monotonic()
            while pub.reconnects < 1 or not pub.connected:
                assert time.monotonic() - t0 < 10, pub.snapshot()
                await asyncio.sleep(0.02)
            await pub.publish_frame("cam", make_frame(2, 8, 8), 0.2)
            while pub.published < 2:
                assert time.monotonic() - t0 < 10, pub.snapshot()
                await asyncio.sleep(0.02)
        return pub

    pub = asyncio.run(scenario())
    assert pub.dropped_by_reason() == {"timeout": 1}
    assert pub.published == 2 and pub.offered == 3


_KILLED_PUBLISHER = textwrap.dedent(
    """
    import asyncio, sys
    from daemon.config import MqttConfig
    from daemon.stages.publish_mqtt import MqttPublisher

    async def main():
        cfg = MqttConfig(host="127.0.0.1", port=int(sys.argv[1]), topic_prefix=sys.argv[2], qos=1,
                         keepalive_s=60, client_id="killed-publisher")
        async with MqttPublisher(cfg, ["cam"]) as pub:
            assert await pub.wait_connected(10)
            assert await pub.flush(10)  # the retained "online" is on the broker
            print("ready", flush=True)
            await asyncio.sleep(120)

    asyncio.run(main())
    """
)


def test_last_will_offline_when_publisher_is_killed(mosquitto: Mosquitto) -> None:
    prefix = "t/will"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_PUBLISHER, str(mosquitto.port), prefix],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read() if proc.stderr else line

        async def scenario() -> list[dict[str, object]]:
            collector = Collector(mosquitto.host, mosquitto.port, prefix)
            task = asyncio.create_task(collector.run())
            online = await collector.wait_for(lambda m: m.topic == f"{prefix}/status")
            assert online.retain and json.loads(online.payload)["state"] == "online"
            proc.send_signal(signal.SIGKILL)  # no DISCONNECT: the broker must publish the will
            offline = await collector.wait_for(
                lambda m: m.topic == f"{prefix}/status" and json.loads(m.payload)["state"] == "offline", 10
            )
            task.cancel()
            # the will is retained: a later subscriber sees offline
            late = Collector(mosquitto.host, mosquitto.port, prefix)
            late_task = asyncio.create_task(late.run())
            retained = await late.wait_for(lambda m: m.topic == f"{prefix}/status")
            late_task.cancel()
            assert retained.retain
            return [json.loads(offline.payload), json.loads(retained.payload)]

        offline, retained = asyncio.run(scenario())
        assert offline["state"] == retained["state"] == "offline"
        assert offline["client_id"] == "killed-publisher" and offline["sources"] == ["cam"]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)  # reaps it and closes the pipes


def test_broker_down_at_start_never_raises() -> None:
    """No broker at all: frames are queued then dropped, labelled by the cause (unreachable), close() returns
    promptly."""
    from daemon.broker import free_port

    cfg = mqtt_config(free_port(), topic_prefix="t/down", qos=0, outbox_size=4, publish_timeout_s=0.3)

    async def scenario() -> MqttPublisher:
        async with MqttPublisher(cfg, ["cam"]) as pub:
            # publish once the first connect attempt has failed: drops before it cannot know the cause
            # (they would be outbox_full)
            for _ in range(200):
                if pub.connect_failures >= 1:
                    break
                await asyncio.sleep(0.01)
            for i in range(10):
                await pub.publish_frame("cam", make_frame(i, 8, 8), 0.0)
            assert not await pub.wait_connected(0.3)
        return pub

    t0 = time.monotonic()
    pub = asyncio.run(scenario())
    assert time.monotonic() - t0 < 5
    assert pub.offered == 20 and pub.published == 0
    assert pub.dropped_by_reason() == {"unreachable": 20}  # 16 pushed out of the outbox, 4 left at close
    assert pub.connect_failures >= 1
