"""One batch worker: the model loaded once, then one video file after another (`geometryd batch`).

The same code path as `geometryd process` (daemon/offline/run.py, options daemon/offline/options.py): streamed
PyAV decode -> MoGe priors through the real sidecar process -> GeometryCrafter -> ``point_map`` float16 /
``mask`` bool npz. The difference is lifetime: the Jittor networks and the sidecar are started once per
worker (a Ray actor, or the CLI process when serial) and reused for every video.

A failing video raises :class:`VideoFailed` with a one-line message; the worker stays usable.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from daemon.jittor_env import import_jittor
from daemon.offline.options import ProcessOptions, UsageError
from daemon.offline.outputs import NpzSink
from daemon.offline.priors import PriorClient
from daemon.offline.process import network_dtype
from daemon.offline.run import run_video
from daemon.pipeline import GeometryCrafter

log = logging.getLogger(__name__)

__all__ = ["BatchWorker", "ProcessOptions", "VideoFailed", "VideoResult"]


class VideoFailed(RuntimeError):
    """This input cannot be processed (bad file, unsupported size...); the message is one line."""


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


class BatchWorker:
    """Holds the GeometryCrafter networks and one prior sidecar; :meth:`process` runs one video."""

    def __init__(self, opts: ProcessOptions, name: str = "local") -> None:
        self.opts = opts
        self.name = name
        self._gc: GeometryCrafter | None = None
        self._priors: PriorClient | None = None
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
        self._priors = PriorClient(Path(o.model_dir) / "moge" / "model.pt", device=o.device,
                                   python=o.prior_python, chunk=o.decode_chunk)
        self._priors.start()
        self.load_s = time.perf_counter() - t0
        log.info("batch worker ready", extra={"worker": self.name, "seconds": round(self.load_s, 2)})
        return self.load_s

    def close(self) -> None:
        if self._priors is not None:
            try:
                self._priors.close()
            except Exception as exc:  # noqa: BLE001 - best effort at shutdown
                log.warning("sidecar stop failed: %s", exc)
            self._priors = None

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
        assert self._gc is not None and self._priors is not None
        gc = self._gc
        try:
            clip, _ = run_video(lambda: gc, self._priors, video, self.opts, lambda _clip: [NpzSink(out)])
        except UsageError as exc:
            raise VideoFailed(str(exc)) from exc
        return clip.t
