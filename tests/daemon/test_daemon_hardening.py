"""`geometryd run` as a real subprocess against an unlucky world (issue #18): a broker that refuses our
credentials or is absent, a sidecar that dies with no restart budget left, a live source stopped by
SIGTERM, a stale sidecar folder from a SIGKILLed predecessor."""

from __future__ import annotations

import os
import signal
import time
from datetime import datetime
from pathlib import Path

import pytest

from daemon.broker import Mosquitto, free_port
from daemon.stages.publish_mqtt import WARN_INTERVAL_S
from helpers import procs
from helpers.clips import make_clip
from helpers.run_daemon import (  # noqa: F401 (fixture)
    DaemonProcess,
    assert_balanced,
    base_sections,
    daemon_procs,
    tiny_model,
    write_config,
)

pytestmark = pytest.mark.e2e

START_TIMEOUT = 600  # first run compiles Jittor kernels


def _wait_ready(d: DaemonProcess) -> None:
    assert d.wait_log("ready sources=", START_TIMEOUT), d.log_text()[-4000:]


@pytest.mark.parametrize("case", ["auth", "unreachable"])
def test_mqtt_problem_degrades_health_labels_drops_and_fails_the_run(
        case: str, tiny_model: Path, tmp_path: Path, daemon_procs: list) -> None:
    clip = make_clip(tmp_path / "clip.mp4", 60)
    http_port = free_port()
    tmp = tmp_path / "tmp"
    stale = tmp / "geometryd-prior-999999999-x1y2z3"  # a SIGKILLed daemon's sidecar folder (pid is dead)
    stale.mkdir(parents=True)
    (stale / "moge.sock").write_bytes(b"")
    broker = Mosquitto(tmp_path / "mq", users={"geo": "right-pw"}) if case == "auth" else None
    if broker is not None:
        broker.start()
    try:
        mqtt = {"username": "geo", "password": "wrong-pw"} if case == "auth" else {}
        sections = base_sections(tiny_model, mqtt_port=broker.port if broker else free_port(),
                                 http_port=http_port, mqtt=mqtt)
        cfg = write_config(tmp_path / "cfg.toml", sections,
                           {"cam": {"type": "file", "path": str(clip), "realtime": True}})
        d = DaemonProcess(cfg, tmp_path, env={"TMPDIR": str(tmp)})
        daemon_procs.append(d)
        _wait_ready(d)
        seen: dict = {}
        end = time.monotonic() + 60
        while time.monotonic() < end and d.proc.poll() is None:
            h = procs.health(http_port)
            if h.get("degraded"):
                seen = h
                break
            time.sleep(0.1)
        rc = d.wait(START_TIMEOUT)
    finally:
        if broker is not None:
            broker.stop()
    log = d.log_text()
    assert seen.get("ok") is False and seen["state"] == "ready", (seen, log[-3000:])
    assert any(r.startswith(f"mqtt_{case}: ") for r in seen["degraded"]), seen
    assert rc == 1, log[-3000:]  # every frame dropped: not a success
    s = assert_balanced(d.summary(), "cam")
    assert s["frames_in"] == 60 and s["frames_out"] == 0
    assert set(s["dropped"]) == {f"mqtt_{case}"}, s["dropped"]
    assert "wrong-pw" not in log
    warnings = [ln for ln in log.splitlines() if "WARNING" in ln and "daemon.stages.publish_mqtt" in ln
                and ("credentials" in ln or "cannot connect" in ln)]
    assert warnings, log[-3000:]
    stamps = [datetime.strptime(ln.split()[0], "%Y-%m-%dT%H:%M:%S.%fZ") for ln in warnings]
    gaps = [(b - a).total_seconds() for a, b in zip(stamps, stamps[1:])]
    assert all(g >= WARN_INTERVAL_S - 1 for g in gaps), gaps  # bounded rate, not one per attempt
    assert not stale.exists() and "removed stale prior sidecar folders" in log


def test_exhausted_sidecar_budget_fails_the_file_source(tiny_model: Path, tmp_path: Path,
                                                         daemon_procs: list) -> None:
    clip = make_clip(tmp_path / "clip.mp4", 90)
    sections = base_sections(tiny_model, prior={"restart_budget": 0})
    cfg = write_config(tmp_path / "cfg.toml", sections,
                       {"cam": {"type": "file", "path": str(clip), "realtime": True}})
    d = DaemonProcess(cfg, tmp_path)
    daemon_procs.append(d)
    _wait_ready(d)
    os.kill(procs.sidecar_pid(d.proc.pid), signal.SIGKILL)
    rc = d.wait(START_TIMEOUT)
    log = d.log_text()
    assert rc == 1, log[-3000:]
    s = assert_balanced(d.summary(), "cam")
    assert s["state"] == "failed" and "restart budget exhausted" in s["error"], s
    assert s["frames_in"] < 90, s  # stopped, not drained into drops


def test_live_source_is_stopped_not_done_after_sigterm(tiny_model: Path, tmp_path: Path,
                                                        daemon_procs: list) -> None:
    sections = base_sections(tiny_model, http_port=free_port())
    cfg = write_config(tmp_path / "cfg.toml", sections, {"phone": {"type": "webrtc"}})
    d = DaemonProcess(cfg, tmp_path, exit_when_done=False)
    daemon_procs.append(d)
    _wait_ready(d)
    d.terminate(signal.SIGTERM)
    assert d.wait(120) == 0, d.log_text()[-3000:]
    assert d.summary()["sources"]["phone"]["state"] == "stopped"
