"""daemon.pipeline's host-side glue vs the torch reference pipeline, with the SAME torch networks on both
sides (so only prior post-processing, resizes, schedule, noise rotation, stitching, chunking and decode
post-processing are compared). No Jittor. fp32 throughout: point maps agree to 1e-4 relative to the max
|value| on the common mask (measured 7e-6 determ, 1.3e-5 diff: float32 rounding of the resizes, ~1e-7,
amplified by the random-weight VAE), masks >= 99.99 % equal (measured 100 %).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from daemon.model.prior_post import compute_stats, prior_to_x4
from daemon.pipeline import GeometryCrafter, NoiseBank, stitch, window_plan
from daemon.scenes import tilted_plane
from daemon.weights.tiny import CLIP_MEAN, CLIP_STD, SCHEDULER_CONFIG, make_tiny
from helpers.pipeline_fixtures import StandInPointMapVAE, TorchNets
from reference.pipeline import TorchRefPipeline

T, H0, W0, H, W = 9, 72, 100, 64, 128
KW = dict(height=H, width=W, window_size=4, overlap=2, num_inference_steps=2, decode_chunk_size=4)


@pytest.fixture(scope="module")
def tiny_torch_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny_torch")
    make_tiny(d, seed=0, parts=["unet_diff", "unet_determ", "vae", "image_encoder", "feature_extractor", "scheduler"])
    return d


@pytest.fixture(scope="module")
def clip_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tilted_plane(T, H0, W0)


def _gc(ref: TorchRefPipeline, variant: str) -> GeometryCrafter:
    nets = TorchNets(ref)
    return GeometryCrafter(unet=nets.unet, svd_vae=nets.svd_vae, point_map_vae=nets.point_map_vae, clip=nets.clip,
                           scheduler_config=dict(SCHEDULER_CONFIG), clip_mean=CLIP_MEAN, clip_std=CLIP_STD,
                           variant=variant, dtype="fp32")


def rel_err(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.abs(a - b)[mask].max() / np.abs(b)[mask].max())


@pytest.mark.parametrize("variant", ["diff", "determ"])
def test_glue_matches_torch_reference(tiny_torch_dir: Path, clip_data, variant: str) -> None:
    frames, points, mask = clip_data
    ref = TorchRefPipeline(tiny_torch_dir, variant, StandInPointMapVAE())
    noise = np.random.default_rng(3).standard_normal((1, KW["window_size"], 4, H // 8, W // 8)).astype(np.float32)
    want = ref(frames, points, mask, noise=noise, **KW)
    got = _gc(ref, variant)(frames, points, mask, noise=noise, quiet=True, **KW)
    assert got.point_map.shape == (T, H0, W0, 3) and got.mask.shape == (T, H0, W0)
    both = got.mask & want.mask
    assert both.mean() > 0.2
    err = rel_err(got.point_map, want.point_map, both)
    assert err < 1e-4, err
    agree = (got.mask == want.mask).mean()
    assert agree >= 0.9999, agree
    assert set(got.timings) == {"prior", "encode", "denoise", "decode", "post"}


def test_prior_post_matches_torch(clip_data) -> None:
    _, points, mask = clip_data
    ref = TorchRefPipeline.prior(None, torch.from_numpy(points), torch.from_numpy(mask), (H, W))  # type: ignore[arg-type]
    got = prior_to_x4(points, mask, (H, W), compute_stats(points, mask))
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=2e-6)


def test_window_plan() -> None:
    assert window_plan(9, 4, 2) == [(0, 4), (2, 6), (4, 8), (6, 9)]
    assert window_plan(10, 4, 2) == [(0, 4), (2, 6), (4, 8), (6, 10)]
    assert window_plan(110, 110, 25) == [(0, 110)]
    assert window_plan(8, 4, 0) == [(0, 4), (4, 8)]
    assert window_plan(250, 110, 25) == [(0, 110), (85, 195), (170, 250)]


def test_noise_bank_rotation_keeps_overlap_noise() -> None:
    noise = np.arange(5, dtype=np.float32).reshape(1, 5, 1, 1, 1)
    bank = NoiseBank(noise, np.float32(1.0), overlap=2, stride=3)
    assert bank.take(5)[0, :, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]
    # the overlap frames of the next window get the noise they had at the end of this one
    assert bank.take(5)[0, :, 0, 0, 0].tolist() == [3, 4, 0, 1, 2]
    assert bank.take(4)[0, :, 0, 0, 0].tolist() == [1, 2, 3, 4]


def test_noise_bank_overlap_zero_slicing_reuses_noise() -> None:
    noise = np.arange(3, dtype=np.float32).reshape(1, 3, 1, 1, 1)
    bank = NoiseBank(noise, np.float32(2.0), overlap=0, stride=3)
    for _ in range(3):  # bank[:, -0:] is the whole bank: every window starts from the same noise
        assert bank.take(3)[0, :, 0, 0, 0].tolist() == [0, 2, 4]
    assert bank.bank.shape[1] == 3  # upstream's bank would have grown to 12 frames; only 3 are ever read


def test_stitch_weights() -> None:
    a = np.zeros((1, 4, 1, 1, 1), np.float32)
    x = np.ones((1, 4, 1, 1, 1), np.float32)
    out = stitch(a, x, 3)[0, :, 0, 0, 0]
    # first overlap frame keeps the old window, the last takes the new one
    np.testing.assert_array_equal(out, [0, 0, 0.5, 1.0, 1.0])
    np.testing.assert_array_equal(stitch(a, x, 0)[0, :, 0, 0, 0], [0] * 4 + [1] * 4)
