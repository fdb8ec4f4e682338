"""The one depth colouriser (daemon/depth_colour.py) and its three users: the demo's previews, `process
--preview` and the viewer (tests/viewer/test_viewer_hub.py) show the same colours for the same depth."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
from PIL import Image

from daemon.commands.demo import write_previews
from daemon.depth_colour import colourise, disparity, robust_range
from daemon.offline.process import write_preview
from daemon.scenes import floor_wall_clip

H, W = 32, 48


def _clip(t: int = 3) -> tuple[np.ndarray, np.ndarray]:
    xs = np.mgrid[0:H, 0:W].astype(np.float32)[1]
    depth = np.stack([(1.0 + xs / W) * (1 + 0.5 * i) for i in range(t)]).astype(np.float32)
    mask = np.ones(depth.shape, bool)
    mask[:, :3] = False
    depth[:, 0, 0] = np.nan  # a NaN under the mask must not poison the range
    return depth, mask


def _nearest_quantile(x: np.ndarray, q: float) -> float:
    flat = np.sort(x.reshape(-1).astype(np.float64))
    return float(flat[round(q * (flat.size - 1))])


def test_disparity_and_range_follow_the_spec() -> None:
    depth, mask = _clip()
    disp, valid = disparity(depth, mask)
    assert disp.dtype == np.float32 and not np.isnan(disp).any()
    assert (disp[~valid] == 0).all() and not valid[0, 0, 0]
    np.testing.assert_allclose(disp[valid], 1 / (depth[valid].astype(np.float64) + 1e-4), rtol=1e-6)
    lo, hi = robust_range(disp)
    # per frame 1 % / 99 % quantiles over ALL pixels (invalid zeros count), the clip takes min lo, max hi
    assert lo == min(_nearest_quantile(d, 0.01) for d in disp) == 0.0  # 3 of 32 rows invalid > 1 %
    assert hi == max(_nearest_quantile(d, 0.99) for d in disp)
    assert robust_range(disp[1]) == (_nearest_quantile(disp[1], 0.01), _nearest_quantile(disp[1], 0.99))


def test_one_range_per_clip_same_depth_same_colour() -> None:
    depth, mask = _clip(4)
    depth[3] = depth[0]  # the first frame again, after farther ones
    rgb = colourise(depth, mask)
    assert rgb.shape == (4, H, W, 3) and rgb.dtype == np.uint8
    assert (rgb[~mask] == 0).all()
    np.testing.assert_array_equal(rgb[3], rgb[0])  # one range for the clip: same depth, same colour
    # a frame coloured alone uses its own range: different from the clip's colours
    assert not np.array_equal(colourise(depth[2], mask[2]), rgb[2])
    np.testing.assert_array_equal(colourise(depth[2], mask[2], robust_range(disparity(depth, mask)[0])), rgb[2])
    lut = cv2.cvtColor(cv2.applyColorMap(np.arange(256, dtype=np.uint8)[None], cv2.COLORMAP_TURBO),
                       cv2.COLOR_BGR2RGB)[0]
    lo, hi = robust_range(disparity(depth, mask)[0])
    d = 1 / (depth[0, 5, 30] + 1e-4)
    np.testing.assert_array_equal(rgb[0, 5, 30], lut[int(np.clip((d - lo) / (hi - lo + 1e-4), 0, 1) * 255)])


def test_process_preview_uses_it(tmp_path: Path) -> None:
    depth, mask = _clip(2)
    frames = np.full((2, H, W, 3), 100, np.uint8)
    write_preview(tmp_path / "p.png", frames, depth, mask, fps=10.0)
    grid = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
    assert grid.shape == (2 * H, 2 * W, 3)  # per frame: input above colours
    expected = colourise(depth, mask)
    np.testing.assert_array_equal(grid[H:, :W], expected[0])
    np.testing.assert_array_equal(grid[H:, W:], expected[1])


def test_demo_preview_uses_it(tmp_path: Path) -> None:
    h, w = 64, 96
    clip = tmp_path / "c.mp4"
    floor_wall_clip(clip, 3, h, w)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    results = {i: SimpleNamespace(depth=(1.0 + xs / w) * (1 + i), depth_valid=ys > 4) for i in range(3)}
    sheet, mp4 = write_previews(results, clip, tmp_path)
    assert mp4.stat().st_size > 0
    img = np.asarray(Image.open(sheet).convert("RGB"))
    expected = colourise(np.stack([r.depth for r in results.values()]),
                         np.stack([r.depth_valid for r in results.values()]))
    for row, i in enumerate(range(3)):  # contact sheet: input | depth, one row per frame
        np.testing.assert_array_equal(img[row * h:(row + 1) * h, w:], expected[i])
