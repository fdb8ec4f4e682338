"""The geometry stage: runs the Jittor GeometryCrafter pipeline on windows, in ONE worker process.

Every source's windows go through one worker (one GPU, one window at a time) so the event loop stays free
(ingest, MQTT, HTTP, watchdog) while a window computes. It is a child process, not a thread, because Jittor
holds the GIL while it computes (see :class:`GeometryWorker`). Each source has its own ``StreamingSession``
(daemon.pipeline) in the worker, holding its carried state. The worker reads frames and priors from the
source's shared-memory ring (one copy, on the way to the device).

Pipe protocol (``multiprocessing`` duplex Connection, pickled tuples, daemon -> worker; one request in
flight at a time, serialised by ``GeometryWorker``'s lock; every request but "stop" is awaited):

    request                                 worker does                              reply value ("ok", v)
    ("load",)                               build the processor (model load)         seconds (float)
    ("warmup",)                             one dummy full window (:func:`warm_up`)  seconds (float)
    ("window", source, ring_name,           attach the ring on first use, copy the   [FrameResult, ..] that
     [(slot, generation, frame_index)..],   frames + priors, ``verify`` every ref,   are final now (the
     first_seq, intrinsics|None)            push to the source's StreamingSession    session holds the rest)
                                            (created on the source's first window;
                                            intrinsics: the source's known K, normalised)
    ("flush", source)                       end and forget the source's session      [FrameResult, ..] held
                                                                                     back ([] if none)
    ("detach", ring_name)                   close its view of the ring               None
    ("ping",)                               nothing                                  worker's monotonic clock
    ("stop",)                               close every ring, reply, exit            None (never read)

    daemon's time limit per request: load and warmup none at startup, ``restart_timeout_s`` for the
    whole restart (load + warmup); window and flush the window deadline; ping ``heartbeat_s`` (sent only
    while idle); detach 5 s (supervisor.py; no fault, the process is about to stop); stop
    ``stop_timeout_s`` for the process to exit, then SIGKILL.

A request that raises in the worker (a stale slot, an unknown op, a pipeline error) is answered by
``("error", "<op>: <ExceptionType>: <message>")``; the worker keeps serving, the daemon raises
``GeometryError`` and counts the window's new frames as dropped (``geometry_error``). A request past its
limit, or EOF on the pipe (the process died), is a fault (``GeometryTimeout``, ``GeometryWorkerDied``): the
daemon kills the process and starts a new one (see :class:`GeometryWorker`). The worker ignores SIGINT/SIGTERM
(the daemon coordinates shutdown) and dies with its parent (PR_SET_PDEATHSIG).

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
from typing import Any, Protocol

import numpy as np

from daemon.config import Config, GeometryConfig, LoggingConfig, ModelConfig, StreamingConfig
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
                    first_frame_index: int, intrinsics: tuple[float, ...] | None = None) -> list[Any]: ...

    def flush(self) -> list[Any]: ...


class Processor(Protocol):
    name: str

    def new_session(self) -> Session: ...


class PipelineGeometry:
    """The real processor: ``GeometryCrafter.from_pretrained`` + one ``StreamingSession`` per source."""

    name = "geometrycrafter"

    def __init__(self, model: ModelConfig, geometry: GeometryConfig, streaming: StreamingConfig) -> None:

        self.geometry, self.streaming = geometry, streaming
        self.gc = GeometryCrafter.from_pretrained(model.dir, variant=model.variant, dtype=model.dtype)

    def new_session(self) -> Session:

        g, st = self.geometry, self.streaming
        return StreamingSession(
            self.gc, height=g.height, width=g.width, window_size=g.window_size, overlap=g.overlap,
            num_inference_steps=g.steps, decode_chunk_size=g.decode_chunk_size,
            force_projection=g.force_projection, force_fixed_focal=g.force_fixed_focal,
            use_extract_interp=g.use_extract_interp, seed=g.seed, low_memory_usage=g.low_memory,
            stats_policy=st.stats,
            stats_params=PolicyParams(st.stats_smoothing, st.stats_max_step, st.cut_threshold),
            metric=g.metric,
        )


def _four(values: tuple[float, ...]) -> tuple[float, float, float, float]:
    fx, fy, cx, cy = values
    return fx, fy, cx, cy


class _IdentitySession:
    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self._window_id = 0
        self._emitted = -1

    def push_window(self, frames: np.ndarray, prior_points: np.ndarray, prior_mask: np.ndarray,
                    first_frame_index: int, intrinsics: tuple[float, ...] | None = None) -> list[Any]:

        if self.delay_s:
            time.sleep(self.delay_s)
        out = []
        for i in range(frames.shape[0]):
            idx = first_frame_index + i
            if idx <= self._emitted:
                continue  # overlap frame already emitted by the previous window
            pts = prior_points[i].astype(np.float32)
            out.append(FrameResult(idx, self._window_id, pts, pts[..., 2].copy(), prior_mask[i].copy(),
                                   _four(intrinsics) if intrinsics else (1.0, 1.0, 0.5, 0.5)))
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
    """What the worker process builds (the real pipeline, or the plumbing-only identity), from the config
    sections it needs; ``geometry`` also holds the worker's supervision keys (deadlines, heartbeat,
    budget)."""

    kind: str  # "pipeline" | "identity"
    model: ModelConfig
    geometry: GeometryConfig
    streaming: StreamingConfig
    logging: LoggingConfig
    identity_delay_s: float = 0.0

    @classmethod
    def from_config(cls, cfg: Config, identity_delay_s: float | None = None) -> ProcessorSpec:
        kind = "pipeline" if identity_delay_s is None else "identity"
        return cls(kind, cfg.model, cfg.geometry, cfg.streaming, cfg.logging, identity_delay_s or 0.0)

    def build(self) -> Processor:
        if self.kind == "identity":
            return IdentityGeometry(self.identity_delay_s)
        return PipelineGeometry(self.model, self.geometry, self.streaming)


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

    def __init__(self, spec: ProcessorSpec) -> None:
        self.spec = spec
        self.policy = spec.geometry  # window_deadline_s, deadline_*, heartbeat_s, restart_*, stop_timeout_s
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

    async def push_window(self, source: str, ring: Any, refs: list[Any], first_seq: int,
                          intrinsics: tuple[float, ...] | None = None) -> list[Any]:
        """One window; on a fault the worker is restarted and the window retried once, then the fault is
        raised (``GeometryFault``; ``GeometryUnavailable`` when no restart is possible)."""
        wire = [(r.slot, r.generation, r.frame_index) for r in refs]
        msg = ("window", source, ring.name, wire, first_seq, intrinsics)
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
    setup_logging(spec.logging.level, spec.logging.format)
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
                reply = warm_up(processor, spec.geometry)
            elif op == "window":
                _, source, ring_name, wire, first_seq, intrinsics = msg
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
                reply = session.push_window(frames, points, mask, first_seq, intrinsics=intrinsics)
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


def warm_up(processor: Processor, geometry: GeometryConfig) -> float:
    """Run one dummy window (random frames, a tilted-plane prior) so every kernel compiles before READY=1.

    Kernels are compiled per shape: the warm-up uses the full window at the processing size; a shorter last
    window of a stream still compiles its own kernels when it comes."""
    t0 = time.monotonic()
    rng = np.random.default_rng(0)
    n, h, w = geometry.window_size, geometry.height, geometry.width
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
