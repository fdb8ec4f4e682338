"""Streaming statistics policies (daemon/model/streaming_stats.py) on the drift clip (bench/drift_clip.py): known
geometry, exact priors, no networks. The figures are in docs/streaming.md."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.drift_clip import CUT, compare, drift_clip, figures, run_policy
from daemon.model.prior_post import compute_stats
from daemon.model.streaming_stats import FollowStats, PolicyParams, StreamStats, follow_focal, frame_stat


@pytest.mark.parametrize("window,overlap", [(110, 25), (25, 5)])
def test_follow_beats_frozen_on_the_drift_clip(window: int, overlap: int) -> None:
    figs = compare(window, overlap)
    frozen, follow = figs["frozen"], figs["follow"]
    assert follow.frac_outside < frozen.frac_outside
    assert follow.scale_error_mean < frozen.scale_error_mean
    assert follow.max_jump < frozen.max_jump
    # the cut is seen (a second segment), and inside a segment s moves smoothly
    assert (frozen.segments, follow.segments) == (1, 2)
    assert follow.max_step_in_segment <= PolicyParams().max_step / (window - overlap) + 1e-9


def test_frozen_is_compute_stats_of_window_zero() -> None:
    points, mask = drift_clip(frames=60)
    norms, _ = run_policy("frozen", points, mask, window=20, overlap=5)
    ref = compute_stats(points[:20], mask[:20])
    assert all(n.stats == ref for n in norms)
    assert float(ref.lo) == 0.0  # the invalid sky enters upstream's 1 % quantile


def test_follow_quantiles_ignore_invalid_pixels() -> None:
    points, mask = drift_clip(frames=20)
    norms, _ = run_policy("follow", points, mask, window=20, overlap=5)
    st = norms[0].stats
    z = points[:20, ..., 2][mask[:20]]
    assert float(st.lo) > 0.0
    # lo/hi are the min/max per-frame 1 %/99 % quantiles of s/z over VALID pixels
    assert float(st.lo) >= float(st.scale) / z.max() * (1 - 1e-5)
    assert float(st.hi) <= float(st.scale) / z.min() * (1 + 1e-5)


def test_a_cut_starts_a_new_segment_anchored_on_its_own_frames() -> None:
    points, mask = drift_clip(frames=60, cut=33)
    norms, _ = run_policy("follow", points, mask, window=20, overlap=5)
    assert [n.segment for n in norms[:33]] == [0] * 33
    assert [n.segment for n in norms[33:]] == [1] * 27
    # the cut's window holds frames 15..34: the new segment is anchored on its frames 33, 34 only
    own = sum(float(points[t, ..., 2][mask[t]].sum()) for t in (33, 34)) / sum(int(mask[t].sum()) for t in (33, 34))
    assert math.isclose(float(norms[33].stats.scale), own, rel_tol=1e-5)


def test_restart_starts_a_new_segment() -> None:
    points, mask = drift_clip(frames=40)
    pol = StreamStats("follow")
    pol.window(points[:20], mask[:20], 0, 0)
    pol.restart()
    norms = pol.window(points[20:40], mask[20:40], 0, 20)
    assert pol.segment == 1 and norms[0].segment == 1


def test_change_per_window_is_bounded_and_smoothed() -> None:
    params = PolicyParams(smoothing=0.5, max_step=0.1, cut_threshold=10.0)
    pol = FollowStats(params)
    z1 = np.full((8, 8), 1.0, np.float32)
    z2 = np.full((8, 8), 2.0, np.float32)  # the scene doubles: no cut (threshold 10)
    ok = np.ones((8, 8), bool)
    pol.window([frame_stat(z1, ok)] * 4, 0)
    out = pol.window([frame_stat(z1, ok)] + [frame_stat(z2, ok)] * 4, 1)
    steps = np.diff([0.0] + [math.log(float(n.stats.scale)) for n in out])
    assert np.all(steps > 0) and np.allclose(steps, 0.1 / 4, rtol=1e-5)  # ramped, capped at max_step


def test_focal_follows_the_same_rule() -> None:
    p = PolicyParams(smoothing=0.5, max_step=0.4)
    assert follow_focal(None, (2.0, 3.0), p) == (2.0, 3.0)  # anchored at a segment start
    fx, fy = follow_focal((2.0, 3.0), (4.0, 3.0), p)
    assert math.isclose(fx, 2.0 * math.exp(0.1)) and fy == 3.0  # bounded: max_step / 4 per chunk


def test_figures_use_every_frame() -> None:
    points, mask = drift_clip(frames=60, cut=CUT if CUT < 60 else 30)
    norms, windows = run_policy("follow", points, mask, window=20, overlap=5)
    assert len(norms) == 60 and windows[0] == (0, 20) and windows[-1][1] == 60
    f = figures(norms, windows, points, mask, cut=30)
    assert 0 <= f.frac_outside < 1 and len(f.per_window_scale_error) == len(windows)


def test_a_noisy_prior_is_not_a_string_of_cuts() -> None:
    """Random-weight MoGe gives priors whose scale jumps by ~50 % between frames: those changes are the
    recent jitter, so they do not count as cuts (the 1st version of the rule found 12 cuts in 30 frames of
    the demo clip); a clean 4x cut after a steady stretch still does."""
    rng = np.random.default_rng(0)
    ok = np.ones((8, 8), bool)
    noisy = [frame_stat(np.full((8, 8), float(np.exp(rng.normal(0, 0.5))), np.float32), ok) for _ in range(60)]
    pol = FollowStats(PolicyParams())
    for k in range(0, 60, 10):
        pol.window(noisy[max(0, k - 2):k + 10], 2 if k else 0)
    assert pol.cuts <= 1, pol.cuts
    steady = [frame_stat(np.full((8, 8), 2.0 * (1 + 0.001 * t), np.float32), ok) for t in range(20)]
    hall = [frame_stat(np.full((8, 8), 8.0, np.float32), ok) for _ in range(5)]
    pol = FollowStats(PolicyParams())
    out = pol.window(steady + hall, 0)
    assert pol.cuts == 1 and out[19].segment == 0 and out[20].segment == 1
