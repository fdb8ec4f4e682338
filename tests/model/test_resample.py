"""daemon.model.resample vs the PyTorch / kornia-equivalent / diffusers references (spec 4.8).

Tolerances (absolute, data in [0,1] or N(0,1), torch float32 as the reference like upstream): bilinear and
AA bicubic 1e-6, nearest-exact exact; torch's float32 *plain* bicubic weights (align_corners=True, used by
resize224) carry their own rounding of up to ~5e-7 per weight (cancellation in the Keys polynomial, FMA
contraction), so bicubic align_corners and resize224 are compared with 2e-6 (measured max 1.01e-6).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from daemon.model import resample

SIZES = [((24, 40), (64, 128)), ((72, 100), (64, 128)), ((65, 33), (30, 17)), ((10, 14), (31, 7))]


@pytest.fixture(scope="module")
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _torch(x: np.ndarray, size: tuple[int, int], **kw: object) -> np.ndarray:
    return F.interpolate(torch.from_numpy(x), size=size, **kw).numpy()


@pytest.mark.parametrize("src,dst", SIZES)
def test_bicubic_antialias_matches_torch(rng: np.random.Generator, src, dst) -> None:
    x = rng.random((2, 3, *src), dtype=np.float32)
    out = resample.resize(x, dst, "bicubic_aa")
    ref = _torch(x, dst, mode="bicubic", align_corners=False, antialias=True)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("src,dst", SIZES)
def test_bilinear_matches_torch(rng: np.random.Generator, src, dst) -> None:
    x = rng.standard_normal((2, 1, *src)).astype(np.float32)
    out = resample.resize(x, dst, "bilinear")
    np.testing.assert_allclose(out, _torch(x, dst, mode="bilinear", align_corners=False), rtol=0, atol=1e-6)


@pytest.mark.parametrize("src,dst", SIZES)
def test_nearest_exact_matches_torch(rng: np.random.Generator, src, dst) -> None:
    x = rng.standard_normal((1, 2, *src)).astype(np.float32)
    ref = _torch(x, dst, mode="nearest-exact")
    np.testing.assert_array_equal(resample.resize(x, dst, "nearest_exact"), ref)


@pytest.mark.parametrize("src,dst", SIZES)
def test_bicubic_align_corners_matches_torch(rng: np.random.Generator, src, dst) -> None:
    x = rng.random((1, 3, *src), dtype=np.float32)
    out = resample.resize(x, dst, "bicubic_ac")
    np.testing.assert_allclose(out, _torch(x, dst, mode="bicubic", align_corners=True), rtol=0, atol=2e-6)


@pytest.mark.parametrize("src", [(64, 128), (576, 1024), (100, 300)])
def test_resize224_matches_diffusers(rng: np.random.Generator, src) -> None:
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
        _resize_with_antialiasing,
    )

    x = (rng.random((2, 3, *src), dtype=np.float32) * 2 - 1).astype(np.float32)
    out = resample.resize224(x)
    ref = _resize_with_antialiasing(torch.from_numpy(x), (224, 224)).numpy()
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6)


def test_resize224_params_example_from_spec() -> None:
    (sy, sx), (ky, kx) = resample.resize224_params(576, 1024)
    assert (round(sy, 4), round(sx, 4), ky, kx) == (0.7857, 1.7857, 3, 7)


@pytest.mark.parametrize("h,w", [(6, 10), (72, 100)])
def test_normalized_grid_matches_kornia_definition(h: int, w: int) -> None:
    # kornia.utils.create_meshgrid(normalized_coordinates=True): linspace(0, n-1, n) / (n-1) - 0.5) * 2.
    xs = (torch.linspace(0, w - 1, w) / (w - 1) - 0.5) * 2
    ys = (torch.linspace(0, h - 1, h) / (h - 1) - 0.5) * 2
    gx, gy = resample.normalized_grid(h, w)
    assert gx.dtype == np.float32 and gy.shape == (h,)
    np.testing.assert_allclose(gx, xs.numpy(), rtol=0, atol=1e-7)
    np.testing.assert_allclose(gy, ys.numpy(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("n", [7, 100, 1001, 7200])
@pytest.mark.parametrize("q", [1 - 0.99, 0.99, 0.5])
def test_quantile_nearest_matches_torch(rng: np.random.Generator, n: int, q: float) -> None:
    x = rng.standard_normal(n).astype(np.float32)
    x[: n // 3] = 0.0  # ties, like the invalid zeros of the disparity map
    ref = torch.quantile(torch.from_numpy(x), q, interpolation="nearest").item()
    assert resample.quantile_nearest(x, q) == np.float32(ref)


def test_unknown_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="bicubic_aa"):
        resample.resize(np.zeros((4, 4), np.float32), (2, 2), "area")
