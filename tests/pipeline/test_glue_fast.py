"""The fast host glue (banded resizes, frame-by-frame prior post-processing, fused decode post-processing)
against the literal 0.1.0 code (reference/glue.py: whole-array formulas, dense-matrix resizes).

Bit-exact where the float32 operations are the same ones: bilinear and nearest-exact resizes, prior
post-processing, prior statistics, decode post-processing, points, the fp16 2v - 1. The bicubic resizes
(source resize, resize224) sum the same non-zero terms, but the dense reference's BLAS splits its long
(mostly zero) dot products into blocks, so its rounding differs: measured <= 3 ulp of the input's scale,
bound 4 ulp; both stay within test_resample.py's bounds against torch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from daemon import pipeline as P
from daemon.model import prior_post, resample
from daemon.scenes import tilted_plane
from reference import glue as ref

ODD = [((10, 14), (31, 7)), ((65, 33), (30, 17)), ((577, 1023), (383, 641)), ((384, 640), (576, 1024)),
       ((7, 9), (7, 9)), ((1, 5), (3, 1)), ((40, 2), (2, 40))]


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (np.isnan(a) & np.isnan(b))).all())


@pytest.mark.parametrize("src,dst", ODD)
@pytest.mark.parametrize("mode", ["bilinear", "nearest_exact"])
def test_linear_resizes_bit_exact_vs_dense(src, dst, mode: str) -> None:
    x = np.random.default_rng(1).standard_normal((2, 3, *src)).astype(np.float32)
    got, want = resample.resize(x, dst, mode), resample.resize_dense(x, dst, mode)
    if mode == "nearest_exact" or not _blas_fuses_two_products():
        assert _same(got, want)  # the 2-core box's OpenBLAS: bit-exact
    else:  # an FMA kernel rounds w0 * x0 + w1 * x1 once: 1 ulp per pass at most
        assert got.shape == want.shape and np.abs(got - want).max() <= 2 * np.spacing(np.abs(x).max())


def _blas_fuses_two_products() -> bool:
    """Whether this BLAS sums a two-term dot product with a fused multiply-add (one rounding)."""
    rng = np.random.default_rng(14)
    a, b = rng.standard_normal((64, 2)).astype(np.float32), rng.standard_normal((2, 4096)).astype(np.float32)
    separate = a[:, :1] * b[:1] + a[:, 1:] * b[1:]
    return not np.array_equal(a @ b, separate)


def _two_tap_oracle(x: np.ndarray, dst: tuple[int, int]) -> np.ndarray:
    """Bilinear as the float32 sum of each output's (at most two) weighted inputs, vertical pass first:
    the values the banded BLAS products of 0.3.0 gave on the 2-core box, written without BLAS."""
    def one_axis(v: np.ndarray, n_out: int) -> np.ndarray:  # along axis -1
        w = resample.bilinear_weights(v.shape[-1], n_out).astype(np.float32)
        out = np.zeros((*v.shape[:-1], n_out), np.float32)
        for o in range(n_out):
            nz = np.flatnonzero(w[o])
            acc = v[..., nz[0]] * w[o, nz[0]]
            for j in nz[1:]:
                acc = acc + v[..., j] * w[o, j]
            out[..., o] = acc
        return out
    y = one_axis(np.swapaxes(x, -1, -2), dst[0])
    return one_axis(np.ascontiguousarray(np.swapaxes(y, -1, -2)), dst[1])


@pytest.mark.parametrize("src,dst", ODD)
def test_bilinear_two_tap_equals_the_float32_formula(src, dst) -> None:
    x = np.random.default_rng(12).standard_normal((3, *src)).astype(np.float32)
    assert _same(resample.resize(x, dst, "bilinear"), _two_tap_oracle(x, dst))


@pytest.mark.parametrize("src,dst", ODD)
@pytest.mark.parametrize("mode", ["bicubic_aa", "bicubic_ac"])
def test_bicubic_resizes_within_4ulp_of_dense(src, dst, mode: str) -> None:
    x = np.random.default_rng(2).random((1, 3, *src), dtype=np.float32)
    got, want = resample.resize(x, dst, mode), resample.resize_dense(x, dst, mode)
    assert got.shape == want.shape and got.dtype == np.float32
    ulp = np.spacing(np.float32(np.abs(x).max()))
    assert np.abs(got - want).max() <= 4 * ulp


def test_resize_shapes_and_float64() -> None:
    rng = np.random.default_rng(3)
    x2 = rng.standard_normal((13, 21)).astype(np.float32)
    assert _same(resample.resize(x2, (8, 30), "bilinear"), resample.resize_dense(x2, (8, 30), "bilinear"))
    x5 = rng.standard_normal((2, 2, 3, 13, 21)).astype(np.float32)
    assert _same(resample.resize(x5, (8, 30), "bilinear"), resample.resize_dense(x5, (8, 30), "bilinear"))
    x64 = rng.standard_normal((2, 13, 21))
    got = resample.resize(x64, (30, 8), "bicubic_aa")
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, resample.resize_dense(x64, (30, 8), "bicubic_aa"), rtol=0, atol=1e-14)


@pytest.mark.parametrize("src", [(64, 128), (576, 1024), (100, 300), (384, 640)])
def test_resize224_within_4ulp_of_dense(src) -> None:
    x = (np.random.default_rng(4).random((2, 3, *src), dtype=np.float32) * 2 - 1).astype(np.float32)
    assert np.abs(resample.resize224(x) - resample.resize224_dense(x)).max() <= 4 * np.spacing(np.float32(1.0))


@pytest.mark.parametrize("mode,kw", [("bilinear", dict(mode="bilinear", align_corners=False)),
                                     ("bicubic_aa", dict(mode="bicubic", align_corners=False, antialias=True))])
def test_nan_stays_local(mode: str, kw) -> None:
    """A NaN pixel poisons the outputs whose taps reach it (torch's set) and at most the rest of its band
    block (a band's GEMM multiplies it by the block's zero weights too); the dense 0.1.0 product spread it
    over whole output rows and columns (a cross through the image)."""
    x = np.random.default_rng(5).random((1, 1, 72, 100), dtype=np.float32)
    x[0, 0, 30, 40] = np.nan
    got = np.isnan(resample.resize(x, (48, 64), mode))[0, 0]
    want = np.isnan(F.interpolate(torch.from_numpy(x), size=(48, 64), **kw).numpy())[0, 0]
    assert want.any() and (got | ~want).all()  # every NaN torch has
    rows, cols = np.flatnonzero(got.any(1)), np.flatnonzero(got.any(0))
    assert rows.ptp() < 2 * resample.BAND_ROWS and cols.ptp() < 2 * resample.BAND_ROWS, (rows, cols)


# ---- order statistics and prior statistics -------------------------------------------------------


@pytest.mark.parametrize("n", [5, 1000, 1023, 4096, 50_000, 300_001])
def test_kth_smallest_matches_partition(n: int) -> None:
    rng = np.random.default_rng(n)
    cases = [rng.standard_normal(n).astype(np.float32), np.sort(rng.random(n, dtype=np.float32)),
             np.sort(rng.random(n, dtype=np.float32))[::-1].copy(),
             rng.integers(0, 3, n).astype(np.float32),  # heavy ties
             np.full(n, 2.5, np.float32)]
    for x in cases:
        for k in {0, 1, n // 100, n // 2, n - 1 - n // 100, n - 2, n - 1} - {-1}:
            if 0 <= k < n:
                assert prior_post.kth_smallest(x, k) == np.partition(x, k)[k], (n, k)


def _clip(t: int, h0: int, w0: int, invalid: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    _, points, _ = tilted_plane(t, h0, w0, seed=seed)
    mask = np.random.default_rng(seed).random((t, h0, w0)) >= invalid
    return points, mask


@pytest.mark.parametrize("t,h0,w0,invalid", [(3, 72, 100, 0.15), (2, 130, 202, 0.002), (2, 64, 96, 0.0),
                                             (2, 64, 96, 0.995), (5, 40, 30, 0.5)])
def test_compute_stats_bit_exact(t: int, h0: int, w0: int, invalid: float) -> None:
    points, mask = _clip(t, h0, w0, invalid)
    assert prior_post.compute_stats(points, mask) == ref.compute_stats_ref(points, mask)


def test_compute_stats_edge_cases_bit_exact() -> None:
    points, mask = _clip(3, 64, 96, 0.005)
    mask[1] = False  # a frame without any valid pixel
    points[2, :4, :4, 2] = 1e-6  # clamped disparity (1e3) at the top
    assert prior_post.compute_stats(points, mask) == ref.compute_stats_ref(points, mask)
    points[0, 5, 5, 2] = np.nan  # a NaN depth: every statistic is NaN, like torch
    got, want = prior_post.compute_stats(points, mask), ref.compute_stats_ref(points, mask)
    assert all(np.isnan([got.scale, got.lo, got.hi]) == np.isnan([want.scale, want.lo, want.hi]))


@pytest.mark.parametrize("t,h0,w0,size", [(5, 72, 100, (64, 128)), (3, 64, 128, (64, 128)),
                                          (4, 130, 202, (64, 128)), (2, 576, 1024, (384, 640)),
                                          (1, 50, 38, (64, 64))])
@pytest.mark.parametrize("nan_guard", [False, True])
def test_prior_to_x4_bit_exact(t: int, h0: int, w0: int, size, nan_guard: bool) -> None:
    points, mask = _clip(t, h0, w0, 0.15, seed=t)
    points[0, :3, :5, 2] = -1.0  # invalid pixels with negative depth: NaN log-depth without the guard
    mask[0, :3, :5] = False
    stats = ref.compute_stats_ref(points, mask)
    want = ref.prior_to_x4_ref(points, mask, size, stats, nan_guard=nan_guard)
    got = prior_post.prior_to_x4(points, mask, size, stats, nan_guard=nan_guard)
    if not nan_guard and size != (h0, w0):  # the NaN spreads: only locally now (test_nan_stays_local_like_torch)
        keep = ~np.isnan(want)
        assert np.isnan(got).sum() < np.isnan(want).sum()
        assert _same(got[keep], want[keep]) and not np.isnan(got[:, 0]).any()
    else:
        assert _same(got, want)


# ---- encoder inputs, decode post-processing ------------------------------------------------------


def test_fp16_signed_unit_equals_fp16_arithmetic() -> None:
    every = np.arange(0, 0x3C01, dtype=np.uint16).view(np.float16)  # every fp16 value in [0, 1]
    rnd = np.random.default_rng(6).random(200_000, dtype=np.float32)
    tiny = np.array([0.0, -0.0, 1.0, 1e-8, 2.0**-25, 3 * 2.0**-25, 2.0**-14, 0.5 + 2**-12, 6e-5], np.float32)
    for v in (every.astype(np.float32), rnd, tiny):
        want = v.astype(np.float16)
        want = (want * np.float16(2.0) - np.float16(1.0)).astype(np.float16)
        assert _same(P.to_signed_unit(v, np.float16), want.astype(np.float32))
    assert _same(P.to_signed_unit(rnd, np.float32), rnd * np.float32(2.0) - np.float32(1.0))


def test_round_to_fp16_equals_the_cast() -> None:
    rng = np.random.default_rng(9)
    x = np.concatenate([rng.standard_normal(300_000).astype(np.float32) * np.float32(s) for s in (1e-6, 1e-3, 1, 300)])
    edges = np.array([0.0, -0.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26, -(2.0**-25), 2.0**-14 * (1 - 2**-12), 65503.0,
                      1 + 2**-11, 1 + 3 * 2**-11, -(1 + 2**-11), 65504.0, 7e4, np.inf, np.nan], np.float32)
    for v in (x, edges, edges[:-4]):
        want = v.astype(np.float16).astype(np.float32)
        got = P.round_to_fp16(v.copy())
        assert _same(got, want) and (np.signbit(got) == np.signbit(want)).all()


@pytest.mark.parametrize("src,size", [((72, 100), (64, 128)), ((576, 1024), (384, 640)), ((64, 128), (64, 128)),
                                      ((50, 38), (64, 64))])
def test_frames_at_size_vs_reference(src, size) -> None:
    frames = np.random.default_rng(7).integers(0, 256, (3, *src, 3), dtype=np.uint8)
    got, want = P.frames_at_size(frames, size), ref.frames_at_size_ref(frames, size)
    assert got.shape == want.shape == (3, 3, *size) and got.dtype == np.float32
    if src == size:
        assert _same(got, want)
    assert np.abs(got - want).max() <= 4 * np.spacing(np.float32(1.0))
    f01 = frames.astype(np.float32) / np.float32(255.0)  # float input in [0, 1] takes the same path
    assert np.abs(P.frames_at_size(f01, size) - want).max() <= 4 * np.spacing(np.float32(1.0))


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_frames_at_size_equals_the_old_passes(dtype) -> None:
    """0.3.0's separate passes (cast copy, divide, resize, clip, transposed copy) as the oracle."""
    frames = np.random.default_rng(15).integers(0, 256, (3, 72, 100, 3), dtype=np.uint8)
    if dtype == np.float32:
        frames = frames.astype(np.float32) / np.float32(255.0)
    n, h0, w0, _ = frames.shape
    xr = np.empty((h0, n, 3, w0), np.float32)
    np.copyto(xr, frames.transpose(1, 0, 3, 2), casting="unsafe")
    if frames.dtype == np.uint8:
        np.divide(xr, np.float32(255.0), out=xr)
    r = resample.resize_hnw(xr.reshape(h0, n * 3, w0), (64, 128), "bicubic_aa")
    np.clip(r, np.float32(0.0), np.float32(1.0), out=r)
    want = np.ascontiguousarray(r.reshape(64, n, 3, 128).transpose(1, 2, 0, 3))
    got = P.frames_at_size(frames, (64, 128))
    assert _same(got, want) and got.flags.c_contiguous


@pytest.mark.parametrize("src,out", [((64, 128), (72, 100)), ((384, 640), (576, 1024)), ((64, 64), (64, 64)),
                                     ((64, 128), (50, 38))])
@pytest.mark.parametrize("extract", [False, True])
def test_decode_post_and_points_bit_exact(src, out, extract: bool) -> None:
    rng = np.random.default_rng(8)
    a, dl, vl = (rng.standard_normal((3, *src)).astype(np.float32) for _ in range(3))
    dl[0, 0, :3] = 20.0  # above the exp clamp
    maps = P.decode_post(a.copy(), dl.copy(), vl.copy(), out, extract)
    fx, fy, ld, valid = ref.decode_post_ref(a, dl, vl, out, extract)
    assert _same(maps.fx, fx) and _same(maps.fy, fy) and _same(maps.log_depth, ld) and _same(maps.valid, valid)
    for ffx, ffy in [(np.float32(0.7), np.float32(0.9)), (np.full(3, 0.7, np.float32), np.full(3, 0.8, np.float32)),
                     (maps.fx, maps.fy)]:
        p1, z1 = P.points_from_maps(maps, ffx, ffy)
        p2, z2 = ref.points_from_maps_ref(maps.log_depth, ffx, ffy)
        assert _same(p1, p2) and _same(z1, z2)


# ---- fp16 latent glue (daemon.model.fp16 kernels) against the old astype formulas ------------------


def _latents(rng: np.random.Generator, f: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal((1, f, 4, 24, 40)).astype(np.float32) * np.float32(scale)).astype(np.float16)


def _old_step(s, u: np.ndarray, i: int, x: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    sigma, sigma_next = s.sigmas[i], s.sigmas[i + 1]
    xf = x.astype(np.float32)
    c_out = (-sigma / np.sqrt(sigma * sigma + np.float32(1.0))).astype(np.float32)
    den = (u.astype(np.float32) * c_out).astype(u.dtype).astype(np.float32) + xf / (sigma * sigma + np.float32(1.0))
    return (xf + (xf - den) / sigma * (sigma_next - sigma)).astype(u.dtype)


def test_scheduler_fp16_fused_equals_old_formulas() -> None:
    from daemon.model.scheduler import make_schedule

    s = make_schedule(5)
    rng = np.random.default_rng(10)
    x = _latents(rng, 30, 700.0)  # 115 200 values: two chunks
    for i in range(s.num_steps):
        want_in = (x.astype(np.float32) / np.sqrt(s.sigmas[i] ** 2 + np.float32(1.0))).astype(np.float16)
        assert _same(s.scale_model_input(x, i), want_in)
        buf = np.empty((1, 30, 12, 24, 40), np.float16)
        s.scale_model_input(x, i, out=buf[:, :, :4])
        assert _same(buf[:, :, :4], want_in)
        u = _latents(rng, 30)
        want = _old_step(s, u, i, x)
        x = s.step(u, i, x)
        assert _same(x, want)


def test_noise_bank_renoise_stitch_z_cfg_equal_old_formulas() -> None:
    from daemon.model.scheduler import make_schedule

    s = make_schedule(5)
    rng = np.random.default_rng(11)
    noise = _latents(rng, 22)
    bank = P.NoiseBank(noise, s.init_noise_sigma, 5, 17)
    assert _same(bank.bank, (noise.astype(np.float32) * s.init_noise_sigma).astype(np.float16))

    x, tail = _latents(rng, 22, 700.0), _latents(rng, 5)
    n = (x[:, :5].astype(np.float32) / s.init_noise_sigma).astype(np.float16)
    n = (n.astype(np.float32) * s.sigmas[0]).astype(np.float16)
    want = x.copy()
    want[:, :5] = (tail.astype(np.float32) + n.astype(np.float32)).astype(np.float16)
    gc = P.GeometryCrafter.__new__(P.GeometryCrafter)
    gc.latent_dtype = np.float16
    assert _same(gc.renoise(x, tail, 5, s), want)

    for overlap in (0, 1, 5, 22):
        prev, new = _latents(rng, 22), _latents(rng, 22)
        if overlap == 0:
            want = np.concatenate([prev, new], axis=1)
        else:
            w = np.linspace(0.0, 1.0, overlap).astype(np.float32)[None, :, None, None, None]
            blended = w * new[:, :overlap].astype(np.float32) + (np.float32(1.0) - w) * prev[:, -overlap:].astype(
                np.float32)
            out = prev.copy()
            out[:, -overlap:] = blended.astype(np.float16)
            want = np.concatenate([out, new[:, overlap:]], axis=1)
        assert _same(P.stitch(prev, new, overlap), want)
    assert _same(P.GeometryCrafter.latents_to_z(prev), prev[0].astype(np.float32) * np.float32(1.0 / P.VAE_SCALING))

    cond, uncond = _latents(rng, 22), _latents(rng, 22)
    diff = (cond.astype(np.float32) - uncond.astype(np.float32)).astype(np.float16)
    scaled = (np.float32(7.5) * diff.astype(np.float32)).astype(np.float16)
    want = (uncond.astype(np.float32) + scaled.astype(np.float32)).astype(np.float16)
    assert _same(P.classifier_free_guidance(cond, uncond, 7.5), want)


@pytest.mark.parametrize("shape", [(3, 72, 100), (5, 50, 38), (2, 576, 1024), (1, 7, 9)])
@pytest.mark.parametrize("per_frame", [False, True])
def test_projected_focal_equals_old_formula(shape, per_frame: bool) -> None:
    rng = np.random.default_rng(13)
    fx, fy = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    valid = rng.random(shape) > 0.2
    valid[0, :2] = False
    maps = P.DecodedMaps(fx=fx, fy=fy, log_depth=fx, valid=valid)
    axis = (1, 2) if per_frame else None
    v = valid.astype(np.float32)  # 0.3.0's formula
    den = np.mean(v, axis=axis, dtype=np.float64).astype(np.float32) + np.float32(1e-4)
    want_x = np.asarray(np.mean(fx * v, axis=axis, dtype=np.float64).astype(np.float32) / den, np.float32)
    want_y = np.asarray(np.mean(fy * v, axis=axis, dtype=np.float64).astype(np.float32) / den, np.float32)
    got_x, got_y = P.projected_focal(maps, per_frame)
    assert _same(got_x, want_x) and _same(got_y, want_y)
