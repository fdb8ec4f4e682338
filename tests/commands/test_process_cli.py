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
from daemon.scenes import tilted_plane
from daemon.video import write_video
from daemon.wire.encoding import png16_decode, png16_text
from helpers.pipeline_fixtures import tiny_model_dir

T, H0, W0 = 6, 96, 128


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    frames, _, _ = tilted_plane(T, H0, W0, seed=11)
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    write_video(path, frames, fps=10)
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "daemon", "process", *args], capture_output=True, text=True,
                          env=env, timeout=900, cwd=Path(__file__).resolve().parents[2])


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
    from daemon.weights.tiny import PARTS, make_tiny, missing_parts

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


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--guidance-scale", "nan"], "--guidance-scale must be a finite number"),
        (["--downsample-ratio", "0"], "--downsample-ratio must be a positive number"),
        (["--process-length", "0"], "--process-length must be -1 (all) or >= 1"),
        (["--window-size", "4", "--overlap", "5"], "--overlap must be in"),
        (["--num-inference-steps", "0"], "--num-inference-steps must be >= 1"),
        (["--steps", "0"], "--num-inference-steps must be >= 1"),
    ],
)
def test_run_py_option_errors_exit_2(tmp_path: Path, clip_file: Path, capsys, extra: list[str], message: str) -> None:
    (tmp_path / "model").mkdir()
    rc = main(["process", str(clip_file), "--model-dir", str(tmp_path / "model"), "--out", str(tmp_path / "o.npz"),
               *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err
    assert len(err.strip().splitlines()) == 1, err


def test_every_run_py_option_is_accepted() -> None:
    """run.py's options (fire: --name_with_underscores) under our dashed names; --out/--save-folder replace
    save_folder's file naming, --model-dir replaces cache_dir and the hub."""
    import argparse

    from daemon.commands.process import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args([
        "process", "v.mp4", "--model-dir", "m", "--save-folder", "out", "--height", "576", "--width", "1024",
        "--downsample-ratio", "2.0", "--num-inference-steps", "3", "--guidance-scale", "1.5",
        "--window-size", "20", "--decode-chunk-size", "4", "--overlap", "5", "--process-length", "30",
        "--process-stride", "2", "--seed", "7", "--model-type", "determ", "--no-force-projection",
        "--no-force-fixed-focal", "--use-extract-interp", "--track-time", "--low-memory-usage"])
    assert (args.height, args.width, args.downsample_ratio, args.steps, args.guidance_scale) == (576, 1024, 2.0, 3, 1.5)
    assert (args.window, args.decode_chunk, args.overlap, args.max_frames, args.stride) == (20, 4, 5, 30, 2)
    assert (args.seed, args.variant, args.force_projection, args.force_fixed_focal) == (7, "determ", False, False)
    assert args.use_extract_interp and args.track_time and args.low_memory and args.save_folder == Path("out")
    defaults = parser.parse_args(["process", "v.mp4", "--model-dir", "m", "--out", "o.npz"])
    assert (defaults.force_projection, defaults.force_fixed_focal, defaults.use_extract_interp) == (True, True, False)
    assert (defaults.guidance_scale, defaults.downsample_ratio, defaults.window, defaults.overlap) == (1.0, 1.0, 110, 25)


def test_downsample_matches_run_py_torch_ops() -> None:
    """daemon.model.downsample vs the torch calls of run.py (F.interpolate bicubic+antialias then clamp; bilinear
    back; mask bilinear > 0.5)."""
    import torch
    import torch.nn.functional as F

    from daemon.model.downsample import downsample_frames, upsample_output

    frames, points, mask = tilted_plane(2, 36, 50, seed=3)
    got = downsample_frames(frames, 1.7)
    t = torch.from_numpy(frames).float().permute(0, 3, 1, 2) / 255.0
    want = F.interpolate(t, (round(36 / 1.7), round(50 / 1.7)), mode="bicubic", antialias=True).clamp(0, 1)
    assert got.shape == (2, 21, 29, 3)
    np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), rtol=0, atol=2e-6)
    pts, m = upsample_output(points[:, :18, :25], mask[:, :18, :25], (36, 50))
    want_p = F.interpolate(torch.from_numpy(points[:, :18, :25]).permute(0, 3, 1, 2), (36, 50), mode="bilinear")
    want_m = F.interpolate(torch.from_numpy(mask[:, :18, :25]).float().unsqueeze(1), (36, 50), mode="bilinear")
    np.testing.assert_allclose(pts, want_p.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(m, want_m.squeeze(1).numpy() > 0.5)


def test_process_with_run_py_options(tmp_path_factory: pytest.TempPathFactory, clip_file: Path) -> None:
    """--downsample-ratio 2 (frames 48x64, processed at 64x64, result back at 96x128), guidance 2, per-pixel
    focal, nearest-exact upsampling, --track-time, --save-folder naming."""
    model = tiny_model_dir(tmp_path_factory.getbasetemp())
    out = tmp_path_factory.mktemp("out_opts")
    res = _run(str(clip_file), "--model-dir", str(model), "--save-folder", str(out), "--height", "64",
               "--width", "64", "--window-size", "4", "--overlap", "1", "--num-inference-steps", "1",
               "--decode-chunk-size", "4", "--downsample-ratio", "2", "--guidance-scale", "2",
               "--no-force-projection", "--use-extract-interp", "--track-time", "--device", "cpu")
    assert res.returncode == 0, res.stderr[-3000:]
    data = np.load(out / "clip.npz")
    assert data["point_map"].shape == (T, H0, W0, 3) and data["mask"].shape == (T, H0, W0)
    assert np.isfinite(data["point_map"].astype(np.float32)).all()
    assert "Elapsed time for denoise:" in res.stdout


def test_process_and_batch_take_their_defaults_from_process_options() -> None:
    """One place for the offline defaults: both front ends parse to ProcessOptions() (issue #13)."""
    import argparse

    from daemon.commands import batch, process
    from daemon.offline.options import ProcessOptions

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    process.register(sub)
    batch.register(sub)
    want = ProcessOptions(model_dir="m")
    got_p = ProcessOptions.from_args(parser.parse_args(["process", "v.mp4", "--model-dir", "m", "--out", "o.npz"]))
    got_b = ProcessOptions.from_args(parser.parse_args(["batch", "v.mp4", "--model-dir", "m", "--out", "o"]))
    assert got_p == want and got_b == want
    flags = ["--window-size", "7", "--overlap", "2", "--guidance-scale", "1.5", "--downsample-ratio", "2",
             "--no-force-fixed-focal", "--decode-chunk-size", "3"]
    p = ProcessOptions.from_args(parser.parse_args(["process", "v.mp4", "--model-dir", "m", "--out", "o.npz", *flags]))
    b = ProcessOptions.from_args(parser.parse_args(["batch", "v.mp4", "--model-dir", "m", "--out", "o", *flags]))
    assert p == b and (p.window, p.overlap, p.guidance_scale, p.downsample_ratio) == (7, 2, 1.5, 2.0)
    assert not p.force_fixed_focal and p.decode_chunk == 3
