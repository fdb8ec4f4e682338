"""Units of the live features: the pts-spaced skip policy, window fps, the preview scale rule, the preview
intrinsics, and the viewer hub's tiers."""

from __future__ import annotations

import asyncio
import json
import struct

import numpy as np

from daemon.frames import FrameMeta
from daemon.stages.preview import PreviewScale, make_preview, prior_intrinsics
from daemon.stages.window import Admission, Verdict, Window


def _admitted_pts(adm: Admission, pts: list[float], arrivals: list[float]) -> list[float]:
    kept = []
    for p, t in zip(pts, arrivals):
        adm.note_arrival(t, p)
        if adm.decide(False, 0, p) is Verdict.ADMIT:
            kept.append(p)
    return kept


def test_skip_spaces_admitted_frames_evenly_in_source_time() -> None:
    """A 30 fps source whose frames arrive in bursts (jitter) and with a variable frame rate (every 4th frame
    missing): kept half, the admitted frames are ~2/30 s apart in pts, not every 2nd arrival."""
    rng = np.random.default_rng(0)
    pts = [i / 30 for i in range(600) if i % 4 != 3]
    arrivals = list(np.cumsum(rng.exponential(1 / 22.5, len(pts))))
    adm = Admission("skip", input_fps=22.5, capacity_fps=11.25)
    adm.source_fps = 30.0
    adm.input_fps, adm.capacity_fps = 22.5, 11.25
    adm.alpha = 0.0  # keep the rates fixed: this checks the spacing rule, not the estimators
    kept = _admitted_pts(adm, pts, arrivals)
    gaps = np.diff(kept)
    step = 1 / (0.5 * 30)
    assert abs(float(np.mean(gaps)) - step) < 0.15 * step
    assert float(np.max(gaps)) <= step + 1 / 30 + 1e-9  # never more than one source frame late
    # the old credit rule kept every n-th ARRIVAL: its gaps in pts follow the missing frames
    old = Admission("skip", input_fps=22.5, capacity_fps=11.25, alpha=0.0)
    kept_old = [p for p, t in zip(pts, arrivals) if old.decide(False, 0) is Verdict.ADMIT]
    assert float(np.std(np.diff(kept_old))) > 2 * float(np.std(gaps))


def test_skip_keeps_everything_when_capacity_suffices_and_bound_still_applies() -> None:
    adm = Admission("skip", input_fps=30.0, capacity_fps=60.0)
    adm.source_fps = 30.0
    assert all(adm.decide(False, 0, i / 30) is Verdict.ADMIT for i in range(10))
    assert adm.decide(True, 1, 11 / 30) is Verdict.SKIP


def test_window_fps_from_pts() -> None:
    metas = [FrameMeta(i, i, 0.1 * i, 0.0) for i in range(5)]
    assert abs(Window(0, [None] * 5, metas, 5).fps - 10.0) < 1e-9
    assert Window(0, [None], metas[:1], 1).fps == 0.0


def test_preview_scale_rule() -> None:
    ps = PreviewScale(cut_threshold=0.4)
    ok = np.ones((4, 4), bool)
    ps.observe_prior(0, np.full((4, 4), 2.0), ok)
    ps.observe_prior(1, np.full((4, 4), 4.0), ok)  # log 2 > 0.4: a cut -> new segment from seq 1
    assert ps.segment_start == 1 and ps.scale == 4.0
    ps.observe_prior(2, np.full((4, 4), 4.4), ok)
    assert abs(ps.scale - 4.2) < 1e-9  # mean valid depth of the segment so far
    ps.observe_refined(0, 9.0)  # a refined frame from before the cut does not set the scale
    assert abs(ps.scale - 4.2) < 1e-9
    ps.observe_refined(1, 3.5)
    assert ps.scale == 3.5


def test_preview_units_and_intrinsics() -> None:
    h, w = 24, 32
    gx = (np.arange(w) / (w - 1) - 0.5) * 2
    gy = (np.arange(h) / (h - 1) - 0.5) * 2
    z = np.full((h, w), 3.0)
    pts = np.stack([0.7 * gx[None, :] * z, 0.5 * gy[:, None] * z, z], -1).astype(np.float32)
    mask = np.ones((h, w), bool)
    mask[0] = False
    p = make_preview(pts, mask, 1.5, 7, 2)
    assert p.frame_index == 7 and p.window_id == 2 and p.prior_scale == 1.5
    np.testing.assert_allclose(p.depth[mask], 2.0)
    fx, fy, cx, cy = prior_intrinsics(pts, mask)
    # same normalisation as FrameResult.intrinsics: (W-1) / (2 W f) with f the grid-unit inverse focal
    assert abs(fx - (w - 1) / (2 * w * 0.7)) < 1e-4 and abs(fy - (h - 1) / (2 * h * 0.5)) < 1e-4


def test_hub_sends_refined_frames_that_previews_overtook() -> None:
    from daemon.viewer.hub import ResultsHub
    from helpers.mqtt import make_frame

    async def main() -> list[dict]:
        hub = ResultsHub(["cam"])
        q = hub.subscribe("cam")
        hub.push("cam", make_frame(3), 0.1, 0.01, tier="refined")
        hub.push("cam", make_frame(9), 0.3, 0.001, tier="preview")
        out = []
        for _ in range(2):
            msg = await asyncio.wait_for(q.get(), 10)
            (n,) = struct.unpack("<I", msg[:4])
            out.append(json.loads(msg[4:4 + n]))
        await hub.close()
        return out

    heads = asyncio.run(main())
    assert [(h["tier"], h["frame_index"]) for h in heads] == [("refined", 3), ("preview", 9)]


def test_preview_scale_ignores_jitter_like_the_session() -> None:
    rng = np.random.default_rng(1)
    ps = PreviewScale(cut_threshold=0.4)
    ok = np.ones((4, 4), bool)
    means = np.exp(rng.normal(0, 0.5, 40))
    for seq, m in enumerate(means):
        ps.observe_prior(seq, np.full((4, 4), float(m)), ok)
    threshold_only = int((np.abs(np.diff(np.log(means))) > 0.4).sum())
    assert threshold_only > 15 and ps.cuts <= 6, (threshold_only, ps.cuts)
