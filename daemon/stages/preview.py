"""The preview tier: each frame's MoGe prior, published as soon as it is computed (docs/streaming.md).

A preview is the prior point map divided by a scale ``s`` so that it is in the units of the refined output
(the pipeline's output is in units of the prior normalised by the session's ``s``):

- the session's current scale: the ``prior_scale`` of the newest refined frame of the current segment;
- before the first refined frame of a segment: the mean valid prior depth of the segment's frames seen so
  far (what the session anchors a segment on);
- a scene cut (the mean valid depth changes by more than ``cut_threshold`` in log between consecutive
  frames and by more than ``JITTER_FACTOR`` x the recent median change, the session's rule) starts a new
  segment here too: refined frames from before the cut no longer set the scale.

Intrinsics: the prior's own per-frame focal (spec 4.2 step 5), normalised as ``FrameResult.intrinsics``.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

import numpy as np

from daemon.model.resample import normalized_grid
from daemon.model.streaming_stats import JITTER_FACTOR, JITTER_FRAMES


@dataclass
class PreviewFrame:
    """What the MQTT publisher and the viewer read of a result (``FrameResultLike``)."""

    frame_index: int
    window_id: int
    point_map: np.ndarray  # (H, W, 3) float32, prior / s
    depth: np.ndarray  # (H, W) float32
    mask: np.ndarray  # (H, W) bool
    intrinsics: tuple[float, float, float, float]
    prior_scale: float = 1.0


def prior_intrinsics(points: np.ndarray, valid: np.ndarray) -> tuple[float, float, float, float]:
    """Normalised (fx, fy, cx, cy) of a prior point map: grid-unit inverse focal from x/z and y/z."""
    h, w = valid.shape
    z = points[..., 2]
    ok = valid & np.isfinite(z) & (z > 1e-6)
    if not ok.any():
        return (0.0, 0.0, 0.5, 0.5)
    gx, gy = normalized_grid(h, w)
    gxx = np.broadcast_to(gx[None, :], (h, w))[ok].astype(np.float64)
    gyy = np.broadcast_to(gy[:, None], (h, w))[ok].astype(np.float64)
    xz = points[..., 0][ok] / z[ok]
    yz = points[..., 1][ok] / z[ok]
    # least squares x/z = c + f * g (the slope is the inverse focal in grid units)
    fx = float(np.polyfit(gxx, xz, 1)[0]) if np.ptp(gxx) > 0 else 0.0
    fy = float(np.polyfit(gyy, yz, 1)[0]) if np.ptp(gyy) > 0 else 0.0
    nfx = (w - 1) / (2.0 * w * fx) if fx else 0.0
    nfy = (h - 1) / (2.0 * h * fy) if fy else 0.0
    return (nfx, nfy, 0.5, 0.5)


class PreviewScale:
    """The scale previews of one source are brought to (module docstring)."""

    def __init__(self, cut_threshold: float = 0.4) -> None:
        self.cut_threshold = cut_threshold
        self.segment_start = 0  # frame seq where the current segment began
        self.cuts = 0
        self._session: float | None = None
        self._sum = 0.0
        self._n = 0
        self._last_mean: float | None = None
        self._recent: deque[float] = deque(maxlen=JITTER_FRAMES)

    def observe_prior(self, seq: int, z: np.ndarray, valid: np.ndarray) -> None:
        ok = valid & np.isfinite(z) & (z > 0)
        n = int(ok.sum())
        if not n:
            return
        total = float(z[ok].sum(dtype=np.float64))
        mean = total / n
        if self._last_mean is not None:
            d = abs(math.log(mean / self._last_mean))
            jitter = statistics.median(self._recent) if len(self._recent) >= 4 else 0.0
            self._recent.append(d)  # cuts included: the median stays robust, the history unbiased
            if d > self.cut_threshold and d > JITTER_FACTOR * jitter:
                self.cuts += 1
                self.restart(seq)
        self._last_mean = mean
        if self._session is None:
            self._sum += total
            self._n += n

    def observe_refined(self, seq: int, prior_scale: float) -> None:
        if seq >= self.segment_start and prior_scale > 0:
            self._session = prior_scale

    def restart(self, seq: int) -> None:
        self.segment_start = seq
        self._session = None
        self._sum, self._n = 0.0, 0

    @property
    def scale(self) -> float:
        if self._session is not None:
            return self._session
        return max(self._sum / self._n, 1e-3) if self._n else 1.0


def make_preview(points: np.ndarray, mask: np.ndarray, scale: float, frame_index: int, window_id: int
                 ) -> PreviewFrame:
    """A preview of one prior frame at ``scale``."""
    s = np.float32(scale)
    valid = np.asarray(mask, bool) & np.isfinite(points[..., 2]) & (points[..., 2] > 0)
    pm = (np.asarray(points, np.float32) / s).astype(np.float32)
    return PreviewFrame(frame_index, window_id, pm, pm[..., 2].copy(), valid, prior_intrinsics(points, valid),
                        float(scale))
