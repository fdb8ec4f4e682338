"""Synthetic scenes: numpy frames of a moving scene (no weights, no camera), and a clip written with PyAV.

One generator for the demo, the benchmarks and the tests. Each scene is a pure function of its arguments
(seeded where it has noise), so a test may rely on its exact pixels:

- :func:`floor_wall`: a camera gliding over a perspective checkerboard floor towards a wall, a red box moving
  across (the demo's sample clip);
- :func:`gradient_square`: a tilted gradient floor and a bright square sliding across it, light noise;
- :func:`tilted_plane`: a tilted plane seen by a pinhole camera, slowly moving, WITH its prior (points and
  mask), for the pipeline tests and the anchor benchmark.

:func:`write_clip` encodes frames with :func:`daemon.video.write_video` (H.264, yuv420p: even sizes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from daemon.video import write_video


def floor_wall(n: int, height: int, width: int) -> np.ndarray:
    """(n, height, width, 3) uint8 RGB: checkerboard floor below the horizon moving towards the camera, a
    wall with a travelling sine above it, a box moving left to right."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    horizon = height * 0.4
    dy = np.maximum(ys - horizon, 1.0)
    z = height / dy
    u = (xs - width / 2) * z / width * 4
    floor = ys > horizon
    frames = np.empty((n, height, width, 3), np.uint8)
    for t in range(n):
        img = np.empty((height, width, 3), np.float32)
        v = z * 2 + t * 0.15
        checker = ((np.floor(u) + np.floor(v)) % 2) * 120 + 60
        wall = 170 + 40 * np.sin(xs / 9.0 + t * 0.1)
        for c, (fa, wa) in enumerate(((1.0, 0.9), (0.8, 0.95), (0.6, 1.0))):
            img[..., c] = np.where(floor, checker * fa, wall * wa)
        bx = int((t * width / max(n, 1)) % (width - width // 6))
        by0, by1 = int(horizon + height * 0.1), int(horizon + height * 0.35)
        img[by0:by1, bx:bx + width // 6] = (230, 60, 40)
        frames[t] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


def gradient_square(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """(n, height, width, 3) uint8 RGB: a tilted gradient floor and a 16x16 bright square sliding across it,
    Gaussian noise (sigma 2) drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    frames = np.empty((n, height, width, 3), np.uint8)
    for t in range(n):
        base = (xs * 1.5 + ys * 2.0 + 4 * t) % 256
        img = np.stack([base, 255 - base, (ys * 4) % 256], -1).astype(np.float32)
        x0 = int((t * 3) % max(1, width - 16))
        img[height // 4: height // 4 + 16, x0: x0 + 16] = (250, 240, 30)
        img += rng.normal(0, 2, img.shape)
        frames[t] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


def tilted_plane(t: int, h0: int, w0: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """frames (T,H0,W0,3) uint8, prior points (T,H0,W0,3) f32 (a tilted plane seen by a pinhole camera, with
    noise, slowly moving), prior mask (T,H0,W0) bool (~85 % valid, invalid pixels keep their depth)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(-1, 1, h0), np.linspace(-1, 1, w0), indexing="ij")
    frames, points, masks = [], [], []
    for i in range(t):
        z = 2.0 + 0.6 * yy + 0.3 * np.sin(3 * xx + 0.2 * i) + 0.05 * rng.standard_normal((h0, w0))
        z = np.maximum(z, 0.3)
        pts = np.stack([xx * z * 0.6, yy * z * 0.4, z], -1).astype(np.float32)
        m = rng.random((h0, w0)) > 0.15
        img = np.stack([(np.sin(5 * xx + i) + 1) * 120, (yy + 1) * 110, (z - z.min()) / np.ptp(z) * 250], -1)
        img = img + 5 * rng.standard_normal(img.shape)
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
        points.append(pts)
        masks.append(m)
    return np.stack(frames), np.stack(points), np.stack(masks)


def write_clip(path: str | Path, frames: np.ndarray, fps: float = 24.0) -> Path:
    """Encode (T, H, W, 3) uint8 RGB frames to ``path`` (H.264 mp4/mkv) and return the path."""
    write_video(path, frames, fps=fps)
    return Path(path)


def floor_wall_clip(path: str | Path, n: int, height: int, width: int, fps: float = 24.0) -> Path:
    """The demo's sample clip: :func:`floor_wall` written to ``path``."""
    return write_clip(path, floor_wall(n, height, width), fps)
