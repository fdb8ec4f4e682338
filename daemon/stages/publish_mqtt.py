"""MQTT v5 publishing stage: per-frame depth/points, retained intrinsics and status (docs/mqtt.md).

One aiomqtt client per daemon, run by a background task with the documented aiomqtt reconnect loop
(exponential backoff with jitter, :class:`daemon.backoff.Backoff`). ``publish_frame`` encodes in a worker
thread and only enqueues: it never waits for the broker and never raises on broker loss. Data messages go
through a bounded outbox (``asyncio.Queue``, ``outbox_size``): when it is full the OLDEST message is dropped.
Retained messages (status, intrinsics) are coalesced per topic (latest wins) and re-sent after every
(re)connect, so a restarted broker without persistence gets them back.

Per-frame outcome: ``publish_frame(..., on_done=cb)`` calls ``cb(ok, reason)`` once all messages of the frame
are published or dropped (for the daemon's frame accounting); ``flush(timeout)`` waits until all is sent.

Accounting of data messages (depth, points), per source: ``offered == published + dropped + queued``; after
``__aexit__`` nothing is queued. Drop reasons: ``oversize`` (packet larger than the configured
``max_payload_bytes`` or the broker's announced Maximum Packet Size: refused, never sent), ``outbox_full``,
``timeout`` (no completion within ``publish_timeout_s``; the connection is then reset), ``disconnected`` (the
connection died under the message), ``shutdown`` (still queued when the publisher closed), and while the
broker is known to be down (the last connect attempt failed) the cause instead of the latter four:
``unreachable`` (no connection) or ``auth`` (the broker refused our credentials). ``problem`` tells
/healthz the same cause; connect failures are logged as a warning at most every ``WARN_INTERVAL_S``.
Pitfall (streaming-recipes.md): a broker with ``max_packet_size`` silently disconnects a client that sends a
larger packet and the publish never completes; hence the size check and the timeout on every publish.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import os
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from daemon.backoff import Backoff
from daemon.config import MqttConfig
from daemon.wire import encoding

log = logging.getLogger(__name__)

MQTT_MAX_PACKET = 268_435_455  # protocol limit (remaining length of a variable byte integer)
DROP_REASONS = ("oversize", "outbox_full", "timeout", "disconnected", "shutdown", "unreachable", "auth")
# While the broker is known to be down, a message lost to the outbox or to shutdown is labelled by the cause.
_DOWN_MASKED = ("outbox_full", "shutdown", "timeout", "disconnected")
_AUTH_CODES = {4, 5, 134, 135}  # CONNACK: v3.1.1 bad user/password, not authorised; v5 the same pair
WARN_INTERVAL_S = 30.0  # at most one connect-failure warning per this many seconds (the rest: debug)
AVAILABILITY = "status"  # <prefix>/status: daemon-wide availability, carries the last will


class FrameResultLike(Protocol):
    """What ``publish_frame`` reads from a ``daemon.pipeline.FrameResult`` (duck-typed, no Jittor import)."""

    frame_index: int
    window_id: int
    point_map: np.ndarray
    depth: np.ndarray
    mask: np.ndarray
    intrinsics: tuple[float, float, float, float]


class PublishError(RuntimeError):
    """Root of this stage's errors (raised only for misuse, never for broker loss)."""


@dataclass
class SourceStats:
    """Data-message counters of one source."""

    offered: int = 0
    published: int = 0
    dropped: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"offered": self.offered, "published": self.published, "dropped": dict(self.dropped)}


class _FrameOutcome:
    """The messages of one frame still unresolved, and the callback told once all are (first drop wins)."""

    def __init__(self, parts: int, callback: Callable[[bool, str], None]) -> None:
        self.parts = parts
        self.reason = ""
        self.callback = callback

    def part_done(self, reason: str | None) -> None:
        self.parts -= 1
        if reason and not self.reason:
            self.reason = reason
        if self.parts == 0:
            try:
                self.callback(not self.reason, self.reason)
            except Exception:  # a caller's bug must not stop the publisher
                log.exception("mqtt: frame outcome callback failed")


@dataclass
class _Message:
    topic: str
    payload: bytes
    properties: Any  # paho Properties
    qos: int
    retain: bool
    source: str
    kind: str
    packet_size: int
    outcome: _FrameOutcome | None = None


def _varint_len(n: int) -> int:
    size = 1
    while n >= 128:
        n //= 128
        size += 1
    return size


def publish_packet_size(topic: str, payload: bytes, properties: Any, qos: int) -> int:
    """Exact size of the MQTT v5 PUBLISH packet (what a broker's ``max_packet_size`` compares)."""
    props = properties.pack() if properties is not None else b"\x00"
    remaining = 2 + len(topic.encode()) + (2 if qos > 0 else 0) + len(props) + len(payload)
    return 1 + _varint_len(remaining) + remaining


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _finite(value: Any) -> Any:
    """NaN/inf -> None, recursively (JSON has no NaN; status dicts from the daemon may carry one)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_payload(obj: dict[str, Any]) -> bytes:
    try:
        text = json.dumps(obj, separators=(",", ":"), allow_nan=False, default=_json_default)
    except ValueError:
        text = json.dumps(_finite(json.loads(json.dumps(obj, default=_json_default))), separators=(",", ":"))
    return text.encode()


class MqttPublisher:
    """Async context manager publishing geometry results for ``sources`` (topics and payloads: docs/mqtt.md).

    ``metrics`` (optional, ``daemon.metrics.Metrics``-like): its ``mqtt_published``, ``mqtt_dropped`` and
    ``mqtt_reconnects`` gauges are kept equal to this publisher's counters.
    """

    def __init__(self, mqtt_cfg: MqttConfig, sources: list[str], metrics: Any = None) -> None:
        self.cfg = mqtt_cfg
        self.prefix = mqtt_cfg.topic_prefix.rstrip("/")
        self.client_id = mqtt_cfg.client_id or f"geometryd-{socket.gethostname()}-{os.getpid()}"
        self.metrics = metrics
        self.stats: dict[str, SourceStats] = {s: SourceStats() for s in sources}
        self.reconnects = 0  # successful connections after the first
        self.connect_failures = 0
        self._connections = 0
        self._broker_max_packet: int | None = None
        self._outbox: asyncio.Queue[_Message] | None = None
        self._retained: dict[str, _Message] = {}  # topic -> latest message (coalesced)
        self._retained_dirty: set[str] = set()
        self._last_intrinsics: dict[str, tuple[float, ...]] = {}
        self._wake: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        self._connected: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._warned_oversize: set[tuple[str, str]] = set()
        self.problem: tuple[str, str] | None = None  # (kind, detail) while the broker is known to be down
        self._last_warn = -math.inf
        self._unwarned = 0
        self._closed = False
        self._inflight = 0

    # --- counters -------------------------------------------------------------------------------------

    @property
    def published(self) -> int:
        return sum(s.published for s in self.stats.values())

    @property
    def dropped(self) -> int:
        return sum(sum(s.dropped.values()) for s in self.stats.values())

    @property
    def offered(self) -> int:
        return sum(s.offered for s in self.stats.values())

    @property
    def queued(self) -> int:
        return self._outbox.qsize() if self._outbox is not None else 0

    @property
    def connected(self) -> bool:
        return self._connected is not None and self._connected.is_set()

    @property
    def max_packet_size(self) -> int:
        """Effective limit: the configured ``max_payload_bytes`` and the broker's announced maximum."""
        limit = int(self.cfg.max_payload_bytes) or MQTT_MAX_PACKET
        if self._broker_max_packet:
            limit = min(limit, self._broker_max_packet)
        return limit

    def dropped_by_reason(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for s in self.stats.values():
            total.update(s.dropped)
        return dict(total)

    def snapshot(self) -> dict[str, Any]:
        """Counters for status messages, /healthz and logs."""
        return {
            "connected": self.connected,
            "published": self.published,
            "dropped": self.dropped_by_reason(),
            "queued": self.queued,
            "reconnects": self.reconnects,
            "sources": {name: s.as_dict() for name, s in self.stats.items()},
        }

    def _source(self, source: str) -> SourceStats:
        stats = self.stats.get(source)
        if stats is None:
            log.warning("mqtt: publishing for undeclared source %r", source)
            stats = self.stats[source] = SourceStats()
        return stats

    def _drop(self, msg: _Message, reason: str) -> None:
        if self.problem is not None and reason in _DOWN_MASKED and not self.connected:
            reason = self.problem[0]
        if msg.outcome is not None:
            msg.outcome.part_done(reason)
        dropped = self._source(msg.source).dropped
        dropped[reason] += 1
        # The first drop per source and reason is a warning, the rest debug (counters carry the totals).
        level = logging.WARNING if dropped[reason] == 1 and reason != "oversize" else logging.DEBUG
        log.log(level, "mqtt: dropped %s (%d bytes): %s", msg.topic, len(msg.payload), reason)
        self._sync_metrics()

    def _sync_metrics(self) -> None:
        m = self.metrics
        if m is None:
            return
        for attr, value in (("mqtt_published", self.published), ("mqtt_dropped", self.dropped),
                            ("mqtt_reconnects", self.reconnects)):
            gauge = getattr(m, attr, None)
            if gauge is not None:
                gauge.set(value)

    # --- lifecycle ------------------------------------------------------------------------------------

    async def __aenter__(self) -> MqttPublisher:
        self._outbox = asyncio.Queue(maxsize=int(self.cfg.outbox_size))
        self._wake, self._stop, self._connected = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self._closed = False
        self._set_retained(self._availability("online"))
        self._task = asyncio.create_task(self._run(), name="mqtt-publisher")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self, grace_s: float | None = None) -> None:
        """Mark every source and the daemon offline, drain the outbox for up to ``grace_s``, disconnect."""
        if self._task is None or self._stop is None or self._outbox is None:
            return
        self._closed = True
        grace = float(self.cfg.publish_timeout_s) if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        # frames first (queued and in flight), then the offline status, whose counts must include them
        while (not self._outbox.empty() or self._inflight) and self.connected and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for source in list(self.stats):
            self._set_retained(self._status_message(source, {"state": "offline"}))
        self._set_retained(self._availability("offline"))
        self._stop.set()
        self._wake_up()
        task, self._task = self._task, None
        try:
            await asyncio.wait_for(asyncio.shield(task), max(deadline - time.monotonic(), 1.0))
        except TimeoutError:
            log.warning("mqtt: the broker did not take the last messages in time; closing anyway")
        except Exception:  # the run loop never raises by design; keep close() total anyway
            log.exception("mqtt: publisher task failed")
        finally:
            if not task.done():  # timed out, or close() itself was cancelled
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        while not self._outbox.empty():
            self._drop(self._outbox.get_nowait(), "shutdown")
        log.info("mqtt: closed (%s)", self.snapshot())

    @property
    def idle(self) -> bool:
        """Connected with nothing queued, no retained update pending and no publish in flight."""
        return self.connected and self.queued == 0 and not self._retained_dirty and self._inflight == 0

    async def flush(self, timeout_s: float) -> bool:
        """Wait until everything offered so far is sent (``idle``); False after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not self.idle:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    async def wait_connected(self, timeout_s: float) -> bool:
        """True once connected (tests and startup logs); False after ``timeout_s``."""
        if self._connected is None:
            return False
        try:
            await asyncio.wait_for(self._connected.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    # --- public publishing API ------------------------------------------------------------------------

    async def publish_frame(
        self, source: str, result: FrameResultLike, pts: float,
        on_done: Callable[[bool, str], None] | None = None,
    ) -> None:
        """Encode one frame (in a worker thread) and enqueue its depth (+ points) messages.

        ``on_done(ok, reason)`` (optional) is called once, on the event loop, when every message of the frame
        is resolved: ``(True, "")`` if all were published, else ``(False, <first drop reason>)``.
        """
        if self._outbox is None:
            raise PublishError("MqttPublisher used outside 'async with'")
        messages = await asyncio.to_thread(self._encode_frame, source, result, pts)
        _attach_outcome(messages, on_done)
        for msg in messages:
            self._offer(msg)
        await self._maybe_publish_intrinsics(source, result)

    async def _maybe_publish_intrinsics(self, source: str, result: FrameResultLike) -> None:
        intr = tuple(float(x) for x in result.intrinsics)
        if self._last_intrinsics.get(source) != intr:
            self._last_intrinsics[source] = intr
            fx, fy, cx, cy = intr
            h, w = np.shape(result.depth)[:2]
            await self.publish_intrinsics(
                source,
                {"fx": fx, "fy": fy, "cx": cx, "cy": cy, "width": int(w), "height": int(h),
                 "frame_index": int(result.frame_index), "window_id": int(result.window_id)},
            )

    async def publish_preview(
        self, source: str, result: FrameResultLike, pts: float,
        on_done: Callable[[bool, str], None] | None = None, extra: dict[str, str] | None = None,
    ) -> None:
        """The preview tier: like ``publish_frame`` on ``<source>/preview/depth`` (+ ``/preview/points``) with
        ``tier=preview``; retained intrinsics are left to the refined tier."""
        if self._outbox is None:
            raise PublishError("MqttPublisher used outside 'async with'")
        messages = await asyncio.to_thread(self._encode_frame, source, result, pts, "preview", extra)
        _attach_outcome(messages, on_done)
        for msg in messages:
            self._offer(msg)

    async def publish_frames(
        self, source: str, results: list[FrameResultLike], pts: list[float],
        on_done: Callable[[FrameResultLike, bool, str], None] | None = None,
        extra: list[dict[str, str]] | None = None,
    ) -> None:
        """``publish_frame`` for a batch (e.g. the final frames of one window): frames are encoded in parallel
        worker threads (zlib and numpy release the GIL) and enqueued in order. A batch of more than
        ``outbox_size`` messages overflows the outbox (oldest dropped, counted).
        ``on_done(result, ok, reason)`` as in ``publish_frame``."""
        if self._outbox is None:
            raise PublishError("MqttPublisher used outside 'async with'")
        if len(results) != len(pts):
            raise PublishError(f"{len(results)} results but {len(pts)} pts")
        limit = asyncio.Semaphore(max(1, min(8, (os.cpu_count() or 2) - 1)))

        async def encode(result: FrameResultLike, t: float, more: dict[str, str] | None) -> list[_Message]:
            async with limit:
                return await asyncio.to_thread(self._encode_frame, source, result, t, "refined", more)

        extras = extra if extra is not None else [None] * len(results)
        encoded = await asyncio.gather(*(encode(r, t, x) for r, t, x in zip(results, pts, extras)))
        for result, messages in zip(results, encoded):
            if on_done is not None:
                _attach_outcome(messages, functools.partial(on_done, result))
            for msg in messages:
                self._offer(msg)
            await self._maybe_publish_intrinsics(source, result)

    async def publish_status(self, source: str, status: dict[str, Any]) -> None:
        """Retained ``<prefix>/<source>/status`` JSON (state defaults to online; counters are added)."""
        self._set_retained(self._status_message(source, status))

    async def publish_intrinsics(self, source: str, intrinsics: dict[str, Any]) -> None:
        """Retained ``<prefix>/<source>/intrinsics`` JSON."""
        body = {"schema": encoding.SCHEMA_VERSION, "source": source, **intrinsics}
        self._set_retained(self._json_message(source, "intrinsics", body))

    # --- message building -----------------------------------------------------------------------------

    def topic(self, source: str, kind: str) -> str:
        return f"{self.prefix}/{source}/{kind}"

    def _encode_frame(self, source: str, result: FrameResultLike, pts: float, tier: str = "refined",
                      extra: dict[str, str] | None = None) -> list[_Message]:
        cfg = self.cfg
        parts = "depth,points" if cfg.publish_points else "depth"
        created = repr(time.time())
        intr = ",".join(repr(float(x)) for x in result.intrinsics)
        out = []
        kinds = ["depth", "points"] if cfg.publish_points else ["depth"]
        for kind in kinds:
            if kind == "depth":
                payload, props = encoding.encode_depth(result.depth, result.mask, cfg.depth_encoding)
                content_type = encoding.CONTENT_TYPES[cfg.depth_encoding]
            else:
                payload, props = encoding.encode_points(
                    result.point_map, result.mask, int(cfg.points_stride), cfg.points_encoding
                )
                content_type = encoding.CONTENT_TYPES[cfg.points_encoding]
            user = encoding.frame_properties(source, result.frame_index, pts, result.window_id, kind)
            user.update(props)
            user.update(frame_parts=parts, intrinsics=intr, created_at=created, tier=tier,
                        prior_scale=repr(float(getattr(result, "prior_scale", 1.0))),
                        units=str(getattr(result, "units", "relative")),
                        metric_scale=repr(float(getattr(result, "metric_scale", 1.0))))
            user.update(extra or {})
            topic_kind = f"preview/{kind}" if tier == "preview" else kind
            out.append(self._message(source, topic_kind, payload, user, content_type, int(cfg.qos),
                                     retain=False))
        return out

    def _message(
        self, source: str, kind: str, payload: bytes, user: dict[str, str], content_type: str, qos: int,
        *, retain: bool,
    ) -> _Message:
        topic = self.topic(source, kind) if source else f"{self.prefix}/{kind}"
        is_json = content_type == "application/json"
        props = encoding.to_mqtt_properties(user, content_type, utf8_payload=is_json)
        size = publish_packet_size(topic, payload, props, qos)
        return _Message(topic, payload, props, qos, retain, source, kind, size)

    def _json_message(self, source: str, kind: str, body: dict[str, Any]) -> _Message:
        user = {"schema": str(encoding.SCHEMA_VERSION), "kind": kind, "source": source}
        return self._message(source, kind, _json_payload(body), user, "application/json", 1, retain=True)

    def _status_message(self, source: str, status: dict[str, Any]) -> _Message:
        body: dict[str, Any] = {"schema": encoding.SCHEMA_VERSION, "source": source, "state": "online"}
        body.update(status)
        stats = self.stats.get(source)
        body["mqtt"] = stats.as_dict() if stats is not None else {}
        body["time"] = time.time()
        return self._json_message(source, "status", body)

    def _availability_body(self, state: str) -> dict[str, Any]:
        return {"schema": encoding.SCHEMA_VERSION, "state": state, "client_id": self.client_id,
                "sources": sorted(self.stats)}

    def _availability(self, state: str) -> _Message:
        body = self._availability_body(state)
        body["time"] = time.time()
        return self._json_message("", AVAILABILITY, body)

    # --- queueing ---------------------------------------------------------------------------------------

    def _wake_up(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _offer(self, msg: _Message) -> None:
        assert self._outbox is not None
        self._source(msg.source).offered += 1
        if self._closed:
            self._drop(msg, "shutdown")
            return
        if self._refuse_oversize(msg):
            return
        if self._outbox.full():
            self._drop(self._outbox.get_nowait(), "outbox_full")
        self._outbox.put_nowait(msg)
        self._wake_up()

    def _refuse_oversize(self, msg: _Message) -> bool:
        limit = self.max_packet_size
        if msg.packet_size <= limit:
            return False
        key = (msg.source, msg.kind)
        if key not in self._warned_oversize:
            self._warned_oversize.add(key)
            log.warning(
                "mqtt: %s packet of %d bytes exceeds the limit of %d bytes (max_payload_bytes=%d, "
                "broker=%s): dropped; lower the resolution, use points_stride or raise the broker's "
                "max_packet_size",
                msg.topic, msg.packet_size, limit, self.cfg.max_payload_bytes, self._broker_max_packet,
            )
        self._drop(msg, "oversize")
        return True

    def _set_retained(self, msg: _Message) -> None:
        if msg.packet_size > self.max_packet_size:
            log.warning("mqtt: retained %s of %d bytes exceeds the packet limit: not sent", msg.topic,
                        msg.packet_size)
            return
        self._retained[msg.topic] = msg
        self._retained_dirty.add(msg.topic)
        self._wake_up()

    # --- connection loop --------------------------------------------------------------------------------

    def _make_client(self) -> Any:
        import aiomqtt

        cfg = self.cfg
        will_props = encoding.to_mqtt_properties(
            {"schema": str(encoding.SCHEMA_VERSION), "kind": AVAILABILITY, "source": ""},
            "application/json", utf8_payload=True,
        )
        will = aiomqtt.Will(
            f"{self.prefix}/{AVAILABILITY}", _json_payload(self._availability_body("offline")), qos=1,
            retain=True, properties=will_props,
        )
        tls_context = None
        if cfg.tls:
            tls_context = ssl.create_default_context(cafile=cfg.ca_file or None)
        client = aiomqtt.Client(
            cfg.host,
            int(cfg.port),
            username=cfg.username or None,
            password=cfg.password or None,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=will,
            keepalive=int(cfg.keepalive_s),
            timeout=float(cfg.publish_timeout_s),  # connect/disconnect; publishes have their own below
            tls_context=tls_context,
            logger=logging.getLogger(f"{__name__}.aiomqtt"),
        )
        # aiomqtt ignores CONNACK properties; the broker's Maximum Packet Size is the limit that matters.
        # PATCH(aiomqtt==2.5.1): its private paho client, to chain on_connect and read CONNACK properties
        paho_client = client._client
        on_connect: Callable[..., None] | None = paho_client.on_connect

        def capture_connack(c: Any, userdata: Any, flags: Any, reason: Any, properties: Any = None) -> None:
            self._broker_max_packet = getattr(properties, "MaximumPacketSize", None) if properties else None
            if on_connect is not None:
                on_connect(c, userdata, flags, reason, properties)

        paho_client.on_connect = capture_connack
        return client

    async def _run(self) -> None:
        import aiomqtt

        assert self._stop is not None and self._connected is not None
        backoff = Backoff(self.cfg.reconnect_initial_s, self.cfg.reconnect_max_s)
        where = f"{self.cfg.host}:{self.cfg.port}"
        while not self._stop.is_set():
            client = None
            try:
                client = self._make_client()
                async with client:
                    self._connections += 1
                    if self._connections > 1:
                        self.reconnects += 1
                        self._sync_metrics()
                    self._connected.set()
                    self.problem = None
                    self._last_warn, self._unwarned = -math.inf, 0
                    log.info("mqtt: connected to %s as %s (broker max packet %s)", where, self.client_id,
                             self._broker_max_packet)
                    backoff.reset()
                    self._retained_dirty.update(self._retained)  # the broker may have lost them
                    await self._serve(client)
                    return  # stop requested and everything sent: leave (graceful DISCONNECT)
            except aiomqtt.MqttError as exc:
                if self._connected.is_set():
                    log.warning("mqtt: connection to %s lost: %s", where, exc)
                else:
                    self.connect_failures += 1
                    self._connect_failed(where, exc)
            except (_Reconnect, _Timeout, _Disconnected) as exc:
                log.warning("mqtt: resetting the connection to %s: %s", where, exc)
            except Exception as exc:  # e.g. a bad TLS setup: keep retrying, never let the stage die silently
                self.connect_failures += 1
                if not self._connected.is_set():
                    self.problem = ("unreachable", f"cannot connect to {where}: {type(exc).__name__}: {exc}")
                log.log(logging.ERROR if self.connect_failures == 1 else logging.DEBUG,
                        "mqtt: unexpected error with %s (retrying with backoff)", where, exc_info=True)
            finally:
                self._connected.clear()
                if client is not None:
                    _force_close(client)
            if self._stop.is_set():
                return
            try:
                await asyncio.wait_for(self._stop.wait(), backoff.next())
            except TimeoutError:
                pass

    def _connect_failed(self, where: str, exc: Exception) -> None:
        """Remember why the broker is down (for /healthz and drop labels); warn at a bounded rate."""
        rc = getattr(exc, "rc", None)
        code = getattr(rc, "value", rc)
        if isinstance(code, int) and code in _AUTH_CODES:
            kind, detail = "auth", f"{where} refused the credentials of user {self.cfg.username!r}: {exc}"
        else:
            kind, detail = "unreachable", f"cannot connect to {where}: {exc}"
        changed = self.problem is None or self.problem[0] != kind
        self.problem = (kind, detail)
        now = time.monotonic()
        if changed or now - self._last_warn >= WARN_INTERVAL_S:
            more = f" ({self._unwarned} more failures since the last warning)" if self._unwarned else ""
            log.warning("mqtt: %s; retrying with backoff%s", detail, more)
            self._last_warn, self._unwarned = now, 0
        else:
            self._unwarned += 1
            log.debug("mqtt: %s (retrying with backoff)", detail)

    async def _serve(self, client: Any) -> None:
        """Send retained updates first, then the outbox, until stopped with nothing left to send."""
        import aiomqtt

        assert self._outbox is not None and self._wake is not None and self._stop is not None
        # PATCH(aiomqtt==2.5.1): the private future aiomqtt resolves when the connection drops
        disconnected: asyncio.Future[None] = client._disconnected
        while True:
            while self._retained_dirty:
                topic = self._retained_dirty.pop()
                try:
                    await self._send(client, self._retained[topic], disconnected)
                except BaseException:
                    self._retained_dirty.add(topic)  # resend after reconnect
                    raise
            if not self._outbox.empty():
                msg = self._outbox.get_nowait()
                if self._refuse_oversize(msg):  # the broker's limit may be known only now
                    continue
                try:
                    await self._send(client, msg, disconnected)
                except asyncio.CancelledError:
                    self._drop(msg, "shutdown")  # close() gave up waiting: still counted
                    raise
                except _Timeout as exc:
                    self._drop(msg, "timeout")
                    raise _Reconnect(str(exc)) from None
                except (_Disconnected, aiomqtt.MqttError) as exc:
                    self._drop(msg, "disconnected")
                    raise _Reconnect(f"publish failed: {exc}") from None
                self._source(msg.source).published += 1
                self._sync_metrics()
                if msg.outcome is not None:
                    msg.outcome.part_done(None)
                continue
            if self._stop.is_set():
                return
            self._wake.clear()
            wake = asyncio.ensure_future(self._wake.wait())
            try:
                waiting: set[asyncio.Future[Any]] = {wake, disconnected}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            finally:
                wake.cancel()
            if disconnected.done():
                raise _Reconnect(f"broker connection lost ({_exception_text(disconnected)})")

    async def _send(self, client: Any, msg: _Message, disconnected: asyncio.Future[None]) -> None:
        """One publish with a timeout; fails fast when the connection drops meanwhile."""

        async def publish_or_disconnect() -> None:
            pub = asyncio.ensure_future(
                client.publish(msg.topic, msg.payload, msg.qos, msg.retain, msg.properties, timeout=math.inf)
            )
            try:
                await asyncio.wait({pub, disconnected}, return_when=asyncio.FIRST_COMPLETED)
                if pub.done():
                    pub.result()
                    return
                raise _Disconnected(_exception_text(disconnected))
            finally:
                pub.cancel()

        timeout = float(self.cfg.publish_timeout_s)
        self._inflight += 1
        try:
            await asyncio.wait_for(publish_or_disconnect(), timeout)
        except TimeoutError:
            raise _Timeout(
                f"publish to {msg.topic} ({msg.packet_size} bytes) timed out after {timeout}s"
            ) from None
        finally:
            self._inflight -= 1


class _Reconnect(Exception):
    """Internal: leave the client context and reconnect."""


class _Timeout(Exception):
    pass


class _Disconnected(Exception):
    pass


def _attach_outcome(messages: list[_Message], on_done: Callable[[bool, str], None] | None) -> None:
    if on_done is None:
        return
    if not messages:
        on_done(True, "")
        return
    outcome = _FrameOutcome(len(messages), on_done)
    for msg in messages:
        msg.outcome = outcome


def _force_close(client: Any) -> None:
    """Close the socket of a client whose graceful exit failed (aiomqtt then leaves it open)."""
    paho_client = getattr(client, "_client", None)
    if paho_client is None or paho_client.socket() is None:
        return
    try:
        # PATCH(paho-mqtt==2.2.0): private socket close; aiomqtt leaves it open after a failed exit
        paho_client._sock_close()
    except Exception:  # best effort on an already broken connection
        log.debug("mqtt: closing a stale socket failed", exc_info=True)


def _exception_text(fut: asyncio.Future[None]) -> str:
    if not fut.done() or fut.cancelled():
        return "disconnected"
    exc = fut.exception()  # also marks it retrieved
    return str(exc) if exc is not None else "disconnected"
