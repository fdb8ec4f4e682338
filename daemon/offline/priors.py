"""MoGe priors for offline runs: one real sidecar process (daemon.stages.prior.PriorSidecar) behind a blocking
call, fed through a shared-memory FrameRing a batch of frames at a time.

The sidecar's asyncio supervisor runs on an event loop in a background thread, so its health pings keep
running between requests and between the videos of a batch worker. The ring is sized by bytes
(:func:`prior_ring_slots`); a request carries up to one ring of frames and the sidecar runs MoGe on them in
batches of ``chunk`` frames, so the batches MoGe sees depend only on the frame size and ``chunk``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from daemon.config import PriorConfig, prior_device
from daemon.shm import FrameRing, SlotRef
from daemon.stages.prior import PriorSidecar

log = logging.getLogger(__name__)

PRIOR_RING_BYTES = 512 << 20  # shared-memory budget of the prior ring (frame + points + mask per slot)

_ring_ids = itertools.count()


def prior_ring_slots(height: int, width: int, most: int = 16) -> int:
    """Ring slots for the offline prior: at most ``most``, fewer for big frames (a 3840x2160 slot is
    133 MB: 3 slots instead of 16 keep the ring at 0.4 GB instead of 2.1 GB)."""
    per_slot = height * width * (3 + 12 + 1)
    return max(1, min(most, PRIOR_RING_BYTES // per_slot))


class PriorClient:
    """Blocking MoGe priors through one long-lived sidecar: :meth:`put` up to :meth:`batch` frames,
    :meth:`flush`."""

    def __init__(self, checkpoint: Path, *, device: str = "auto", python: str = "", chunk: int = 8,
                 request_timeout_s: float = 3600.0) -> None:
        self.checkpoint = Path(checkpoint)
        self.settings = PriorConfig(checkpoint=str(checkpoint), python=python, device=prior_device(device),
                                    fp16=False, resolution_level=9, request_timeout_s=request_timeout_s)
        self.chunk = chunk
        self._sidecar: PriorSidecar | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ring: FrameRing | None = None
        self._refs: list[SlotRef] = []

    def start(self) -> None:
        if self._sidecar is not None:
            return
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="offline-prior-loop", daemon=True)
        self._thread.start()
        sidecar = PriorSidecar(self.settings, self.checkpoint, chunk=self.chunk)
        self._call(sidecar.start())
        self._sidecar = sidecar

    def _call(self, coro: Any) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @staticmethod
    def batch(height: int, width: int) -> int:
        """Frames per request for this frame size (one ring)."""
        return prior_ring_slots(height, width)

    def put(self, frame: np.ndarray, index: int) -> int:
        """Write one (H,W,3) uint8 frame into the ring for the next :meth:`flush`; returns the frames waiting.
        At most :meth:`batch` frames wait (the caller flushes when that many do)."""
        h, w, _ = frame.shape
        ring = self._ring
        if ring is None or (ring.height, ring.width) != (h, w):
            if self._refs:
                raise ValueError(f"frame size changed to {w}x{h} with {len(self._refs)} frames waiting")
            self.end_clip()
            ring = self._ring = FrameRing.create(f"offline{next(_ring_ids)}", self.batch(h, w), h, w)
        if len(self._refs) == ring.n_slots:
            raise ValueError(f"{len(self._refs)} frames already wait: flush() first")
        self._refs.append(ring.write_frame(frame, index, float(index)))
        return len(self._refs)

    def flush(self, on_frame: Callable[[int, np.ndarray, np.ndarray], None]) -> None:
        """MoGe on the waiting frames (one request): ``on_frame(index, points (H,W,3) float32, mask (H,W)
        bool)`` per frame, in order, on views into the ring (valid only during the call: copy what must
        stay)."""
        refs, self._refs = self._refs, []
        if not refs:
            return
        ring = self._ring
        assert ring is not None
        try:
            self.start()  # on first use: a file that fails before its first batch never starts a sidecar
            assert self._sidecar is not None
            self._call(self._sidecar.compute(ring, refs))
            for ref in refs:
                on_frame(ref.frame_index, ring.prior_points(ref), ring.prior_mask(ref))
        finally:
            for ref in refs:
                ring.release(ref)

    def end_clip(self) -> None:
        """Drop the ring (its shared memory) until the next request."""
        ring, self._ring = self._ring, None
        if ring is None:
            return
        for ref in self._refs:
            ring.release(ref)
        self._refs = []
        if self._sidecar is not None:
            try:
                self._call(self._sidecar.detach(ring.name))
            except Exception as exc:  # noqa: BLE001 - the ring goes away anyway
                log.debug("detaching ring %s failed: %s", ring.name, exc)
        ring.close()
        ring.unlink()

    def close(self) -> None:
        self.end_clip()
        if self._sidecar is not None:
            try:
                self._call(self._sidecar.stop())
            finally:
                self._sidecar = None
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(5)
            self._loop.close()
            self._loop = None

    def __enter__(self) -> PriorClient:  # noqa: PYI034 - final class
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
