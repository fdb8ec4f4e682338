"""Client and supervisor of the MoGe sidecar (`python -m moge_sidecar`); the prior stage of the daemon.

Contract: ../../shared/design/architecture.md ("Data flow"), spec 4.2 (sidecar contract), protocol in
moge_sidecar/server.py. Only ring names, slot numbers and generations cross the socket; frames and priors
stay in the FrameRing (shared memory).

Supervision: ready handshake with `startup_timeout_s`; a ping every `ping_interval_s` (a pong missing for
`ping_timeout_s` = hung -> kill + restart); a request without an answer after `request_timeout_s` -> kill +
restart; a crash (EOF on the socket) -> restart (the first at once, the next ones in a row after a
jittered exponential wait, :class:`daemon.backoff.Backoff`, reset by an answered ping or request); in-flight
requests are retried on the new process (up to `max_attempts` tries each), never dropped silently; at most
`restart_budget` restarts per 60 s, then every request fails with PriorError until the budget window frees up.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from daemon.backoff import Backoff
from daemon.config import PriorConfig, prior_device
from daemon.shm import FrameRing, SlotRef

log = logging.getLogger(__name__)

_REPO_ROOT = Path(__file__).resolve().parents[2]
_BUDGET_WINDOW_S = 60.0
PRIOR_DIR_PREFIX = "geometryd-prior-"  # TMPDIR/geometryd-prior-<daemon pid>-<random>/moge.sock


class PriorError(Exception):
    """Root of prior-stage errors."""


class PriorRequestError(PriorError):
    """The sidecar rejected a request (kind: bad_request | unknown_ring | stale_slot | internal)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class SidecarUnavailable(PriorError):
    """The sidecar could not be (re)started: startup failure, timeout, or restart budget exhausted."""


class SidecarBudgetExhausted(SidecarUnavailable):
    """``restart_budget`` restarts happened in the last 60 s: no restart until the window frees one."""


class _Crashed(Exception):
    """Internal: the connection died while a request was in flight."""


class PriorSidecar:
    """Async supervisor of one MoGe sidecar process shared by all sources."""

    def __init__(self, prior_cfg: PriorConfig, checkpoint: Path, *, chunk: int = 8, moge_version: int = 1,
                 ping_interval_s: float = 5.0, ping_timeout_s: float = 10.0, max_attempts: int = 3,
                 backoff_initial_s: float = 0.5, backoff_max_s: float = 30.0, threads: int = 0,
                 extra_env: dict[str, str] | None = None, log_level: str = "", log_format: str = "") -> None:
        self.cfg = prior_cfg
        self.checkpoint = Path(checkpoint)
        self.chunk = chunk
        self.moge_version = moge_version
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.max_attempts = max_attempts
        self.backoff = Backoff(backoff_initial_s, backoff_max_s)
        self.threads = threads
        self.extra_env = dict(extra_env or {})
        # the daemon's [logging]; "" = the sidecar's default
        self.log_level, self.log_format = log_level, log_format
        # counters (metrics)
        self.restarts = 0
        self.requests = 0
        self.errors = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.pid: int | None = None
        self.last_timing: dict[str, Any] = {}

        self._tmpdir: str | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._read_task: asyncio.Task | None = None
        self._health_task: asyncio.Task | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self._restart_times: deque[float] = deque()
        self._consecutive_failures = 0
        self._connected = asyncio.Event()
        self._stopping = False
        self._started = False

    # ------------------------------------------------------------------ lifecycle
    @property
    def connected(self) -> bool:
        """True while a sidecar process is up and its connection is open (health endpoint, metrics)."""
        return self._connected.is_set() and self._proc is not None and self._proc.returncode is None

    @property
    def socket_path(self) -> Path:
        assert self._tmpdir is not None
        return Path(self._tmpdir) / "moge.sock"

    async def start(self) -> None:
        """Spawn the sidecar and wait for its ready line (raises SidecarUnavailable on failure)."""
        if self._started:
            return
        if not self.checkpoint.is_file():
            raise SidecarUnavailable(f"MoGe checkpoint not found: {self.checkpoint}")
        self._stopping = False
        self._tmpdir = tempfile.mkdtemp(prefix=f"{PRIOR_DIR_PREFIX}{os.getpid()}-")
        async with self._lock:
            await self._spawn()
        self._started = True
        self._health_task = asyncio.create_task(self._health_loop(), name="prior-health")

    async def stop(self) -> None:
        """Stop health checks, SIGTERM the sidecar (SIGKILL after 2 s), fail pending requests."""
        self._stopping = True
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            self._health_task = None
        await self._teardown(signal.SIGTERM, grace=2.0)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(PriorError("prior sidecar stopped"))
        self._pending.clear()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        self._started = False

    async def __aenter__(self) -> PriorSidecar:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _command(self) -> list[str]:
        python = self.cfg.python or sys.executable
        cmd = [python, "-m", "moge_sidecar", "--socket", str(self.socket_path), "--checkpoint",
               str(self.checkpoint), "--device", self.cfg.device,
               "--resolution-level", str(self.cfg.resolution_level),
               "--moge-version", str(self.moge_version), "--chunk", str(self.chunk),
               "--parent-pid", str(os.getpid())]
        if self.cfg.fp16:
            cmd.append("--fp16")
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        if self.log_level:
            cmd += ["--log-level", self.log_level]
        if self.log_format:
            cmd += ["--log-format", self.log_format]
        return cmd

    async def _spawn(self) -> None:
        """Start a process and complete the handshake; caller holds self._lock."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.update(self.extra_env)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        cmd = self._command()
        log.info("starting MoGe sidecar", extra={"cmd": " ".join(cmd)})
        try:
            self._proc = await asyncio.create_subprocess_exec(*cmd, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                              stdout=asyncio.subprocess.DEVNULL)
        except OSError as exc:
            raise SidecarUnavailable(f"cannot start MoGe sidecar {cmd[0]!r}: {exc}") from exc
        self.pid = self._proc.pid
        timeout = self.cfg.startup_timeout_s
        try:
            await asyncio.wait_for(self._handshake(), timeout)
        except TimeoutError:
            await self._teardown(signal.SIGKILL, grace=0)
            raise SidecarUnavailable(f"MoGe sidecar not ready after {timeout} s") from None
        except SidecarUnavailable:
            await self._teardown(signal.SIGKILL, grace=0)
            raise
        assert self._reader is not None  # set by the connect above
        self._read_task = asyncio.create_task(self._read_loop(self._reader, self._proc), name="prior-read")
        self._connected.set()

    async def _handshake(self) -> None:
        proc = self._proc
        assert proc is not None
        while True:
            if proc.returncode is not None:
                raise SidecarUnavailable(f"MoGe sidecar exited with code {proc.returncode} during startup")
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.socket_path), limit=1 << 20)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                await asyncio.sleep(0.05)
        line = await reader.readline()
        self.bytes_received += len(line)
        try:
            ready = json.loads(line)
        except json.JSONDecodeError:
            ready = None
        if not isinstance(ready, dict) or ready.get("op") != "ready":
            writer.close()
            raise SidecarUnavailable(f"MoGe sidecar sent {line[:200]!r} instead of a ready line")
        self._reader, self._writer = reader, writer
        log.info("MoGe sidecar ready", extra={"pid": ready.get("pid"), "device": ready.get("device")})

    async def _teardown(self, sig: int, grace: float) -> None:
        """Close the connection and end the process (sig, then SIGKILL after `grace` seconds)."""
        self._connected.clear()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                await asyncio.wait_for(proc.wait(), grace if grace > 0 else 5.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._read_task is not None and self._read_task is not asyncio.current_task():
            self._read_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._read_task
        self._read_task = None
        self._fail_pending(_Crashed("MoGe sidecar connection closed"))

    def _fail_pending(self, exc: Exception) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()

    async def _read_loop(self, reader: asyncio.StreamReader, proc: asyncio.subprocess.Process) -> None:
        while True:
            try:
                line = await reader.readline()
            except (ValueError, ConnectionError, OSError) as exc:  # overlong line or a broken socket
                log.warning("MoGe sidecar connection broken", extra={"error": repr(exc)})
                break
            if not line:
                break
            self.bytes_received += len(line)
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                log.warning("unparsable line from MoGe sidecar", extra={"line": line[:200]})
                continue
            rid = msg.get("id") if isinstance(msg, dict) else None
            fut = self._pending.pop(rid, None) if isinstance(rid, int) else None
            if fut is not None and not fut.done():
                fut.set_result(msg)
        # EOF: the sidecar died or closed the connection
        if not self._stopping:
            log.warning("MoGe sidecar connection lost",
                        extra={"pid": proc.pid, "returncode": proc.returncode})
        self._connected.clear()
        self._fail_pending(_Crashed("MoGe sidecar connection lost"))

    async def _restart(self, reason: str) -> None:
        """Kill whatever runs and start a fresh process (budget, backoff); caller holds self._lock."""
        await self._teardown(signal.SIGKILL, grace=0)
        now = time.monotonic()
        while self._restart_times and now - self._restart_times[0] > _BUDGET_WINDOW_S:
            self._restart_times.popleft()
        budget = self.cfg.restart_budget
        if len(self._restart_times) >= budget:
            raise SidecarBudgetExhausted(f"MoGe sidecar restart budget exhausted ({budget} per "
                                     f"{_BUDGET_WINDOW_S:.0f} s); last failure: {reason}")
        if self._consecutive_failures:
            await asyncio.sleep(self.backoff.next())
        self._consecutive_failures += 1
        self._restart_times.append(time.monotonic())
        self.restarts += 1
        log.warning("restarting MoGe sidecar", extra={"reason": reason, "restarts": self.restarts})
        await self._spawn()

    def budget_wait_s(self) -> float:
        """Seconds until the restart budget allows another restart (0 when it does now)."""
        budget = self.cfg.restart_budget
        times = list(self._restart_times)
        if len(times) < budget or not times:
            return 0.0
        oldest_that_counts = times[len(times) - budget]
        return max(0.0, oldest_that_counts + _BUDGET_WINDOW_S - time.monotonic())

    async def _ensure_running(self, reason: str) -> None:
        if self._stopping or not self._started:
            raise PriorError("prior sidecar is not running")
        if self._connected.is_set() and self._proc is not None and self._proc.returncode is None:
            return
        async with self._lock:
            if self._connected.is_set() and self._proc is not None and self._proc.returncode is None:
                return
            await self._restart(reason)

    async def _health_loop(self) -> None:
        while True:
            t0 = time.monotonic()
            while time.monotonic() - t0 < self.ping_interval_s:  # re-read: the interval may be changed live
                await asyncio.sleep(min(0.25, self.ping_interval_s))
            if not self._connected.is_set() or self._lock.locked():
                continue
            try:
                await self._call({"op": "ping"}, self.ping_timeout_s)
                self._consecutive_failures = 0
                self.backoff.reset()
            except (TimeoutError, _Crashed) as exc:
                log.warning("MoGe sidecar failed its health check", extra={"error": repr(exc)})
                try:
                    async with self._lock:
                        await self._restart(f"health check: {exc!r}")
                except PriorError as err:
                    log.error("MoGe sidecar unavailable", extra={"error": str(err)})
            except Exception:  # the health loop must survive anything
                log.exception("MoGe sidecar health check error")

    # ------------------------------------------------------------------ requests
    async def _call(self, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        writer = self._writer
        if writer is None or not self._connected.is_set():
            raise _Crashed("not connected")
        rid = next(self._ids)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        data = (json.dumps({**msg, "id": rid}, separators=(",", ":")) + "\n").encode()
        try:
            writer.write(data)
            self.bytes_sent += len(data)
            await writer.drain()
        except (ConnectionError, OSError) as exc:
            self._pending.pop(rid, None)
            raise _Crashed(f"send failed: {exc}") from exc
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(rid, None)

    async def ping(self, timeout: float = 5.0) -> dict[str, Any]:
        """Round trip to the sidecar (health)."""
        await self._ensure_running("ping")
        try:
            return await self._call({"op": "ping"}, timeout)
        except (TimeoutError, _Crashed) as exc:
            raise PriorError(f"MoGe sidecar ping failed: {exc!r}") from exc

    async def compute(self, ring: FrameRing, refs: list[SlotRef]) -> dict[str, Any]:
        """Fill the prior slots of `refs` in `ring`; returns the sidecar's timing. Raises PriorError."""
        if not refs:
            return {"frames": 0}
        msg = {"op": "prior", "ring": ring.name, "slots": [r.slot for r in refs],
               "generations": [r.generation for r in refs]}
        timeout = self.cfg.request_timeout_s
        self.requests += 1
        last: str = ""
        t0 = time.perf_counter()
        for attempt in range(1, self.max_attempts + 1):
            try:
                await self._ensure_running(last or "not running")
                reply = await self._call(msg, timeout)
            except _Crashed as exc:
                last = f"sidecar crashed during request (attempt {attempt}): {exc}"
                log.warning("prior request interrupted; retrying",
                            extra={"ring": ring.name, "attempt": attempt})
                continue
            except TimeoutError:
                last = f"request timed out after {timeout} s (attempt {attempt})"
                log.warning("prior request hung; killing the sidecar",
                            extra={"ring": ring.name, "attempt": attempt})
                async with self._lock:
                    await self._teardown(signal.SIGKILL, grace=0)
                continue
            except SidecarBudgetExhausted:
                self.errors += 1
                raise
            except SidecarUnavailable as exc:  # this restart failed (e.g. killed while loading): one attempt
                last = f"sidecar restart failed (attempt {attempt}): {exc}"
                log.warning("prior sidecar restart failed; retrying",
                            extra={"ring": ring.name, "attempt": attempt, "error": str(exc)})
                continue
            except PriorError:
                self.errors += 1
                raise
            if reply.get("op") == "done":
                self._consecutive_failures = 0
                self.backoff.reset()
                timing = dict(reply.get("timing") or {})
                timing["roundtrip_ms"] = (time.perf_counter() - t0) * 1e3
                timing["attempts"] = attempt
                self.last_timing = timing
                return timing
            self.errors += 1
            raise PriorRequestError(str(reply.get("kind", "internal")), str(reply.get("error", reply)))
        self.errors += 1
        raise PriorError(f"prior for {ring.name} failed after {self.max_attempts} attempts: {last}")

    async def detach(self, ring_name: str) -> None:
        """Ask the sidecar to unmap a ring (the source is gone)."""
        with contextlib.suppress(PriorError, asyncio.TimeoutError, _Crashed):
            await self._ensure_running("detach")
            await self._call({"op": "detach", "ring": ring_name}, 10.0)


def cleanup_stale_prior_dirs(tmp_dir: str | None = None) -> list[str]:
    """Remove ``TMPDIR/geometryd-prior-*`` folders left by a daemon that died (SIGKILL): those whose owner pid
    (in the name) is dead, and 0.1.0's pid-less ones whose socket nobody listens on. Returns the names."""
    root = Path(tmp_dir or tempfile.gettempdir())
    removed: list[str] = []
    try:
        entries = sorted(p for p in root.iterdir() if p.name.startswith(PRIOR_DIR_PREFIX) and p.is_dir())
    except OSError:
        return removed
    for path in entries:
        owner = path.name[len(PRIOR_DIR_PREFIX):].split("-", 1)[0]
        if owner.isdigit():
            stale = int(owner) != os.getpid() and not _pid_alive(int(owner))
        else:
            stale = not _socket_listening(path / "moge.sock")
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                removed.append(path.name)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _socket_listening(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


_offline_ids = itertools.count()


def run_priors(frames: np.ndarray, checkpoint: Path, device: str = "cpu", fp16: bool = False,
               resolution_level: int = 9, python: str | None = None, *, chunk: int = 8,
               n_slots: int = 16, moge_version: int = 1, threads: int = 0,
               request_timeout_s: float = 3600.0) -> tuple[np.ndarray, np.ndarray]:
    """Blocking: frames (T,H,W,3) uint8 -> points (T,H,W,3) float32, mask (T,H,W) bool through a real sidecar
    process and a FrameRing (for `geometryd process`). Must not be called from a running event loop."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T,H,W,3) uint8, got {frames.shape} {frames.dtype}")
    settings = PriorConfig(checkpoint=str(checkpoint), python=python or "", device=prior_device(device),
                           fp16=fp16, resolution_level=resolution_level, request_timeout_s=request_timeout_s)
    return asyncio.run(_run_priors(frames, settings, Path(checkpoint), chunk, n_slots, moge_version, threads))


async def _run_priors(frames: np.ndarray, settings: PriorConfig, checkpoint: Path, chunk: int, n_slots: int,
                      moge_version: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    t, h, w, _ = frames.shape
    points = np.empty((t, h, w, 3), np.float32)
    mask = np.empty((t, h, w), bool)
    n_slots = max(1, min(n_slots, t))
    ring = FrameRing.create(f"offline{next(_offline_ids)}", n_slots, h, w)
    try:
        async with PriorSidecar(settings, checkpoint, chunk=chunk, moge_version=moge_version,
                                threads=threads) as sidecar:
            for start in range(0, t, n_slots):
                stop = min(t, start + n_slots)
                refs = [ring.write_frame(frames[i], i, float(i)) for i in range(start, stop)]
                await sidecar.compute(ring, refs)
                for ref in refs:
                    points[ref.frame_index] = ring.prior_points(ref)
                    mask[ref.frame_index] = ring.prior_mask(ref)
                    ring.release(ref)
    finally:
        ring.close()
        ring.unlink()
    return points, mask
