"""Lifecycle edges of `geometryd run` (real daemon processes): a startup failure logs its traceback at error
level, a /dev/shm too small for the rings is refused with the sizes, a second SIGTERM forces the exit, child
processes carry names and the sidecar logs in the daemon's ``logging.format``.

The second-signal test uses the hidden plumbing-only identity processor (``--plumbing-identity-delay``): it
is about signals and processes, and a slow window is all it needs.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from helpers import procs
from helpers.clips import make_clip
from helpers.run_daemon import (  # noqa: F401 (fixture)
    DaemonProcess,
    base_sections,
    daemon_procs,
    our_shm_segments,
    tiny_model,
    write_config,
)

pytestmark = pytest.mark.e2e


def test_shm_too_small_is_refused_with_sizes_and_a_traceback(tiny_model: Path, tmp_path: Path,
                                                             daemon_procs: list) -> None:
    clip = make_clip(tmp_path / "clip.mp4", 4)
    # 2048x2048 frames (the largest size the config allows), ~2300 slots: ~150 GB of rings, more than any
    # CI /dev/shm
    sections = base_sections(tiny_model, geometry={"height": 2048, "width": 2048, "window_size": 110,
                                                   "overlap": 25},
                             daemon={"shutdown_grace_s": 60.0, "watchdog_interval_s": 0.5,
                                     "shm_slack_frames": 2000})
    cfg = write_config(tmp_path / "cfg.toml", sections, {"c": {"type": "file", "path": str(clip)}})
    d = DaemonProcess(cfg, tmp_path)
    daemon_procs.append(d)
    rc = d.wait(120)
    log = d.log_text()
    assert rc == 1, log[-3000:]
    assert "shared memory: the rings need" in log and "MiB in /dev/shm but only" in log, log[-3000:]
    assert "ERROR" in log and "Traceback (most recent call last)" in log, log[-3000:]  # at error level
    assert "starting prior sidecar" not in log  # refused before any child process


def test_second_sigterm_forces_exit_children_named_json_logs(tiny_model: Path, tmp_path: Path,
                                                            daemon_procs: list) -> None:
    clip = make_clip(tmp_path / "clip.mp4", 40)
    sections = base_sections(tiny_model, logging={"level": "info", "format": "json"},
                             daemon={"shutdown_grace_s": 120.0})
    cfg = write_config(tmp_path / "cfg.toml", sections, {"c": {"type": "file", "path": str(clip)}})
    d = DaemonProcess(cfg, tmp_path, exit_when_done=False, extra_args=["--plumbing-identity-delay", "3"])
    daemon_procs.append(d)
    procs.wait_for(lambda: '"msg": "ready"' in d.log_text(), 300, "ready", d)
    titles = sorted(procs.child_titles(d.proc.pid).values())
    assert "geometryd: geometry" in titles and "geometryd: sidecar" in titles, titles
    d.terminate(signal.SIGTERM)  # graceful: the queued windows (3 s each) would take a while
    procs.wait_for(lambda: "stop requested" in d.log_text(), 10, "stop requested", d)
    time.sleep(0.5)
    t0 = time.monotonic()
    d.terminate(signal.SIGTERM)
    rc = d.wait(10)
    assert time.monotonic() - t0 < 5
    log = d.log_text()
    assert rc == 1, log[-3000:]
    assert "forcing exit" in log
    assert not our_shm_segments(d.proc.pid)
    lines = [ln for ln in log.splitlines() if ln.startswith("{")]
    sidecar = [json.loads(ln) for ln in lines if '"logger": "moge_sidecar' in ln]
    assert sidecar and all(rec["level"] for rec in sidecar), log[-3000:]
    assert not [ln for ln in log.splitlines() if "moge_sidecar[" in ln]  # the old plain format
