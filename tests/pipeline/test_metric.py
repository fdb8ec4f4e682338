"""Metric scale with MoGe-2: the factor rule, a tiny random MoGe-2 checkpoint (official v2 layout) loaded by
the real sidecar, the config/weights entries, and two real daemon runs (relative, metric) on the same clip."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from daemon.broker import Mosquitto
from daemon.config import ConfigError, parse_config
from daemon.model.metric_scale import MetricScale, follow_factor, window_factor
from daemon.model.streaming_stats import PolicyParams
from daemon.stages.prior import run_priors
from daemon.weights import pull
from helpers.clips import make_clip, synthetic_frames
from helpers.run_daemon import (  # noqa: F401 (fixtures)
    DaemonProcess,
    Subscriber,
    assert_balanced,
    base_sections,
    daemon_procs,
    tiny_model,
    write_config,
)
from moge_sidecar.tiny import make_tiny_moge2

REPO = Path(__file__).resolve().parents[2]


def test_window_factor_is_a_median_of_ratios_on_valid_pixels() -> None:
    rng = np.random.default_rng(0)
    depth = rng.uniform(0.5, 2.0, (2, 8, 9)).astype(np.float32)
    prior = depth * np.float32(2.5)
    valid = rng.random(depth.shape) > 0.3
    prior[0, 0, 0] = np.nan  # invalid prior pixels, outliers and non-positive depths do not count
    prior[0, 0, 1] = 1e6
    depth[0, 0, 2] = 0.0
    valid[0, 0, :3] = True
    assert window_factor(prior, depth, valid) == pytest.approx(2.5, rel=1e-6)
    assert window_factor(prior, depth, np.zeros_like(valid)) is None


def test_factor_follows_the_streaming_continuity_rule() -> None:
    p = PolicyParams(smoothing=0.5, max_step=0.4)
    assert follow_factor(None, 3.0, p) == 3.0
    assert follow_factor(2.0, 2.0 * math.exp(0.2), p) == pytest.approx(2.0 * math.exp(0.1))
    assert follow_factor(2.0, 200.0, p) == pytest.approx(2.0 * math.exp(0.4))  # bounded per window
    m = MetricScale("follow", p)
    assert m.update(None, 0) is None  # nothing valid yet: stays relative
    assert m.update(3.0, 0) == 3.0  # anchored
    assert m.update(3.0 * math.exp(0.2), 0) == pytest.approx(3.0 * math.exp(0.1))
    assert m.update(None, 0) == pytest.approx(3.0 * math.exp(0.1))  # kept
    assert m.update(7.0, 1) == 7.0  # a new segment re-anchors
    f = MetricScale("frozen", p)
    assert f.update(3.0, 0) == 3.0 and f.update(5.0, 1) == 3.0


def test_config_metric_needs_moge2() -> None:
    with pytest.raises(ConfigError, match='geometry.metric = true: needs prior.model = "moge2"'):
        parse_config({"geometry": {"metric": True}}, REPO)
    cfg = parse_config({"geometry": {"metric": True}, "prior": {"model": "moge2"}, "model": {"dir": "/m"}}, REPO)
    assert cfg.prior_checkpoint() == Path("/m/moge2/model.pt") and cfg.moge_version() == 2
    cfg = parse_config({"model": {"dir": "/m"}}, REPO)
    assert cfg.prior.model == "moge1" and not cfg.geometry.metric
    assert cfg.prior_checkpoint() == Path("/m/moge/model.pt") and cfg.moge_version() == 1


def test_weights_pull_knows_moge2() -> None:
    plan = pull.pull_plan("diff", prior="moge2")
    moge = [p for p in plan if "moge" in p.repo_id.lower()]
    assert [(p.repo_id, p.filename, str(p.dest)) for p in moge] == [
        ("Ruicheng/moge-2-vitl-normal", "model.pt", "moge2/model.pt")]
    both = {p.repo_id for p in pull.pull_plan("diff", prior="both")}
    assert {"Ruicheng/moge-vitl", "Ruicheng/moge-2-vitl-normal"} <= both
    assert "Ruicheng/moge-2-vitl-normal" not in {p.repo_id for p in pull.pull_plan("diff")}  # moge1 stays default
    with pytest.raises(ValueError, match="prior must be one of"):
        pull.pull_plan("diff", prior="moge3")


@pytest.fixture(scope="module")
def moge2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("moge2") / "model.pt"
    make_tiny_moge2(path, seed=3, metric_scale=3.0)
    return path


def test_sidecar_runs_tiny_moge2_metric(moge2: Path, tmp_path: Path) -> None:
    """The checkpoint is MoGe-2's format (strict load into moge.model.v2); the sidecar returns its metric
    points: the same model with metric scale 1 gives the same points divided by 3."""
    import torch
    from moge.model.v2 import MoGeModel

    ckpt = torch.load(str(moge2), map_location="cpu", weights_only=True)
    assert set(ckpt) == {"model_config", "model"}
    assert any(k.startswith("scale_head.") for k in ckpt["model"])
    MoGeModel(**ckpt["model_config"]).load_state_dict(ckpt["model"])  # strict
    make_tiny_moge2(tmp_path / "unit.pt", seed=3, metric_scale=1.0)
    frames = make_frames(3)
    pts3, m3 = run_priors(frames, moge2, device="cpu", resolution_level=0, moge_version=2, chunk=2)
    pts1, m1 = run_priors(frames, tmp_path / "unit.pt", device="cpu", resolution_level=0, moge_version=2,
                          chunk=2)
    np.testing.assert_array_equal(m3, m1)
    assert 0.1 < m3.mean() < 0.9
    np.testing.assert_allclose(pts3[m3], pts1[m1] * 3.0, rtol=1e-4)


def make_frames(n: int) -> np.ndarray:

    return synthetic_frames(n, 64, 128, seed=1)


def _daemon_run(tmp: Path, model: Path, ckpt: Path, clip: Path, metric: bool, daemon_procs: list,
                n: int) -> tuple[dict, list]:
    tmp.mkdir()
    with Mosquitto(tmp / "mq") as broker:
        sub = Subscriber(broker.port, prefix="m")
        try:
            sections = base_sections(model, mqtt_port=broker.port, files_dir=tmp / "out",
                                     mqtt={"topic_prefix": "m"}, geometry={"metric": metric},
                                     prior={"model": "moge2", "checkpoint": str(ckpt)})
            cfg = write_config(tmp / "cfg.toml", sections,
                               {"cam": {"type": "file", "path": str(clip), "preview": False}})
            d = DaemonProcess(cfg, tmp)
            daemon_procs.append(d)
            assert d.wait(900) == 0, d.log_text()[-4000:]
            assert sub.wait_count(n, 10), (len(sub.frames), d.log_text()[-3000:])
        finally:
            sub.close()
    assert assert_balanced(d.summary(), "cam")["frames_out"] == n
    ref = np.load(tmp / "out" / "cam" / "clip.npz")
    order = np.argsort(ref["frame_index"])
    arrays = {k: ref[k][order] for k in ("depth", "mask", "point_map")}
    return arrays, sorted(sub.frames, key=lambda f: f.frame_index)


def test_daemon_metric_output(tiny_model: Path, moge2: Path, tmp_path: Path, daemon_procs: list) -> None:
    """The same clip through the daemon with MoGe-2 priors, relative then metric: units on every message,
    metric depth = relative depth x the published factor, and that factor is the median ratio of the prior's
    metric depth to the relative depth on the valid pixels of each window's frames (the first window anchors
    it; each later one follows the streaming continuity rule)."""
    from daemon.stages.ingest_file import decode_container

    n = 16
    clip = make_clip(tmp_path / "clip.mp4", n)
    rel, rel_msgs = _daemon_run(tmp_path / "rel", tiny_model, moge2, clip, False, daemon_procs, n)
    met, met_msgs = _daemon_run(tmp_path / "met", tiny_model, moge2, clip, True, daemon_procs, n)
    for f in rel_msgs:
        assert {f.properties[k]["units"] for k in ("depth", "points")} == {"relative"}
        assert f.properties["depth"]["metric_scale"] == "1.0"
    factors = []
    for f in met_msgs:
        assert {f.properties[k]["units"] for k in ("depth", "points")} == {"metric"}
        factors.append(float(f.properties["depth"]["metric_scale"]))
    factors = np.asarray(factors)
    np.testing.assert_array_equal(met["mask"], rel["mask"])
    want = rel["depth"] * factors.astype(np.float32)[:, None, None]
    np.testing.assert_allclose(met["depth"], want, rtol=1e-6)
    assert not np.allclose(factors, 1.0, rtol=0.05)  # the tiny MoGe-2 predicts ~3x its relative depth

    import av

    with av.open(str(clip)) as container:
        frames = np.stack([img for img, _, _ in decode_container(container, 64, 128)])
    points, pmask = run_priors(frames, moge2, device="cpu", resolution_level=0, moge_version=2, chunk=2)
    prior_z = np.where(pmask, points[..., 2], np.nan)
    # groups of frames made final together share a factor; recompute each group's raw factor from the priors
    starts = [0] + [i for i in range(1, n) if factors[i] != factors[i - 1]]
    assert len(starts) >= 3, factors
    prev = None
    params = PolicyParams()
    for s, e in zip(starts, starts[1:] + [n]):
        raw = window_factor(prior_z[s:e], rel["depth"][s:e], rel["mask"][s:e])
        assert raw is not None
        got = factors[s]
        expect = [raw] if prev is None else [follow_factor(prev, raw, params), raw]  # raw: a re-anchor (cut)
        assert any(got == pytest.approx(x, rel=1e-4) for x in expect), (s, e, got, expect, factors)
        prev = got
