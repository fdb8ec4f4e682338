"""GeometryCrafter inference: offline (whole clip, upstream-exact) and streaming (window by window).

Reference: spec sections 4.1-4.7 (TencentARC/GeometryCrafter ``diff_ppl.py`` / ``determ_ppl.py``, ``run.py``).
The networks (UNet, SVD VAE encoder, point-map VAE, CLIP) run in Jittor (``daemon.model``); the glue between
them runs host-side in numpy: prior post-processing (:mod:`daemon.model.prior_post`), resizes
(:mod:`daemon.model.resample`), the Euler steps (:mod:`daemon.model.scheduler`), window stitching and decode
post-processing. Latents are small ((T,4,H/8,W/8)), so moving them per network call costs little, and host
glue keeps the numerics identical to PyTorch's float32 semantics on every device. Network inputs are numpy
arrays, outputs come back as numpy right after each call.

Precision (spec 1.3): ``dtype="fp16"`` runs UNet and CLIP in fp16, keeps latents in fp16 between steps
(Euler update in fp32), runs both VAEs in fp32. ``dtype="fp32"`` runs everything in fp32 (parity tests).

Streaming (:class:`StreamingSession`) deviates from the clip-global offline algorithm only where the offline
algorithm needs the future (spec 4.9); the choices are documented in ``docs/streaming.md``:

1. prior normalisation (depth scale ``s``, disparity ``lo``/``hi``) follows the scene per window and per
   frame (``stats_policy="follow"``, daemon/model/streaming_stats.py) or is computed on the first window and
   frozen (``"frozen"``, the 0.1.0 behaviour);
2. the noise bank is generated and rotated exactly as offline, windows are stitched in latent space exactly
   as offline; a window's last ``overlap`` frames are held back until the next window has been blended in;
3. decoding runs on consecutive chunks of ``decode_chunk_size`` final frames aligned to the stream start,
   exactly the offline chunking; a partial chunk waits for more final frames (or :meth:`flush`);
4. with ``force_fixed_focal`` the focal is anchored per statistics segment and smoothed per decode chunk
   (``follow``) or computed from the first decoded chunks and frozen (``frozen``); with
   ``force_projection`` alone it is per frame (exact).
Consequently, with ``frozen``, a single window (one push + flush) equals the offline output exactly when the
first decode covers the whole window or the focal is per frame (tests/pipeline/test_pipeline_streaming.py).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from daemon.frames import FrameResult
from daemon.intrinsics import project_known
from daemon.model import fp16, resample
from daemon.model.metric_scale import MetricScale, window_factor
from daemon.model.prior_post import PriorStats, compute_stats, prior_to_x4
from daemon.model.scheduler import EulerKarrasSchedule, load_scheduler_config, schedule_from_config
from daemon.model.streaming_stats import FrameNorm, PolicyParams, StreamStats, follow_focal

log = logging.getLogger(__name__)

VAE_SCALING = 0.18215
ADDED_TIME_IDS = (7.0, 127.0, 0.02)  # fps, motion bucket, noise augmentation (spec 4.3.5)
DETERM_TIMESTEP = 1.6378  # spec 4.5: the literal constant
MODEL_PARTS = ("point_map_vae", "vae", "image_encoder", "feature_extractor", "scheduler")
VARIANTS = ("diff", "determ")


@dataclass
class GeometryOutput:
    """Result of :meth:`GeometryCrafter.__call__`."""

    point_map: np.ndarray  # (T, H0, W0, 3) float32
    mask: np.ndarray  # (T, H0, W0) bool
    depth: np.ndarray  # (T, H0, W0) float32
    intrinsics: np.ndarray  # (T, 4) float32: fx, fy, cx, cy normalised (see FrameResult)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


# --------------------------------------------------------------------------------------------------
# small helpers


def _np(x: Any) -> np.ndarray:
    """Jittor Var / numpy -> numpy."""
    return x.numpy() if hasattr(x, "numpy") and not isinstance(x, np.ndarray) else np.asarray(x)


def _release_device_memory() -> None:
    jt = sys.modules.get("jittor")
    if jt is not None:
        jt.gc()


class _Stages:
    """Per-stage timings, with a tqdm bar when stderr is a terminal and INFO logs otherwise."""

    def __init__(self, quiet: bool = False) -> None:
        self.timings: dict[str, float] = {}
        self._tty = not quiet and sys.stderr.isatty()
        self._quiet = quiet

    @contextmanager
    def stage(self, name: str, total: int) -> Iterator[Any]:
        bar = None
        if self._tty:
            bar = tqdm(total=total, desc=name, leave=False, unit="it")
        t0 = time.perf_counter()
        try:
            yield (bar.update if bar is not None else (lambda n=1: None))
        finally:
            if bar is not None:
                bar.close()
            dt = time.perf_counter() - t0
            self.timings[name] = self.timings.get(name, 0.0) + dt
            if not self._quiet:
                log.info("stage %s: %.3f s", name, dt)


def window_plan(num_frames: int, window_size: int, overlap: int) -> list[tuple[int, int]]:
    """Spec 4.6: windows [s, e) with s = 0, stride, ... while s < T - overlap, e = min(s + window, T)."""
    stride = window_size - overlap
    plan = []
    s = 0
    while s < num_frames - overlap:
        plan.append((s, min(s + window_size, num_frames)))
        s += stride
    return plan


class NoiseBank:
    """Spec 4.4 step 1 and 2a: initial noise times init_noise_sigma, rotated after every window.

    Rotation uses Python slicing semantics literally: with overlap 0, ``bank[:, -0:]`` is the whole bank, so
    every window reuses the same noise. Upstream's bank then grows by ``stride`` frames per window; only its
    first ``window_size`` frames are ever read, so the bank is trimmed to them (same values, bounded memory
    for endless streams).
    """

    def __init__(self, noise: np.ndarray, init_noise_sigma: np.float32, overlap: int, stride: int) -> None:
        noise = noise if noise.ndim == 5 else noise[None]
        # fp16 noise times an fp32 scalar: computed in fp32, rounded once (CUDA opmath)
        if noise.dtype == np.float16:
            self.bank = fp16.fused_f16(lambda n, rnd: np.multiply(n, init_noise_sigma, out=n), (noise,), 0)
        else:
            self.bank = (noise.astype(np.float32) * init_noise_sigma).astype(noise.dtype)
        self.overlap = overlap
        self.stride = stride
        self.window = self.bank.shape[1]

    def take(self, length: int) -> np.ndarray:
        x = self.bank[:, :length].copy()
        rotated = np.concatenate([self.bank[:, -self.overlap :], self.bank[:, : self.stride]], axis=1)
        self.bank = rotated[:, : self.window]
        return x


def make_noise(seed: int, window_size: int, h: int, w: int, dtype: type = np.float16) -> np.ndarray:
    """Default initial noise (1, window, 4, h, w). Not torch's CUDA stream (spec 7.4): inject for parity."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((1, window_size, 4, h, w), dtype=np.float32).astype(dtype)


def stitch(latents: np.ndarray | None, x: np.ndarray, overlap: int) -> np.ndarray:
    """Spec 4.6: blend the new window's first ``overlap`` frames into the tail of ``latents``; append the
    rest.

    Arrays are (1, F, 4, h, w); weights linspace(0, 1, overlap) in fp32, result stored in the latent dtype.
    """
    if latents is None:
        return x.copy()
    if overlap == 0:
        return np.concatenate([latents, x], axis=1)
    w = np.linspace(0.0, 1.0, overlap).astype(np.float32)[None, :, None, None, None]
    n_old = latents.shape[1]
    out = np.empty((latents.shape[0], n_old + x.shape[1] - overlap, *latents.shape[2:]), latents.dtype)
    out[:, : n_old - overlap] = latents[:, : n_old - overlap]
    out[:, n_old:] = x[:, overlap:]
    if latents.dtype == np.float16 and x.dtype == np.float16:
        for j in range(overlap):  # one weight per frame: a fused pass per frame
            wj, cj = w.flat[j], np.float32(1.0) - w.flat[j]

            def blend(new: np.ndarray, old: np.ndarray, t: np.ndarray, rnd: fp16.Rounder,
                      wj: np.float32 = wj, cj: np.float32 = cj) -> np.ndarray:
                np.multiply(new, wj, out=t)
                np.multiply(old, cj, out=old)
                return np.add(t, old, out=t)

            out[:, n_old - overlap + j] = fp16.fused_f16(blend, (x[:, j], latents[:, n_old - overlap + j]), 1)
        return out
    new = x[:, :overlap].astype(np.float32)
    old = latents[:, -overlap:].astype(np.float32)
    blended = w * new + (np.float32(1.0) - w) * old
    out[:, n_old - overlap : n_old] = blended.astype(latents.dtype)
    return out


def classifier_free_guidance(cond: np.ndarray, uncond: np.ndarray, scale: float) -> np.ndarray:
    """Upstream ``noise_pred_uncond + guidance_scale * (noise_pred - noise_pred_uncond)`` in the latent dtype:
    each op formed in float32 and rounded once to it (torch's CUDA fp16 kernels, python-float scalar)."""
    ld = cond.dtype
    if ld == np.float16 and uncond.dtype == np.float16:
        g = np.float32(scale)

        def kernel(c: np.ndarray, un: np.ndarray, rnd: fp16.Rounder) -> np.ndarray:
            np.subtract(c, un, out=c)
            rnd(c)
            np.multiply(c, g, out=c)
            rnd(c)
            return np.add(un, c, out=c)

        return fp16.fused_f16(kernel, (cond, uncond), n_tmp=0)
    diff = (cond.astype(np.float32) - uncond.astype(np.float32)).astype(ld)
    scaled = (np.float32(scale) * diff.astype(np.float32)).astype(ld)
    return (uncond.astype(np.float32) + scaled.astype(np.float32)).astype(ld)


# --------------------------------------------------------------------------------------------------
# decode post-processing (spec 4.7)


@dataclass
class DecodedMaps:
    """Decoder outputs resized to the output size (spec 4.7 steps 1-3)."""

    fx: np.ndarray  # (n, Ho, Wo) per-pixel inverse focal in grid units
    fy: np.ndarray
    log_depth: np.ndarray  # (n, Ho, Wo)
    valid: np.ndarray  # (n, Ho, Wo) bool


def decode_post(
    a: np.ndarray, dl: np.ndarray, vl: np.ndarray, out_size: tuple[int, int], use_extract_interp: bool
) -> DecodedMaps:
    """a, dl, vl: (n, H, W) decoder heads at processing size -> maps at ``out_size`` (spec 4.7 steps 2-3)."""
    ho, wo = out_size
    diag = np.float32(np.sqrt(np.float32(wo * wo + ho * ho)))
    kx, ky = np.float32(wo) / diag, np.float32(ho) / diag
    if a.shape[-2:] != tuple(out_size) and not use_extract_interp:
        return _decode_post_bilinear(a, dl, vl, (ho, wo), kx, ky)
    if a.shape[-2:] != tuple(out_size):
        dl = resample.resize(dl, out_size, "nearest_exact")
        vl = resample.resize(vl, out_size, "nearest_exact")
        a = resample.resize(a, out_size, "bilinear")
    fx = np.multiply(a, kx, dtype=np.float32)
    fy = np.multiply(a, ky, dtype=np.float32)
    return DecodedMaps(fx=fx, fy=fy, log_depth=np.asarray(dl, np.float32), valid=vl > 0)


def _decode_post_bilinear(a: np.ndarray, dl: np.ndarray, vl: np.ndarray, out_size: tuple[int, int],
                          kx: np.float32, ky: np.float32) -> DecodedMaps:
    """:func:`decode_post` with bilinear resizes, fused per block of output rows: each block is resized
    (two-tap passes, :func:`daemon.model.resample.bilinear_block`) and finished (log, the focal factors,
    ``> 0``) while it is in cache, straight into the output maps; the same float32 operations in the same
    order as resizing whole maps first."""
    n, h, w = a.shape
    ho, wo = out_size
    e = np.minimum(np.asarray(dl, np.float32), np.float32(10.0))
    np.exp(e, out=e)
    a = np.ascontiguousarray(a, np.float32)
    vl = np.ascontiguousarray(vl, np.float32)
    fx, fy = np.empty((n, ho, wo), np.float32), np.empty((n, ho, wo), np.float32)
    log_depth, valid = np.empty((n, ho, wo), np.float32), np.empty((n, ho, wo), bool)
    ty, tx = resample.bilinear_taps(h, ho), resample.bilinear_taps(w, wo)
    rb = resample.block_rows(wo)

    def frames(i0: int, i1: int) -> None:
        sc = resample.BilinearScratch(min(rb, ho), w, wo)
        blk = np.empty((min(rb, ho), wo), np.float32)
        for i in range(i0, i1):
            for r0 in range(0, ho, rb):
                r1 = min(r0 + rb, ho)
                b = blk[: r1 - r0]
                ld = resample.bilinear_block(e[i], ty, tx, r0, r1, log_depth[i, r0:r1], sc)
                np.log(ld, out=ld)
                resample.bilinear_block(vl[i], ty, tx, r0, r1, b, sc)
                np.greater(b, np.float32(0.0), out=valid[i, r0:r1])
                resample.bilinear_block(a[i], ty, tx, r0, r1, b, sc)
                np.multiply(b, kx, out=fx[i, r0:r1])
                np.multiply(b, ky, out=fy[i, r0:r1])

    resample.split_frames(n, frames)
    return DecodedMaps(fx=fx, fy=fy, log_depth=log_depth, valid=valid)


def projected_focal(maps: DecodedMaps, per_frame: bool) -> tuple[np.ndarray, np.ndarray]:
    """Spec 4.7 step 4: mean(f * valid) / (mean(valid) + 1e-4) over all frames (or per frame).

    The means are float64 sums of the float32 products (the valid count exactly); per frame, each frame's
    products are formed in a reused buffer and summed right away (the same sums as the whole-array mean
    over axes (1, 2): numpy reduces each frame's contiguous pixels alike)."""
    n, h, w = maps.valid.shape
    size = np.float64(h * w) if per_frame else np.float64(n * h * w)
    count = np.count_nonzero(maps.valid, axis=(1, 2) if per_frame else None)
    den = (count / size).astype(np.float32) + np.float32(1e-4)
    if not per_frame:
        fx = np.mean(np.multiply(maps.fx, maps.valid), dtype=np.float64).astype(np.float32) / den
        fy = np.mean(np.multiply(maps.fy, maps.valid), dtype=np.float64).astype(np.float32) / den
        return np.asarray(fx, np.float32), np.asarray(fy, np.float32)
    sums = np.empty((2, n), np.float64)

    def frames(i0: int, i1: int) -> None:
        buf = np.empty((h, w), np.float32)
        for i in range(i0, i1):
            for k, f in enumerate((maps.fx, maps.fy)):
                np.multiply(f[i], maps.valid[i], out=buf)
                sums[k, i] = np.add.reduce(buf, axis=None, dtype=np.float64)

    resample.split_frames(n, frames)
    means = (sums / size).astype(np.float32)
    return means[0] / den, means[1] / den


def points_from_maps(maps: DecodedMaps, fx: np.ndarray, fy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spec 4.7 step 5: (points (n,Ho,Wo,3), depth (n,Ho,Wo)); fx/fy scalar, per frame (n,) or per pixel."""
    n, ho, wo = maps.log_depth.shape
    gx, gy = resample.normalized_grid(ho, wo)
    fx = np.asarray(fx, np.float32)
    fy = np.asarray(fy, np.float32)
    if fx.ndim == 1:
        fx, fy = fx[:, None, None], fy[:, None, None]
    z = np.minimum(maps.log_depth, np.float32(10.0))
    np.exp(z, out=z)
    points = np.empty((n, ho, wo, 3), np.float32)
    # the same products in the same order as (fx * g) * z, written straight into the interleaved output
    np.multiply(fx * gx[None, None, :], z, out=points[..., 0])
    np.multiply(fy * gy[None, :, None], z, out=points[..., 1])
    points[..., 2] = z
    return points, z


def normalised_intrinsics(fx: np.ndarray, fy: np.ndarray, ho: int, wo: int) -> np.ndarray:
    """Grid-unit inverse focals -> (n, 4) [fx, fy, cx, cy] normalised by W/H with pixel centres (u+0.5)/W."""
    fx = np.atleast_1d(np.asarray(fx, np.float64))
    fy = np.atleast_1d(np.asarray(fy, np.float64))
    out = np.empty((fx.shape[0], 4), np.float32)
    out[:, 0] = (wo - 1) / (2.0 * wo * fx)
    out[:, 1] = (ho - 1) / (2.0 * ho * fy)
    out[:, 2:] = 0.5
    return out


# --------------------------------------------------------------------------------------------------
# the model


def _check_sizes(height: int, width: int, h0: int, w0: int, window_size: int, overlap: int) -> None:
    if height <= 0 or width <= 0 or height % 64 or width % 64:
        raise ValueError(f"height/width must be positive multiples of 64, got {height}x{width}")
    if not 0.5 <= width / height <= 2.0:
        raise ValueError(
            f"aspect ratio width/height = {width / height:.3f} is outside [0.5, 2] ({width}x{height})"
        )
    if h0 % 2 or w0 % 2:
        raise ValueError(f"frame size {h0}x{w0} must be even in both dimensions (spec 7.7)")
    if window_size < 1:
        raise ValueError(f"window_size must be >= 1, got {window_size}")
    if overlap < 0 or overlap >= window_size:
        raise ValueError(f"overlap must be in [0, window_size) = [0, {window_size}), got {overlap}")


def _check_frames(frames: np.ndarray) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3), got shape {frames.shape}")


def _frames_to_unit(frames: np.ndarray) -> np.ndarray:
    """(n,H0,W0,3) uint8 or float in [0,1] -> (n,3,H0,W0) float32 in [0,1]."""
    _check_frames(frames)
    x = frames.astype(np.float32)
    if frames.dtype == np.uint8:
        x = x / np.float32(255.0)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def round_to_fp16(x: np.ndarray) -> np.ndarray:
    """float32 -> the float32 value of ``x.astype(float16)`` (round to nearest even), a new array
    (:func:`daemon.model.fp16.round_to_fp16`: float32/uint32 passes over cached chunks)."""
    return fp16.round_to_fp16(x)


def to_signed_unit(v: np.ndarray, ld: type) -> np.ndarray:
    """Spec 4.3.1: v in [0,1] -> 2v - 1 computed in the latent dtype, returned as float32 (what the encoders
    take; in fp16 mode the values are exactly the fp16 ones: :func:`daemon.model.fp16.signed_unit_fp16`,
    checked on every fp16 value in [0, 1], tests/pipeline/test_glue_fast.py)."""
    if ld == np.float32:
        w = np.multiply(v, np.float32(2.0), dtype=np.float32)
        return np.subtract(w, np.float32(1.0), out=w)
    return fp16.signed_unit_fp16(v)


def frames_at_size(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(n,H0,W0,3) uint8 or float [0,1] -> (n,3,H,W) float32 in [0,1] at the processing size (spec 4.3.1:
    antialiased bicubic, clamped), the same values as ``clip(resize(_frames_to_unit(frames)), 0, 1)``.

    The unit conversion is fused into the rows-outermost copy the banded resize works on.
    """
    _check_frames(frames)
    n, h0, w0, _ = frames.shape
    if (h0, w0) == tuple(size):
        return _frames_to_unit(frames)
    xr = np.empty((h0, n, 3, w0), np.float32)
    if frames.dtype == np.uint8:  # uint8 / float32 scalar: the float32 loop on the cast values, one pass
        np.divide(frames.transpose(1, 0, 3, 2), np.float32(255.0), out=xr)
    else:
        np.copyto(xr, frames.transpose(1, 0, 3, 2), casting="unsafe")
    r = resample.resize_hnw(xr.reshape(h0, n * 3, w0), size, "bicubic_aa")  # (H, n*3, W)
    out = np.empty((n, 3, size[0], size[1]), np.float32)
    r4 = r.reshape(size[0], n, 3, size[1]).transpose(1, 2, 0, 3)
    np.clip(r4, np.float32(0.0), np.float32(1.0), out=out)
    return out


def _check_prior(frames: np.ndarray, points: np.ndarray, mask: np.ndarray) -> None:
    t, h0, w0 = frames.shape[:3]
    if points.shape != (t, h0, w0, 3):
        raise ValueError(
            f"prior_points shape {points.shape} does not match frames (expected {(t, h0, w0, 3)})"
        )
    if mask.shape != (t, h0, w0):
        raise ValueError(f"prior_mask shape {mask.shape} does not match frames (expected {(t, h0, w0)})")


@dataclass
class Conditioning:
    """Per-frame encoder outputs (spec 4.3), frames along axis 0."""

    emb: np.ndarray  # (n, D) CLIP image embeddings, latent dtype
    vlat: np.ndarray  # (n, 4, h, w) video latents (unscaled), latent dtype
    plat: np.ndarray  # (n, 4, h, w) prior latents (scaled by 0.18215), latent dtype

    @staticmethod
    def concat(parts: list[Conditioning]) -> Conditioning:
        keys = ("emb", "vlat", "plat")
        return Conditioning(*(np.concatenate([getattr(p, k) for p in parts]) for k in keys))

    def slice(self, s: int, e: int) -> Conditioning:
        return Conditioning(self.emb[s:e], self.vlat[s:e], self.plat[s:e])


class GeometryCrafter:
    """Networks + schedule of one variant; callable on a clip (offline, upstream semantics)."""

    def __init__(
        self,
        *,
        unet: Any,
        svd_vae: Any,
        point_map_vae: Any,
        clip: Any,
        scheduler_config: dict[str, Any],
        clip_mean: tuple[float, float, float],
        clip_std: tuple[float, float, float],
        variant: str = "diff",
        dtype: str = "fp16",
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if dtype not in ("fp16", "fp32"):
            raise ValueError(f"dtype must be 'fp16' or 'fp32', got {dtype!r}")
        self.unet, self.svd_vae, self.point_map_vae, self.clip = unet, svd_vae, point_map_vae, clip
        self.scheduler_config = scheduler_config
        self.clip_mean = np.asarray(clip_mean, np.float32).reshape(1, 3, 1, 1)
        self.clip_std = np.asarray(clip_std, np.float32).reshape(1, 3, 1, 1)
        self.variant = variant
        self.dtype = dtype
        self.latent_dtype = np.float16 if dtype == "fp16" else np.float32
        self.low_memory_usage = False

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, variant: str = "diff", dtype: str = "fp16"
    ) -> GeometryCrafter:
        """Load the merged official layout (spec 1.1): unet_<variant>/, point_map_vae/, vae/, image_encoder/,
        feature_extractor/, scheduler/. Raises FileNotFoundError naming every missing part."""
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        model_dir = Path(model_dir)
        parts = [f"unet_{variant}", *MODEL_PARTS]
        missing = [p for p in parts if not (model_dir / p).is_dir()]
        if missing:
            named = ", ".join(p + "/" for p in missing)
            raise FileNotFoundError(f"model folder {model_dir} is missing: {named}")
        pre = model_dir / "feature_extractor" / "preprocessor_config.json"
        if not pre.is_file():
            raise FileNotFoundError(
                f"model folder {model_dir} is missing feature_extractor/preprocessor_config.json"
            )
        sched = model_dir / "scheduler" / "scheduler_config.json"
        if not sched.is_file():
            raise FileNotFoundError(f"model folder {model_dir} is missing scheduler/scheduler_config.json")
        pre_cfg = json.loads(pre.read_text())
        # the networks import Jittor at their top: loaded here, so that the host-side numerics do not need it
        from daemon.model.clip import load_clip
        from daemon.model.unet import load_unet
        from daemon.model.vae import load_point_map_vae, load_svd_vae

        t0 = time.perf_counter()
        gc = cls(
            unet=load_unet(model_dir / f"unet_{variant}", dtype=dtype),
            svd_vae=load_svd_vae(model_dir / "vae", dtype="fp32"),  # force_upcast: encodes run in fp32
            point_map_vae=load_point_map_vae(model_dir / "point_map_vae", dtype="fp32"),
            clip=load_clip(model_dir / "image_encoder", dtype=dtype),
            scheduler_config=load_scheduler_config(sched),
            clip_mean=tuple(pre_cfg["image_mean"]),
            clip_std=tuple(pre_cfg["image_std"]),
            variant=variant,
            dtype=dtype,
        )
        log.info("loaded GeometryCrafter %s/%s from %s in %.1f s", variant, dtype, model_dir,
                 time.perf_counter() - t0)
        return gc

    # ---- stage functions (shared by offline and streaming) ------------------------------------------

    def schedule(self, num_inference_steps: int) -> EulerKarrasSchedule:
        return schedule_from_config(self.scheduler_config, num_inference_steps)

    def _after_call(self) -> None:
        if self.low_memory_usage:
            _release_device_memory()

    def encode(
        self, frames01: np.ndarray, x4: np.ndarray, size: tuple[int, int], chunk: int, progress: Any = None
    ) -> Conditioning:
        """Spec 4.3 on frames and prior x4 (n,4,H,W), in chunks of ``chunk`` frames.

        ``frames``: (n,H0,W0,3) uint8 or float in [0,1] (converted and resized chunk by chunk), or already
        (n,3,H0,W0) float in [0,1]."""
        ld = self.latent_dtype
        parts = []
        channels_last = frames01.ndim == 4 and frames01.shape[-1] == 3
        if not channels_last and (frames01.ndim != 4 or frames01.shape[1] != 3):
            _check_frames(frames01)  # raises with the expected layout
        for s in range(0, frames01.shape[0], chunk):
            if channels_last:
                v = frames_at_size(frames01[s : s + chunk], size)
            else:
                v = frames01[s : s + chunk]
                if v.shape[-2:] != tuple(size):
                    v = np.clip(resample.resize(v, size, "bicubic_aa"), 0.0, 1.0).astype(np.float32)
            v32 = to_signed_unit(v, ld)
            # CLIP: fp32 resize224 -> [0,1] -> normalise -> network dtype
            c = resample.resize224(v32)
            np.add(c, np.float32(1.0), out=c)
            np.divide(c, np.float32(2.0), out=c)
            np.subtract(c, self.clip_mean, out=c)
            np.divide(c, self.clip_std, out=c)
            emb = _np(self.clip.image_embeds(c.astype(ld))).astype(ld)
            self._after_call()
            vlat = _np(self.svd_vae.encode(v32)).astype(ld)
            self._after_call()
            xs = x4[s : s + chunk]
            pseudo = np.empty((xs.shape[0], 3, *xs.shape[2:]), np.float32)
            pseudo[:] = xs[:, 2:3]  # the disparity as pseudo-RGB (a broadcast copy: faster than np.repeat)
            mean = _np(self.svd_vae.encode(pseudo)).astype(np.float32)
            self._after_call()
            offset = _np(self.point_map_vae.encode(xs)).astype(np.float32)
            self._after_call()
            plat = ((mean + offset) * np.float32(VAE_SCALING)).astype(ld)
            parts.append(Conditioning(emb, vlat, plat))
            if progress is not None:
                progress(v32.shape[0])
        return Conditioning.concat(parts)

    def _added_time_ids(self) -> np.ndarray:
        return np.asarray([ADDED_TIME_IDS], self.latent_dtype)

    def denoise_window(
        self,
        cond: Conditioning,
        x: np.ndarray | None,
        schedule: EulerKarrasSchedule | None,
        progress: Any = None,
        guidance_scale: float = 1.0,
    ) -> np.ndarray:
        """Spec 4.4 c-d (diff, ``x`` = initial noisy latents (1,L,4,h,w)) or 4.5 (determ, ``x`` unused).

        ``guidance_scale`` > 1 (diff only, upstream ``diff_ppl.py``): a second, unconditional UNet call per
        step on [scaled latents, 0, 0] with zero image embeddings, combined as uncond + g * (cond - uncond).
        Returns the window's clean latents (1, L, 4, h, w) in the latent dtype."""
        ld = self.latent_dtype
        emb = cond.emb[None].astype(ld)
        vlat, plat = cond.vlat[None].astype(ld), cond.plat[None].astype(ld)
        ids = self._added_time_ids()
        if self.variant == "determ":
            u = _np(self.unet(np.concatenate([plat, vlat], axis=2), DETERM_TIMESTEP, emb, ids))
            self._after_call()
            if progress is not None:
                progress(1)
            return (-u).astype(ld)
        assert x is not None and schedule is not None
        c = x.shape[2]
        sample = np.empty((*x.shape[:2], c + vlat.shape[2] + plat.shape[2], *x.shape[3:]), ld)
        sample[:, :, c : c + vlat.shape[2]] = vlat  # channel order: noisy, video, prior
        sample[:, :, c + vlat.shape[2] :] = plat
        for i in range(schedule.num_steps):
            inp = schedule.scale_model_input(x, i, out=sample[:, :, :c])
            u = _np(self.unet(sample, float(schedule.timesteps[i]), emb, ids)).astype(ld)
            self._after_call()
            if guidance_scale > 1.0:
                zeros = np.zeros_like(inp)
                uncond = np.concatenate([inp, zeros, zeros], axis=2)
                uu = _np(self.unet(uncond, float(schedule.timesteps[i]), np.zeros_like(emb), ids)).astype(ld)
                self._after_call()
                u = classifier_free_guidance(u, uu, guidance_scale)
            x = schedule.step(u, i, x)
            if progress is not None:
                progress(2 if guidance_scale > 1.0 else 1)
        return x.astype(ld)

    def decode(
        self, latents: np.ndarray, chunk: int, progress: Any = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Spec 4.7 step 1: z (n,4,h,w) fp32 (already / 0.18215) -> (a, dl, vl) each (n,H,W), chunked."""
        outs: list[list[np.ndarray]] = [[], [], []]
        for s in range(0, latents.shape[0], chunk):
            z = np.ascontiguousarray(latents[s : s + chunk], np.float32)
            heads = self.point_map_vae.decode(z, z.shape[0])
            for k in range(3):
                outs[k].append(_np(heads[k])[:, 0].astype(np.float32))
            self._after_call()
            if progress is not None:
                progress(z.shape[0])
        return np.concatenate(outs[0]), np.concatenate(outs[1]), np.concatenate(outs[2])

    @staticmethod
    def latents_to_z(latents: np.ndarray) -> np.ndarray:
        """Stitched latents (1,n,4,h,w) -> decoder input (n,4,h,w) fp32 (spec 4.6 last step)."""
        z = fp16.to_f32(latents[0]) if latents.dtype == np.float16 else latents[0].astype(np.float32)
        return np.multiply(z, np.float32(1.0 / VAE_SCALING), out=z)

    def renoise(
        self, x: np.ndarray, tail: np.ndarray, overlap: int, schedule: EulerKarrasSchedule
    ) -> np.ndarray:
        """Spec 4.4 step 2b: x[:, :overlap] = A_tail + x[:, :overlap] / init_noise_sigma * sigma_0."""
        ld = self.latent_dtype
        init, sigma0 = schedule.init_noise_sigma, schedule.sigmas[0]
        x = x.copy()
        if ld == np.float16 and x.dtype == np.float16 and tail.dtype == np.float16:
            def kernel(xf: np.ndarray, tf: np.ndarray, rnd: fp16.Rounder) -> np.ndarray:
                np.divide(xf, init, out=xf)
                rnd(xf)
                np.multiply(xf, sigma0, out=xf)
                rnd(xf)
                return np.add(tf, xf, out=xf)

            x[:, :overlap] = fp16.fused_f16(kernel, (x[:, :overlap], tail), n_tmp=0)
            return x
        n = (x[:, :overlap].astype(np.float32) / init).astype(ld)
        n = (n.astype(np.float32) * sigma0).astype(ld)
        x[:, :overlap] = (tail.astype(np.float32) + n.astype(np.float32)).astype(ld)
        return x

    # ---- offline ---------------------------------------------------------------------------------

    def offline_latents(
        self,
        frames: np.ndarray,
        x4: np.ndarray,
        size: tuple[int, int],
        *,
        window_size: int,
        overlap: int,
        num_inference_steps: int,
        guidance_scale: float,
        decode_chunk_size: int,
        noise: np.ndarray | None,
        seed: int,
        stages: Any = None,
    ) -> np.ndarray:
        """Offline steps between the prior and the decoder (spec 4.3-4.6): encode the clip, denoise its
        windows, stitch them. ``window_size``/``overlap`` as already adjusted for a short clip (run.py).
        Returns the stitched latents (1, T, 4, H/8, W/8)."""
        stages = stages if stages is not None else _Stages(True)
        t = x4.shape[0]
        h, w = size[0] // 8, size[1] // 8
        with stages.stage("encode", t) as tick:
            cond = self.encode(frames, x4, size, decode_chunk_size, tick)

        plan = window_plan(t, window_size, overlap)
        schedule = self.schedule(num_inference_steps) if self.variant == "diff" else None
        bank = None
        if schedule is not None:
            if noise is None:
                noise = make_noise(seed, window_size, h, w, self.latent_dtype)
            noise = np.asarray(noise)
            noise = noise if noise.ndim == 5 else noise[None]
            if noise.shape[1] < window_size or noise.shape[2:] != (4, h, w):
                raise ValueError(f"noise shape {noise.shape} must be (1, >={window_size}, 4, {h}, {w})")
            bank = NoiseBank(noise[:, :window_size].astype(self.latent_dtype), schedule.init_noise_sigma,
                             overlap, window_size - overlap)
        latents: np.ndarray | None = None
        guided = schedule is not None and guidance_scale > 1.0
        n_calls = len(plan) * (schedule.num_steps if schedule is not None else 1) * (2 if guided else 1)
        with stages.stage("denoise", n_calls) as tick:
            for k, (s, e) in enumerate(plan):
                x = None
                if bank is not None and schedule is not None:
                    x = bank.take(e - s)
                    if k > 0 and overlap > 0:
                        x = self.renoise(x, latents[:, -overlap:], overlap, schedule)  # type: ignore[index]
                res = self.denoise_window(cond.slice(s, e), x, schedule, tick, guidance_scale=guidance_scale)
                latents = stitch(latents, res, overlap if k > 0 else 0)
        assert latents is not None and latents.shape[1] == t
        del cond
        return latents

    def __call__(
        self,
        frames: np.ndarray,
        prior_points: np.ndarray,
        prior_mask: np.ndarray,
        *,
        height: int,
        width: int,
        window_size: int = 110,
        overlap: int = 25,
        num_inference_steps: int = 5,
        guidance_scale: float = 1.0,
        decode_chunk_size: int = 8,
        noise: np.ndarray | None = None,
        force_projection: bool = True,
        force_fixed_focal: bool = True,
        use_extract_interp: bool = False,
        track_time: bool = False,
        low_memory_usage: bool = False,
        seed: int = 42,
        nan_guard: bool = False,
        quiet: bool = False,
        intrinsics: Sequence[float] | None = None,
    ) -> GeometryOutput:
        """Whole-clip inference with upstream semantics. frames (T,H0,W0,3) uint8 (or float [0,1]),
        prior_points (T,H0,W0,3) f32, prior_mask (T,H0,W0) bool -> :class:`GeometryOutput`.

        Keywords are upstream's (``GeometryCrafterDiffPipeline.__call__``); ``noise`` is upstream's
        ``latents`` (initial noise, scaled by init_noise_sigma here), ``guidance_scale`` and
        ``num_inference_steps`` are ignored by the determ variant as upstream does. ``track_time`` prints
        the elapsed time per stage to stdout. ``intrinsics``: known camera intrinsics, normalised as
        ``FrameResult.intrinsics``; they replace the estimated focal of the projection step
        (:func:`daemon.intrinsics.project_known`) and are returned as given."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[0] == 0:
            raise ValueError(f"frames must be a non-empty (T, H, W, 3) array, got shape {frames.shape}")
        t, h0, w0 = frames.shape[:3]
        _check_sizes(height, width, h0, w0, window_size, overlap)
        _check_prior(frames, prior_points, prior_mask)
        if decode_chunk_size < 1:
            raise ValueError(f"decode_chunk_size must be >= 1, got {decode_chunk_size}")
        if not np.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale}")
        if t <= window_size:  # run.py: a short clip is one window without overlap
            window_size, overlap = t, 0
        self.low_memory_usage = low_memory_usage
        size = (height, width)
        stages = _Stages(quiet)

        with stages.stage("prior", t):
            stats = compute_stats(np.asarray(prior_points, np.float32), np.asarray(prior_mask, bool))
            x4 = prior_to_x4(prior_points, prior_mask, size, stats, nan_guard=nan_guard)
        latents = self.offline_latents(frames, x4, size, window_size=window_size, overlap=overlap,
                                       num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                       decode_chunk_size=decode_chunk_size, noise=noise, seed=seed,
                                       stages=stages)
        del x4

        with stages.stage("decode", t) as tick:
            a, dl, vl = self.decode(self.latents_to_z(latents), decode_chunk_size, tick)
        with stages.stage("post", t):
            maps = decode_post(a, dl, vl, (h0, w0), use_extract_interp)
            del a, dl, vl
            if intrinsics is not None:
                points, depth = project_known(maps.log_depth, intrinsics)
                intr = np.tile(np.asarray(intrinsics, np.float32), (t, 1))
            elif force_projection:
                fx, fy = projected_focal(maps, per_frame=not force_fixed_focal)
                points, depth = points_from_maps(maps, fx, fy)
                fxs = np.broadcast_to(fx, (t,)) if fx.ndim == 0 else fx
                fys = np.broadcast_to(fy, (t,)) if fy.ndim == 0 else fy
            else:
                points, depth = points_from_maps(maps, maps.fx, maps.fy)
                fxs, fys = projected_focal(maps, per_frame=True)
            if intrinsics is None:
                intr = normalised_intrinsics(fxs, fys, h0, w0)
        if low_memory_usage:
            _release_device_memory()
        if track_time:
            for name, seconds in stages.timings.items():
                print(f"Elapsed time for {name}: {seconds * 1e3:.1f} ms")
        return GeometryOutput(point_map=points, mask=maps.valid, depth=depth, intrinsics=intr,
                              timings=stages.timings)


# --------------------------------------------------------------------------------------------------
# streaming


class StreamingSession:
    """Window-by-window inference for one source (module docstring and docs/streaming.md for semantics).

    The caller sends windows of ``window_size`` frames where consecutive windows share ``overlap`` frames:
    window k > 0 = the last ``overlap`` frames of window k-1 followed by ``stride`` new frames, with
    ``first_frame_index`` = previous first + stride. The last window may be shorter (> overlap frames).
    A window that does not continue the previous one restarts stitching (pending frames are flushed first;
    ``follow`` statistics and focal start a new segment, ``frozen`` ones are kept).
    """

    def __init__(
        self,
        gc: GeometryCrafter,
        *,
        height: int,
        width: int,
        window_size: int,
        overlap: int,
        num_inference_steps: int,
        decode_chunk_size: int,
        force_projection: bool = True,
        force_fixed_focal: bool = True,
        use_extract_interp: bool = False,
        seed: int = 42,
        noise: np.ndarray | None = None,
        nan_guard: bool = True,
        low_memory_usage: bool | None = None,
        stats_policy: str = "follow",
        stats_params: PolicyParams | None = None,
        metric: bool = False,
    ) -> None:
        _check_sizes(height, width, 2, 2, window_size, overlap)
        if low_memory_usage is not None:  # shared by every session of this model
            gc.low_memory_usage = low_memory_usage
        if decode_chunk_size < 1:
            raise ValueError(f"decode_chunk_size must be >= 1, got {decode_chunk_size}")
        self.gc = gc
        self.size = (height, width)
        self.window_size, self.overlap, self.stride = window_size, overlap, window_size - overlap
        self.decode_chunk_size = decode_chunk_size
        self.force_projection, self.force_fixed_focal = force_projection, force_fixed_focal
        self.use_extract_interp = use_extract_interp
        self.nan_guard = nan_guard
        self.schedule = gc.schedule(num_inference_steps) if gc.variant == "diff" else None
        h, w = height // 8, width // 8
        if noise is None:
            noise = make_noise(seed, window_size, h, w, gc.latent_dtype)
        noise = noise if noise.ndim == 5 else noise[None]
        if noise.shape[1] < window_size or noise.shape[2:] != (4, h, w):
            raise ValueError(f"noise shape {noise.shape} must be (1, >={window_size}, 4, {h}, {w})")
        self._noise = noise[:, :window_size].astype(gc.latent_dtype)
        self.stats: PriorStats | None = None  # of the last new frame
        self.stats_policy = stats_policy
        self.stats_params = stats_params or PolicyParams()
        self._policy = StreamStats(stats_policy, self.stats_params)
        # fixed (fx, fy) in grid units: numpy scalars (or 0-d arrays)
        self.focal: tuple[np.ndarray | np.floating[Any], np.ndarray | np.floating[Any]] | None = None
        self._focal_segment = -1  # segment the fixed focal belongs to (follow)
        self.timings: dict[str, float] = {}
        self.windows_done = 0
        self._out_size: tuple[int, int] | None = None
        self._intrinsics: tuple[float, ...] | None = None  # known, normalised (the last window's)
        self.metric = metric  # priors are metric (MoGe-2): scale the output to metres (model/metric_scale.py)
        self._metric = MetricScale(stats_policy, self.stats_params)
        self._restart()

    def _restart(self) -> None:
        """Start a new stitched segment (first window, fresh noise bank)."""
        self._bank = (
            NoiseBank(self._noise, self.schedule.init_noise_sigma, self.overlap, self.stride)
            if self.schedule is not None
            else None
        )
        self._latents: np.ndarray | None = None  # (1, n, 4, h, w): not yet decoded frames of the segment
        self._frame_window: list[int] = []  # window id per pending latent frame
        self._frame_norm: list[FrameNorm] = []  # normalisation per pending latent frame
        self._frame_prior_z: list[np.ndarray] = []  # metric: prior depth per pending frame (NaN = invalid)
        self._base = 0  # frame index of _latents[:, 0]
        self._seg_start = 0  # frame index of the segment start (decode chunk alignment)
        self._next_first: int | None = None  # expected first_frame_index of the next window
        self._cond_tail: Conditioning | None = None

    def _time(self, name: str, t0: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def push_window(
        self, frames: np.ndarray, prior_points: np.ndarray, prior_mask: np.ndarray, first_frame_index: int,
        intrinsics: Sequence[float] | None = None,
    ) -> list[FrameResult]:
        """Process one window; returns results for the frames that became final (in frame order).

        ``intrinsics``: the source's known intrinsics, normalised as ``FrameResult.intrinsics``; the frames
        emitted from now on are projected with them instead of an estimated focal."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[0] == 0:
            raise ValueError(f"frames must be a non-empty (F, H, W, 3) array, got shape {frames.shape}")
        f, h0, w0 = frames.shape[:3]
        _check_sizes(self.size[0], self.size[1], h0, w0, self.window_size, self.overlap)
        _check_prior(frames, prior_points, prior_mask)
        if f > self.window_size:
            raise ValueError(f"window has {f} frames, more than window_size {self.window_size}")
        if self._out_size is not None and self._out_size != (h0, w0):
            raise ValueError(f"frame size changed from {self._out_size} to {(h0, w0)} within a session")
        self._out_size = (h0, w0)
        self._intrinsics = None if intrinsics is None else tuple(float(v) for v in intrinsics)
        results: list[FrameResult] = []
        if self._next_first is not None and first_frame_index != self._next_first:
            log.warning("window at frame %d does not continue the stream (expected %d): restarting stitching",
                        first_frame_index, self._next_first)
            results.extend(self.flush())
            self._policy.restart()  # follow: a new segment; frozen: kept
        first = self._latents is None and self._next_first is None
        if not first and f <= self.overlap:
            raise ValueError(f"a continuing window needs more than overlap={self.overlap} frames, got {f}")
        window_id = self.windows_done
        gc = self.gc

        t0 = time.perf_counter()
        points = np.asarray(prior_points, np.float32)
        mask = np.asarray(prior_mask, bool)
        reuse = 0 if first else self.overlap
        segment = self._policy.segment
        norms = self._policy.window(points, mask, reuse, first_frame_index)
        if self.stats is None or self._policy.segment != segment:
            log.info("prior statistics (%s) from window %d: s=%.4g lo=%.4g hi=%.4g", self.stats_policy,
                     window_id, norms[-1].stats.scale, norms[-1].stats.lo, norms[-1].stats.hi)
        self.stats = norms[-1].stats
        x4 = self._prior_x4(points[reuse:], mask[reuse:], norms)
        if self.metric:
            new_z = np.where(mask[reuse:], points[reuse:, ..., 2], np.float32(np.nan)).astype(np.float32)
            self._frame_prior_z += list(new_z)
        self._time("prior", t0)

        t0 = time.perf_counter()
        new = gc.encode(frames[reuse:], x4, self.size, self.decode_chunk_size)
        cond = new if reuse == 0 else Conditioning.concat([self._cond_tail, new])  # type: ignore[list-item]
        self._cond_tail = cond.slice(f - self.overlap, f) if self.overlap else None
        self._time("encode", t0)

        t0 = time.perf_counter()
        x = None
        if self._bank is not None and self.schedule is not None:
            x = self._bank.take(f)
            if not first and self.overlap > 0:
                tail = self._latents[:, -self.overlap :]  # type: ignore[index]
                x = gc.renoise(x, tail, self.overlap, self.schedule)
        res = gc.denoise_window(cond, x, self.schedule)
        if first:
            self._latents = res.copy()
            self._base = self._seg_start = first_frame_index
            self._frame_window = [window_id] * f
            self._frame_norm = list(norms)
        else:
            self._latents = stitch(self._latents, res, self.overlap)
            if self.overlap:
                self._frame_window[-self.overlap :] = [window_id] * self.overlap
            self._frame_window += [window_id] * (f - self.overlap)
            self._frame_norm += norms
        self._time("denoise", t0)
        self.windows_done += 1
        self._next_first = first_frame_index + f - self.overlap

        final_end = first_frame_index + f - self.overlap  # the last `overlap` frames may still change
        results.extend(self._emit(final_end, partial_ok=False))
        return results

    def _prior_x4(self, points: np.ndarray, mask: np.ndarray, norms: list[FrameNorm]) -> np.ndarray:
        """prior_to_x4 over runs of frames that share their statistics."""
        parts, s = [], 0
        while s < len(norms):
            e = s + 1
            while e < len(norms) and norms[e].stats == norms[s].stats:
                e += 1
            parts.append(prior_to_x4(points[s:e], mask[s:e], self.size, norms[s].stats,
                                     nan_guard=self.nan_guard))
            s = e
        return np.concatenate(parts)

    def _fixed_focal(self, maps: DecodedMaps, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-frame (fx, fy) of the fixed focal: frozen from the first chunk, or under ``follow`` anchored
        per
        segment and smoothed per decode chunk (daemon.model.streaming_stats.follow_focal)."""
        if self.stats_policy == "frozen":
            if self.focal is None:
                self.focal = projected_focal(maps, per_frame=False)
                log.info("focal frozen from frames %d..%d", self._base, self._base + n - 1)
            fx, fy = self.focal
            return np.full(n, fx, np.float32), np.full(n, fy, np.float32)
        fxs, fys = np.empty(n, np.float32), np.empty(n, np.float32)
        s = 0
        while s < n:
            seg = self._frame_norm[s].segment
            e = min(n, s + self.decode_chunk_size)
            e = next((i for i in range(s, e) if self._frame_norm[i].segment != seg), e)
            sub = DecodedMaps(maps.fx[s:e], maps.fy[s:e], maps.log_depth[s:e], maps.valid[s:e])
            cfx, cfy = projected_focal(sub, per_frame=False)
            old = None if seg != self._focal_segment or self.focal is None else self.focal
            if old is None:
                log.info("fixed focal anchored on frames %d..%d (segment %d)", self._base + s,
                         self._base + e - 1,
                         seg)
            nfx, nfy = follow_focal(None if old is None else (float(old[0]), float(old[1])),
                                    (float(cfx), float(cfy)),
                                    self.stats_params)
            self.focal = (np.float32(nfx), np.float32(nfy))
            self._focal_segment = seg
            fxs[s:e], fys[s:e] = self.focal
            s = e
        return fxs, fys

    def flush(self) -> list[FrameResult]:
        """End of stream (or of a segment): decode and return every held-back frame."""
        if self._latents is None:
            self._restart()
            return []
        results = self._emit(self._base + self._latents.shape[1], partial_ok=True)
        self._restart()
        return results

    def _emit(self, final_end: int, partial_ok: bool) -> list[FrameResult]:
        """Decode final frames [base, final_end) in chunks aligned to the segment start."""
        assert self._latents is not None and self._out_size is not None
        dc = self.decode_chunk_size
        n_final = final_end - self._base
        if not partial_ok:
            # chunk boundaries at seg_start + k*dc: only whole chunks
            n_final = ((final_end - self._seg_start) // dc) * dc + self._seg_start - self._base
        if n_final <= 0:
            return []
        t0 = time.perf_counter()
        z = self.gc.latents_to_z(self._latents[:, :n_final])
        a, dl, vl = self.gc.decode(z, dc)
        self._time("decode", t0)
        t0 = time.perf_counter()
        h0, w0 = self._out_size
        maps = decode_post(a, dl, vl, (h0, w0), self.use_extract_interp)
        if self._intrinsics is not None:
            points, depth = project_known(maps.log_depth, self._intrinsics)
        elif self.force_projection:
            if self.force_fixed_focal:
                fxs, fys = self._fixed_focal(maps, n_final)
                fx, fy = (fxs[0], fys[0]) if self.stats_policy == "frozen" else (fxs, fys)
            else:
                fx, fy = fxs, fys = projected_focal(maps, per_frame=True)
            points, depth = points_from_maps(maps, fx, fy)
        else:
            points, depth = points_from_maps(maps, maps.fx, maps.fy)
            fxs, fys = projected_focal(maps, per_frame=True)
        if self._intrinsics is not None:
            intr = np.tile(np.asarray(self._intrinsics, np.float64), (n_final, 1))
        else:
            intr = normalised_intrinsics(fxs, fys, h0, w0)
        factor = None
        if self.metric:
            raw = window_factor(np.stack(self._frame_prior_z[:n_final]), depth, maps.valid)
            factor = self._metric.update(raw, self._frame_norm[0].segment)
            if factor is not None:
                points *= np.float32(factor)
                depth = depth * np.float32(factor)
            self._frame_prior_z = self._frame_prior_z[n_final:]
        results = [
            FrameResult(
                frame_index=self._base + i,
                window_id=self._frame_window[i],
                point_map=points[i],
                depth=depth[i],
                mask=maps.valid[i],
                intrinsics=tuple(float(v) for v in intr[i]),  # type: ignore[arg-type]
                prior_scale=float(self._frame_norm[i].stats.scale),
                units="relative" if factor is None else "metric",
                metric_scale=1.0 if factor is None else float(np.float32(factor)),
            )
            for i in range(n_final)
        ]
        self._latents = self._latents[:, n_final:]
        self._frame_window = self._frame_window[n_final:]
        self._frame_norm = self._frame_norm[n_final:]
        self._base += n_final
        self._time("post", t0)
        return results
