"""Prometheus metrics of one daemon, in its own registry (never the process-global default).

Frame accounting per source (the invariant the tests check at the end of a run):
``frames_in == frames_out + frames_skipped + frames_dropped``. ``skipped`` = left out on purpose by the
overload policy; ``dropped`` = lost to a fault or a full buffer (ring, queue, MQTT outbox, shutdown), with
a ``reason`` label. Previews (the preview tier, docs/streaming.md) have their own counters:
``previews_in == previews_out + previews_dropped`` (a preview is not a frame: frames are counted once, by
their refined result).
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)


@dataclass
class SourceCounts:
    """Plain per-source counters mirrored from the Prometheus ones (for /healthz, logs and tests)."""

    frames_in: int = 0
    frames_out: int = 0
    skipped: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list, repr=False)  # last 10k end-to-end, seconds
    previews_in: int = 0
    previews_out: int = 0
    previews_dropped: dict[str, int] = field(default_factory=dict)
    preview_latencies: list[float] = field(default_factory=list, repr=False)
    window_fps: float | None = None  # effective source frame rate of the last window (pts)

    def previews_balanced(self) -> bool:
        return self.previews_in == self.previews_out + sum(self.previews_dropped.values())

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def balanced(self) -> bool:
        return self.frames_in == self.frames_out + self.skipped + self.dropped_total


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.frames_in = Counter("geometryd_frames_in", "Frames decoded from a source", ["source"],
                                 registry=r)
        self.frames_out = Counter("geometryd_frames_out", "Frames with a published result", ["source"],
                                  registry=r)
        self.frames_skipped = Counter("geometryd_frames_skipped", "Frames left out by the overload policy",
                                      ["source"], registry=r)
        self.frames_dropped = Counter("geometryd_frames_dropped",
                                      "Frames lost (full buffer, fault, shutdown)",
                                      ["source", "reason"], registry=r)
        self.windows = Counter("geometryd_windows", "Windows processed", ["source"], registry=r)
        self.stage_seconds = Histogram("geometryd_stage_seconds", "Stage latency per window",
                                       ["stage", "source"], buckets=_STAGE_BUCKETS, registry=r)
        self.frame_latency = Histogram("geometryd_frame_latency_seconds",
                                       "Ingest-to-publish latency per frame", ["source"],
                                       buckets=_STAGE_BUCKETS, registry=r)
        self.loop_lag = Histogram("geometryd_loop_lag_seconds", "Event-loop lag of the periodic tick",
                                  buckets=_LAG_BUCKETS, registry=r)
        self.source_up = Gauge("geometryd_source_up", "1 while the source delivers frames", ["source"],
                               registry=r)
        self.source_reconnects = Counter("geometryd_source_reconnects", "Source (RTSP) reopen attempts",
                                         ["source"], registry=r)
        self.source_errors = Counter("geometryd_source_errors", "Source errors", ["source", "kind"],
                                     registry=r)
        self.sidecar_restarts = Gauge("geometryd_sidecar_restarts", "Prior sidecar restarts", registry=r)
        self.geometry_restarts = Gauge("geometryd_geometry_restarts",
                                       "Geometry worker restarts (hung or crashed worker)", registry=r)
        self.mqtt_reconnects = Gauge("geometryd_mqtt_reconnects", "MQTT reconnects", registry=r)
        self.mqtt_published = Gauge("geometryd_mqtt_published", "MQTT messages published", registry=r)
        self.mqtt_dropped = Gauge("geometryd_mqtt_dropped", "MQTT messages dropped", registry=r)
        self.device_memory = Gauge("geometryd_device_memory_bytes",
                                   "Device memory in use (Jittor on CUDA) or process max RSS on CPU",
                                   ["kind"], registry=r)
        self.previews_out = Counter("geometryd_previews_out", "Preview-tier frames published", ["source"],
                                    registry=r)
        self.previews_dropped = Counter("geometryd_previews_dropped", "Preview-tier frames lost",
                                        ["source", "reason"], registry=r)
        self.preview_latency = Histogram("geometryd_preview_latency_seconds",
                                         "Ingest-to-publish latency per preview frame", ["source"],
                                         buckets=_STAGE_BUCKETS, registry=r)
        self.window_fps = Gauge("geometryd_window_fps",
                                "Effective source frame rate (pts) of the last window", ["source"],
                                registry=r)
        self.sink_frames = Counter("geometryd_sink_frames", "Frames written by a recording/live sink (mcap, "
                                   "foxglove)", ["sink", "source"], registry=r)
        self.sink_bytes = Counter("geometryd_sink_bytes", "Bytes written by a recording/live sink",
                                  ["sink", "source"], registry=r)
        self.sink_failed = Counter("geometryd_sink_failed", "Frames a recording/live sink failed to write",
                                   ["sink", "source"], registry=r)
        self.sink_files = Counter("geometryd_sink_files", "Files a recording sink opened (rotation)",
                                  ["sink", "source"], registry=r)
        self.foxglove_subscriptions = Gauge("geometryd_foxglove_subscriptions",
                                            "Channel subscriptions of live Foxglove clients", registry=r)
        self.counts: dict[str, SourceCounts] = {}

    def source(self, name: str) -> SourceCounts:
        return self.counts.setdefault(name, SourceCounts())

    def frame_in(self, source: str) -> None:
        self.source(source).frames_in += 1
        self.frames_in.labels(source).inc()

    def frame_out(self, source: str, latency_s: float | None = None) -> None:
        self.source(source).frames_out += 1
        self.frames_out.labels(source).inc()
        if latency_s is not None:
            self.frame_latency.labels(source).observe(latency_s)
            lat = self.source(source).latencies
            lat.append(latency_s)
            if len(lat) > 10_000:
                del lat[:5_000]

    def skip(self, source: str, n: int = 1) -> None:
        if n:
            self.source(source).skipped += n
            self.frames_skipped.labels(source).inc(n)

    def drop(self, source: str, reason: str, n: int = 1) -> None:
        if n:
            d = self.source(source).dropped
            d[reason] = d.get(reason, 0) + n
            self.frames_dropped.labels(source, reason).inc(n)

    def preview_in(self, source: str, n: int = 1) -> None:
        self.source(source).previews_in += n

    def preview_out(self, source: str, latency_s: float) -> None:
        c = self.source(source)
        c.previews_out += 1
        self.previews_out.labels(source).inc()
        self.preview_latency.labels(source).observe(latency_s)
        c.preview_latencies.append(latency_s)
        if len(c.preview_latencies) > 10_000:
            del c.preview_latencies[:5_000]

    def preview_drop(self, source: str, reason: str, n: int = 1) -> None:
        if n:
            d = self.source(source).previews_dropped
            d[reason] = d.get(reason, 0) + n
            self.previews_dropped.labels(source, reason).inc(n)

    def sink_wrote(self, sink: str, source: str, nbytes: int) -> None:
        self.sink_frames.labels(sink, source).inc()
        self.sink_bytes.labels(sink, source).inc(nbytes)

    def sink_fail(self, sink: str, source: str) -> None:
        self.sink_failed.labels(sink, source).inc()

    def set_window_fps(self, source: str, fps: float) -> None:
        self.source(source).window_fps = fps
        self.window_fps.labels(source).set(fps)

    def observe_stage(self, stage: str, source: str, seconds: float) -> None:
        self.stage_seconds.labels(stage, source).observe(seconds)

    def update_device_memory(self, jt: object | None = None) -> None:
        """RSS always; Jittor's CUDA allocator bytes when Jittor runs on CUDA."""
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        try:
            with open(f"/proc/{os.getpid()}/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
        self.device_memory.labels("rss").set(rss)
        if jt is not None and getattr(getattr(jt, "flags", None), "use_cuda", False):
            try:
                info = jt.get_mem_info() if hasattr(jt, "get_mem_info") else None
                used = getattr(info, "total_cuda_used", None) if info is not None else None
                if used is not None:
                    self.device_memory.labels("cuda").set(float(used))
            except Exception:  # jittor's memory API differs across builds; never fail a tick on it
                pass

    def render(self) -> bytes:
        return generate_latest(self.registry)
