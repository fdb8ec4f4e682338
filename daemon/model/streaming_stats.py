"""Prior statistics of a stream: which depth scale ``s`` and disparity range ``lo``/``hi`` normalise each
frame.

Pure numpy, no networks (docs/streaming.md "Statistics that follow the scene"). Two policies:

- ``frozen`` (the 0.1.0 behaviour, the baseline): :func:`daemon.model.prior_post.compute_stats` on the first
  window, kept for the life of the session (invalid pixels take part in the quantiles, as upstream).
- ``follow``: per segment (the stream between scene cuts and source restarts). A segment's first frames are
  anchored on the segment's own frames of their window. Each later window estimates a target over ALL its
  frames of the segment (the ``overlap`` frames it shares with the previous window plus the new ones),
  moves a fraction ``smoothing`` of the way in log space, at most ``max_step`` (log units) per window, and
  ramps that change linearly over the window's new frames, so consecutive frames never differ by more than
  ``max_step / stride``. Quantiles use valid pixels only. A scene cut is a change of the mean valid depth or
  of the 99 % inverse-depth quantile between consecutive frames larger than ``cut_threshold`` (log units)
  AND larger than ``JITTER_FACTOR`` times the median change of the recent frames (a noisy prior, e.g.
  random weights, is not a string of cuts); the frames from the cut on start a new segment (new anchor).

The disparity range is kept in raw inverse-depth units (``L``, ``H``; ``lo = s L``, ``hi = s H``), because
the normalised disparity ``(s/z - lo) / (hi - lo)`` depends on ``L`` and ``H`` only.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

import numpy as np

from daemon.model.prior_post import Q_HI, Q_LO, PriorStats, compute_stats

POLICIES = ("follow", "frozen")
JITTER_FACTOR = 4.0  # a cut must stand out of the recent frame-to-frame changes by this factor
JITTER_FRAMES = 16


@dataclass(frozen=True)
class FrameStat:
    """What the policies need of one frame's prior (cheap to keep)."""

    depth_sum: float  # sum of valid depths
    n_valid: int
    inv_lo: float  # Q_LO quantile of 1/z over valid pixels
    inv_hi: float  # Q_HI quantile of 1/z over valid pixels

    @property
    def mean_depth(self) -> float:
        return self.depth_sum / self.n_valid if self.n_valid else 0.0


def frame_stat(z: np.ndarray, valid: np.ndarray) -> FrameStat:
    """Per-frame statistics of prior depth ``z`` (H, W) over ``valid`` pixels with a positive finite depth."""
    ok = np.asarray(valid, bool) & np.isfinite(z) & (z > 0)
    n = int(ok.sum())
    if n == 0:
        return FrameStat(0.0, 0, 0.0, 0.0)
    inv = 1.0 / z[ok].astype(np.float64)
    k_lo, k_hi = int(round(Q_LO * (n - 1))), int(round(Q_HI * (n - 1)))
    part = np.partition(inv, (k_lo, k_hi))
    return FrameStat(float(z[ok].sum(dtype=np.float64)), n, float(part[k_lo]), float(part[k_hi]))


@dataclass(frozen=True)
class FrameNorm:
    """Normalisation of one frame: the PriorStats it is normalised with and the segment it belongs to."""

    stats: PriorStats
    segment: int


@dataclass(frozen=True)
class PolicyParams:
    smoothing: float = 0.5  # fraction of the way to the window's target taken per window
    max_step: float = 0.4  # largest change of log s, log L, log H per window
    cut_threshold: float = 0.4  # log-ratio between consecutive frames that starts a new segment


def _target(stats: list[FrameStat]) -> tuple[float, float, float] | None:
    """(log s, log L, log H) of a set of frames: s = mean valid depth, L/H = min/max per-frame quantiles."""
    good = [f for f in stats if f.n_valid]
    if not good:
        return None
    s = max(sum(f.depth_sum for f in good) / sum(f.n_valid for f in good), 1e-3)
    lo = max(min(f.inv_lo for f in good), 1e-12)
    hi = max(max(f.inv_hi for f in good), lo * (1 + 1e-6))
    return math.log(s), math.log(lo), math.log(hi)


def _to_prior_stats(state: tuple[float, float, float]) -> PriorStats:
    ls, ll, lh = state
    s = math.exp(ls)
    return PriorStats(scale=np.float32(s), lo=np.float32(s * math.exp(ll)), hi=np.float32(s * math.exp(lh)))


class FollowStats:
    """The ``follow`` policy (module docstring). Call :meth:`window` once per window, in stream order."""

    def __init__(self, params: PolicyParams = PolicyParams()) -> None:
        self.p = params
        self.segment = -1
        self.cuts = 0
        self._state: tuple[float, float, float] | None = None  # (log s, log L, log H) after the last frame
        self._last: FrameStat | None = None  # last frame seen (cut detection)
        self._recent: deque[float] = deque(maxlen=JITTER_FRAMES)  # recent frame-to-frame changes
        self._flags: list[bool] = []  # per new frame of the last window: a cut starts there

    def restart(self) -> None:
        """A source restart: the next window starts a new segment."""
        self._state = None
        self._last = None
        self._recent.clear()
        self._flags = []

    @staticmethod
    def change(prev: FrameStat | None, cur: FrameStat) -> float | None:
        """Log change of the mean valid depth or the 99 % inverse depth, whichever is larger."""
        if prev is None or not prev.n_valid or not cur.n_valid:
            return None
        return max(abs(math.log(cur.mean_depth / prev.mean_depth)),
                   abs(math.log(max(cur.inv_hi, 1e-12) / max(prev.inv_hi, 1e-12))))

    def is_cut(self, prev: FrameStat | None, cur: FrameStat) -> bool:
        """Cut test for consecutive frames; records the change in the recent history."""
        d = self.change(prev, cur)
        if d is None:
            return False
        jitter = statistics.median(self._recent) if len(self._recent) >= 4 else 0.0
        self._recent.append(d)  # cuts included: the median stays robust, the history unbiased
        return d > self.p.cut_threshold and d > JITTER_FACTOR * jitter

    def window(self, stats: list[FrameStat], n_reused: int) -> list[FrameNorm]:
        """Normalisation of the window's new frames ``stats[n_reused:]`` (the first ``n_reused`` were
        normalised by the previous window and are given for the estimate only)."""
        new = stats[n_reused:]
        # runs of new frames between cuts
        runs: list[tuple[int, int, bool]] = []  # (start, end) in `stats`, starts a segment
        start, fresh = n_reused, self._state is None
        prev = self._last
        reused_flags = self._flags[len(self._flags) - n_reused:] if n_reused else []
        flags = []
        for i in range(n_reused, len(stats)):
            before = stats[i - 1] if i > start else prev
            cut = self.is_cut(before, stats[i])
            flags.append(cut)
            if cut:
                if i > start:
                    runs.append((start, i, fresh))
                start, fresh = i, True
        runs.append((start, len(stats), fresh))
        self._flags = (self._flags + flags)[-max(len(stats), 1):]
        out: list[FrameNorm] = []
        for s, e, fresh in runs:
            if fresh:
                if self._state is not None:  # a cut (a start or restart has no state)
                    self.cuts += 1
                self.segment += 1
                self._state = _target(stats[s:e]) or self._state or (0.0, 0.0, 0.0)
                norm = FrameNorm(_to_prior_stats(self._state), self.segment)
                out.extend([norm] * (e - s))
                continue
            # continuing: estimate over the frames of this segment in the window (shared + new)
            first = max((i for i, f in enumerate(reused_flags) if f), default=0)
            target = _target(stats[first:e])
            assert self._state is not None
            old = self._state
            step: tuple[float, ...]
            if target is None:
                step = (0.0, 0.0, 0.0)
            else:
                step = tuple(max(-self.p.max_step, min(self.p.max_step, self.p.smoothing * (t - o)))
                             for t, o in zip(target, old))
            n = e - s
            for j in range(n):
                a = (j + 1) / n
                out.append(FrameNorm(_to_prior_stats(tuple(o + a * d for o, d in zip(old, step))),  # type: ignore[arg-type]
                                     self.segment))
            self._state = tuple(o + d for o, d in zip(old, step))  # type: ignore[assignment]
        if new:
            self._last = new[-1]
        return out


class FrozenStats:
    """The ``frozen`` policy: compute_stats on the first window, kept for the session (also over restarts)."""

    def __init__(self) -> None:
        self.stats: PriorStats | None = None
        self.segment = 0

    def restart(self) -> None:
        pass

    def window_from_prior(self, points: np.ndarray, mask: np.ndarray, n_reused: int) -> list[FrameNorm]:
        if self.stats is None:
            self.stats = compute_stats(np.asarray(points, np.float32), np.asarray(mask, bool))
        return [FrameNorm(self.stats, 0)] * (points.shape[0] - n_reused)


class StreamStats:
    """The session's statistics policy, by name (``streaming.stats``): prior points/mask of a window in,
    one :class:`FrameNorm` per new frame out."""

    def __init__(self, policy: str = "follow", params: PolicyParams = PolicyParams()) -> None:
        if policy not in POLICIES:
            raise ValueError(f"statistics policy must be one of {POLICIES}, got {policy!r}")
        self.policy = policy
        self._frozen = FrozenStats() if policy == "frozen" else None
        self._follow = FollowStats(params) if policy == "follow" else None
        self._cache: dict[int, FrameStat] = {}  # frame index -> stat (the overlap frames are seen twice)

    @property
    def segment(self) -> int:
        return self._follow.segment if self._follow is not None else 0

    def restart(self) -> None:
        if self._follow is not None:
            self._follow.restart()
        self._cache.clear()

    def window(self, points: np.ndarray, mask: np.ndarray, n_reused: int, first_frame_index: int = 0
               ) -> list[FrameNorm]:
        if self._frozen is not None:
            return self._frozen.window_from_prior(points, mask, n_reused)
        assert self._follow is not None
        stats = []
        for i in range(points.shape[0]):
            idx = first_frame_index + i
            st = self._cache.get(idx)
            if st is None:
                st = frame_stat(points[i, ..., 2], mask[i])
            stats.append(st)
        self._cache = {first_frame_index + i: st for i, st in enumerate(stats)}
        return self._follow.window(stats, n_reused)


def follow_focal(old: tuple[float, float] | None, new: tuple[float, float], params: PolicyParams
                 ) -> tuple[float, float]:
    """The fixed focal under ``follow``: anchored when ``old`` is None (a segment start), else moved a
    fraction ``smoothing`` towards the chunk's focal in log space, at most ``max_step / 4`` per chunk."""
    if old is None:
        return new
    lim = params.max_step / 4
    return tuple(o * math.exp(max(-lim, min(lim, params.smoothing * math.log(n / o))))  # type: ignore[return-value]
                 for o, n in zip(old, new))
