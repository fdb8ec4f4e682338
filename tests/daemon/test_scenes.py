"""daemon/scenes.py: the one synthetic scene generator (demo, benchmarks, tests) and its clip writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from daemon import scenes
from daemon.video import probe, read_frames


def test_scenes_are_deterministic_moving_and_sized() -> None:
    for make in (lambda: scenes.floor_wall(4, 32, 48), lambda: scenes.gradient_square(4, 32, 48, seed=1)):
        a, b = make(), make()
        assert a.shape == (4, 32, 48, 3) and a.dtype == np.uint8
        assert np.array_equal(a, b)
        assert not np.array_equal(a[0], a[-1])  # the scene moves
    frames, points, mask = scenes.tilted_plane(3, 20, 30, seed=4)
    assert frames.shape == (3, 20, 30, 3) and points.shape == (3, 20, 30, 3) and mask.shape == (3, 20, 30)
    assert (points[..., 2] >= 0.3).all() and 0.75 < mask.mean() < 0.95


def test_floor_wall_clip_decodes_to_its_frames(tmp_path: Path) -> None:
    path = scenes.floor_wall_clip(tmp_path / "clip.mp4", 12, 64, 96, fps=15)
    info = probe(path)
    assert (info.width, info.height, info.fps) == (96, 64, 15.0)
    decoded, _ = read_frames(path)
    assert decoded.shape == (12, 64, 96, 3)
    # lossy H.264 (crf 18): close to the generated pixels, not equal
    err = np.abs(decoded.astype(np.int16) - scenes.floor_wall(12, 64, 96).astype(np.int16))
    assert float(err.mean()) < 6.0
