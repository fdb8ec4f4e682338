"""Metric scale with MoGe-2: the factor rule, a tiny random MoGe-2 checkpoint (official v2 layout) loaded by
the real sidecar, the config/weights entries, and two real daemon runs (relative, metric) on the same clip."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from daemon.config import ConfigError, parse_config
from daemon.model.metric_scale import MetricScale, follow_factor, window_factor
from daemon.model.streaming_stats import PolicyParams
from daemon.stages.prior import run_priors
from daemon.weights import pull
from daemon_fixtures import (
    DaemonProcess,
    Subscriber,
    assert_balanced,
    base_sections,
    daemon_procs,  # noqa: F401 (fixture)
    make_clip,
    tiny_model,  # noqa: F401 (fixture)
    write_config,
)
from moge_sidecar.tiny import make_tiny_moge2
from mosquitto import Mosquitto

REPO = Path(__file__).resolve().parents[1]


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
    from daemon_fixtures import synthetic_frames

    return synthetic_frames(n, 64, 128, seed=1)
