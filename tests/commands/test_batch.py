"""`geometryd batch`: real PyAV clips, the make-tiny model, the real MoGe sidecar and Jittor pipeline; the
outputs are compared with `geometryd process` on the same files; `--ray local` on a real local Ray
cluster with two logical GPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from daemon.cli import main
from daemon.offline.batch import UsageError, expand_inputs, output_paths
from daemon.scenes import tilted_plane
from daemon.video import write_video
from helpers.pipeline_fixtures import tiny_model_dir

REPO = Path(__file__).resolve().parents[2]
T = 5
OPTS = ["--window", "4", "--overlap", "1", "--steps", "1", "--decode-chunk", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prebuilt = os.environ.get("GEOMETRYD_TEST_TINY_MODEL")
    return Path(prebuilt) if prebuilt else tiny_model_dir(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    out = {}
    for i, name in enumerate(("alpha", "beta", "gamma")):
        frames, _, _ = tilted_plane(T, 64, 64, seed=20 + i)
        out[name] = d / f"{name}.mp4"
        write_video(out[name], frames, fps=10)
    out["corrupt"] = d / "corrupt.mp4"
    out["corrupt"].write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(3000))
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, model: Path, clips: dict[str, Path]) -> dict[str, Path]:
    """`geometryd process` of each good clip (in-process: one Jittor import for all three)."""
    d = tmp_path_factory.mktemp("reference")
    out = {}
    for name in ("alpha", "beta", "gamma"):
        out[name] = d / f"{name}.npz"
        rc = main(["process", str(clips[name]), "--model-dir", str(model), "--out", str(out[name]), *OPTS])
        assert rc == 0
    return out


def _batch(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "daemon", "batch", *args], capture_output=True, text=True,
                          env=env, timeout=900, cwd=REPO)


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def _assert_equal_npz(got: Path, want: Path) -> None:
    """Bit-equal (Ray batch actors run with this process's OpenMP thread count, see daemon/cluster/batch_pool.py;
    with Ray's default of 1 thread, 0.2-1.2 % of the elements differed by float16 steps)."""
    a, b = np.load(got), np.load(want)
    assert sorted(a.files) == ["mask", "point_map"]
    assert a["point_map"].dtype == np.float16 and a["mask"].dtype == bool
    assert a["point_map"].shape == b["point_map"].shape == (T, 64, 64, 3)
    np.testing.assert_array_equal(a["mask"], b["mask"])
    np.testing.assert_array_equal(a["point_map"], b["point_map"])


def test_batch_serial_corrupt_fails_alone_and_resumes(tmp_path: Path, model: Path, clips: dict[str, Path],
                                                      reference: dict[str, Path]) -> None:
    out = tmp_path / "out"
    inputs = [str(clips[n]) for n in ("alpha", "corrupt", "beta", "gamma")]
    res = _batch(*inputs, "--out", str(out), "--model-dir", str(model), *OPTS)
    assert res.returncode == 1, res.stderr[-3000:]
    summary = [line for line in res.stderr.splitlines() if line.startswith("geometryd batch:")]
    assert len(summary) == 1 and "3 ok, 0 skipped, 1 failed of 4 inputs" in summary[0]
    assert "corrupt.mp4" in summary[0]
    rows = {Path(r["input"]).stem: r for r in _manifest(out)}
    assert sorted(rows) == ["alpha", "beta", "corrupt", "gamma"]
    assert rows["corrupt"]["status"] == "failed" and "corrupt.mp4" in rows["corrupt"]["error"]
    assert not (out / "corrupt.npz").exists()
    for name in ("alpha", "beta", "gamma"):
        assert rows[name]["status"] == "ok" and rows[name]["frames"] == T and rows[name]["error"] is None
        _assert_equal_npz(out / f"{name}.npz", reference[name])
    mtimes = {n: (out / f"{n}.npz").stat().st_mtime_ns for n in ("alpha", "beta", "gamma")}

    again = _batch(str(clips["alpha"]), str(clips["corrupt"]), str(clips["beta"].parent / "*.mp4"), "--out",
                   str(out), "--model-dir", str(model), *OPTS)
    assert again.returncode == 1, again.stderr[-3000:]
    assert "0 ok, 3 skipped, 1 failed of 4 inputs" in again.stderr
    rows2 = _manifest(out)[4:]
    assert sorted((Path(r["input"]).stem, r["status"]) for r in rows2) == [
        ("alpha", "skipped"), ("beta", "skipped"), ("corrupt", "failed"), ("gamma", "skipped")]
    assert mtimes == {n: (out / f"{n}.npz").stat().st_mtime_ns for n in ("alpha", "beta", "gamma")}


@pytest.mark.ray
def test_batch_on_local_ray_two_logical_gpus(tmp_path: Path, model: Path, clips: dict[str, Path],
                                             reference: dict[str, Path]) -> None:
    out = tmp_path / "out"
    inputs = [str(clips[n]) for n in ("alpha", "corrupt", "beta")]
    res = _batch(*inputs, "--out", str(out), "--model-dir", str(model), "--ray", "local", "--local-gpus", "2",
                 *OPTS)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "2 ok, 0 skipped, 1 failed of 3 inputs" in res.stderr
    rows = {Path(r["input"]).stem: r for r in _manifest(out)}
    assert rows["corrupt"]["status"] == "failed" and "corrupt.mp4" in rows["corrupt"]["error"]
    for name in ("alpha", "beta"):
        assert rows[name]["status"] == "ok" and rows[name]["worker"].startswith("batch-")
        _assert_equal_npz(out / f"{name}.npz", reference[name])


def test_inputs_folders_globs_and_name_clashes(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for p in ("a/x.mp4", "a/y.mkv", "a/notes.txt", "b/x.mp4"):
        (tmp_path / p).write_bytes(b"")
    got = expand_inputs([str(tmp_path / "a"), str(tmp_path / "a" / "x.mp4"), str(tmp_path / "b" / "*.mp4")])
    assert got == [tmp_path / "a" / "x.mp4", tmp_path / "a" / "y.mkv", tmp_path / "b" / "x.mp4"]
    with pytest.raises(UsageError, match="would both write x.npz"):
        output_paths(got, tmp_path / "out")
    with pytest.raises(UsageError, match="input not found"):
        expand_inputs([str(tmp_path / "nope.mp4")])
    with pytest.raises(UsageError, match="no video files"):
        expand_inputs([str(tmp_path / "*.webm")])


def test_bad_arguments_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["batch", str(tmp_path), "--out", str(tmp_path / "o"), "--model-dir", str(tmp_path / "none")])
    assert rc == 2 and "model folder not found" in capsys.readouterr().err
