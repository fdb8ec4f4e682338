"""RTSP camera ingest against a real GStreamer RTSP server (tests/helpers/rtsp_server.py under Debian's python3):
frames arrive; the server is killed and restarted on the same port; the daemon reconnects and goes on."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from daemon.broker import free_port
from helpers.procs import health, metrics, wait_for
from helpers.run_daemon import (  # noqa: F401 (fixture)
    DaemonProcess,
    assert_balanced,
    base_sections,
    daemon_procs,
    tiny_model,
    write_config,
)

START_TIMEOUT = 600  # first run compiles Jittor kernels
SYSTEM_PYTHON = "/usr/bin/python3"
SERVER = Path(__file__).resolve().parents[1] / "helpers" / "rtsp_server.py"


def _gst_available() -> bool:
    try:
        return subprocess.run([SYSTEM_PYTHON, "-c", "import gi; gi.require_version('GstRtspServer', '1.0'); "
                               "from gi.repository import GstRtspServer"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not _gst_available(), reason="GStreamer RTSP server (python3-gi) not installed")]


def _start_server(port: int = 0) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([SYSTEM_PYTHON, str(SERVER), "--port", str(port), "--width", "128", "--height", "64",
                             "--fps", "15"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    assert url.startswith("rtsp://127.0.0.1:"), url
    return proc, url


def _counter(text: str, name: str, source: str) -> float:
    m = re.search(rf'^{name}{{source="{source}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_rtsp_frames_then_server_restart_reconnects(tiny_model: Path, tmp_path: Path, daemon_procs: list) -> None:
    server, url = _start_server()
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    http_port = free_port()
    try:
        sections = base_sections(tiny_model, http_port=http_port)
        cfg = write_config(tmp_path / "cfg.toml", sections, {"cam": {
            "type": "rtsp", "url": url.replace("rtsp://", "rtsp://user:secretpw@"), "open_timeout_s": 5.0,
            "stall_timeout_s": 2.0, "reconnect_initial_s": 0.2, "reconnect_max_s": 1.0}})
        d = DaemonProcess(cfg, tmp_path, exit_when_done=False)
        daemon_procs.append(d)
        wait_for(lambda: d.wait_log("daemon.supervisor: ready", 0.1), START_TIMEOUT, "ready", d)
        wait_for(lambda: health(http_port)["sources"]["cam"]["frames_out"] >= 8, 120, "frames from the camera", d)
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        time.sleep(1.5)  # the daemon notices (stream error or stall) and starts reconnecting
        server, _ = _start_server(port)
        out_before = health(http_port)["sources"]["cam"]["frames_out"]
        in_before = health(http_port)["sources"]["cam"]["frames_in"]
        wait_for(lambda: health(http_port)["sources"]["cam"]["frames_in"] >= in_before + 30, 60,
                 "frames after the restart", d)
        wait_for(lambda: health(http_port)["sources"]["cam"]["frames_out"] > out_before, 120,
                 "results after the restart", d)
        text = metrics(http_port)
        assert _counter(text, "geometryd_source_reconnects_total", "cam") >= 1
        d.terminate(signal.SIGTERM)
        assert d.wait(120) == 0, d.log_text()[-4000:]
    finally:
        server.kill()
        server.wait(10)
    s = assert_balanced(d.summary(), "cam")
    assert s["reconnects"] >= 1
    log = d.log_text()
    assert "secretpw" not in log and "rtsp://***:***@127.0.0.1" in log
