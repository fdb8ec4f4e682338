"""Health honest about MQTT (issue #18), against a real mosquitto: a broker that refuses our credentials or
is not there at all is reported (``problem`` -> /healthz ``degraded``), warned about at a bounded rate, and
every lost frame is labelled by that cause, not ``shutdown``."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from daemon.broker import Mosquitto, free_port
from daemon.stages.publish_mqtt import MqttPublisher
from helpers.mqtt import make_frame, mqtt_config


def _offer_and_close(cfg, seconds: float) -> tuple[MqttPublisher, list[str], list[tuple[str, str] | None]]:
    reasons: list[str] = []
    problems: list[tuple[str, str] | None] = []

    async def main() -> MqttPublisher:
        async with MqttPublisher(cfg, ["cam"]) as pub:
            for i in range(6):
                await pub.publish_frame("cam", make_frame(i, 8, 8), i / 30,
                                        on_done=lambda ok, why: reasons.append("" if ok else why))
            await asyncio.sleep(seconds)  # many reconnect attempts (backoff 0.05..0.2 s)
            problems.append(pub.problem)
            assert not pub.connected
        return pub

    return asyncio.run(main()), reasons, problems


def test_wrong_password_is_an_auth_problem(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with Mosquitto(tmp_path, users={"geo": "right"}) as broker:
        cfg = mqtt_config(broker.port, username="geo", password="wrong-pw", outbox_size=4, publish_points=False)
        with caplog.at_level(logging.DEBUG, logger="daemon.stages.publish_mqtt"):
            pub, reasons, problems = _offer_and_close(cfg, 2.0)
    kind, detail = problems[0]
    assert kind == "auth" and "geo" in detail and "wrong-pw" not in detail, problems
    assert reasons == ["auth"] * 6  # 2 lost to the full outbox, 4 at close: both because of the broker
    assert pub.snapshot()["dropped"] == {"auth": 6}
    assert pub.connect_failures >= 5
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "credentials" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # bounded rate, not one per attempt


def test_absent_broker_is_unreachable() -> None:
    cfg = mqtt_config(free_port(), outbox_size=4, publish_points=False)
    pub, reasons, problems = _offer_and_close(cfg, 1.0)
    assert problems[0] is not None and problems[0][0] == "unreachable", problems
    assert reasons == ["unreachable"] * 6
    assert pub.snapshot()["dropped"] == {"unreachable": 6}


def test_problem_clears_when_the_broker_comes(tmp_path: Path) -> None:
    port = free_port()
    cfg = mqtt_config(port, publish_points=False)

    async def main() -> None:
        async with MqttPublisher(cfg, ["cam"]) as pub:
            for _ in range(100):
                if pub.problem is not None:
                    break
                await asyncio.sleep(0.05)
            assert pub.problem is not None and pub.problem[0] == "unreachable"
            broker = Mosquitto(tmp_path, port=port)
            await asyncio.to_thread(broker.start)
            try:
                assert await pub.wait_connected(10)
                assert pub.problem is None
            finally:
                await asyncio.to_thread(broker.stop)

    asyncio.run(main())
