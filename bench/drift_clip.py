"""The drift clip: a synthetic scene with KNOWN geometry whose depth range grows 3x, with one hard cut, and
the three figures that compare the streaming statistics policies on it (docs/streaming.md).

The priors are the exact point maps of the scene (no network involved), so the figures measure the policy
alone. Run ``python -m bench.drift_clip`` to print them and write bench/results/drift_clip.json; the test
(tests/pipeline/test_streaming_stats.py) asserts that ``follow`` beats ``frozen`` on all three.

Scene: a pinhole camera over a floor that rises from a horizon at depth 4 to the bottom row at depth
``near(t)``, which shrinks from 1.2 to 0.4 over the clip (far/near range 3.3 -> 10, i.e. 3x), with moving
ripples; the top 20 % of rows are sky (invalid prior). At frame ``CUT`` the camera is in a hall 4x larger
(every depth x4).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from daemon.model.prior_post import compute_stats
from daemon.model.streaming_stats import FrameNorm, PolicyParams, StreamStats
from daemon.pipeline import window_plan

FRAMES, CUT, H0, W0 = 330, 220, 48, 64
FOCAL = 0.8  # focal length / image width
WINDOW, OVERLAP = 110, 25  # the shipped defaults


def drift_clip(frames: int = FRAMES, cut: int = CUT, h: int = H0, w: int = W0) -> tuple[np.ndarray,
                                                                                        np.ndarray]:
    """(points (T,H,W,3) float32, mask (T,H,W) bool): the exact geometry of every frame."""
    v = (np.arange(h) + 0.5) / h
    u = (np.arange(w) + 0.5) / w
    horizon = 0.2
    pts = np.zeros((frames, h, w, 3), np.float32)
    mask = np.zeros((frames, h, w), bool)
    mask[:, v > horizon, :] = True
    a = np.clip((v - horizon) / (1 - horizon), 0, 1)[:, None]
    for t in range(frames):
        near = 1.2 * 3.0 ** (-t / (frames - 1))
        z = 4.0 * (near / 4.0) ** a * (1 + 0.05 * np.sin(12 * u[None, :] + 0.07 * t))
        z = np.broadcast_to(z, (h, w)).astype(np.float64)
        if t >= cut:
            z = 4.0 * z
        z = np.where(mask[t], z, 0.0)
        pts[t, ..., 0] = (u[None, :] - 0.5) / FOCAL * z
        pts[t, ..., 1] = (v[:, None] - 0.5) * (h / w) / FOCAL * z
        pts[t, ..., 2] = z
    return pts, mask


def run_policy(policy: str, points: np.ndarray, mask: np.ndarray, window: int = WINDOW,
               overlap: int = OVERLAP,
               params: PolicyParams = PolicyParams()) -> tuple[list[FrameNorm], list[tuple[int, int]]]:
    """Normalisation of every frame as a streaming session with ``policy`` assigns it, and the window plan
    (new frames [s, e) of each window)."""
    pol = StreamStats(policy, params)
    norms: list[FrameNorm] = []
    new_ranges = []
    for k, (s, e) in enumerate(window_plan(points.shape[0], window, overlap)):
        reuse = overlap if k else 0
        norms.extend(pol.window(points[s:e], mask[s:e], reuse, s))
        new_ranges.append((s + reuse, e))
    return norms, new_ranges


@dataclass
class Figures:
    frac_outside: float  # valid prior disparity values outside [-1, 1] before the clamp, over the clip
    scale_error_mean: float  # mean over windows of |log(s / s_shot)|, s_shot = offline s of the frame's shot
    scale_error_max: float
    max_jump: float  # largest |change of log(mean depth / s)| between consecutive frames
    max_step_in_segment: float  # largest |change of log s| between consecutive frames of one segment
    segments: int  # segments the policy used (frozen: 1)
    per_window_scale_error: list[float]


def figures(norms: list[FrameNorm], windows: list[tuple[int, int]], points: np.ndarray, mask: np.ndarray,
            cut: int = CUT) -> Figures:
    z = points[..., 2]
    shots = [(0, cut), (cut, points.shape[0])]
    ref = {}
    for s, e in shots:
        ref[(s, e)] = float(compute_stats(points[s:e], mask[s:e]).scale)
    outside = total = 0
    log_err = np.zeros(len(norms))
    level = np.zeros(len(norms))
    log_s = np.zeros(len(norms))
    for t, n in enumerate(norms):
        st = n.stats
        v = mask[t]
        zs = z[t][v] / st.scale
        d = 1.0 / np.maximum(zs, np.float32(1e-3))
        dn = (d - st.lo) / (st.hi - st.lo + np.float32(1e-4)) * 2 - 1
        outside += int(np.count_nonzero(np.abs(dn) > 1))
        total += int(v.sum())
        shot = shots[0] if t < cut else shots[1]
        log_s[t] = math.log(float(st.scale))
        log_err[t] = abs(log_s[t] - math.log(ref[shot]))
        level[t] = math.log(float(z[t][v].mean()) / float(st.scale))
    per_window = [float(log_err[s:e].mean()) for s, e in windows]
    seg = np.array([n.segment for n in norms])
    same_segment = seg[1:] == seg[:-1]
    return Figures(
        frac_outside=outside / total,
        scale_error_mean=float(np.mean(per_window)),
        scale_error_max=float(np.max(per_window)),
        max_jump=float(np.max(np.abs(np.diff(level)))),
        max_step_in_segment=float(np.max(np.abs(np.diff(log_s))[same_segment], initial=0.0)),
        segments=len({n.segment for n in norms}),
        per_window_scale_error=per_window,
    )


def compare(window: int = WINDOW, overlap: int = OVERLAP) -> dict[str, Figures]:
    points, mask = drift_clip()
    out = {}
    for policy in ("frozen", "follow"):
        norms, windows = run_policy(policy, points, mask, window, overlap)
        out[policy] = figures(norms, windows, points, mask)
    return out


def main() -> int:
    result = {}
    for name, (w, o) in {"default_110_25": (WINDOW, OVERLAP), "low_latency_25_5": (25, 5)}.items():
        figs = compare(w, o)
        result[name] = {p: vars(f) for p, f in figs.items()}
        for p, f in figs.items():
            print(f"{name:18s} {p:7s} outside [-1,1] {f.frac_outside:7.2%}  "
                  f"scale error mean {f.scale_error_mean:.3f} max {f.scale_error_max:.3f}  "
                  f"max jump {f.max_jump:.3f}  "
                  f"max step of log s in a segment {f.max_step_in_segment:.4f}  segments {f.segments}")
    out = Path(__file__).resolve().parent / "results" / "drift_clip.json"
    out.write_text(json.dumps({"clip": {"frames": FRAMES, "cut": CUT, "size": [H0, W0]}, **result}, indent=1))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
