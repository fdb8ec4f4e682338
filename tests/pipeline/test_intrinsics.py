"""Known camera intrinsics: validation and normalisation, the projection with them, `geometryd process
--intrinsics` (real sidecar, tiny model) and a real daemon run whose retained `intrinsics` topic carries them
unchanged while its published points follow them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from daemon.broker import Mosquitto
from daemon.config import ConfigError, parse_config
from daemon.intrinsics import check_pixel_intrinsics, normalise_pixel_intrinsics, project_known
from daemon.scenes import tilted_plane as synthetic_clip
from daemon.video import write_video
from helpers.clips import make_clip
from helpers.pipeline_fixtures import tiny_model_dir
from helpers.run_daemon import (  # noqa: F401 (fixtures)
    DaemonProcess,
    Subscriber,
    assert_balanced,
    base_sections,
    daemon_procs,
    tiny_model,
    write_config,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("bad,message", [
    ([500, 500, 320], "4 numbers"),
    ([500, float("nan"), 320, 240], "finite"),
    ([0, 500, 320, 240], "fx, fy must be > 0"),
    ([500, -1, 320, 240], "fx, fy must be > 0"),
    ([500, 500, 0, 240], "cx, cy must be > 0"),
    ([500, 500, 640, 240], "cx=640.0 must be < the source width 640"),
    ([500, 500, 320, 480.5], "cy=480.5 must be < the source height 480"),
])
def test_pixel_intrinsics_are_validated(bad: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_pixel_intrinsics(bad, 480, 640)


def test_normalised_form_and_projection() -> None:
    fx, fy, cx, cy = 300.0, 280.0, 150.0, 110.0
    n = normalise_pixel_intrinsics([fx, fy, cx, cy], 240, 320)
    assert n == (fx / 320, fy / 240, (cx + 0.5) / 320, (cy + 0.5) / 240)
    rng = np.random.default_rng(0)
    log_depth = rng.uniform(-1, 2, (2, 240, 320)).astype(np.float32)
    log_depth[0, 0, 0] = 12.0  # clamped at 10 as the estimated-focal path does
    points, depth = project_known(log_depth, n)
    z = np.exp(np.minimum(log_depth, 10)).astype(np.float32)
    np.testing.assert_allclose(depth, z, rtol=1e-6)
    np.testing.assert_array_equal(points[..., 2], depth)
    u = np.arange(320)[None, None, :]
    v = np.arange(240)[None, :, None]
    np.testing.assert_allclose(points[..., 0] / points[..., 2], np.broadcast_to((u - cx) / fx, depth.shape),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(points[..., 1] / points[..., 2], np.broadcast_to((v - cy) / fy, depth.shape),
                               rtol=1e-6, atol=1e-7)
    # at half the size (the ingests stretch) the same normalised tuple gives (u' - cx')/fx' of the scaled K
    p2, _ = project_known(log_depth[:, ::2, ::2].copy(), n)
    u2 = np.arange(160)
    np.testing.assert_allclose(p2[0, 5, :, 0] / p2[0, 5, :, 2], (u2 - ((cx + 0.5) / 2 - 0.5)) / (fx / 2),
                               rtol=1e-6, atol=1e-7)


def test_config_intrinsics() -> None:
    src = {"type": "file", "path": "x.mp4"}
    cfg = parse_config({"sources": {"a": {**src, "intrinsics": [500, 500.5, 320, 240]}}}, REPO)
    assert cfg.sources["a"].intrinsics == [500.0, 500.5, 320.0, 240.0]
    assert parse_config({"sources": {"a": src}}, REPO).sources["a"].intrinsics is None
    for bad, message in (([1, 2, 3], "an array of 4 numbers"), ([0, 1, 1, 1], "must be > 0"),
                         ("500", "an array of 4 numbers")):
        with pytest.raises(ConfigError, match=message) as err:
            parse_config({"sources": {"a": {**src, "intrinsics": bad}}}, REPO)
        assert str(err.value).startswith("config error: sources.a.intrinsics = ")
    with pytest.raises(ConfigError, match="geometry.force_projection = false"):
        parse_config({"geometry": {"force_projection": False},
                      "sources": {"a": {**src, "intrinsics": [5, 5, 3, 3]}}}, REPO)


T, H0, W0 = 5, 64, 128
K = (70.0, 65.0, 50.25, 40.5)  # off-centre principal point: the estimated path could not produce it


def test_process_uses_known_intrinsics(tmp_path_factory: pytest.TempPathFactory) -> None:
    frames, _, _ = synthetic_clip(T, H0, W0, seed=5)
    work = tmp_path_factory.mktemp("intr")
    clip = work / "clip.mp4"
    write_video(clip, frames, fps=10)
    model = tiny_model_dir(tmp_path_factory.getbasetemp())
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, "-m", "daemon", "process", str(clip), "--model-dir", str(model), "--window", "4",
            "--overlap", "1", "--steps", "1", "--decode-chunk", "4", "--device", "cpu"]
    res = subprocess.run([*base, "--out", str(work / "k.npz"), "--intrinsics", ",".join(map(str, K))],
                         check=False, capture_output=True, text=True, env=env, timeout=900,
                         cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    data = np.load(work / "k.npz")
    pm, mask = data["point_map"].astype(np.float32), data["mask"]
    assert mask.mean() > 0.05
    fx, fy, cx, cy = K
    u = np.broadcast_to(np.arange(W0)[None, None, :], mask.shape)
    v = np.broadcast_to(np.arange(H0)[None, :, None], mask.shape)
    # float16 storage: X and Z each within 2^-11 relative, so X/Z within 2^-10 (+ subnormal slack near 0)
    np.testing.assert_allclose(pm[..., 0][mask] / pm[..., 2][mask], ((u - cx) / fx)[mask], rtol=2**-10, atol=1e-4)
    np.testing.assert_allclose(pm[..., 1][mask] / pm[..., 2][mask], ((v - cy) / fy)[mask], rtol=2**-10, atol=1e-4)
    # a principal point outside the video is a usage error (exit 2), found once the size is known
    res = subprocess.run([*base, "--out", str(work / "bad.npz"), "--intrinsics", f"70,65,{W0 + 1},40"],
                         check=False, capture_output=True, text=True, env=env, timeout=900,
                         cwd=REPO)
    assert res.returncode == 2 and f"must be < the source width {W0}" in res.stderr


def _retained(port: int, topic: str) -> dict:
    import aiomqtt

    async def get() -> dict:
        async with aiomqtt.Client("127.0.0.1", port) as client:
            await client.subscribe(topic, qos=1)
            async with asyncio.timeout(10):
                async for msg in client.messages:
                    return json.loads(msg.payload)
        raise AssertionError("no retained message")

    return asyncio.run(get())


def test_daemon_publishes_known_intrinsics(tiny_model: Path, tmp_path: Path, daemon_procs: list) -> None:
    """The clip is decoded at 128x256 and processed at 64x128: K is in pixels of the decoded size."""
    clip = make_clip(tmp_path / "clip.mp4", 12, height=128, width=256)
    k = (180.0, 170.0, 140.0, 70.0)
    want = normalise_pixel_intrinsics(k, 128, 256)
    with Mosquitto(tmp_path / "mq") as broker:
        sub = Subscriber(broker.port, prefix="k")
        try:
            sections = base_sections(tiny_model, mqtt_port=broker.port, mqtt={"topic_prefix": "k"})
            cfg = write_config(tmp_path / "cfg.toml", sections, {"cam": {"type": "file", "path": str(clip)}})
            with open(cfg, "a") as f:  # the last table is [sources.cam]
                f.write(f"intrinsics = [{', '.join(map(repr, k))}]\n")
            d = DaemonProcess(cfg, tmp_path)
            daemon_procs.append(d)
            assert d.wait(600) == 0, d.log_text()[-4000:]
            assert sub.wait_count(12, 10), (len(sub.frames), d.log_text()[-3000:])
        finally:
            sub.close()
        retained = _retained(broker.port, "k/cam/intrinsics")
    cam = assert_balanced(d.summary(), "cam")
    assert cam["frames_out"] == 12
    assert (retained["fx"], retained["fy"], retained["cx"], retained["cy"]) == want  # unchanged, exactly
    assert (retained["width"], retained["height"]) == (128, 64)
    fx, fy, cx, cy = want
    for f in sub.frames:
        assert f.intrinsics == want
        m = f.points_valid & (np.abs(f.points[..., 2]) > 1e-3)
        assert m.mean() > 0.05
        un = (np.arange(128)[None, :] + 0.5) / 128
        vn = (np.arange(64)[:, None] + 0.5) / 64
        rx = np.broadcast_to((un - cx) / fx, m.shape)
        ry = np.broadcast_to((vn - cy) / fy, m.shape)
        np.testing.assert_allclose(f.points[..., 0][m] / f.points[..., 2][m], rx[m], rtol=2**-10, atol=1e-4)
        np.testing.assert_allclose(f.points[..., 1][m] / f.points[..., 2][m], ry[m], rtol=2**-10, atol=1e-4)


def test_daemon_source_fails_on_intrinsics_outside_the_frame(tiny_model: Path, tmp_path: Path,
                                                             daemon_procs: list) -> None:
    """cx beyond the decoded width (known only once a frame is decoded): the source fails with a message
    naming the intrinsics, no frame is admitted, the counters balance."""
    clip = make_clip(tmp_path / "clip.mp4", 4)
    cfg = write_config(tmp_path / "cfg.toml", base_sections(tiny_model),
                       {"cam": {"type": "file", "path": str(clip), "preview": False}})
    with open(cfg, "a") as f:
        f.write("intrinsics = [100.0, 100.0, 128.0, 30.0]\n")  # the clip is 128 wide: cx must be < 128
    d = DaemonProcess(cfg, tmp_path)
    daemon_procs.append(d)
    assert d.wait(600) == 1, d.log_text()[-4000:]
    cam = assert_balanced(d.summary(), "cam")
    assert cam["state"] == "failed" and cam["frames_in"] == 0
    assert "cx=128.0 must be < the source width 128" in cam["error"]
