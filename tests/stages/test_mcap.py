"""MCAP recordings: the recorder's files read back with the ``mcap`` library and their Foxglove schemas decoded
from the schema records in the file (tests/foxglove_decode.py); the daemon recording a real clip (and being
SIGKILLed mid-recording); ``geometryd process --out OUT.mcap`` against the npz of the same settings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest

from daemon.config import ConfigError, McapConfig, parse_config
from daemon.scenes import tilted_plane as synthetic_clip
from daemon.stages.publish_mcap import McapRecorder
from daemon.wire import foxglove as fx
from helpers.clips import make_clip
from helpers.foxglove_decode import cloud_xyz, depth_array, read_mcap
from helpers.mqtt import make_frame
from helpers.pipeline_fixtures import tiny_model_dir
from helpers.run_daemon import (  # noqa: F401 (fixtures)
    DaemonProcess,
    assert_balanced,
    base_sections,
    daemon_procs,
    tiny_model,
    write_config,
)

H, W = 12, 20
TOPICS = ["/cam/depth", "/cam/color", "/cam/points", "/cam/calibration", "/tf"]


def _image(i: int, h: int = H, w: int = W) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([(xx * 12 + i) % 256, (yy * 20) % 256, np.full_like(xx, 128)], -1).astype(np.uint8)


def _recorder(tmp_path: Path, **kw: object) -> McapRecorder:
    cfg = msgspec.structs.replace(McapConfig(enabled=True, compression="zstd"), **kw)
    return McapRecorder(cfg, str(tmp_path))


def test_recorder_channels_decode_and_match_the_frames(tmp_path: Path) -> None:
    rec = _recorder(tmp_path, points_stride=3)
    frames = [make_frame(i, H, W) for i in range(4)]
    for i, f in enumerate(frames):
        rec.write_frame("cam", f, 10.0 + i / 30, image=_image(i))
    rec.close()
    (path,) = sorted((tmp_path / "cam").glob("*.mcap"))
    assert path.name.endswith("Z.mcap")
    got = read_mcap(path)
    assert got.has_footer and not got.truncated
    assert sorted({t for t, _, _ in got.messages}) == sorted(TOPICS)
    schemas = {got.channels[cid].topic: s.name for cid, s in
               ((cid, got.schemas[c.schema_id]) for cid, c in got.channels.items())}
    assert schemas == {"/cam/depth": "foxglove.RawImage", "/cam/color": "foxglove.CompressedImage",
                       "/cam/points": "foxglove.PointCloud", "/cam/calibration": "foxglove.CameraCalibration",
                       "/tf": "foxglove.FrameTransform"}
    assert {c.topic: c.metadata for c in got.channels.values()}["/cam/depth"] == {"units": "relative"}
    for i, f in enumerate(frames):
        ns = round((10.0 + i / 30) * 1e9)
        (_, depth), = [(t, m) for t, m in got.topic("/cam/depth") if t == ns]
        assert depth.timestamp.seconds * 10**9 + depth.timestamp.nanos == ns
        d = depth_array(depth)
        np.testing.assert_array_equal(d[f.mask], f.depth[f.mask])  # float32, bit for bit
        assert np.isnan(d[~f.mask]).all()
        (_, cloud), = [(t, m) for t, m in got.topic("/cam/points") if t == ns]
        sub = f.mask[::3, ::3]
        np.testing.assert_array_equal(cloud_xyz(cloud), f.point_map[::3, ::3][sub])
        assert cloud.point_stride == 16 and cloud.frame_id == "cam/camera"
        rgba = np.frombuffer(cloud.data, np.uint8).reshape(-1, 16)[:, 12:]
        np.testing.assert_array_equal(rgba[:, :3], _image(i)[::3, ::3][sub])
        (_, cal), = [(t, m) for t, m in got.topic("/cam/calibration") if t == ns]
        fxn, fyn, cxn, cyn = f.intrinsics
        assert (cal.width, cal.height) == (W, H)
        np.testing.assert_allclose(cal.K, [fxn * W, 0, cxn * W - 0.5, 0, fyn * H, cyn * H - 0.5, 0, 0, 1])
        (_, jpg), = [(t, m) for t, m in got.topic("/cam/color") if t == ns]
        assert jpg.format == "jpeg"
        assert np.abs(fx.decode_jpeg(jpg.data).astype(int) - _image(i)).mean() < 8  # JPEG q90
    (_, tf), = got.topic("/tf")[:1]
    assert (tf.parent_frame_id, tf.child_frame_id) == ("world", "cam/camera")


def test_pixel_k_projects_like_the_normalised_intrinsics() -> None:
    intr, w, h = (0.9, 1.2, 0.47, 0.52), 64, 48
    x, y, z = 0.3, -0.2, 2.0
    un, vn = intr[2] + intr[0] * x / z, intr[3] + intr[1] * y / z  # (u + 0.5) / W
    k = fx.pixel_k(intr, w, h)
    assert k[0] * x / z + k[2] == pytest.approx(un * w - 0.5)
    assert k[4] * y / z + k[5] == pytest.approx(vn * h - 0.5)


def test_colour_off_and_rotation_by_duration(tmp_path: Path) -> None:
    rec = _recorder(tmp_path, colour=False, rotate_s=0.1, points_stride=1)
    n = 10
    for i in range(n):
        rec.write_frame("cam", make_frame(i, H, W), i / 30, image=_image(i))
    rec.close()
    paths = sorted((tmp_path / "cam").glob("*.mcap"))
    assert paths == sorted(rec.written) and len(paths) == 4  # a file spans [first pts, first pts + 0.1 s)
    counts = []
    for p in paths:
        got = read_mcap(p)
        assert got.has_footer and "/cam/color" not in {t for t, _, _ in got.messages}
        counts.append(len(got.topic("/cam/depth")))
        cloud = got.topic("/cam/points")[0][1]
        assert cloud.point_stride == 12 and [f.name for f in cloud.fields] == ["x", "y", "z"]
    assert counts == [3, 3, 3, 1]


def test_rotation_by_size(tmp_path: Path) -> None:
    rec = _recorder(tmp_path, rotate_mb=1, rotate_s=0.0, compression="none", points_stride=1)
    h, w = 128, 160  # ~0.33 MiB of messages per frame uncompressed
    for i in range(8):
        rec.write_frame("cam", make_frame(i, h, w), i / 30)
    rec.close()
    paths = sorted((tmp_path / "cam").glob("*.mcap"))
    assert len(paths) >= 2
    assert all(p.stat().st_size < (1 << 20) + 400_000 for p in paths)  # at most one frame past the limit
    assert sum(len(read_mcap(p).topic("/cam/depth")) for p in paths) == 8


def test_foxglove_bind_rule() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"foxglove": {"enabled": True, "bind": "0.0.0.0"}}, Path("."))
    assert str(e.value) == ('config error: foxglove.bind = "0.0.0.0": a non-loopback bind needs foxglove.token '
                            "(or bind 127.0.0.1)")
    cfg = parse_config({"foxglove": {"enabled": True, "bind": "0.0.0.0", "token": "t0k"}}, Path("."))
    assert cfg.foxglove.token == "t0k" and "t0k" not in repr(cfg)
    with pytest.raises(ConfigError, match="foxglove.token"):
        parse_config({"foxglove": {"token": "a b"}}, Path("."))
    cfg = parse_config({"mcap": {"dir": "rec"}}, Path("/srv/g"))
    assert cfg.mcap.dir == "/srv/g/rec"


# ---- the daemon ---------------------------------------------------------------------------------------------

N = 20


def test_daemon_records_every_frame_like_the_file_sink(tiny_model: Path, tmp_path: Path, daemon_procs: list) -> None:
    clip = make_clip(tmp_path / "clip.mp4", n_frames=N)
    out = tmp_path / "out"
    sections = base_sections(tiny_model, files_dir=out, mcap={"enabled": True, "points_stride": 1})
    cfg = write_config(tmp_path / "cfg.toml", sections, {"cam": {"type": "file", "path": str(clip)}})
    d = DaemonProcess(cfg, tmp_path)
    daemon_procs.append(d)
    assert d.wait(900) == 0, d.log_text()[-4000:]
    s = assert_balanced(d.summary(), "cam")
    assert s["frames_out"] == N and not s["dropped"]
    (path,) = sorted((out / "cam").glob("*.mcap"))
    got = read_mcap(path)
    assert got.has_footer and not got.truncated
    npz = np.load(out / "cam" / "clip.npz")
    order = np.argsort(npz["frame_index"])
    depth_msgs = sorted(got.topic("/cam/depth"))
    assert [t for t, _ in depth_msgs] == [round(p * 1e9) for p in npz["pts"][order]]
    for k, (_, msg) in zip(order, depth_msgs):
        m = npz["mask"][k]
        np.testing.assert_array_equal(depth_array(msg)[m], npz["depth"][k][m])
        assert np.isnan(depth_array(msg)[~m]).all()
    clouds = sorted(got.topic("/cam/points"))
    for k, (_, msg) in zip(order, clouds):
        # the npz holds the same float32 points rounded to float16 (FileSink)
        np.testing.assert_array_equal(cloud_xyz(msg).astype(np.float16), npz["point_map"][k][npz["mask"][k]])
        rgb = np.frombuffer(msg.data, np.uint8).reshape(-1, 16)[:, 12:15]
        assert rgb.std() > 5  # coloured from the real frames (JPEG round trip), not a constant
    assert len(got.topic("/cam/color")) == N and len(got.topic("/cam/calibration")) == N
    log = d.log_text()
    assert "mcap: wrote" in log


def test_daemon_sigkill_leaves_a_readable_recording(tiny_model: Path, tmp_path: Path, daemon_procs: list) -> None:
    clip = make_clip(tmp_path / "clip.mp4", n_frames=30)
    out = tmp_path / "out"
    sections = base_sections(tiny_model, files_dir=out, mcap={"enabled": True},
                             files={"enabled": False, "dir": str(out)})
    cfg = write_config(tmp_path / "cfg.toml", sections,
                       {"cam": {"type": "file", "path": str(clip), "loop": True, "realtime": True}})
    d = DaemonProcess(cfg, tmp_path, exit_when_done=False, extra_args=["--plumbing-identity-delay", "0.05"])
    daemon_procs.append(d)
    end = time.monotonic() + 600
    frames = 0
    while time.monotonic() < end and frames < 12:
        assert d.proc.poll() is None, d.log_text()[-4000:]
        paths = sorted((out / "cam").glob("*.mcap")) if (out / "cam").exists() else []
        if paths:
            frames = len(read_mcap(paths[-1]).topic("/cam/depth"))
        time.sleep(0.2)
    assert frames >= 12, d.log_text()[-4000:]
    d.proc.send_signal(signal.SIGKILL)
    d.wait(30)
    (path,) = sorted((out / "cam").glob("*.mcap"))
    got = read_mcap(path)
    assert not got.has_footer  # killed: no summary, no footer ...
    n = len(got.topic("/cam/depth"))
    assert n >= frames  # ... yet every frame written before the kill reads back, whole and decodable
    for topic in TOPICS:
        assert len(got.topic(topic)) == n, topic
    for _, msg in got.topic("/cam/depth"):
        d_ = depth_array(msg)
        assert d_.shape == (64, 128) and np.isfinite(d_).any()
    times = [t for t, _ in got.topic("/cam/depth")]
    assert times == sorted(times) and len(set(times)) == n


# ---- geometryd process --out OUT.mcap ----------------------------------------------------------------------

T, H0, W0 = 6, 64, 64


def _process(clip: Path, model: Path, out: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "daemon", "process", str(clip), "--model-dir", str(model),
                          "--out", str(out), "--window", "4", "--overlap", "1", "--steps", "1",
                          "--decode-chunk", "4", "--device", "cpu", "--dtype", "fp32"],
                         capture_output=True, text=True, env=env, timeout=900, check=False,
                         cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0, res.stderr[-3000:]


def test_process_out_mcap_matches_npz(tmp_path_factory: pytest.TempPathFactory) -> None:
    from daemon.video import write_video

    frames, _, _ = synthetic_clip(T, H0, W0, seed=11)
    base = tmp_path_factory.mktemp("proc")
    clip = base / "my clip.mp4"
    write_video(clip, frames, fps=10)
    model = tiny_model_dir(tmp_path_factory.getbasetemp())
    _process(clip, model, base / "o.npz")
    _process(clip, model, base / "o.mcap")
    npz = np.load(base / "o.npz")
    got = read_mcap(base / "o.mcap")
    assert got.has_footer
    topics = {t for t, _, _ in got.messages}
    assert topics == {"/my_clip/depth", "/my_clip/color", "/my_clip/points", "/my_clip/calibration", "/tf"}
    depth = sorted(got.topic("/my_clip/depth"))
    assert [t for t, _ in depth] == [round(i / 10 * 1e9) for i in range(T)]
    for i, (_, msg) in enumerate(depth):
        m = npz["mask"][i]
        d = depth_array(msg)
        assert d.shape == (H0, W0)
        np.testing.assert_array_equal(np.isnan(d), ~m)
        # the npz holds float16 point maps: z equals the float32 depth within float16 rounding (2**-11 rel.)
        np.testing.assert_allclose(d[m], npz["point_map"][i][..., 2][m].astype(np.float32), rtol=2**-11, atol=0)


def test_write_failure_is_counted_and_raised(tmp_path: Path) -> None:
    from daemon.metrics import Metrics

    (tmp_path / "cam").write_text("a file where the source folder should be")
    metrics = Metrics()
    rec = McapRecorder(McapConfig(enabled=True), str(tmp_path), metrics)
    with pytest.raises(OSError):
        rec.write_frame("cam", make_frame(0, H, W), 0.0)
    rec.write_frame("ok", make_frame(0, H, W), 0.0)
    rec.close()
    text = metrics.render().decode()
    assert 'geometryd_sink_failed_total{sink="mcap",source="cam"} 1.0' in text
    assert 'geometryd_sink_frames_total{sink="mcap",source="ok"} 1.0' in text
    assert 'geometryd_sink_files_total{sink="mcap",source="ok"} 1.0' in text


def test_colour_stash_is_bounded_and_round_trips() -> None:
    from daemon.stages.colour_stash import ColourStash

    stash = ColourStash(3)
    for seq in range(5):
        stash.put(seq, _image(seq))
    assert len(stash) == 3 and stash.evicted == 2
    assert stash.take(0) is None and stash.take(1) is None  # evicted oldest first (dropped frames)
    jpeg = stash.take(4)
    assert jpeg is not None and stash.take(4) is None
    assert np.abs(fx.decode_jpeg(jpeg).astype(int) - _image(4)).mean() < 8


def test_channel_units_follow_the_result(tmp_path: Path) -> None:
    import dataclasses

    frame = make_frame(0, H, W)
    metric = dataclasses.replace(frame, units="metric")
    rec = _recorder(tmp_path)
    rec.write_frame("m", metric, 0.0)
    rec.write_frame("r", frame, 0.0)
    rec.close()
    for source, units in (("m", "metric"), ("r", "relative")):
        (path,) = (tmp_path / source).glob("*.mcap")
        chans = {c.topic: c.metadata for c in read_mcap(path).channels.values()}
        assert chans[f"/{source}/depth"] == {"units": units} == chans[f"/{source}/points"]
