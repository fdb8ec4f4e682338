"""``geometryd run`` as a real subprocess, and what the daemon tests need around it: a tiny model folder,
config files (written by the library's ``daemon.config.write_config``), a fake systemd notify socket, a
subscriber in a thread.

Import what a test needs: ``from helpers.run_daemon import DaemonProcess, tiny_model, ...`` (tests/ is on
sys.path through tests/conftest.py). The tiny model is built once per session (``daemon.weights.tiny.make_tiny``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from daemon.config import write_config as write_config_tables
from daemon.weights.tiny import make_tiny
from daemon.wire.subscribe import iter_frames
from helpers.clips import H, W

REPO = Path(__file__).resolve().parents[2]

# Small sizes everywhere: 64x128 frames, window 8 overlap 2, 1 step (tests run on 2 CPU cores).
GEOMETRY = {"height": H, "width": W, "window_size": 8, "overlap": 2, "steps": 1, "decode_chunk_size": 4,
            "seed": 7}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prebuilt = os.environ.get("GEOMETRYD_TEST_TINY_MODEL")  # a folder built earlier (local iteration)
    if prebuilt:
        return Path(prebuilt)
    out = tmp_path_factory.mktemp("tiny-model")
    make_tiny(out, seed=0)
    return out


def write_config(path: Path, sections: dict[str, dict[str, Any]],
                 sources: dict[str, dict[str, Any]] | None = None) -> Path:
    """``sections`` and ``sources`` validated and written by ``daemon.config.write_config``; returns ``path``."""
    write_config_tables(path, {**sections, "sources": dict(sources or {})})
    return path


def base_sections(model_dir: Path, *, mqtt_port: int | None = None, http_port: int | None = None,
                  files_dir: Path | None = None, **overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A config for tests: tiny model fp32, CPU prior, small geometry, quick timeouts."""
    s: dict[str, dict[str, Any]] = {
        "model": {"dir": str(model_dir), "variant": "diff", "dtype": "fp32"},
        "geometry": dict(GEOMETRY),
        "prior": {"device": "cpu", "resolution_level": 0, "startup_timeout_s": 120.0},
        "mqtt": {"enabled": mqtt_port is not None, "port": mqtt_port or 1883, "qos": 1,
                 "depth_encoding": "f16", "reconnect_initial_s": 0.1, "reconnect_max_s": 0.5,
                 "publish_timeout_s": 2.0},
        "files": {"enabled": files_dir is not None, "dir": str(files_dir or "/nonexistent"), "npz": "clip"},
        "http": {"enabled": http_port is not None, "port": http_port or 9410},
        "logging": {"level": "info"},
        "daemon": {"shutdown_grace_s": 60.0, "watchdog_interval_s": 0.5, "shm_slack_frames": 2},
    }
    for k, v in overrides.items():
        s.setdefault(k, {}).update(v)
    return s


class NotifySocket:
    """A fake ``$NOTIFY_SOCKET``: a bound unix datagram socket collecting messages in a thread."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self.timed: list[tuple[float, str]] = []  # (time.monotonic() at arrival, line)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            lines = data.decode().splitlines()
            now = time.monotonic()
            self.timed.extend((now, ln) for ln in lines)
            self.messages.extend(lines)

    def wait_for(self, line: str, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if line in self.messages:
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


class DaemonProcess:
    """``python -m daemon run --config ... --summary ...`` as a subprocess, logs to a file."""

    def __init__(self, config: Path, workdir: Path, *, exit_when_done: bool = True,
                 env: dict[str, str] | None = None, extra_args: list[str] | None = None) -> None:
        self.summary_path = workdir / "summary.json"
        self.log_path = workdir / "daemon.log"
        args = [sys.executable, "-m", "daemon", "run", "--config", str(config), "--summary", str(self.summary_path)]
        if exit_when_done:
            args.append("--exit-when-done")
        args += extra_args or []
        full_env = dict(os.environ)
        full_env.update(env or {})
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(args, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def terminate(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def wait_log(self, needle: str, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if needle in self.log_text():
                return True
            if self.proc.poll() is not None:
                return needle in self.log_text()
            time.sleep(0.1)
        return False

    def summary(self) -> dict[str, Any]:
        return json.loads(self.summary_path.read_text())


def our_shm_segments(pid: int) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(f"geometryd-{pid}-*"))


def assert_balanced(summary: dict[str, Any], source: str) -> dict[str, Any]:
    s = summary["sources"][source]
    dropped = sum(s["dropped"].values())
    assert s["frames_in"] == s["frames_out"] + s["skipped"] + dropped, s
    assert s["balanced"], s
    return s


@pytest.fixture
def daemon_procs() -> Iterator[list[DaemonProcess]]:
    """Collects DaemonProcess objects so a failing test never leaves a daemon running."""
    procs: list[DaemonProcess] = []
    yield procs
    for p in procs:
        p.kill()


class Subscriber:
    """``daemon.wire.subscribe.iter_frames`` in a background thread (own event loop), reconnecting after a broker
    outage; ``frames`` collects every ReceivedFrame in arrival order."""

    def __init__(self, port: int, prefix: str = "geometry", source: str = "+") -> None:
        self.port, self.prefix, self.source = port, prefix, source
        self.frames: list[Any] = []
        self.connections = 0
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._task: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(15), "subscriber did not connect"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._task = self._loop.create_task(self._main())
        try:
            self._loop.run_until_complete(self._task)
        except BaseException:  # cancelled at close
            pass

    async def _main(self) -> None:
        while True:
            ready = asyncio.Event()

            async def watch(ready: asyncio.Event = ready) -> None:
                await ready.wait()
                self.connections += 1
                self._ready.set()

            watcher = asyncio.create_task(watch())
            try:
                async for frame in iter_frames("127.0.0.1", self.port, self.prefix, self.source, ready=ready):
                    self.frames.append(frame)
            except aiomqtt.MqttError:
                await asyncio.sleep(0.2)
            finally:
                watcher.cancel()

    def wait_count(self, n: int, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end and len(self.frames) < n:
            time.sleep(0.05)
        return len(self.frames) >= n

    def close(self) -> None:
        if self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(5)
