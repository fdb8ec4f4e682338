"""`geometryd process` end to end: a PyAV-written clip, a make-tiny model folder, the real MoGe sidecar
process, the Jittor pipeline; plus the argument errors (exit 2) that must not need any model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from daemon.cli import main
from daemon.encoding import png16_decode, png16_text
from daemon.video import write_video
from tests.pipeline_fixtures import synthetic_clip, tiny_model_dir

T, H0, W0 = 6, 96, 128


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    frames, _, _ = synthetic_clip(T, H0, W0, seed=11)
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    write_video(path, frames, fps=10)
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "daemon", "process", *args], capture_output=True, text=True,
                          env=env, timeout=900, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--height", "100", "--width", "128"], "multiple of 64"),
        (["--height", "64"], "both --height and --width"),
        (["--window", "4", "--overlap", "4"], "--overlap must be in"),
        (["--preview", "x.gif"], "--preview must end"),
    ],
)
def test_bad_arguments_exit_2(tmp_path: Path, clip_file: Path, capsys, extra: list[str], message: str) -> None:
    (tmp_path / "model").mkdir()
    rc = main(["process", str(clip_file), "--model-dir", str(tmp_path / "model"), "--out", str(tmp_path / "o.npz"), *extra])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_missing_inputs_exit_2(tmp_path: Path, clip_file: Path, capsys) -> None:
    rc = main(["process", str(tmp_path / "none.mp4"), "--model-dir", str(tmp_path), "--out", str(tmp_path / "o.npz")])
    assert rc == 2 and "video file not found" in capsys.readouterr().err
    rc = main(["process", str(clip_file), "--model-dir", str(tmp_path), "--out", str(tmp_path / "o.npz")])
    err = capsys.readouterr().err
    assert rc == 2 and "missing: feature_extractor/" in err and "unet_diff/" in err


def test_process_writes_npz_png_and_preview(tmp_path_factory: pytest.TempPathFactory, clip_file: Path) -> None:
    model = tiny_model_dir(tmp_path_factory.getbasetemp())
    out = tmp_path_factory.mktemp("out")
    res = _run(str(clip_file), "--model-dir", str(model), "--out", str(out / "clip.npz"), "--height", "64",
               "--width", "64", "--window", "4", "--overlap", "1", "--steps", "1", "--decode-chunk", "4",
               "--png-depth", str(out / "depth"), "--preview", str(out / "preview.png"), "--device", "cpu")
    assert res.returncode == 0, res.stderr[-3000:]
    print(res.stdout)
    data = np.load(out / "clip.npz")
    assert sorted(data.files) == ["mask", "point_map"]
    assert data["point_map"].dtype == np.float16 and data["point_map"].shape == (T, H0, W0, 3)
    assert data["mask"].dtype == bool and data["mask"].shape == (T, H0, W0)
    assert np.isfinite(data["point_map"].astype(np.float32)).all()
    pngs = sorted((out / "depth").glob("depth_*.png"))
    assert len(pngs) == T
    q = png16_decode(pngs[0].read_bytes())
    assert q.shape == (H0, W0) and q.dtype == np.uint16
    assert "depth_quant_scale" in png16_text(pngs[0].read_bytes())
    assert (out / "preview.png").stat().st_size > 1000
    for stage in ("prior_moge", "encode", "denoise", "decode"):
        assert stage in res.stdout


def test_make_tiny_is_complete_and_idempotent(tmp_path_factory: pytest.TempPathFactory) -> None:
    from daemon.tiny import PARTS, make_tiny, missing_parts

    model = tiny_model_dir(tmp_path_factory.getbasetemp())
    assert missing_parts(model) == []
    stamp = {p: (model / p / PARTS[p][0]).stat().st_mtime_ns for p in PARTS}
    make_tiny(model, seed=0)  # complete: nothing rewritten
    assert stamp == {p: (model / p / PARTS[p][0]).stat().st_mtime_ns for p in PARTS}
    import json

    assert json.loads((model / "unet_diff" / "config.json").read_text())["in_channels"] == 12
    assert json.loads((model / "unet_determ" / "config.json").read_text())["in_channels"] == 8
    with pytest.raises(ValueError, match="unknown part"):
        make_tiny(model, parts=["unet_fast"])
