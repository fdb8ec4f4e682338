"""Typed config sections reach the stages (issue #13, "defaults live in the schema only"): the geometry
worker, the prior sidecar, the RTSP ingest, the HTTP server, the MQTT and file publishers receive their
``daemon.config`` section instead of copies of its fields with defaults of their own."""

from __future__ import annotations

from pathlib import Path

from daemon import http_guard
from daemon.config import Config, parse_config
from daemon.http import HttpServer
from daemon.metrics import Metrics
from daemon.stages import geometry, prior
from daemon.stages.geometry import GeometryWorker, ProcessorSpec
from daemon.stages.ingest_rtsp import RtspIngest
from daemon.stages.prior import PriorSidecar

TABLES = {
    "geometry": {"heartbeat_s": 7.0, "window_deadline_s": 42.0, "restart_budget": 2, "steps": 3,
                 "low_memory": True},
    "streaming": {"stats": "frozen", "cut_threshold": 0.9},
    "prior": {"restart_budget": 3, "request_timeout_s": 12.0, "device": "cpu"},
    "http": {"header_timeout_s": 3.0, "idle_timeout_s": 4.0, "max_connections": 5},
    "logging": {"level": "debug"},
    "sources": {"cam": {"type": "rtsp", "url": "rtsp://u:p@127.0.0.1:8554/x", "open_timeout_s": 4.0,
                        "stall_timeout_s": 6.0, "reconnect_initial_s": 0.25, "reconnect_max_s": 8.0}},
}


def _cfg(tmp_path: Path) -> Config:
    return parse_config(TABLES, tmp_path)


def test_the_geometry_worker_reads_its_sections(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    spec = ProcessorSpec.from_config(cfg)
    assert (spec.kind, spec.model, spec.geometry, spec.streaming, spec.logging) == (
        "pipeline", cfg.model, cfg.geometry, cfg.streaming, cfg.logging)
    worker = GeometryWorker(spec)
    assert worker.policy is cfg.geometry and worker.deadline_s == 42.0
    identity = ProcessorSpec.from_config(cfg, identity_delay_s=0.5)
    assert identity.kind == "identity" and identity.identity_delay_s == 0.5


def test_sidecar_rtsp_and_http_read_their_sections(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    sc = PriorSidecar(cfg.prior, tmp_path / "model.pt")
    assert sc.cfg is cfg.prior
    src = cfg.sources["cam"]
    rtsp = RtspIngest("cam", src, 64, 128)
    assert (rtsp.url, rtsp.open_timeout_s, rtsp.stall_timeout_s) == (src.url, 4.0, 6.0)
    assert (rtsp.backoff.initial_s, rtsp.backoff.maximum_s) == (0.25, 8.0)
    server = HttpServer("127.0.0.1", 0, Metrics().render, lambda: {"ok": True}, limits=cfg.http)
    assert server.limits is cfg.http


def test_no_layer_keeps_a_copy_of_the_defaults() -> None:
    # the copies this issue removed: each restated a config table's fields and defaults
    assert not hasattr(geometry, "WorkerPolicy") and not hasattr(geometry, "SessionParams")
    assert not hasattr(prior, "PriorSettings")
    assert not hasattr(http_guard, "ConnectionLimits")
