"""Known camera intrinsics: validation, the normalised form the daemon publishes, and the projection step.

A user gives ``[fx, fy, cx, cy]`` in pixels of the source (decoded) size, OpenCV convention: pixel ``u``
has its centre at ``u``, so ``u = cx + fx * X / Z``. The normalised form (``FrameResult.intrinsics``) divides
by the width/height with pixel centres at ``(u + 0.5) / W``: ``fx_n = fx / W``, ``cx_n = (cx + 0.5) / W``.
It does not depend on the size a frame is resized to (the ingests stretch to the processing size, no crop),
so one normalised tuple serves the processing and the output size alike.

With known intrinsics the projection step (spec 4.7 step 5, upstream ``decode_point_map`` with
``force_projection``) keeps the decoded depth and replaces the estimated focal (and the centred principal
point) by the given ones: ``X = (u_n - cx_n) / fx_n * Z`` with ``u_n = (u + 0.5) / W_out``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Intrinsics = tuple[float, float, float, float]


def check_pixel_intrinsics(values: Sequence[float], height: int = 0, width: int = 0) -> Intrinsics:
    """``[fx, fy, cx, cy]`` in pixels -> a tuple, or ValueError naming the bad value. With a size, the
    principal point must lie inside the image (``0 < cx < W``, ``0 < cy < H``)."""
    vals = tuple(float(v) for v in values)
    if len(vals) != 4:
        raise ValueError(f"intrinsics must be 4 numbers [fx, fy, cx, cy], got {len(vals)}")
    fx, fy, cx, cy = vals
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"intrinsics must be finite numbers, got {list(vals)}")
    if fx <= 0 or fy <= 0:
        raise ValueError(f"focal lengths fx, fy must be > 0 pixels, got fx={fx} fy={fy}")
    if cx <= 0 or cy <= 0:
        raise ValueError(f"principal point cx, cy must be > 0 pixels, got cx={cx} cy={cy}")
    if width and not cx < width:
        raise ValueError(f"principal point cx={cx} must be < the source width {width}")
    if height and not cy < height:
        raise ValueError(f"principal point cy={cy} must be < the source height {height}")
    return fx, fy, cx, cy


def normalise_pixel_intrinsics(values: Sequence[float], height: int, width: int) -> Intrinsics:
    """Validated pixel intrinsics of a ``height`` x ``width`` source -> the normalised (fx, fy, cx, cy)."""
    fx, fy, cx, cy = check_pixel_intrinsics(values, height, width)
    return fx / width, fy / height, (cx + 0.5) / width, (cy + 0.5) / height


def project_known(log_depth: np.ndarray, intrinsics: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """log_depth (n,H,W) decoder depth head at the output size, normalised intrinsics -> (points (n,H,W,3),
    depth (n,H,W)); depth = exp(min(log_depth, 10)) exactly as the estimated-focal path."""
    n, ho, wo = log_depth.shape
    fx, fy, cx, cy = (float(v) for v in intrinsics)
    rx = (((np.arange(wo, dtype=np.float64) + 0.5) / wo - cx) / fx).astype(np.float32)  # X/Z per column
    ry = (((np.arange(ho, dtype=np.float64) + 0.5) / ho - cy) / fy).astype(np.float32)  # Y/Z per row
    z = np.minimum(log_depth, np.float32(10.0))
    np.exp(z, out=z)
    points = np.empty((n, ho, wo, 3), np.float32)
    np.multiply(rx[None, None, :], z, out=points[..., 0])
    np.multiply(ry[None, :, None], z, out=points[..., 1])
    points[..., 2] = z
    return points, z
