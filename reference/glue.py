"""The literal (pre-#16) host glue, kept as the reference the fast paths are compared with.

Whole-array numpy formulas of spec 4.2 (prior post-processing) with the dense-matrix resizes
(:func:`daemon.model.resample.resize_dense`), as daemon/model/prior_post.py was in 0.1.0; decode post-processing and
the source/CLIP resizes of daemon/pipeline.py likewise. Slow on purpose: it is the readable definition.
"""

from __future__ import annotations

import numpy as np

from daemon.model import resample
from daemon.model.prior_post import PriorStats

Q_LO = 1 - 0.99
Q_HI = 0.99


def _mean(x: np.ndarray, axis: tuple[int, ...] | None = None) -> np.ndarray:
    return np.mean(x, axis=axis, dtype=np.float64).astype(np.float32)


def _disparity(points_z: np.ndarray, valid: np.ndarray, scale: np.float32) -> np.ndarray:
    z = points_z / scale
    return ((np.float32(1.0) / np.maximum(z, np.float32(1e-3))) * valid).astype(np.float32)


def compute_stats_ref(points: np.ndarray, mask: np.ndarray) -> PriorStats:
    """Spec 4.2 steps 2-3 over all frames and pixels given: s, then lo/hi of the normalised disparity."""
    valid = mask.astype(np.float32)
    s = _mean(points[..., 2] * valid) / (_mean(valid) + np.float32(1e-8))
    s = np.float32(max(s, np.float32(1e-3)))
    d = _disparity(points[..., 2], valid, s)
    lo = min(resample.quantile_nearest(d[t], Q_LO) for t in range(d.shape[0]))
    hi = max(resample.quantile_nearest(d[t], Q_HI) for t in range(d.shape[0]))
    return PriorStats(scale=s, lo=np.float32(lo), hi=np.float32(hi))


def prior_to_x4_ref(
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
        d = resample.resize_dense(d, size, "bilinear")
        m = resample.resize_dense(m, size, "bilinear")
        focal = resample.resize_dense(np.ascontiguousarray(focal), size, "bilinear")
        zlog = np.log(resample.resize_dense(np.exp(np.minimum(zlog, np.float32(10.0))), size, "bilinear"))
    fnorm = np.sqrt(focal[:, 0] ** 2 + focal[:, 1] ** 2)
    return np.stack([fnorm, zlog, d, m], axis=1).astype(np.float32)


def frames_at_size_ref(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """0.1.0's _frames_to_unit + encode's source resize: (n,H0,W0,3) -> (n,3,H,W) float32 in [0,1]."""
    x = frames.astype(np.float32)
    if frames.dtype == np.uint8:
        x = x / np.float32(255.0)
    v = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if v.shape[-2:] != tuple(size):
        v = np.clip(resample.resize_dense(v, size, "bicubic_aa"), 0.0, 1.0).astype(np.float32)
    return v


def clip_input_ref(v: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """0.1.0's CLIP input: resize224 of v in [-1, 1], back to [0, 1], normalised."""
    c = resample.resize224_dense(v.astype(np.float32))
    return ((c + np.float32(1.0)) / np.float32(2.0) - mean) / std


def decode_post_ref(a, dl, vl, out_size, use_extract_interp):  # type: ignore[no-untyped-def]
    """0.1.0's decode_post (returns fx, fy, log_depth, valid)."""
    if a.shape[-2:] != tuple(out_size):
        if use_extract_interp:
            dl = resample.resize_dense(dl, out_size, "nearest_exact")
            vl = resample.resize_dense(vl, out_size, "nearest_exact")
        else:
            dl = np.log(resample.resize_dense(np.exp(np.minimum(dl, np.float32(10.0))), out_size, "bilinear"))
            vl = resample.resize_dense(vl, out_size, "bilinear")
        a = resample.resize_dense(a, out_size, "bilinear")
    ho, wo = out_size
    diag = np.float32(np.sqrt(np.float32(wo * wo + ho * ho)))
    fx = (a * (np.float32(wo) / diag)).astype(np.float32)
    fy = (a * (np.float32(ho) / diag)).astype(np.float32)
    return fx, fy, dl.astype(np.float32), vl > 0


def points_from_maps_ref(log_depth, fx, fy):  # type: ignore[no-untyped-def]
    """0.1.0's points_from_maps."""
    n, ho, wo = log_depth.shape
    gx, gy = resample.normalized_grid(ho, wo)
    fx = np.asarray(fx, np.float32)
    fy = np.asarray(fy, np.float32)
    if fx.ndim == 1:
        fx, fy = fx[:, None, None], fy[:, None, None]
    z = np.exp(np.minimum(log_depth, np.float32(10.0))).astype(np.float32)
    x = fx * gx[None, None, :] * z
    y = fy * gy[None, :, None] * z
    return np.stack([x, y, z], axis=-1).astype(np.float32), z
