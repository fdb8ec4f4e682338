"""PLY export: the writer read back with plyfile, and `geometryd process --format npz,ply` end to end (a
PyAV-written clip, a make-tiny model folder, the real MoGe sidecar) compared with the npz of the same run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from plyfile import PlyData

from daemon.cli import main
from daemon.offline.ply import write_ply
from daemon.scenes import tilted_plane as synthetic_clip
from daemon.video import read_frames, write_video
from helpers.pipeline_fixtures import tiny_model_dir

T, H0, W0 = 5, 64, 128


def test_writer_reads_back_and_leaves_invalid_points_out(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    points = rng.standard_normal((6, 7, 3)).astype(np.float32)
    colours = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    mask = rng.random((6, 7)) > 0.3
    points[0, 0] = np.nan  # a non-finite point is invalid even where the mask says valid
    mask[0, 0] = True
    points[1, 2, 1] = np.inf
    mask[1, 2] = True
    n = write_ply(tmp_path / "a.ply", points, colours, mask)
    keep = mask & np.isfinite(points).all(-1)
    assert n == keep.sum() and n < mask.sum()
    ply = PlyData.read(str(tmp_path / "a.ply"))
    assert ply.text is False and ply.byte_order == "<"
    v = ply["vertex"]
    assert [p.name for p in v.properties] == ["x", "y", "z", "red", "green", "blue"]
    assert v["x"].dtype == np.dtype("<f4") and v["red"].dtype == np.uint8
    np.testing.assert_array_equal(np.stack([v["x"], v["y"], v["z"]], -1), points[keep])
    np.testing.assert_array_equal(np.stack([v["red"], v["green"], v["blue"]], -1), colours[keep])


def test_writer_empty_frame(tmp_path: Path) -> None:
    n = write_ply(tmp_path / "e.ply", np.zeros((2, 2, 3), np.float32), np.zeros((2, 2, 3), np.uint8),
                  np.zeros((2, 2), bool))
    assert n == 0 and PlyData.read(str(tmp_path / "e.ply"))["vertex"].count == 0


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    frames, _, _ = synthetic_clip(T, H0, W0, seed=5)
    path = tmp_path_factory.mktemp("ply_clip") / "clip.mp4"
    write_video(path, frames, fps=10)
    return path


def test_format_ply_needs_a_folder(tmp_path: Path, clip_file: Path, capsys) -> None:
    (tmp_path / "model").mkdir()
    rc = main(["process", str(clip_file), "--model-dir", str(tmp_path / "model"), "--out", str(tmp_path / "o.npz"),
               "--format", "ply"])
    assert rc == 2 and "--format ply writes a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["process", str(clip_file), "--model-dir", str(tmp_path), "--out", str(tmp_path), "--format", "obj"])


def test_process_ply_matches_npz(tmp_path_factory: pytest.TempPathFactory, clip_file: Path) -> None:
    model = tiny_model_dir(tmp_path_factory.getbasetemp())
    out = tmp_path_factory.mktemp("ply_out") / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "daemon", "process", str(clip_file), "--model-dir", str(model), "--out", str(out),
         "--format", "npz,ply", "--window", "4", "--overlap", "1", "--steps", "1", "--decode-chunk", "4",
         "--device", "cpu"],
        check=False, capture_output=True, text=True, env=env, timeout=900,
        cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0, res.stderr[-3000:]
    data = np.load(out / "clip.npz")
    pm, mask = data["point_map"], data["mask"]
    plys = sorted(out.glob("points_*.ply"))
    assert [p.name for p in plys] == [f"points_{i:06d}.ply" for i in range(T)]
    frames, _ = read_frames(clip_file)
    assert frames.shape == (T, H0, W0, 3)
    for i, path in enumerate(plys):
        v = PlyData.read(str(path))["vertex"]
        keep = mask[i] & np.isfinite(pm[i].astype(np.float32)).all(-1)
        assert 0 < v.count == keep.sum()
        xyz = np.stack([v["x"], v["y"], v["z"]], -1)
        # the npz holds float16 of the same float32 points: equal after the same rounding
        np.testing.assert_array_equal(xyz.astype(np.float16), pm[i][keep])
        np.testing.assert_array_equal(np.stack([v["red"], v["green"], v["blue"]], -1), frames[i][keep])
