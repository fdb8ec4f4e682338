"""Unit tests of the daemon core's small parts: windows, overload admission, sd_notify, HTTP, systemd units,
URL scrubbing, logging. Fast (no Jittor, no model)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest

from daemon.frames import FrameMeta
from daemon.stages.window import Admission, Verdict, WindowBuilder, ring_slots

REPO = Path(__file__).resolve().parents[2]


class _Ref:
    def __init__(self, slot: int) -> None:
        self.slot, self.generation, self.frame_index = slot, slot + 1, slot


def _feed(builder: WindowBuilder, n: int) -> tuple[list, list]:
    wins, refs = [], []
    for i in range(n):
        ref = _Ref(i)
        refs.append(ref)
        w = builder.add(ref, FrameMeta(i, i, i / 30, 0.0))
        if w is not None:
            wins.append(w)
    last = builder.finish()
    if last is not None:
        wins.append(last)
    return wins, refs


def test_windows_share_overlap_and_release_every_slot_once() -> None:
    b = WindowBuilder(8, 2)
    wins, refs = _feed(b, 23)
    seqs = [[m.seq for m in w.metas] for w in wins]
    assert seqs[0] == list(range(0, 8))
    assert seqs[1] == list(range(6, 14))
    assert seqs[2] == list(range(12, 20))
    assert seqs[3] == list(range(18, 23)) and wins[3].final and wins[3].n_new == 3
    assert [w.n_new for w in wins] == [8, 6, 6, 3]
    assert [[m.seq for m in w.new_metas] for w in wins][1] == list(range(8, 14))
    released = []
    for w in wins:
        released += b.done(w)
    released += b.release_carry()
    assert sorted(r.slot for r in released) == list(range(23))  # each exactly once


def test_overlap_slot_released_only_after_second_window() -> None:
    b = WindowBuilder(4, 2)
    wins, _ = _feed(b, 6)
    first = b.done(wins[0])
    assert sorted(r.slot for r in first) == [0, 1]  # 2, 3 still belong to window 1
    assert sorted(r.slot for r in b.done(wins[1])) == [2, 3]  # 4, 5 carried for a next window
    assert sorted(r.slot for r in b.release_carry()) == [4, 5]  # the stream ended without one


def test_ring_sized_for_bound_never_fills() -> None:
    """Worst case of the skip/queue bound: window in flight + `bound` waiting + one filling."""
    from daemon.shm import FrameRing, RingFullError

    ws, ov, bound = 8, 2, 2
    ring = FrameRing.create("unit-ring", ring_slots(ws, ov, bound, slack=0), 8, 8)
    try:
        b = WindowBuilder(ws, ov)
        adm = Admission("queue", max_queued_windows=bound)
        waiting: list = []
        in_flight = None
        frame = np.zeros((8, 8, 3), np.uint8)
        for i in range(200):
            if i % 5 == 0 and waiting:  # geometry finishes a window now and then
                if in_flight is not None:
                    for r in b.done(in_flight):
                        ring.release(r)
                in_flight = waiting.pop(0)
            verdict = adm.decide(b.needed == 1, len(waiting))
            if verdict is not Verdict.ADMIT:
                continue
            try:
                ref = ring.write_frame(frame, i, 0.0)
            except RingFullError:  # pragma: no cover - the assertion
                pytest.fail(f"ring full at frame {i}")
            w = b.add(ref, FrameMeta(i, i, 0.0, 0.0))
            if w is not None:
                waiting.append(w)
                assert len(waiting) <= bound
    finally:
        ring.close()
        ring.unlink()


def test_skip_policy_thins_evenly_to_capacity() -> None:
    adm = Admission("skip")
    for k in range(10):
        adm.note_arrival(k / 30)
    adm.note_window(10, 1.0)  # 10 frames/s of capacity against 30 frames/s of input
    verdicts = [adm.decide(False, 0) for _ in range(30)]
    kept = [i for i, v in enumerate(verdicts) if v is Verdict.ADMIT]
    assert len(kept) == 10
    assert set(np.diff(kept)) == {3}  # evenly: every third frame
    assert adm.decide(True, 1) is Verdict.SKIP  # completing a window beyond the bound
    assert Admission("queue", 2).decide(True, 2) is Verdict.DROP


def test_sdnotify_plain_and_abstract_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from daemon import sdnotify

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    path = tmp_path / "notify.sock"
    name = f"geometryd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s1, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s2:
        s1.bind(str(path))
        s2.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sdnotify.notify("READY=1")
        assert s1.recv(100) == b"READY=1"
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("WATCHDOG=1")
        assert s2.recv(100) == b"WATCHDOG=1"
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval_s() == 15.0


def test_http_metrics_healthz_and_token() -> None:
    import aiohttp

    from daemon.http import HttpServer
    from daemon.metrics import Metrics

    m = Metrics()
    m.frame_in("cam")
    m.drop("cam", "ring_full")
    state = {"ok": False}

    async def main() -> None:
        async with HttpServer("127.0.0.1", 0, m.render, lambda: dict(state), token="s3cret") as srv:
            url = f"http://127.0.0.1:{srv.port}"
            async with aiohttp.ClientSession() as http:
                async with http.get(url + "/metrics") as r:
                    assert r.status == 401
                auth = {"Authorization": "Bearer s3cret"}
                async with http.get(url + "/metrics", headers=auth) as r:
                    text = await r.text()
                    assert r.status == 200
                    assert 'geometryd_frames_dropped_total{reason="ring_full",source="cam"} 1.0' in text
                async with http.get(url + "/healthz", headers=auth) as r:
                    assert r.status == 503 and (await r.json()) == {"ok": False}
                state["ok"] = True
                async with http.get(url + "/healthz", headers=auth) as r:
                    assert r.status == 200

    asyncio.run(main())
    assert m.source("cam").balanced()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("unit", ["geometryd.service", "geometryd@.service", "geometryd@0.service"])
def test_systemd_units_verify_silently(unit: str, tmp_path: Path) -> None:
    """`systemd-analyze verify` must print nothing. verify insists that ExecStart's binary exists, so the
    test copies the unit with ExecStart pointed at this venv's `geometryd`; every other byte is unchanged."""
    src = REPO / "systemd" / ("geometryd@.service" if "@" in unit else unit)
    exe = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "geometryd"
    if not exe.exists():
        exe = Path(shutil.which("geometryd") or "/usr/bin/true")
    text = src.read_text()
    assert "ExecStart=/opt/geometryd/.venv/bin/geometryd run --config /etc/geometryd/" in text
    patched = text.replace("ExecStart=/opt/geometryd/.venv/bin/geometryd", f"ExecStart={exe}")
    assert patched.count("\n") == text.count("\n")
    (tmp_path / unit).write_text(patched)
    proc = subprocess.run(["systemd-analyze", "verify", str(tmp_path / unit)], capture_output=True,
                          text=True, timeout=60)
    assert proc.stdout + proc.stderr == "", proc.stdout + proc.stderr
    assert proc.returncode == 0
    for key in ("Type=notify", "WatchdogSec=30", "NotifyAccess=main", "Restart=on-failure", "RemoveIPC=yes",
                "User=geometryd", "NoNewPrivileges=yes", "ProtectSystem=strict", "DeviceAllow=/dev/nvidiactl rw"):
        assert key in text, key


def test_unit_stop_timeout_exceeds_grace() -> None:
    from daemon.config import default_config

    text = (REPO / "systemd" / "geometryd.service").read_text()
    stop = int(text.split("TimeoutStopSec=")[1].split()[0])
    assert stop > default_config().daemon.shutdown_grace_s + 10


def test_scrub_url() -> None:
    from daemon.config import scrub_url

    assert scrub_url("rtsp://admin:hunter2@10.0.0.5:554/live") == "rtsp://***:***@10.0.0.5:554/live"
    assert scrub_url("error opening rtsp://u:p@h/x: 401") == "error opening rtsp://***:***@h/x: 401"
    assert scrub_url("rtsp://host/x") == "rtsp://host/x"


def test_json_logging(capsys: pytest.CaptureFixture[str]) -> None:
    from daemon.logging_setup import setup_logging

    setup_logging("info", "json")
    try:
        logging.getLogger("daemon.test").info("hello", extra={"source": "cam", "n": 3})
        logging.getLogger("daemon.test").debug("quiet")
        line = capsys.readouterr().err.strip().splitlines()[-1]
        obj = json.loads(line)
        assert obj["msg"] == "hello" and obj["source"] == "cam" and obj["n"] == 3 and obj["level"] == "info"
    finally:
        logging.getLogger().handlers.clear()
