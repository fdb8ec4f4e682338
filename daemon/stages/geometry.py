"""The geometry stage: runs the Jittor GeometryCrafter pipeline on windows, in ONE worker process.

Every source's windows go through one worker (one GPU, one window at a time) so the event loop stays free
(ingest, MQTT, HTTP, watchdog) while a window computes. It is a child process, not a thread, because Jittor
holds the GIL while it computes (see :class:`GeometryWorker`). Each source has its own ``StreamingSession``
(daemon.pipeline) in the worker, holding its carried state. The worker reads frames and priors from the
source's shared-memory ring (one copy, on the way to the device).

Pipe protocol (``multiprocessing`` Connection, pickled tuples; one request in flight at a time; every
request is answered by ``("ok", value)`` or ``("error", "op: Type: message")``):

    request                     ok value                      daemon's time limit
    ("load",)                   model load seconds (float)    none at startup; restart_timeout_s
    ("warmup",)                 warm-up seconds (float)       none at startup; restart_timeout_s
    ("window", source, ring,    [FrameResult, ..] now final   the window deadline
     [(slot, gen, i)..], first_seq)
    ("flush", source)           [FrameResult, ..] held back   the window deadline
    ("detach", ring)            None                          5 s, then given up (no kill)
    ("ping",)                   worker's monotonic clock      heartbeat_s (idle only)
    ("stop",)                   None, then the process exits  stop_timeout_s (exit included)

A request past its limit, or EOF on the pipe (the process died), is a fault: the daemon kills the process
and starts a new one (see :class:`GeometryWorker`). The worker ignores SIGINT/SIGTERM (the daemon
coordinates shutdown) and dies with its parent (PR_SET_PDEATHSIG).

``IdentityGeometry`` is a PLUMBING-ONLY processor (returns the prior as the result, optionally after a
fixed delay): it is selectable only through the hidden ``run --plumbing-identity-delay`` option (the
plumbing mode of bench/e2e_cpu.py), never by the config, and proves nothing about the pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing as mp
import signal
import time
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from daemon.frames import FrameResult
from daemon.logging_setup import setup_logging
from daemon.model.streaming_stats import PolicyParams
from daemon.pipeline import GeometryCrafter, StreamingSession
from daemon.shm import FrameRing, SlotRef

log = logging.getLogger(__name__)


class GeometryError(RuntimeError):
    """A window could not be processed (message names the source and window)."""


class Session(Protocol):
    def push_window(self, frames: np.ndarray, prior_points: np.ndarray, prior_mask: np.ndarray,
                    first_frame_index: int) -> list[Any]: ...

    def flush(self) -> list[Any]: ...


class Processor(Protocol):
    name: str

    def new_session(self) -> Session: ...


@dataclass(frozen=True)
class SessionParams:
    height: int
    width: int
    window_size: int
    overlap: int
    num_inference_steps: int
    decode_chunk_size: int
    force_projection: bool = True
    force_fixed_focal: bool = True
    use_extract_interp: bool = False
    seed: int = 42
    stats_policy: str = "follow"  # streaming.stats and its parameters (daemon/model/streaming_stats.py)
    stats_smoothing: float = 0.5
    stats_max_step: float = 0.4
    cut_threshold: float = 0.4

    @classmethod
    def from_config(cls, g: Any, streaming: Any = None) -> SessionParams:
        st = {} if streaming is None else {
            "stats_policy": streaming.stats, "stats_smoothing": streaming.stats_smoothing,
            "stats_max_step": streaming.stats_max_step, "cut_threshold": streaming.cut_threshold}
        return cls(g.height, g.width, g.window_size, g.overlap, g.steps, g.decode_chunk_size,
                   g.force_projection, g.force_fixed_focal, g.use_extract_interp, g.seed, **st)


class PipelineGeometry:
    """The real processor: ``GeometryCrafter.from_pretrained`` + one ``StreamingSession`` per source."""

    name = "geometrycrafter"

    def __init__(self, model_dir: str | Path, variant: str, dtype: str, params: SessionParams,
                 low_memory: bool = False) -> None:
        self.params = params
        self.low_memory = low_memory
        self.gc = GeometryCrafter.from_pretrained(model_dir, variant=variant, dtype=dtype)

    def new_session(self) -> Session:
        p = self.params
        return StreamingSession(
            self.gc, height=p.height, width=p.width, window_size=p.window_size, overlap=p.overlap,
            num_inference_steps=p.num_inference_steps, decode_chunk_size=p.decode_chunk_size,
            force_projection=p.force_projection, force_fixed_focal=p.force_fixed_focal,
            use_extract_interp=p.use_extract_interp, seed=p.seed, low_memory_usage=self.low_memory,
            stats_policy=p.stats_policy,
            stats_params=PolicyParams(p.stats_smoothing, p.stats_max_step, p.cut_threshold),
        )


class _IdentitySession:
    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self._window_id = 0
        self._emitted = -1

    def push_window(self, frames: np.ndarray, prior_points: np.ndarray, prior_mask: np.ndarray,
                    first_frame_index: int) -> list[Any]:
        if self.delay_s:
            time.sleep(self.delay_s)
        out = []
        for i in range(frames.shape[0]):
            idx = first_frame_index + i
            if idx <= self._emitted:
                continue  # overlap frame already emitted by the previous window
            pts = prior_points[i].astype(np.float32)
            out.append(FrameResult(idx, self._window_id, pts, pts[..., 2].copy(), prior_mask[i].copy(),
                                   (1.0, 1.0, 0.5, 0.5)))
            self._emitted = idx
        self._window_id += 1
        return out

    def flush(self) -> list[Any]:
        return []


class IdentityGeometry:
    """PLUMBING ONLY (see module docstring): result = prior, after ``delay_s`` per window."""

    name = "identity-plumbing-only"

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s

    def new_session(self) -> Session:
        return _IdentitySession(self.delay_s)


@dataclass(frozen=True)
class ProcessorSpec:
    """What the worker process builds: the real pipeline, or the plumbing-only identity."""

    kind: str  # "pipeline" | "identity"
    params: SessionParams
    model_dir: str = ""
    variant: str = "diff"
    dtype: str = "fp16"
    low_memory: bool = False
    identity_delay_s: float = 0.0
    log_level: str = "info"
    log_format: str = "text"

    def build(self) -> Processor:
        if self.kind == "identity":
            return IdentityGeometry(self.identity_delay_s)
        return PipelineGeometry(self.model_dir, self.variant, self.dtype, self.params, self.low_memory)


class GeometryFault(GeometryError):
    """The worker missed a deadline or died; ``reason`` is the frames' drop reason."""

    reason = "geometry_crash"


class GeometryTimeout(GeometryFault):
    """A request ran past its deadline (a wedged GPU, a stopped process): the worker was killed."""

    reason = "geometry_timeout"


class GeometryWorkerDied(GeometryFault):
    """The worker process exited (crash, OOM kill) while a request was in flight or while idle."""

    reason = "geometry_crash"


class GeometryUnavailable(GeometryError):
    """The worker could not be (re)started: restart budget spent, or the restart itself failed."""


@dataclass(frozen=True)
class WorkerPolicy:
    """Supervision of the worker; same names and defaults as the ``[geometry]`` keys of daemon/config.py."""

    window_deadline_s: float = 0.0  # 0: deadline_factor x warm-up seconds, at least deadline_floor_s
    deadline_factor: float = 3.0
    deadline_floor_s: float = 60.0
    heartbeat_s: float = 5.0
    restart_budget: int = 5
    stop_timeout_s: float = 15.0
    restart_timeout_s: float = 900.0

    @classmethod
    def from_config(cls, g: Any) -> WorkerPolicy:
        return cls(g.window_deadline_s, g.deadline_factor, g.deadline_floor_s, g.heartbeat_s,
                   g.restart_budget,
                   g.stop_timeout_s, g.restart_timeout_s)


_BUDGET_WINDOW_S = 60.0


class GeometryWorker:
    """The Jittor pipeline in ONE child process, shared by every source, supervised.

    Why a process and not a thread: Jittor never releases the GIL while it executes ops (no
    ``PyEval_SaveThread`` anywhere in jittor 1.3.11), so a worker *thread* stalls the event loop for the whole
    window (measured on 2 shared CPU cores, tiny model: loop lag p50 6.5 s, max 80 s -> missed watchdog
    pings, MQTT keepalives, RTSP reads; with this process: p50 0.75 ms, p99 11 ms, max 16 ms while a window
    computes). The child attaches each source's FrameRing (zero copy, like the sidecar) and keeps one
    StreamingSession per source; only slot refs go to it and FrameResults come back over a pipe. Calls are
    serialised (one window at a time on the one GPU) by a lock and a single-thread executor that waits on
    the pipe.

    Supervision (docs/recovery.md): every window has a deadline (``window_deadline_s``, else
    ``deadline_factor`` x the warm-up's measured seconds, at least ``deadline_floor_s``); while idle a
    ``ping`` every ``heartbeat_s`` must be answered within ``heartbeat_s``. A missed deadline or heartbeat
    kills the process (SIGKILL also ends a SIGSTOPped one); a dead process is seen as EOF on the pipe. Either
    way the worker is restarted in place (load + warm-up, at most ``restart_budget`` restarts per 60 s) and
    ``generation`` grows: every source's StreamingSession starts over (its held-back frames are lost, and
    counted by the caller). ``push_window`` retries the faulting window once on the new process.
    """

    def __init__(self, spec: ProcessorSpec, policy: WorkerPolicy | None = None) -> None:
        self.spec = spec
        self.policy = policy or WorkerPolicy()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="geometry-pipe")
        self._lock = asyncio.Lock()
        self._proc: Any = None
        self._conn: Any = None
        self.busy_since: float | None = None
        self.deadline_s: float = self.policy.window_deadline_s or self.policy.deadline_floor_s
        self.warmup_s: float | None = None
        self.generation = 0  # grows on every (re)start: the sessions of older generations are gone
        self.restarts = 0
        self.restarting = False
        self.last_fault: str | None = None  # drop reason of the latest fault
        self.last_recovery_s: float | None = None  # fault -> restarted worker, seconds
        self.unavailable: str | None = None  # set once a restart was refused or failed: the worker is gone
        self._restart_times: deque[float] = deque()
        self._heartbeat_task: asyncio.Task[None] | None = None
        self.on_unavailable: Any = None  # callback(message) when an idle-time restart fails (daemon: fatal)

    # ---- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> float:
        """Spawn the process and build the processor (model load); returns the load seconds."""
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(target=_worker_main, args=(child, self.spec), name="geometryd-geometry",
                                 daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent
        self.generation += 1
        return float(await self._call(("load",), None))

    async def warm_up(self) -> float:
        """Compile every kernel (see :func:`warm_up`); sets the derived window deadline from the time."""
        secs = float(await self._call(("warmup",), None))
        if self.warmup_s is None:  # the first warm-up compiles; restarts find the kernel cache
            self.warmup_s = secs
            p = self.policy
            self.deadline_s = p.window_deadline_s or max(p.deadline_floor_s, p.deadline_factor * secs)
        if self._heartbeat_task is None and self.policy.heartbeat_s > 0:
            self._heartbeat_task = asyncio.create_task(self._heartbeat_loop(), name="geometry-heartbeat")
        return secs

    async def push_window(self, source: str, ring: Any, refs: list[Any], first_seq: int) -> list[Any]:
        """One window; on a fault the worker is restarted and the window retried once, then the fault is
        raised (``GeometryFault``; ``GeometryUnavailable`` when no restart is possible)."""
        wire = [(r.slot, r.generation, r.frame_index) for r in refs]
        msg = ("window", source, ring.name, wire, first_seq)
        for attempt in (1, 2):
            try:
                return await self.request(msg, self.deadline_s)
            except GeometryFault as fault:
                log.error("geometry worker fault: %s", fault,
                          extra={"source": source, "attempt": attempt, "reason": fault.reason})
                await self.recover(fault)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def flush(self, source: str) -> list[Any]:
        """The source's held-back frames; after a fault the restarted worker has none (returns [])."""
        try:
            return await self.request(("flush", source), self.deadline_s)
        except GeometryFault as fault:
            await self.recover(fault)
            raise

    async def detach(self, ring_name: str) -> None:
        """Close the worker's view of a ring (at shutdown: the caller bounds the wait; a slow answer is no
        fault, the process is about to stop anyway)."""
        await self.request(("detach", ring_name), None)

    async def request(self, msg: tuple[Any, ...], deadline: float | None) -> Any:
        async with self._lock:
            if self.unavailable is not None:
                raise GeometryUnavailable(self.unavailable)
            return await self._call(msg, deadline)

    async def _call(self, msg: tuple[Any, ...], deadline: float | None) -> Any:
        """One request/reply on the pipe; caller holds the lock (or is starting up)."""
        loop = asyncio.get_running_loop()
        conn, proc = self._conn, self._proc

        def roundtrip() -> Any:
            try:
                conn.send(msg)
                return conn.recv()
            except (EOFError, OSError, BrokenPipeError) as exc:
                proc.join(1)
                raise GeometryWorkerDied(
                    f"geometry worker process died during {msg[0]!r} (exit code {proc.exitcode}): "
                    f"{type(exc).__name__}") from None

        self.busy_since = time.monotonic()
        try:
            fut = loop.run_in_executor(self._executor, roundtrip)
            try:
                done, _ = await asyncio.wait({fut}, timeout=deadline)
            except asyncio.CancelledError:
                fut.cancel()  # not started yet: never sent; running: its reply is read by its own thread
                raise
            if not done:
                _kill(proc)  # the pipe thread then sees EOF and returns
                with contextlib.suppress(GeometryWorkerDied):
                    await fut
                raise GeometryTimeout(f"geometry worker missed the {deadline:.1f} s deadline of {msg[0]!r}: "
                                      "killed")
            status, value = fut.result()
        finally:
            self.busy_since = None
        if status == "error":
            raise GeometryError(value)
        return value

    async def recover(self, fault: GeometryFault) -> None:
        """Kill what is left of the worker and start a new one (load + warm-up), within the budget."""
        async with self._lock:
            if self.unavailable is not None:
                raise GeometryUnavailable(self.unavailable)
            try:
                await self._recover_locked(fault)
            except GeometryUnavailable as exc:
                self.unavailable = str(exc)
                raise

    async def _recover_locked(self, fault: GeometryFault) -> None:
        t0 = time.monotonic()
        self.last_fault = fault.reason
        now = time.monotonic()
        while self._restart_times and now - self._restart_times[0] > _BUDGET_WINDOW_S:
            self._restart_times.popleft()
        if len(self._restart_times) >= self.policy.restart_budget:
            _kill(self._proc)
            raise GeometryUnavailable(f"{fault}, and the restart budget is spent "
                                      f"({self.policy.restart_budget} restarts per {_BUDGET_WINDOW_S:.0f} s)")
        self._restart_times.append(now)
        self.restarts += 1
        self.restarting = True
        try:
            _kill(self._proc)
            with contextlib.suppress(Exception):
                self._conn.close()
            log.warning("restarting the geometry worker", extra={"reason": fault.reason,
                                                                 "restarts": self.restarts})
            try:
                await asyncio.wait_for(self._start_and_warm(), self.policy.restart_timeout_s)
            except Exception as exc:
                _kill(self._proc)
                raise GeometryUnavailable(
                    f"geometry worker restart failed: {type(exc).__name__}: {exc}") from None
        finally:
            self.restarting = False
        self.last_recovery_s = time.monotonic() - t0
        log.info("geometry worker restarted", extra={"seconds": round(self.last_recovery_s, 2),
                                                     "generation": self.generation})

    async def _start_and_warm(self) -> None:
        await self.start()
        await self._call(("warmup",), None)

    async def _heartbeat_loop(self) -> None:
        """While idle: a ping every ``heartbeat_s``; no pong (hung) or EOF (dead) -> restart."""
        period = self.policy.heartbeat_s
        while True:
            await asyncio.sleep(period)
            if self._lock.locked():
                continue  # a window is in flight: its deadline watches the worker
            try:
                await self.request(("ping",), period)
                continue
            except GeometryFault as exc:
                fault = exc
            except GeometryUnavailable:
                return  # the window path already reported it
            except GeometryError:
                continue
            log.error("geometry worker heartbeat: %s", fault)
            try:
                await self.recover(fault)
            except GeometryUnavailable as exc:
                if self.on_unavailable is not None:
                    self.on_unavailable(str(exc))
                return

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    async def stop(self, timeout: float | None = None) -> None:
        """Ask the process to exit (it needs ``stop_timeout_s``, measured: Jittor's exit); kill it when it is
        still busy or still alive after that."""
        timeout = self.policy.stop_timeout_s if timeout is None else timeout
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat_task
            self._heartbeat_task = None
        if self._proc is None:
            return
        t0 = time.monotonic()
        try:  # a window still running (cancelled by the shutdown grace) may finish within the timeout
            await asyncio.wait_for(self._lock.acquire(), timeout)
            locked = True
        except TimeoutError:
            locked = False
        if locked and self.alive:
            with contextlib.suppress(Exception):
                self._conn.send(("stop",))
        left = max(0.5, timeout - (time.monotonic() - t0))
        await asyncio.to_thread(self._proc.join, left)
        if self._proc.is_alive():
            log.warning("geometry worker still busy at shutdown: killing it", extra={"timeout_s": timeout})
            _kill(self._proc)
        else:
            log.info("geometry worker exited", extra={"seconds": round(time.monotonic() - t0, 2),
                                                      "exit_code": self._proc.exitcode})
        with contextlib.suppress(Exception):
            self._conn.close()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._proc = None
        if locked:
            self._lock.release()

    def shutdown(self) -> None:
        """Last resort (no event loop): kill the process, drop the pipe thread."""
        if self._proc is not None and self._proc.is_alive():
            _kill(self._proc)
        self._executor.shutdown(wait=False, cancel_futures=True)


def _kill(proc: Any) -> None:
    if proc is not None and proc.is_alive():
        proc.kill()
        proc.join(10)


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    # the daemon coordinates shutdown (it sends "stop" or kills us); a terminal's Ctrl-C or systemd's SIGTERM
    # to the group must not kill the worker in the middle of a window the daemon is still waiting for
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _worker_main(conn: Any, spec: ProcessorSpec) -> None:
    """Child process: build the processor, then serve requests until "stop" or EOF."""
    _die_with_parent()
    set_process_title("geometryd: geometry")
    setup_logging(spec.log_level, spec.log_format)
    processor: Processor | None = None
    sessions: dict[str, Session] = {}
    rings: dict[str, Any] = {}
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        op = msg[0]
        try:
            if op == "stop":
                for ring in rings.values():
                    ring.close()
                conn.send(("ok", None))
                return
            if op == "ping":
                reply: Any = time.monotonic()
            elif op == "load":
                t0 = time.monotonic()
                processor = spec.build()
                reply = time.monotonic() - t0
            elif op == "warmup":
                assert processor is not None
                reply = warm_up(processor, spec.params)
            elif op == "window":
                _, source, ring_name, wire, first_seq = msg
                assert processor is not None
                ring = rings.get(ring_name)
                if ring is None:
                    ring = rings[ring_name] = FrameRing.attach(ring_name)
                refs = [SlotRef(*w) for w in wire]
                frames = np.stack([ring.frame(r) for r in refs])
                points = np.stack([ring.prior_points(r) for r in refs])
                mask = np.stack([ring.prior_mask(r) for r in refs])
                for r in refs:  # the slots must not have been reused while we copied them
                    ring.verify(r)
                session = sessions.get(source)
                if session is None:
                    session = sessions[source] = processor.new_session()
                reply = session.push_window(frames, points, mask, first_seq)
            elif op == "flush":
                session = sessions.pop(msg[1], None)
                reply = session.flush() if session is not None else []
            elif op == "detach":
                ring = rings.pop(msg[1], None)
                if ring is not None:
                    ring.close()
                reply = None
            else:
                raise ValueError(f"unknown request {op!r}")
            conn.send(("ok", reply))
        except Exception as exc:  # reported to the daemon, which counts the window's frames as dropped
            log.error("geometry worker: %s failed: %s", op, exc)
            log.debug("%s", traceback.format_exc())
            conn.send(("error", f"{op}: {type(exc).__name__}: {exc}"))


def set_process_title(title: str) -> None:
    """Name this process for ps/top/systemd-cgls (``geometryd: sidecar``, ``geometryd: geometry``)."""
    try:
        import setproctitle
    except ImportError:  # pinned in requirements.txt; a missing module must not stop a worker
        return
    setproctitle.setproctitle(title)


def warm_up(processor: Processor, params: SessionParams) -> float:
    """Run one dummy window (random frames, a tilted-plane prior) so every kernel compiles before READY=1.

    Kernels are compiled per shape: the warm-up uses the full window at the processing size; a shorter last
    window of a stream still compiles its own kernels when it comes."""
    t0 = time.monotonic()
    rng = np.random.default_rng(0)
    n, h, w = params.window_size, params.height, params.width
    frames = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    ys, xs = np.meshgrid(np.linspace(-0.5, 0.5, h), np.linspace(-0.5, 0.5, w), indexing="ij")
    z = 1.0 + 2.0 * (0.5 - ys)  # a floor-like tilted plane: depth varies, so the prior statistics are sane
    plane = np.stack([xs * z, ys * z, z], -1).astype(np.float32)
    points = np.broadcast_to(plane, (n, h, w, 3)).copy()
    mask = np.ones((n, h, w), dtype=bool)
    session = processor.new_session()
    session.push_window(frames, points, mask, 0)
    session.flush()
    return time.monotonic() - t0
