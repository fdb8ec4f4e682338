"""FileSink: upstream-compatible npz per window / per clip, 16-bit PNG depth, atomic writes."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from daemon.config import FilesConfig
from daemon.stages.publish_files import FileSink
from daemon.wire import encoding as enc
from helpers.mqtt import make_frame

H, W = 12, 20


def _frames(window_sizes: list[int]) -> list:
    frames, index = [], 0
    for window_id, n in enumerate(window_sizes):
        for _ in range(n):
            frames.append(make_frame(index, H, W, window_id=window_id))
            index += 1
    return frames


def _check_npz(path: Path, frames: list, pts: list[float]) -> None:
    with np.load(path) as npz:
        keys = {"point_map", "mask", "depth", "frame_index", "window_id", "pts", "intrinsics"}
        assert set(npz.files) == keys
        t = len(frames)
        assert npz["point_map"].dtype == np.float16 and npz["point_map"].shape == (t, H, W, 3)
        assert npz["mask"].dtype == np.bool_ and npz["mask"].shape == (t, H, W)
        assert npz["depth"].dtype == np.float32 and npz["depth"].shape == (t, H, W)
        assert npz["intrinsics"].dtype == np.float32 and npz["intrinsics"].shape == (t, 4)
        want_points = np.stack([f.point_map for f in frames]).astype(np.float16)
        np.testing.assert_array_equal(npz["point_map"], want_points)
        np.testing.assert_array_equal(npz["mask"], np.stack([f.mask for f in frames]))
        np.testing.assert_array_equal(npz["depth"], np.stack([f.depth for f in frames]))
        np.testing.assert_array_equal(npz["frame_index"], [f.frame_index for f in frames])
        np.testing.assert_array_equal(npz["window_id"], [f.window_id for f in frames])
        np.testing.assert_array_equal(npz["pts"], pts)
        np.testing.assert_array_equal(npz["intrinsics"], np.float32([f.intrinsics for f in frames]))


def test_npz_per_window(tmp_path: Path) -> None:
    frames = _frames([3, 2])
    sink = FileSink(FilesConfig(enabled=True, dir=str(tmp_path), npz="window", png16_depth=False))
    for f in frames:
        sink.write_frame("cam", f, f.frame_index / 30)
    # window 0 is final as soon as window 1 starts; window 1 only at close
    assert (tmp_path / "cam" / "window_000000.npz").exists()
    assert not (tmp_path / "cam" / "window_000001.npz").exists()
    sink.close()
    _check_npz(tmp_path / "cam" / "window_000000.npz", frames[:3], [i / 30 for i in range(3)])
    _check_npz(tmp_path / "cam" / "window_000001.npz", frames[3:], [i / 30 for i in range(3, 5)])
    assert sorted(p.name for p in (tmp_path / "cam").iterdir()) == ["window_000000.npz", "window_000001.npz"]


def test_npz_per_clip_two_sources(tmp_path: Path) -> None:
    frames = _frames([2, 2, 1])
    sink = FileSink(FilesConfig(enabled=True, dir=str(tmp_path), npz="clip"))
    for f in frames:
        sink.write_frame("a", f, float(f.frame_index))
    sink.write_frame("b", frames[0], 7.5)
    assert not (tmp_path / "a" / "clip.npz").exists()
    sink.close()
    _check_npz(tmp_path / "a" / "clip.npz", frames, [float(f.frame_index) for f in frames])
    _check_npz(tmp_path / "b" / "clip.npz", frames[:1], [7.5])
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith(".")]
    assert leftovers == []  # temp files and folders are gone


def test_png16_depth_per_frame(tmp_path: Path) -> None:
    frames = _frames([2])
    sink = FileSink(FilesConfig(enabled=True, dir=str(tmp_path), npz="off", png16_depth=True))
    for f in frames:
        sink.write_frame("cam", f, 0.0)
    sink.close()
    assert not list(tmp_path.rglob("*.npz"))
    for f in frames:
        path = tmp_path / "cam" / "depth" / f"{f.frame_index:06d}.png"
        data = path.read_bytes()
        q = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # a standard 16-bit PNG reader
        assert q.dtype == np.uint16 and q.shape == (H, W)
        text = enc.png16_text(data)
        assert text["frame_index"] == str(f.frame_index)
        scale, offset = float(text["depth_quant_scale"]), float(text["depth_quant_offset"])
        np.testing.assert_array_equal(q > 0, f.mask)
        depth = 1.0 / (q[f.mask].astype(np.float64) * scale + offset)
        inv_err = np.abs(1.0 / depth - 1.0 / f.depth[f.mask].astype(np.float64))
        assert inv_err.max() <= scale / 2 * (1 + 1e-9)


def test_bad_mode_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="window or clip"):
        FileSink(FilesConfig(dir=str(tmp_path), npz="frames"))  # type: ignore[arg-type]
