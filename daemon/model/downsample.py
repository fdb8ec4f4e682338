"""run.py's ``--downsample_ratio``: shrink the clip before everything, bring the result back afterwards.

Upstream (``run.py``): frames in [0, 1] are resized to (round(H/r), round(W/r)) bicubic with antialias and
clamped to [0, 1]; the pipeline (prior included) runs on them; the point map is resized back bilinearly
(align_corners off, no antialias) and the mask as ``bilinear(mask as float) > 0.5``.
"""

from __future__ import annotations

import numpy as np

from daemon.model import resample


def downsampled_size(h0: int, w0: int, ratio: float) -> tuple[int, int]:
    """(round(H0/r), round(W0/r)) with Python's round, like run.py."""
    return round(h0 / ratio), round(w0 / ratio)


def downsample_frames(frames: np.ndarray, ratio: float) -> np.ndarray:
    """(T,H0,W0,3) uint8 -> (T,h,w,3) float32 in [0, 1] (bicubic, antialiased, clamped)."""
    h, w = downsampled_size(frames.shape[1], frames.shape[2], ratio)
    x = frames.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)
    x = np.clip(resample.resize(np.ascontiguousarray(x), (h, w), "bicubic_aa"), 0.0, 1.0)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1), dtype=np.float32)


def quantize_frames(frames01: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] -> uint8 for the MoGe sidecar, whose shared-memory ring carries uint8 frames
    (upstream gives MoGe the float frames: up to 0.5/255 apart per pixel, docs/parity.md)."""
    return np.clip(np.rint(frames01 * np.float32(255.0)), 0, 255).astype(np.uint8)


def upsample_output(point_map: np.ndarray, mask: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray,
                                                                                             np.ndarray]:
    """(T,h,w,3) points and (T,h,w) mask -> ``size`` = (H0, W0): bilinear points, bilinear(mask) > 0.5."""
    pts = resample.resize(np.ascontiguousarray(point_map.transpose(0, 3, 1, 2)), size, "bilinear")
    m = resample.resize(mask.astype(np.float32), size, "bilinear") > 0.5
    return np.ascontiguousarray(pts.transpose(0, 2, 3, 1), dtype=np.float32), m
