"""Resamplers and the normalised pixel grid of GeometryCrafter, host-side (numpy), matching PyTorch.

Reference: spec section 4.8 (torch ``F.interpolate`` modes, kornia ``create_meshgrid``, diffusers
``_resize_with_antialiasing``). Every resize here is separable, so each is expressed as two small weight
matrices (rows = output index, columns = input index) applied to the last two axes:
``out = Wy @ x @ Wx.T``. Source positions are computed in float32 like PyTorch's CPU kernels (so the
chosen taps and the linear weights are the same); kernel weights are float64 and the products run in
float32 (float64 for float64 input). PyTorch's own float32 cubic weights carry rounding of up to ~5e-7
(cancellation in the Keys polynomial), so fp32-vs-fp32 agreement on bicubic is ~1e-6 while agreement with
torch run in float64 is ~1e-7 (tests/model/test_resample.py).

Speed: the matrices are applied as banded products (:func:`_bands`: each block of output rows reads only
the inputs it needs); bilinear float32 resizes skip the matrices and run as two taps per axis on blocks of
output rows that stay in cache (:func:`bilinear_block`), the same float32 values.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

MODES = ("bicubic_aa", "bilinear", "nearest_exact", "bicubic_ac")


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys cubic convolution kernel (float64)."""
    x = np.abs(np.asarray(x, np.float64))
    return np.where(
        x <= 1.0,
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
        np.where(x < 2.0, ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a, 0.0),
    )


@functools.lru_cache(maxsize=64)
def aa_bicubic_weights(n_in: int, n_out: int) -> np.ndarray:
    """torch ``interpolate(mode="bicubic", antialias=True, align_corners=False)`` along one axis (a=-0.5)."""
    scale = np.float32(n_in) / np.float32(n_out)
    support = np.float32(2.0) * max(scale, np.float32(1.0))
    invscale = 1.0 / float(scale) if scale >= 1.0 else 1.0
    w = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        center = scale * np.float32(i + 0.5)
        lo = max(int(center - support + np.float32(0.5)), 0)
        hi = min(int(center + support + np.float32(0.5)), n_in)
        j = np.arange(lo, hi)
        k = _cubic((j - float(center) + 0.5) * invscale, -0.5)
        total = k.sum()
        w[i, lo:hi] = k / total if total != 0 else k
    return w


@functools.lru_cache(maxsize=64)
def bicubic_align_corners_weights(n_in: int, n_out: int) -> np.ndarray:
    """torch ``interpolate(mode="bicubic", align_corners=True)`` along one axis (a=-0.75, clamped taps)."""
    scale = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0.0)
    w = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        x = scale * np.float32(i)
        x0 = int(math.floor(x))
        t = float(x) - x0
        taps = _cubic(np.array([t + 1.0, t, 1.0 - t, 2.0 - t]), -0.75)
        for off, k in zip(range(-1, 3), taps):
            w[i, min(max(x0 + off, 0), n_in - 1)] += k
    return w


@functools.lru_cache(maxsize=64)
def bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """torch ``interpolate(mode="bilinear", align_corners=False)`` along one axis (no antialias)."""
    scale = np.float32(n_in) / np.float32(n_out)
    w = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        # one rounding of scale*(i+0.5)-0.5, like the fused multiply-add of torch's compiled kernel
        src = max(np.float32(float(scale) * (i + 0.5) - 0.5), np.float32(0.0))
        i0 = int(src)
        i1 = i0 + 1 if i0 < n_in - 1 else i0
        lam1 = float(src - np.float32(i0))
        w[i, i0] += 1.0 - lam1
        w[i, i1] += lam1
    return w


@functools.lru_cache(maxsize=64)
def nearest_exact_weights(n_in: int, n_out: int) -> np.ndarray:
    """torch ``interpolate(mode="nearest-exact")`` along one axis."""
    scale = np.float32(n_in) / np.float32(n_out)
    w = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        w[i, min(int(math.floor(np.float32(i + 0.5) * scale)), n_in - 1)] = 1.0
    return w


_WEIGHTS = {
    "bicubic_aa": aa_bicubic_weights,
    "bilinear": bilinear_weights,
    "nearest_exact": nearest_exact_weights,
    "bicubic_ac": bicubic_align_corners_weights,
}


BAND_ROWS = 16  # output rows (or columns) per block of a banded product (measured best of 8-64)


@dataclass(frozen=True)
class _Band:
    """One block of a banded resize: output indices [o0, o1) read input indices [i0, i1)."""

    o0: int
    o1: int
    i0: int
    i1: int
    w: np.ndarray  # (o1 - o0, i1 - i0) weights in the compute dtype


@functools.lru_cache(maxsize=128)
def _bands(mode_or_key: object, n_in: int, n_out: int, dtype: str,
           rows: int = BAND_ROWS) -> tuple[_Band, ...]:
    """Split a dense weight matrix into blocks of output rows that touch only the input range they need.

    Each block is an ordinary BLAS product over the non-zero columns of its rows, so the sums run over the
    same non-zero terms in the same order as the dense ``W @ x``: the work is O(taps * n) instead of
    O(n_out * n_in), and a NaN/inf in the input stays local as in torch's kernels (the dense product
    multiplied it by every zero weight of its column, spreading it to the whole row/column).
    """
    dense = _dense_weights(mode_or_key, n_in, n_out).astype(dtype)
    out = []
    for o0 in range(0, n_out, rows):
        o1 = min(o0 + rows, n_out)
        nz = np.flatnonzero(dense[o0:o1].any(axis=0))
        i0, i1 = (int(nz[0]), int(nz[-1]) + 1) if nz.size else (0, 1)
        out.append(_Band(o0, o1, i0, i1, np.ascontiguousarray(dense[o0:o1, i0:i1])))
    return tuple(out)


def _dense_weights(key: object, n_in: int, n_out: int) -> np.ndarray:
    if isinstance(key, str):
        return _WEIGHTS[key](n_in, n_out)
    name, *params = cast("tuple[Any, ...]", key)
    if name == "resize224":
        ksize, sigma, n224 = params
        return bicubic_align_corners_weights(n_in, n224) @ gaussian_blur_weights(n_in, ksize, sigma)
    raise ValueError(f"unknown weight key {key!r}")


def _rows_pass(xr: np.ndarray, bands: tuple[_Band, ...], n_out: int) -> np.ndarray:
    """``W @ x`` on rows-outermost data xr (n_in, N, W) -> (n_out, N, W): one GEMM per band over all N."""
    n_in, n, w = xr.shape
    x2 = xr.reshape(n_in, n * w)
    out = np.empty((n_out, n * w), xr.dtype)
    for b in bands:
        np.matmul(b.w, x2[b.i0 : b.i1], out=out[b.o0 : b.o1])
    return out.reshape(n_out, n, w)


def _cols_pass(x: np.ndarray, bands: tuple[_Band, ...], n_out: int) -> np.ndarray:
    """``x @ W.T`` along axis -1 of x (..., n_in) -> (..., n_out): one GEMM per band over all rows."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    out = np.empty((x2.shape[0], n_out), x.dtype)
    for b in bands:
        np.matmul(x2[:, b.i0 : b.i1], b.w.T, out=out[:, b.o0 : b.o1])
    return out.reshape(*lead, n_out)


def _apply_banded(x: np.ndarray, key_y: object, key_x: object, size: tuple[int, int]) -> np.ndarray:
    """Vertical then horizontal pass (the dense reference's order). The vertical pass runs on a rows-outermost
    copy, so that each band is one large GEMM instead of one small GEMM per image (small multithreaded
    GEMMs were 20x slower on the shared 2-core box)."""
    dt = np.float64 if x.dtype == np.float64 else np.float32
    x = np.asarray(x, dt)
    lead, (h_in, w_in), (h_out, w_out) = x.shape[:-2], x.shape[-2:], size
    xr = np.ascontiguousarray(x.reshape(-1, h_in, w_in).transpose(1, 0, 2))  # (h_in, N, w_in)
    y = _rows_pass(xr, _bands(key_y, h_in, h_out, np.dtype(dt).name), h_out)
    z = _cols_pass(y, _bands(key_x, w_in, w_out, np.dtype(dt).name), w_out)  # (h_out, N, w_out)
    return np.ascontiguousarray(z.transpose(1, 0, 2)).reshape(*lead, h_out, w_out)


def resize_hnw(xr: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """:func:`resize` on rows-outermost float32 data: xr (H_in, N, W_in) -> (H_out, N, W_out), the same
    values.

    For callers that build this layout anyway (e.g. from (n, H, W, C) frames) and save two relayouts.
    """
    if mode not in _WEIGHTS or mode == "nearest_exact":
        raise ValueError(f"resize_hnw supports the linear modes, not {mode!r}")
    h_in, _, w_in = xr.shape
    y = _rows_pass(xr, _bands(mode, h_in, size[0], "float32"), size[0])
    return _cols_pass(y, _bands(mode, w_in, size[1], "float32"), size[1])


def resize_rows(x: np.ndarray, n_out: int, mode: str) -> np.ndarray:
    """The vertical half of :func:`resize` (float32 input): axis -2 to ``n_out``."""
    x = np.asarray(x, np.float32)
    lead, (h_in, w_in) = x.shape[:-2], x.shape[-2:]
    xr = np.ascontiguousarray(x.reshape(-1, h_in, w_in).transpose(1, 0, 2))
    y = _rows_pass(xr, _bands(mode, h_in, n_out, "float32"), n_out)
    return np.ascontiguousarray(y.transpose(1, 0, 2)).reshape(*lead, n_out, w_in)


def resize_cols(x: np.ndarray, n_out: int, mode: str) -> np.ndarray:
    """The horizontal half of :func:`resize` (float32 input): axis -1 to ``n_out``."""
    x = np.ascontiguousarray(x, np.float32)
    return _cols_pass(x, _bands(mode, x.shape[-1], n_out, "float32"), n_out)


@dataclass(frozen=True)
class Taps2:
    """Bilinear weights along one axis as two taps per output index: out = x[i0] * w0 + x[i1] * w1."""

    i0: np.ndarray  # (n_out,) intp
    i1: np.ndarray  # (n_out,) intp: i0 + 1, or i0 at the clamped end (then w1 = 0, w0 the summed weight)
    w0: np.ndarray  # (n_out,) float32
    w1: np.ndarray


@functools.lru_cache(maxsize=64)
def bilinear_taps(n_in: int, n_out: int) -> Taps2:
    """The non-zero entries of the float32 :func:`bilinear_weights` matrix (at most two per row)."""
    w = bilinear_weights(n_in, n_out).astype(np.float32)
    rows = np.arange(n_out)
    i0 = np.argmax(w != 0, axis=1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w0 = w[rows, i0]
    w1 = np.where(i1 != i0, w[rows, i1], np.float32(0.0)).astype(np.float32)
    if ((w != 0).sum(axis=1) > 2).any() or np.count_nonzero(w) != np.count_nonzero(w0) + np.count_nonzero(w1):
        raise AssertionError(f"bilinear weights {n_in}->{n_out} are not two adjacent taps")
    return Taps2(i0, i1, w0, w1)


BLOCK_VALUES = 1 << 15  # output values per block of the two-tap bilinear (the block's buffers stay in L2)


def block_rows(w_out: int) -> int:
    """Output rows per block of :func:`bilinear_block` for an output width ``w_out``."""
    return max(1, BLOCK_VALUES // max(w_out, 1))


class BilinearScratch:
    """Buffers of one block of :func:`bilinear_block` (reused over the blocks of a resize)."""

    def __init__(self, rows: int, w_in: int, w_out: int) -> None:
        self.a = np.empty((rows, w_in), np.float32)
        self.b = np.empty((rows, w_in), np.float32)
        self.c = np.empty((rows, w_out), np.float32)


def bilinear_block(x: np.ndarray, ty: Taps2, tx: Taps2, r0: int, r1: int, out: np.ndarray,
                   sc: BilinearScratch) -> np.ndarray:
    """Output rows [r0, r1) of the bilinear resize of one float32 image ``x`` (h_in, w_in) into ``out``
    (r1 - r0, w_out): the vertical two-tap pass on the rows it needs, then the horizontal one.

    Each output is ``x0 * w0 + x1 * w1`` with both products rounded: the same float32 value the banded
    BLAS products give on the 2-core box's OpenBLAS (tests/pipeline/test_glue_fast.py compares them), and
    a NaN reaches only the outputs whose taps read it."""
    k = r1 - r0
    a, b, c = sc.a[:k], sc.b[:k], sc.c[:k]
    # mode="clip": the indices are in range, and take(out=...) buffers its output in the default mode
    np.take(x, ty.i0[r0:r1], axis=0, out=a, mode="clip")
    np.multiply(a, ty.w0[r0:r1, None], out=a)
    np.take(x, ty.i1[r0:r1], axis=0, out=b, mode="clip")
    np.multiply(b, ty.w1[r0:r1, None], out=b)
    np.add(a, b, out=a)
    np.take(a, tx.i0, axis=1, out=out, mode="clip")
    np.multiply(out, tx.w0, out=out)
    np.take(a, tx.i1, axis=1, out=c, mode="clip")
    np.multiply(c, tx.w1, out=c)
    return np.add(out, c, out=out)


THREADS = 2  # host glue threads (the 2-core box): numpy releases the GIL inside each block's ufuncs
_POOL: ThreadPoolExecutor | None = None


def split_frames(n: int, work: Callable[[int, int], None]) -> None:
    """``work(i0, i1)`` on :data:`THREADS` contiguous ranges of ``n`` frames in parallel (inline for one
    frame or one thread); the ranges write disjoint outputs."""
    global _POOL
    k = min(THREADS, n)
    if k <= 1:
        work(0, n)
        return
    if _POOL is None:
        _POOL = ThreadPoolExecutor(THREADS, thread_name_prefix="glue")
    bounds = [n * j // k for j in range(k + 1)]
    futures = [_POOL.submit(work, bounds[j], bounds[j + 1]) for j in range(1, k)]
    work(bounds[0], bounds[1])
    for f in futures:
        f.result()


def resize_into(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Bilinear resize of one float32 image ``x`` (h_in, w_in) into the C-contiguous float32 image ``out``
    (h_out, w_out); the values of ``resize(x, out.shape, "bilinear")``."""
    (h_in, w_in), (h_out, w_out) = x.shape, out.shape
    ty, tx = bilinear_taps(h_in, h_out), bilinear_taps(w_in, w_out)
    rb = block_rows(w_out)
    sc = BilinearScratch(min(rb, h_out), w_in, w_out)
    x = np.ascontiguousarray(x, np.float32)
    for r0 in range(0, h_out, rb):
        r1 = min(r0 + rb, h_out)
        bilinear_block(x, ty, tx, r0, r1, out[r0:r1], sc)
    return out


def _bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of float32 images (..., h_in, w_in), block by block (:func:`bilinear_block`)."""
    lead, (h_in, w_in), (h_out, w_out) = x.shape[:-2], x.shape[-2:], size
    imgs = np.ascontiguousarray(x, np.float32).reshape(-1, h_in, w_in)
    out = np.empty((imgs.shape[0], h_out, w_out), np.float32)
    ty, tx = bilinear_taps(h_in, h_out), bilinear_taps(w_in, w_out)
    rb = block_rows(w_out)

    def images(i0: int, i1: int) -> None:
        sc = BilinearScratch(min(rb, h_out), w_in, w_out)
        for i in range(i0, i1):
            for r0 in range(0, h_out, rb):
                r1 = min(r0 + rb, h_out)
                bilinear_block(imgs[i], ty, tx, r0, r1, out[i, r0:r1], sc)

    split_frames(imgs.shape[0], images)
    return out.reshape(*lead, h_out, w_out)


@functools.lru_cache(maxsize=64)
def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    return np.argmax(nearest_exact_weights(n_in, n_out), axis=1)


def _nearest(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """nearest-exact as a gather: the same values the one-hot product gives, without the arithmetic."""
    dt = np.float64 if x.dtype == np.float64 else np.float32
    iy = _nearest_index(x.shape[-2], size[0])
    ix = _nearest_index(x.shape[-1], size[1])
    return np.asarray(x, dt)[..., iy[:, None], ix[None, :]]


def resize_dense(x: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """The reference: the same resize as two dense matrix products (slow; tests compare against it)."""
    if mode not in _WEIGHTS:
        raise ValueError(f"unknown resize mode {mode!r}; allowed: {', '.join(MODES)}")
    h_in, w_in = x.shape[-2:]
    if (h_in, w_in) == tuple(size) and mode != "bicubic_ac":
        return np.asarray(x, np.float64 if x.dtype == np.float64 else np.float32).copy()
    return _apply(x, _WEIGHTS[mode](h_in, size[0]), _WEIGHTS[mode](w_in, size[1]))


def _apply(x: np.ndarray, wy: np.ndarray, wx: np.ndarray) -> np.ndarray:
    dt = np.float64 if x.dtype == np.float64 else np.float32
    x = np.asarray(x, dt)
    out = np.matmul(wy.astype(dt), x)  # (..., Ho, W)
    return np.matmul(out, wx.T.astype(dt))  # (..., Ho, Wo)


def resize(x: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """Resize the last two axes of ``x`` to ``size`` = (H, W) with one of :data:`MODES`."""
    if mode not in _WEIGHTS:
        raise ValueError(f"unknown resize mode {mode!r}; allowed: {', '.join(MODES)}")
    h_in, w_in = x.shape[-2:]
    size = (int(size[0]), int(size[1]))
    if (h_in, w_in) == size and mode != "bicubic_ac":
        return np.asarray(x, np.float64 if x.dtype == np.float64 else np.float32).copy()
    if mode == "nearest_exact":
        return _nearest(x, size)
    if mode == "bilinear" and x.dtype != np.float64:
        return _bilinear(x, size)
    return _apply_banded(x, mode, mode, size)


@functools.lru_cache(maxsize=16)
def gaussian_blur_weights(n: int, ksize: int, sigma: float) -> np.ndarray:
    """kornia/diffusers separable Gaussian blur along one axis with reflect padding, as an (n, n) matrix."""
    t = np.arange(ksize, dtype=np.float32) - np.float32(ksize // 2)
    sig = np.float32(sigma)
    g = np.exp(-(t * t) / (np.float32(2.0) * sig * sig)).astype(np.float32)
    g = (g / g.sum(dtype=np.float32)).astype(np.float64)
    pad = ksize // 2
    if pad >= n:
        raise ValueError(f"blur kernel {ksize} too large for an axis of {n} pixels (reflect padding)")
    w = np.zeros((n, n), np.float64)
    for i in range(n):
        for k, tap in enumerate(g):
            j = i + k - pad
            if j < 0:
                j = -j
            elif j > n - 1:
                j = 2 * (n - 1) - j
            w[i, j] += tap
    return w


def resize224_params(
    h: int, w: int, size: tuple[int, int] = (224, 224)
) -> tuple[tuple[float, float], tuple[int, int]]:
    """Blur sigmas and kernel sizes of diffusers ``_resize_with_antialiasing`` (spec 4.8)."""
    sy = max((h / size[0] - 1.0) / 2.0, 0.001)
    sx = max((w / size[1] - 1.0) / 2.0, 0.001)
    ky, kx = int(max(2.0 * 2 * sy, 3)), int(max(2.0 * 2 * sx, 3))
    ky += 1 - ky % 2
    kx += 1 - kx % 2
    return (sy, sx), (ky, kx)


def resize224(x: np.ndarray, size: tuple[int, int] = (224, 224)) -> np.ndarray:
    """diffusers ``_resize_with_antialiasing``: Gaussian blur (x then y, reflect) + bicubic align_corners.

    Horizontal blur, vertical blur and the bicubic resize are all linear and separable, so they are folded
    into one matrix per axis.
    """
    h, w = x.shape[-2:]
    (sy, sx), (ky, kx) = resize224_params(h, w, size)
    return _apply_banded(x, ("resize224", ky, sy, size[0]), ("resize224", kx, sx, size[1]), size)


def resize224_dense(x: np.ndarray, size: tuple[int, int] = (224, 224)) -> np.ndarray:
    """The reference for :func:`resize224`: the folded matrices as dense products."""
    h, w = x.shape[-2:]
    (sy, sx), (ky, kx) = resize224_params(h, w, size)
    wy = bicubic_align_corners_weights(h, size[0]) @ gaussian_blur_weights(h, ky, sy)
    wx = bicubic_align_corners_weights(w, size[1]) @ gaussian_blur_weights(w, kx, sx)
    return _apply(x, wy, wx)


def normalized_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """kornia ``create_meshgrid(normalized_coordinates=True)``: (g_x (W,), g_y (H,)) float32 in [-1, 1]."""
    xs = np.arange(width, dtype=np.float32)
    ys = np.arange(height, dtype=np.float32)
    gx = (xs / np.float32(width - 1) - np.float32(0.5)) * np.float32(2.0)
    gy = (ys / np.float32(height - 1) - np.float32(0.5)) * np.float32(2.0)
    return gx.astype(np.float32), gy.astype(np.float32)


def quantile_nearest(x: np.ndarray, q: float) -> np.float32:
    """``torch.quantile(x.flatten(), q, interpolation="nearest")`` for a float32 array.

    torch converts ``q`` to the input dtype and computes the rank ``q * (n - 1)`` in it, then rounds half
    to even. A NaN anywhere gives NaN, like torch.
    """
    flat = np.asarray(x, np.float32).reshape(-1)
    if np.isnan(flat).any():
        return np.float32(np.nan)
    rank = np.float32(q) * np.float32(flat.size - 1)
    k = int(np.rint(rank))
    return np.partition(flat, k)[k]
