"""Clear ValueErrors / FileNotFoundErrors of GeometryCrafter before any network runs (brief + spec 7.7)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from daemon.pipeline import GeometryCrafter
from daemon.weights.tiny import CLIP_MEAN, CLIP_STD, SCHEDULER_CONFIG


@pytest.fixture(scope="module")
def gc() -> GeometryCrafter:
    # no networks: every check below must fire before the first network call
    return GeometryCrafter(unet=None, svd_vae=None, point_map_vae=None, clip=None,
                           scheduler_config=dict(SCHEDULER_CONFIG), clip_mean=CLIP_MEAN, clip_std=CLIP_STD,
                           variant="diff", dtype="fp32")


def _inputs(t: int = 3, h0: int = 48, w0: int = 64):
    return (np.zeros((t, h0, w0, 3), np.uint8), np.ones((t, h0, w0, 3), np.float32), np.ones((t, h0, w0), bool))


@pytest.mark.parametrize(
    "inputs,kw,message",
    [
        (_inputs(0), {}, "non-empty"),
        (_inputs(), {"height": 100}, "multiples of 64"),
        (_inputs(), {"width": 0}, "multiples of 64"),
        (_inputs(), {"width": 192}, "aspect ratio"),
        (_inputs(), {"window_size": 4, "overlap": 4}, "overlap must be in"),
        (_inputs(h0=47), {}, "must be even"),
        ((_inputs()[0], np.ones((3, 48, 64, 2), np.float32), _inputs()[2]), {}, "prior_points shape"),
        ((_inputs()[0], _inputs()[1], np.ones((2, 48, 64), bool)), {}, "prior_mask shape"),
        (_inputs(), {"decode_chunk_size": 0}, "decode_chunk_size"),
    ],
)
def test_validation_errors(gc: GeometryCrafter, inputs, kw: dict, message: str) -> None:
    args = {"height": 64, "width": 64, "window_size": 4, "overlap": 1, **kw}
    with pytest.raises(ValueError, match=message):
        gc(*inputs, **args)


def test_bad_variant_and_dtype() -> None:
    with pytest.raises(ValueError, match="variant"):
        GeometryCrafter.from_pretrained("/nonexistent", variant="fast")
    with pytest.raises(ValueError, match="dtype"):
        GeometryCrafter(unet=None, svd_vae=None, point_map_vae=None, clip=None, scheduler_config={},
                        clip_mean=CLIP_MEAN, clip_std=CLIP_STD, dtype="bf16")


def test_missing_model_parts_are_named(tmp_path: Path) -> None:
    (tmp_path / "vae").mkdir()
    (tmp_path / "unet_diff").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        GeometryCrafter.from_pretrained(tmp_path, variant="diff")
    named = str(err.value).split("missing: ")[1].split(", ")
    assert named == ["point_map_vae/", "image_encoder/", "feature_extractor/", "scheduler/"]
    with pytest.raises(FileNotFoundError, match="unet_determ/"):
        GeometryCrafter.from_pretrained(tmp_path, variant="determ")
