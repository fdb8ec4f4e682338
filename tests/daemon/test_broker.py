"""The broker launcher (daemon/broker.py) and its fixture: serves MQTT v5, restarts on the same port, honours
max_packet_size."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiomqtt

from daemon.broker import Mosquitto, free_port, start_broker
from helpers.mosquitto import mosquitto  # noqa: F401 (fixture)


async def _roundtrip(broker: Mosquitto, payload: bytes) -> bytes:
    async with aiomqtt.Client(
        broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5, identifier="fixture-rt"
    ) as client:
        await client.subscribe("fixture/t", qos=1)
        await client.publish("fixture/t", payload, qos=1)
        async with asyncio.timeout(5):
            async for message in client.messages:
                return bytes(message.payload)
    raise AssertionError("no message")


def test_broker_roundtrip_and_restart_same_port(mosquitto: Mosquitto) -> None:
    assert asyncio.run(_roundtrip(mosquitto, b"hello")) == b"hello"
    port = mosquitto.port
    mosquitto.stop()
    assert not mosquitto.running
    mosquitto.start()
    assert mosquitto.port == port
    assert asyncio.run(_roundtrip(mosquitto, b"again")) == b"again"


def test_max_packet_size_disconnects_oversize(tmp_path: Path) -> None:
    async def scenario(broker: Mosquitto) -> None:
        async with aiomqtt.Client(
            broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5, identifier="fixture-big"
        ) as client:
            await client.subscribe("fixture/big", qos=1)
            await client.publish("fixture/big", b"x" * 100, qos=1)  # fits
            async with asyncio.timeout(5):
                async for message in client.messages:
                    assert bytes(message.payload) == b"x" * 100
                    break
            # The broker drops the connection for an oversize packet: the QoS 1 publish never completes.
            try:
                await asyncio.wait_for(client.publish("fixture/big", b"x" * 10_000, qos=1), 2.0)
            except (TimeoutError, aiomqtt.MqttError):
                return
            raise AssertionError("oversize publish completed despite max_packet_size")

    with Mosquitto(tmp_path, max_packet_size=2048) as broker:
        asyncio.run(scenario(broker))



def test_free_port_is_bindable_and_start_broker_falls_back(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free right now
    broker = start_broker(tmp_path / "ok")
    assert broker is not None and broker.running
    broker.stop()
    assert not broker.running
    # a broker that exits at once (here: an executable that is not mosquitto) means "no broker", not a crash
    assert start_broker(tmp_path / "bad", executable="/bin/false") is None
