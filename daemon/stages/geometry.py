"""The geometry stage: runs the Jittor GeometryCrafter pipeline on windows, in ONE worker process.

Every source's windows go through one worker (one GPU, one window at a time) so the event loop stays free
(ingest, MQTT, HTTP, watchdog) while a window computes. It is a child process, not a thread, because Jittor
holds the GIL while it computes (see :class:`GeometryWorker`). Each source has its own ``StreamingSession``
(daemon.pipeline) in the worker, holding its carried state. The worker reads frames and priors from the
source's shared-memory ring (one copy, on the way to the device).

``IdentityGeometry`` is a PLUMBING-ONLY processor (returns the prior as the result, optionally after a
fixed delay): it is selectable only through the hidden ``run --plumbing-identity-delay`` option (the
plumbing mode of bench/e2e_cpu.py), never by the config, and proves nothing about the pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

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
    stats_policy: str = "follow"  # streaming.stats and its parameters (daemon/streaming_stats.py)
    stats_smoothing: float = 0.5
    stats_max_step: float = 0.4
    cut_threshold: float = 0.4

    @classmethod
    def from_config(cls, g: Any, streaming: Any = None) -> "SessionParams":
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
        from daemon.pipeline import GeometryCrafter

        self.params = params
        self.low_memory = low_memory
        self.gc = GeometryCrafter.from_pretrained(model_dir, variant=variant, dtype=dtype)

    def new_session(self) -> Session:
        from daemon.pipeline import StreamingSession
        from daemon.streaming_stats import PolicyParams

        p = self.params
        return StreamingSession(
            self.gc, height=p.height, width=p.width, window_size=p.window_size, overlap=p.overlap,
            num_inference_steps=p.num_inference_steps, decode_chunk_size=p.decode_chunk_size,
            force_projection=p.force_projection, force_fixed_focal=p.force_fixed_focal,
            use_extract_interp=p.use_extract_interp, seed=p.seed, stats_policy=p.stats_policy,
            stats_params=PolicyParams(p.stats_smoothing, p.stats_max_step, p.cut_threshold),
        )


class _IdentitySession:
    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self._window_id = 0
        self._emitted = -1

    def push_window(self, frames: np.ndarray, prior_points: np.ndarray, prior_mask: np.ndarray,
                    first_frame_index: int) -> list[Any]:
        from daemon.pipeline import FrameResult

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


class GeometryWorkerDied(GeometryError):
    """The worker process exited (crash, OOM kill): the daemon cannot go on without it."""


class GeometryWorker:
    """The Jittor pipeline in ONE child process, shared by every source.

    Why a process and not a thread: Jittor never releases the GIL while it executes ops (no
    ``PyEval_SaveThread`` anywhere in jittor 1.3.11), so a worker *thread* stalls the event loop for the whole
    window (measured on 2 shared CPU cores, tiny model: loop lag p50 6.5 s, max 80 s -> missed watchdog
    pings, MQTT keepalives, RTSP reads; with this process: p50 0.75 ms, p99 11 ms, max 16 ms while a window
    computes). The child attaches each source's FrameRing (zero copy, like the sidecar) and keeps one
    StreamingSession per source; only slot refs go to it and FrameResults come back over a pipe. Calls are
    serialised (one window at a time on the one GPU) by a single-thread executor that waits on the pipe.
    """

    def __init__(self, spec: ProcessorSpec) -> None:
        self.spec = spec
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="geometry-pipe")
        self._proc: Any = None
        self._conn: Any = None
        self.busy_since: float | None = None

    async def start(self) -> float:
        """Spawn the process and build the processor (model load); returns the load seconds."""
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(target=_worker_main, args=(child, self.spec), name="geometryd-geometry",
                                 daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent
        return float(await self._call(("load",)))

    async def warm_up(self) -> float:
        return float(await self._call(("warmup",)))

    async def push_window(self, source: str, ring: Any, refs: list[Any], first_seq: int) -> list[Any]:
        wire = [(r.slot, r.generation, r.frame_index) for r in refs]
        return await self._call(("window", source, ring.name, wire, first_seq))  # type: ignore[no-any-return]

    async def flush(self, source: str) -> list[Any]:
        return await self._call(("flush", source))  # type: ignore[no-any-return]

    async def detach(self, ring_name: str) -> None:
        await self._call(("detach", ring_name))

    async def _call(self, msg: tuple[Any, ...]) -> Any:
        loop = asyncio.get_running_loop()

        def roundtrip() -> Any:
            self.busy_since = time.monotonic()
            try:
                self._conn.send(msg)
                return self._conn.recv()
            except (EOFError, OSError, BrokenPipeError) as exc:
                code = self._proc.exitcode if self._proc is not None else None
                raise GeometryWorkerDied(f"geometry worker process died (exit code {code}): {exc}") from None
            finally:
                self.busy_since = None

        status, value = await loop.run_in_executor(self._executor, roundtrip)
        if status == "error":
            raise GeometryError(value)
        return value

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    async def stop(self, timeout: float = 5.0) -> None:
        """Ask the process to exit; kill it when it is busy past ``timeout`` (mid-window at shutdown)."""
        if self._proc is None:
            return
        if self.busy_since is None and self.alive:
            with contextlib.suppress(Exception):
                self._conn.send(("stop",))
        await asyncio.to_thread(self._proc.join, timeout)
        if self._proc.is_alive():
            log.warning("geometry worker still busy at shutdown: killing it")
            self._proc.kill()
            await asyncio.to_thread(self._proc.join, 5)
        with contextlib.suppress(Exception):
            self._conn.close()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._proc = None

    def shutdown(self) -> None:
        """Last resort (no event loop): kill the process, drop the pipe thread."""
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _die_with_parent() -> None:
    import ctypes
    import signal

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
    import traceback

    from daemon.logging_setup import setup_logging
    from daemon.shm import FrameRing, SlotRef

    _die_with_parent()
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
                conn.send(("ok", None))
                return
            if op == "load":
                t0 = time.monotonic()
                processor = spec.build()
                reply: Any = time.monotonic() - t0
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
