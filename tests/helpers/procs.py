"""Looking at real processes from a test: the children of a daemon (/proc), its /healthz and /metrics, and
polling until something holds while the process under test is still alive."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import pytest


class Watched(Protocol):
    """A started process with a log (``DaemonProcess``, ``ClusterProcess``)."""

    proc: Any

    def log_text(self) -> str: ...


def children(pid: int) -> dict[int, tuple[str, bytes]]:
    """The direct children of ``pid``: child pid -> (process title, raw cmdline), from /proc."""
    out: dict[int, tuple[str, bytes]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out[int(entry.name)] = (cmd.split(b"\0")[0].decode(errors="replace"), cmd)
    return out


def child_titles(pid: int) -> dict[int, str]:
    """The direct children of ``pid``: child pid -> process title (setproctitle, else argv[0])."""
    return {child: title for child, (title, _) in children(pid).items()}


def sidecar_pid(daemon_pid: int) -> int:
    """The daemon's MoGe sidecar child (by module name or process title); AssertionError when there is none."""
    for child, (_, cmd) in children(daemon_pid).items():
        if b"moge_sidecar" in cmd or cmd.startswith(b"geometryd: sidecar"):
            return child
    raise AssertionError("no sidecar child")


def worker_pid(daemon_pid: int) -> int | None:
    """The daemon's child whose process title is ``geometryd: geometry`` (setproctitle)."""
    for child, (title, _) in children(daemon_pid).items():
        if title.startswith("geometryd: geometry"):
            return child
    return None


def health(port: int) -> dict[str, Any]:
    """GET /healthz on loopback: the JSON body (also of an error status), {} while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())  # type: ignore[no-any-return]
    except OSError:
        return {}


def metrics(port: int) -> str:
    """GET /metrics on loopback (Prometheus text)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()  # type: ignore[no-any-return]


def wait_for(pred: Callable[[], Any], timeout: float, what: str, proc: Watched | None = None,
             poll_s: float = 0.05) -> Any:
    """Poll ``pred`` until it returns a true value (returned); fail the test with the log tail of ``proc``
    when it exits first or ``timeout`` passes."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        if proc is not None and proc.proc.poll() is not None:
            pytest.fail(f"process exited ({proc.proc.returncode}) while waiting for {what}:\n"
                        f"{proc.log_text()[-5000:]}")
        time.sleep(poll_s)
    pytest.fail(f"timeout waiting for {what}" + (f":\n{proc.log_text()[-5000:]}" if proc is not None else ""))
