"""Shared pieces of the MQTT tests: frames, configs, a raw collector of every message under a prefix."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import numpy as np

from daemon.config import MqttConfig
from daemon.frames import FrameResult


def make_frame(index: int, h: int = 24, w: int = 32, window_id: int = 0, seed: int = 0) -> FrameResult:
    rng = np.random.default_rng(seed + index)
    yy, xx = np.mgrid[0:h, 0:w]
    depth = (1.0 + 0.3 * np.sin(xx / 5.0 + index) + yy / h).astype(np.float32)
    gx = (xx / (w - 1) - 0.5) * 2
    gy = (yy / (h - 1) - 0.5) * 2
    points = np.stack([0.8 * gx * depth, 0.6 * gy * depth, depth], -1).astype(np.float32)
    mask = rng.random((h, w)) > 0.1
    return FrameResult(index, window_id, points, depth, mask, (0.8, 0.6, 0.0, 0.0))


def noisy_frame(index: int, h: int, w: int) -> FrameResult:
    """A frame whose payloads barely compress (for size limits)."""
    rng = np.random.default_rng(index)
    depth = (0.5 + rng.random((h, w))).astype(np.float32)
    points = rng.standard_normal((h, w, 3)).astype(np.float32)
    return FrameResult(index, 0, points, depth, np.ones((h, w), bool), (1.0, 1.0, 0.0, 0.0))


def mqtt_config(port: int, **overrides: Any) -> MqttConfig:
    base: dict[str, Any] = dict(
        host="127.0.0.1", port=port, qos=1, publish_timeout_s=2.0, outbox_size=64, keepalive_s=5,
        reconnect_initial_s=0.05, reconnect_max_s=0.2,
    )
    base.update(overrides)
    return MqttConfig(**base)


@dataclass
class Collected:
    topic: str
    payload: bytes
    retain: bool
    user: dict[str, str]
    content_type: str | None


@dataclass
class Collector:
    """Subscribes to ``<prefix>/#`` and records every message (retained ones included)."""

    host: str
    port: int
    prefix: str
    messages: list[Collected] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        from daemon.wire.encoding import from_mqtt_properties
        from daemon.wire.subscribe import install_fast_properties_unpack

        install_fast_properties_unpack()

        async with aiomqtt.Client(self.host, self.port, protocol=aiomqtt.ProtocolVersion.V5) as client:
            await client.subscribe(f"{self.prefix}/#", qos=1)
            self.ready.set()
            async for m in client.messages:
                props = m.properties
                self.messages.append(Collected(
                    str(m.topic), bytes(m.payload), bool(m.retain), from_mqtt_properties(props),
                    getattr(props, "ContentType", None),
                ))
                self.arrived.set()

    async def wait_for(self, predicate: Any, timeout_s: float = 5.0) -> Collected:
        async with asyncio.timeout(timeout_s):
            while True:
                for m in self.messages:
                    if predicate(m):
                        return m
                self.arrived.clear()
                await self.arrived.wait()
