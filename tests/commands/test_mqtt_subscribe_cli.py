"""``geometryd subscribe`` as a user runs it: a separate process printing one line per decoded frame."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from daemon.broker import Mosquitto
from daemon.stages.publish_mqtt import MqttPublisher
from helpers.mosquitto import mosquitto  # noqa: F401 (fixture)
from helpers.mqtt import make_frame, mqtt_config

REPO = Path(__file__).resolve().parents[2]


def test_subscribe_cli_prints_json_lines_and_saves_frames(mosquitto: Mosquitto, tmp_path: Path) -> None:
    prefix = "t/cli"
    out_dir = tmp_path / "frames"
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "subscribe", "--port", str(mosquitto.port), "--prefix", prefix,
         "--source", "cam", "--count", "2", "--json", "--timeout", "30", "--out", str(out_dir)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    cfg = mqtt_config(mosquitto.port, topic_prefix=prefix)

    async def publish_until_exit() -> None:
        # The CLI subscribes after its imports; publish until it has seen its 2 frames and exits.
        async with MqttPublisher(cfg, ["cam"]) as pub:
            index = 0
            while proc.poll() is None and index < 300:
                await pub.publish_frame("cam", make_frame(index), index / 30)
                index += 1
                await asyncio.sleep(0.1)

    asyncio.run(publish_until_exit())
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    lines = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    assert len(lines) == 2
    first, second = lines
    assert second["frame_index"] == first["frame_index"] + 1
    assert first["source"] == "cam" and first["depth_shape"] == [24, 32]
    assert first["points_shape"] == [24, 32, 3]
    frame = make_frame(first["frame_index"])
    valid = frame.depth[frame.mask]
    assert abs(first["depth_median"] - float(np.median(valid))) < 1e-3 * float(np.median(valid))
    assert first["valid_fraction"] == round(float(frame.mask.mean()), 4) and "latency_ms" in first
    saved = np.load(first["file"])
    np.testing.assert_array_equal(saved["depth_valid"], frame.mask)
    np.testing.assert_array_equal(saved["points"], frame.point_map.astype(np.float16).astype(np.float32))


def test_subscribe_cli_reports_unreachable_broker() -> None:
    from daemon.broker import free_port

    out = subprocess.run(
        [sys.executable, "-m", "daemon", "subscribe", "--port", str(free_port()), "--count", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 1
    assert "MQTT error" in out.stdout and "Connection refused" in out.stdout


def test_fast_properties_unpack_is_equivalent() -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from daemon.wire import encoding as enc
    from daemon.wire.subscribe import install_fast_properties_unpack

    user = {**enc.frame_properties("cam", 7, 0.25, 1, "points"), "shape": "4,5,3", "stride": "2"}
    packed = enc.to_mqtt_properties(user, "application/octet-stream").pack()
    packet = packed + bytes(range(256)) * 64  # properties followed by a payload, as paho passes them
    paho_unpack = getattr(Properties.unpack, "_geometryd_original", Properties.unpack)
    before = Properties(PacketTypes.PUBLISH)
    _, used_before = paho_unpack(before, packet)
    install_fast_properties_unpack()
    install_fast_properties_unpack()  # idempotent
    after = Properties(PacketTypes.PUBLISH)
    _, used_after = after.unpack(packet)
    assert getattr(Properties.unpack, "_geometryd_fast", False)
    assert used_after == used_before == len(packed)
    assert after.UserProperty == before.UserProperty and enc.from_mqtt_properties(after) == user
    assert after.ContentType == before.ContentType == "application/octet-stream"
