"""Synthetic inputs for the daemon tests, from the library's one scene generator (``daemon.scenes``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from daemon.scenes import floor_wall_clip, gradient_square

# The daemon tests' processing size (tests run on 2 CPU cores).
H, W = 64, 128


def synthetic_frames(n: int, height: int = H, width: int = W, seed: int = 0) -> np.ndarray:
    """``daemon.scenes.gradient_square``: a tilted gradient floor and a bright square sliding across it."""
    return gradient_square(n, height, width, seed)


def make_clip(path: Path, n_frames: int = 60, height: int = H, width: int = W, fps: int = 30) -> Path:
    """The demo's synthetic scene (``daemon.scenes.floor_wall``: a floor and a wall, a box moving across)
    written with PyAV."""
    return floor_wall_clip(path, n_frames, height, width, fps)
