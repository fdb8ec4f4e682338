"""One batch worker: the model loaded once, then one video file after another (`geometryd batch`).

Same stages and parameters as `geometryd process` (daemon/offline/process.py): PyAV decode -> MoGe priors
through the
real sidecar process -> ``GeometryCrafter.__call__`` -> ``point_map`` float16 / ``mask`` bool npz. The
difference is lifetime: the Jittor networks and the sidecar are started once per worker (a Ray actor, or the
CLI process when serial) and reused for every video. The sidecar's asyncio supervisor runs on an event loop
in a background thread, so its health pings keep running between videos.

A failing video raises :class:`VideoFailed` with a one-line message; the worker stays usable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from daemon.jittor_env import import_jittor
from daemon.offline.process import network_dtype
from daemon.pipeline import GeometryCrafter
from daemon.shm import FrameRing
from daemon.stages.prior import PriorSettings, PriorSidecar
from daemon.video import VideoError, read_frames

log = logging.getLogger(__name__)

_ring_ids = itertools.count()


class VideoFailed(RuntimeError):
    """This input cannot be processed (bad file, unsupported size...); the message is one line."""


@dataclasses.dataclass(frozen=True)
class ProcessOptions:
    """The processing options of `geometryd process` (same names, same defaults)."""

    model_dir: str
    variant: str = "diff"
    height: int = 0
    width: int = 0
    window: int = 110
    overlap: int = 25
    steps: int = 5
    decode_chunk: int = 8
    stride: int = 1
    max_frames: int = -1
    seed: int = 42
    low_memory: bool = False
    dtype: str = "auto"
    device: str = "auto"
    prior_python: str = ""


@dataclasses.dataclass(frozen=True)
class VideoResult:
    input: str
    output: str
    status: str  # "ok" | "failed" | "skipped"
    frames: int = 0
    seconds: float = 0.0
    error: str | None = None
    worker: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def write_npz_atomic(path: Path, point_map: np.ndarray, mask: np.ndarray) -> None:
    """Write ``<path>`` through a temporary name: an existing npz is always complete (resumable batches)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, point_map=point_map.astype(np.float16), mask=mask.astype(bool))
    os.replace(tmp, path)


class BatchWorker:
    """Holds the GeometryCrafter networks and one prior sidecar; :meth:`process` runs one video."""

    def __init__(self, opts: ProcessOptions, name: str = "local") -> None:
        self.opts = opts
        self.name = name
        self._gc: Any = None
        self._sidecar: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.load_s = 0.0

    # ---- lifetime --------------------------------------------------------------------------------------
    def start(self) -> float:
        """Load the networks and start the sidecar (call from the main thread: Jittor's signal handlers are
        removed there, daemon.jittor_env). Returns the seconds it took."""
        if self._gc is not None:
            return self.load_s

        t0 = time.perf_counter()
        import_jittor()
        o = self.opts
        self._gc = GeometryCrafter.from_pretrained(o.model_dir, variant=o.variant,
                                                   dtype=network_dtype(o.dtype))
        ckpt = Path(o.model_dir) / "moge" / "model.pt"
        settings = PriorSettings(checkpoint=str(ckpt), python=o.prior_python, device=o.device, fp16=False,
                                 resolution_level=9, request_timeout_s=3600.0)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="batch-prior-loop", daemon=True)
        self._thread.start()
        self._sidecar = PriorSidecar(settings, ckpt, chunk=o.decode_chunk)
        self._call(self._sidecar.start())
        self.load_s = time.perf_counter() - t0
        log.info("batch worker ready", extra={"worker": self.name, "seconds": round(self.load_s, 2)})
        return self.load_s

    def close(self) -> None:
        if self._loop is None:
            return
        if self._sidecar is not None:
            try:
                self._call(self._sidecar.stop())
            except Exception as exc:  # noqa: BLE001 - best effort at shutdown
                log.warning("sidecar stop failed: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)
        self._loop.close()
        self._loop = None

    def _call(self, coro: Any) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    # ---- one video -------------------------------------------------------------------------------------
    def process(self, video: str, out: str) -> VideoResult:
        """Run one file into ``out`` (npz). Never raises for a bad input: the result says failed."""
        t0 = time.perf_counter()
        try:
            frames = self._run(Path(video), Path(out))
        except Exception as exc:  # noqa: BLE001 - one bad input must not stop the batch
            msg = " ".join(f"{type(exc).__name__}: {exc}".split())
            log.error("input failed", extra={"input": video, "error": msg})
            return VideoResult(video, out, "failed", 0, time.perf_counter() - t0, msg, self.name)
        return VideoResult(video, out, "ok", frames, time.perf_counter() - t0, None, self.name)

    def _run(self, video: Path, out: Path) -> int:
        self.start()
        o = self.opts
        try:
            frames, _fps = read_frames(video, stride=o.stride, max_frames=o.max_frames)
        except VideoError as exc:
            raise VideoFailed(str(exc)) from exc
        if len(frames) == 0:
            raise VideoFailed(f"no frames decoded from {video}")
        t, h0, w0 = frames.shape[:3]
        height, width = (o.height, o.width) if o.height else (h0, w0)
        if height % 64 or width % 64:
            raise VideoFailed(f"source size {w0}x{h0} is not a multiple of 64: give --height and --width")
        if h0 % 2 or w0 % 2:
            raise VideoFailed(f"source size {w0}x{h0} must be even in both dimensions")
        if not 0.5 <= width / height <= 2.0:
            raise VideoFailed(f"processing aspect ratio {width}x{height} is outside [0.5, 2]")
        points, mask = self._call(self._priors(frames))
        res = self._gc(frames, points, mask, height=height, width=width, window_size=o.window,
                       overlap=o.overlap, num_inference_steps=o.steps, decode_chunk_size=o.decode_chunk,
                       low_memory_usage=o.low_memory, seed=o.seed, quiet=True)
        write_npz_atomic(out, res.point_map, res.mask)
        return t

    async def _priors(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The priors of every frame through the worker's sidecar (as daemon.stages.prior.run_priors)."""
        t, h, w, _ = frames.shape
        points = np.empty((t, h, w, 3), np.float32)
        mask = np.empty((t, h, w), bool)
        n_slots = max(1, min(16, t))
        ring = FrameRing.create(f"batch{next(_ring_ids)}", n_slots, h, w)
        try:
            for start in range(0, t, n_slots):
                refs = [ring.write_frame(frames[i], i,
                                         float(i)) for i in range(start, min(t, start + n_slots))]
                await self._sidecar.compute(ring, refs)
                for ref in refs:
                    points[ref.frame_index] = ring.prior_points(ref)
                    mask[ref.frame_index] = ring.prior_mask(ref)
                    ring.release(ref)
        finally:
            try:
                await self._sidecar.detach(ring.name)
            except Exception:  # noqa: BLE001 - the ring goes away anyway
                pass
            ring.close()
            ring.unlink()
        return points, mask
