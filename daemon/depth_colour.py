"""The one depth colouriser: depth -> disparity -> robust range -> Turbo RGB (demo previews, `process
--preview`, the live viewer).

Disparity and range follow the upstream app's visualisation (spec 4.7 step 7): ``d = 1 / (Z + 1e-4)`` on
valid pixels and 0 elsewhere; per frame ``lo_t``/``hi_t`` are the 1 % and 99 % quantiles ("nearest" rule,
over all pixels, invalid zeros included, as spec 4.2 step 3); a clip uses ``min lo_t .. max hi_t`` so that
colours mean the same depth in every frame; ``(d - lo) / (hi - lo + 1e-4)`` is clipped to [0, 1]. The colour
map is OpenCV's Turbo (near = red, far = dark blue); invalid pixels are black.
"""

from __future__ import annotations

import numpy as np

from daemon.model.resample import quantile_nearest

EPS = np.float32(1e-4)
Q = 0.99  # hi = 99 % quantile, lo = 1 % quantile


def disparity(depth: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(1 / (Z + 1e-4)) x valid`` as float32, and ``valid`` (mask, finite, Z > 0); any shape."""
    depth = np.asarray(depth, np.float32)
    valid = np.asarray(mask, bool) & np.isfinite(depth) & (depth > 0)
    safe = np.where(valid, depth, np.float32(1.0))
    disp = np.where(valid, np.float32(1.0) / (safe + EPS), np.float32(0.0)).astype(np.float32)
    return disp, valid


def robust_range(disp: np.ndarray) -> tuple[float, float]:
    """``(min_t lo_t, max_t hi_t)`` of a (H,W) frame or a (T,H,W) clip of disparities."""
    frames = disp.reshape((-1, *disp.shape[-2:]))
    lo = min(float(quantile_nearest(d, 1 - Q)) for d in frames)
    hi = max(float(quantile_nearest(d, Q)) for d in frames)
    return lo, hi


def colourise(depth: np.ndarray, mask: np.ndarray,
              value_range: tuple[float, float] | None = None) -> np.ndarray:
    """(...,H,W) depth and mask -> (...,H,W,3) uint8 RGB; the range is ``robust_range`` of the given frames
    unless ``value_range`` (lo, hi) is passed."""
    import cv2

    disp, valid = disparity(depth, mask)
    lo, hi = value_range if value_range is not None else robust_range(disp)
    norm = np.clip((disp - np.float32(lo)) / (np.float32(hi) - np.float32(lo) + EPS), 0, 1)
    u8 = (norm * 255).astype(np.uint8)
    flat = u8.reshape((-1, u8.shape[-1]))  # applyColorMap takes one 2-D image: stack the rows of all frames
    rgb = cv2.applyColorMap(flat, cv2.COLORMAP_TURBO)[..., ::-1].reshape((*u8.shape, 3))
    rgb = np.ascontiguousarray(rgb)
    rgb[~valid] = 0
    return rgb
