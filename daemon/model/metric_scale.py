"""Metric scale for GeometryCrafter's relative output, from a metric prior (MoGe-2, ``geometry.metric``).

Per window (the frames one pushed window makes final) the raw factor is the median, over the pixels valid
in both GeometryCrafter's mask and the prior's (positive finite depths), of ``prior depth / output depth``:
a median of ratios, robust to the prior's outliers and to the mask edges. Consecutive windows follow the
continuity rule of the streaming statistics (daemon/model/streaming_stats.py): under ``follow`` the factor
is anchored on a segment's first window, then moves a fraction ``smoothing`` of the way to each window's raw
factor in log space, at most ``max_step`` per window, and is re-anchored when a new segment starts (scene
cut, source restart); under ``frozen`` the first window's factor is kept for the session. A window without
a single valid pixel keeps the current factor (none yet: the frames stay relative).
"""

from __future__ import annotations

import math

import numpy as np

from daemon.model.streaming_stats import PolicyParams


def window_factor(prior_depth: np.ndarray, depth: np.ndarray, valid: np.ndarray) -> float | None:
    """Median of prior_depth / depth over ``valid`` pixels where both are positive and finite (None: none)."""
    ok = (np.asarray(valid, bool) & np.isfinite(prior_depth) & (prior_depth > 0)
          & np.isfinite(depth) & (depth > 0))
    if not ok.any():
        return None
    ratio = prior_depth[ok].astype(np.float64) / depth[ok].astype(np.float64)
    return float(np.median(ratio))


def follow_factor(old: float | None, new: float, params: PolicyParams) -> float:
    """Anchored on ``new`` when ``old`` is None, else ``smoothing`` of the way in log space, at most
    ``max_step`` (log units) per window."""
    if old is None:
        return new
    step = params.smoothing * math.log(new / old)
    return old * math.exp(max(-params.max_step, min(params.max_step, step)))


class MetricScale:
    """The factor of a session, window after window (module docstring)."""

    def __init__(self, policy: str = "follow", params: PolicyParams | None = None) -> None:
        self.policy = policy
        self.params = params or PolicyParams()
        self.factor: float | None = None
        self.segment = -1
        self.raw: float | None = None  # the last window's raw factor (logs, tests)

    def update(self, raw: float | None, segment: int) -> float | None:
        """The factor for a window of ``segment`` whose raw factor is ``raw``; None while none is known."""
        self.raw = raw
        if raw is None:
            return self.factor
        if self.factor is None or (self.policy == "follow" and segment != self.segment):
            self.factor = raw
        elif self.policy == "follow":
            self.factor = follow_factor(self.factor, raw, self.params)
        self.segment = segment
        return self.factor
