"""Post-processing of the MoGe prior into the 4-channel point-map VAE input (spec 4.2 steps 1-7, 4.3.4).

Host-side numpy, float32 like upstream (reductions accumulate in float64, then round to float32).
The clip-global statistics (depth scale ``s``, disparity range ``lo``/``hi``) are a separate value,
:class:`PriorStats`, so the streaming session can compute them once (first window) and reuse them; the
offline pipeline computes them over the whole clip.

Deviation (opt-in, spec 7.5): with ``nan_guard`` the log-depth of *invalid* pixels whose prior depth is
<= -1e-7 is 0 instead of upstream's NaN (which would poison the whole window through the encoder).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from daemon import resample

Q_LO = 1 - 0.99  # 0.010000000000000009, as upstream writes it
Q_HI = 0.99


@dataclass(frozen=True)
class PriorStats:
    """Clip-global normalisation of spec 4.2 steps 2-3."""

    scale: np.float32  # s: mean valid prior depth, >= 1e-3
    lo: np.float32  # min over frames of the 1 % disparity quantile
    hi: np.float32  # max over frames of the 99 % disparity quantile


def _mean(x: np.ndarray, axis: tuple[int, ...] | None = None) -> np.ndarray:
    return np.mean(x, axis=axis, dtype=np.float64).astype(np.float32)


def _disparity(points_z: np.ndarray, valid: np.ndarray, scale: np.float32) -> np.ndarray:
    z = points_z / scale
    return ((np.float32(1.0) / np.maximum(z, np.float32(1e-3))) * valid).astype(np.float32)


def compute_stats(points: np.ndarray, mask: np.ndarray) -> PriorStats:
    """Spec 4.2 steps 2-3 over all frames and pixels given: s, then lo/hi of the normalised disparity."""
    valid = mask.astype(np.float32)
    s = _mean(points[..., 2] * valid) / (_mean(valid) + np.float32(1e-8))
    s = np.float32(max(s, np.float32(1e-3)))
    d = _disparity(points[..., 2], valid, s)
    lo = min(resample.quantile_nearest(d[t], Q_LO) for t in range(d.shape[0]))
    hi = max(resample.quantile_nearest(d[t], Q_HI) for t in range(d.shape[0]))
    return PriorStats(scale=s, lo=np.float32(lo), hi=np.float32(hi))


def prior_to_x4(
    points: np.ndarray,
    mask: np.ndarray,
    size: tuple[int, int],
    stats: PriorStats,
    nan_guard: bool = False,
) -> np.ndarray:
    """(T,H0,W0,3) f32 points + (T,H0,W0) bool mask -> x4 (T,4,H,W) f32 = [fnorm, zlog, disparity, mask+-1].

    ``size`` = processing (H, W); resizes are bilinear (align_corners off), log-depth through
    ``ln(bilinear(exp(min(zlog, 10))))`` (spec 4.2 step 7).
    """
    t, h0, w0, _ = points.shape
    if mask.shape != (t, h0, w0):
        raise ValueError(f"prior mask shape {mask.shape} does not match prior points {points.shape}")
    if h0 % 2 or w0 % 2:
        raise ValueError(f"prior size {h0}x{w0} must be even in both dimensions (spec 7.7)")
    points = np.asarray(points, np.float32)
    m = mask.astype(np.float32) * np.float32(2.0) - np.float32(1.0)  # step 1
    valid = (m > 0).astype(np.float32)
    p = points / stats.scale  # step 2
    # step 3
    d = _disparity(points[..., 2], valid, stats.scale)
    d = np.clip((d - stats.lo) / (stats.hi - stats.lo + np.float32(1e-4)), 0, 1)
    d = d * np.float32(2) - np.float32(1)
    # step 4
    pz = p[..., 2]
    xy = p[..., :2] / (pz[..., None] + np.float32(1e-7))
    with np.errstate(invalid="ignore", divide="ignore"):
        zlog = np.log(pz + np.float32(1e-7))
    if nan_guard:
        zlog = np.where(valid > 0, zlog, np.float32(0.0))
    zlog = (zlog * valid).astype(np.float32)
    # step 5: per-frame principal point c and inverse focals f in grid units
    gx, gy = resample.normalized_grid(h0, w0)
    c = _mean(xy, axis=(1, 2))  # (T, 2)
    fx = _mean((xy[..., 0] - c[:, None, None, 0]) / gx[None, None, :], axis=(1, 2))
    fy = _mean((xy[..., 1] - c[:, None, None, 1]) / gy[None, :, None], axis=(1, 2))
    focal = np.broadcast_to(np.stack([fx, fy], 1)[:, :, None, None], (t, 2, h0, w0))
    # step 7
    if (h0, w0) != tuple(size):
        d = resample.resize(d, size, "bilinear")
        m = resample.resize(m, size, "bilinear")
        focal = resample.resize(np.ascontiguousarray(focal), size, "bilinear")
        zlog = np.log(resample.resize(np.exp(np.minimum(zlog, np.float32(10.0))), size, "bilinear"))
    fnorm = np.sqrt(focal[:, 0] ** 2 + focal[:, 1] ** 2)
    return np.stack([fnorm, zlog, d, m], axis=1).astype(np.float32)
