"""Post-processing of the MoGe prior into the 4-channel point-map VAE input (spec 4.2 steps 1-7, 4.3.4).

Host-side numpy, float32 like upstream (reductions accumulate in float64, then round to float32).
The clip-global statistics (depth scale ``s``, disparity range ``lo``/``hi``) are a separate value,
:class:`PriorStats`, so the streaming session can compute them once (first window) and reuse them; the
offline pipeline computes them over the whole clip.

Speed: both functions work frame by frame on reused buffers with in-place ufuncs, in the same order of
float32 operations as the spec's formulas (so the results are the same float32 values as the literal
whole-array code, reference/glue.py), and the resizes are the banded products of
:mod:`daemon.model.resample`. The per-frame disparity quantiles are order statistics of the valid depths (the
disparity is a monotone function of depth), found by a sampled threshold and a partition of the few
candidates instead of a partition of the whole frame.

Deviation (opt-in, spec 7.5): with ``nan_guard`` the log-depth of *invalid* pixels whose prior depth is
<= -1e-7 is 0 instead of upstream's NaN (which would poison the whole window through the encoder).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from daemon.model import resample

Q_LO = 1 - 0.99  # 0.010000000000000009, as upstream writes it
Q_HI = 0.99
_F = np.float32
_SAMPLE_STEP = 16  # every 16th value estimates where an order statistic lies
_BLOCK_VALUES = 1 << 15  # pixels per block of rows in prior_to_x4's elementwise steps (stays in L2)
_SAMPLE_MARGIN = 64  # sample ranks of slack around the estimate (a miss only costs a full partition)


@dataclass(frozen=True)
class PriorStats:
    """Clip-global normalisation of spec 4.2 steps 2-3."""

    scale: np.float32  # s: mean valid prior depth, >= 1e-3
    lo: np.float32  # min over frames of the 1 % disparity quantile
    hi: np.float32  # max over frames of the 99 % disparity quantile


def _mean(x: np.ndarray, axis: tuple[int, ...] | None = None) -> np.ndarray | np.float32:
    return np.mean(x, axis=axis, dtype=np.float64).astype(np.float32)


def _disparity(points_z: np.ndarray, valid: np.ndarray, scale: np.float32) -> np.ndarray:
    z = points_z / scale
    return ((np.float32(1.0) / np.maximum(z, np.float32(1e-3))) * valid).astype(np.float32)


def _rank(q: float, n: int) -> int:
    """The rank torch.quantile(..., interpolation="nearest") picks (resample.quantile_nearest)."""
    return int(np.rint(np.float32(q) * np.float32(n - 1)))


def kth_smallest(x: np.ndarray, k: int) -> np.float32:
    """``np.partition(x, k)[k]`` for a 1-D float32 array without NaN, partitioning only a few candidates.

    The k-th value is bracketed by order statistics of a strided sample; the values inside the bracket
    are partitioned (exact: the values below the bracket are counted). A bracket that misses falls back
    to the full partition.
    """
    n = x.size
    if n < 64 * _SAMPLE_STEP:
        return np.partition(x, k)[k]
    sample = x[::_SAMPLE_STEP]
    ks = k // _SAMPLE_STEP
    r0, r1 = max(ks - _SAMPLE_MARGIN, 0), min(ks + _SAMPLE_MARGIN, sample.size - 1)
    part = np.partition(sample, (r0, r1))
    a, b = part[r0], part[r1]
    if r0 == 0:  # bracket open below: everything <= b
        below, cand = 0, x[x <= b]
    elif r1 == sample.size - 1:  # open above: everything >= a
        sel = x >= a
        cand = x[sel]
        below = n - cand.size
    else:
        sel = x >= a
        sel &= x <= b
        cand = x[sel]
        below = int(np.count_nonzero(x < a))
    j = k - below
    if 0 <= j < cand.size:
        return np.partition(cand, j)[j]
    return np.partition(x, k)[k]


def _frame_quantiles(z_valid: np.ndarray, n: int) -> tuple[np.float32, np.float32]:
    """Spec 4.2 step 3 for one frame: the nearest-rank Q_LO / Q_HI quantiles of its disparity map.

    ``z_valid`` = prior depth / s at the valid pixels (finite), ``n`` = pixels in the frame. The invalid
    pixels' disparity is exactly 0 and the valid ones' is g(z) = 1/max(z, 1e-3) > 0, weakly decreasing in
    z, so the k-th smallest disparity is 0 for k below the invalid count and otherwise g of an order
    statistic of the valid depths.
    """
    n_inv = n - z_valid.size
    out = []
    for q in (Q_LO, Q_HI):
        j = _rank(q, n) - n_inv  # rank among the valid disparities (ascending)
        if j < 0:
            out.append(np.float32(0.0))
            continue
        z = kth_smallest(z_valid, z_valid.size - 1 - j)  # the j-th smallest g is g of the j-th largest z
        out.append((np.float32(1.0) / np.maximum(z, np.float32(1e-3))).astype(np.float32))
    return out[0], out[1]


def compute_stats(points: np.ndarray, mask: np.ndarray) -> PriorStats:
    """Spec 4.2 steps 2-3 over all frames and pixels given: s, then lo/hi of the normalised disparity."""
    points = np.asarray(points, np.float32)
    mask = np.asarray(mask, bool)
    t = points.shape[0]
    n = mask[0].size
    # s = mean(z * valid) / (mean(valid) + 1e-8); the products are whole per frame, summed in float64
    num = np.float64(0.0)
    buf = np.empty(mask.shape[1:], np.float32)
    for i in range(t):
        np.multiply(points[i, ..., 2], mask[i], out=buf)
        num += np.add.reduce(buf, axis=None, dtype=np.float64)
    valid = np.float32(np.count_nonzero(mask) / mask.size)
    s = np.float32(num / points[..., 2].size) / (valid + np.float32(1e-8))
    s = np.float32(max(s, np.float32(1e-3)))
    if not np.isfinite(s):  # a NaN/inf depth: the literal formulas decide what comes out
        return _compute_stats_literal(points, mask, s)
    lo, hi = [], []
    for i in range(t):
        zv = points[i, ..., 2][mask[i]]
        np.divide(zv, s, out=zv)
        a, b = _frame_quantiles(zv, n)
        lo.append(a)
        hi.append(b)
    return PriorStats(scale=s, lo=np.float32(min(lo)), hi=np.float32(max(hi)))


def _compute_stats_literal(points: np.ndarray, mask: np.ndarray, s: np.float32) -> PriorStats:
    d = _disparity(points[..., 2], mask.astype(np.float32), s)
    lo = min(resample.quantile_nearest(d[t], Q_LO) for t in range(d.shape[0]))
    hi = max(resample.quantile_nearest(d[t], Q_HI) for t in range(d.shape[0]))
    return PriorStats(scale=s, lo=np.float32(lo), hi=np.float32(hi))


class StatsAccumulator:
    """:func:`compute_stats` fed one frame at a time, with the same float32 result and no frame kept.

    Per frame it keeps the float64 sum of z * valid, the valid count and the two order statistics of the
    valid depths that the 1 %/99 % disparity quantiles pick (their ranks depend only on the frame's valid
    count). Dividing by s > 0 is monotone in floating point, so the k-th smallest of z / s is the k-th
    smallest z divided by s: the quantiles follow once s is known. A non-finite s (a NaN/inf depth) takes
    the literal formulas, which need the frames again: ``finish`` asks ``reread(i)`` for them.
    """

    def __init__(self) -> None:
        self._num = np.float64(0.0)
        self._count = 0
        self._pixels = 0
        self._n = 0
        self._order: list[tuple[np.float32 | None, np.float32 | None]] = []

    def add(self, z: np.ndarray, valid: np.ndarray) -> None:
        """One frame: z (H,W) float32 prior depth, valid (H,W) bool."""
        z = np.asarray(z, np.float32)
        valid = np.asarray(valid, bool)
        n = valid.size
        if self._n and n != self._n:
            raise ValueError(f"prior frame has {n} pixels, the clip started with {self._n}")
        self._n = n
        buf = np.multiply(z, valid, dtype=np.float32)
        self._num += np.add.reduce(buf, axis=None, dtype=np.float64)
        nv = int(np.count_nonzero(valid))
        self._count += nv
        self._pixels += n
        lost = bool(np.isnan(self._num) or self._num == np.inf)  # s will be non-finite: literal path
        zv = z[valid]
        order: list[np.float32 | None] = []
        for q in (Q_LO, Q_HI):
            j = _rank(q, n) - (n - nv)
            order.append(None if j < 0 or lost else kth_smallest(zv, zv.size - 1 - j))
        self._order.append((order[0], order[1]))

    @property
    def frames(self) -> int:
        return len(self._order)

    def finish(self, reread: Callable[[int], tuple[np.ndarray, np.ndarray]] | None = None) -> PriorStats:
        if not self._order:
            raise ValueError("no prior frames")
        s = np.float32(self._num / self._pixels) / (np.float32(self._count / self._pixels) + np.float32(1e-8))
        s = np.float32(max(s, np.float32(1e-3)))
        if not np.isfinite(s):
            if reread is None:
                raise ValueError("the prior has non-finite depths: the statistics need the frames again")
            lo_l, hi_l = [], []
            for i in range(len(self._order)):
                z, valid = reread(i)
                d = _disparity(np.asarray(z, np.float32), np.asarray(valid, bool).astype(np.float32), s)
                lo_l.append(resample.quantile_nearest(d, Q_LO))
                hi_l.append(resample.quantile_nearest(d, Q_HI))
            return PriorStats(scale=s, lo=np.float32(min(lo_l)), hi=np.float32(max(hi_l)))
        lo, hi = [], []
        for a, b in self._order:
            qs = []
            for zq in (a, b):
                if zq is None:
                    qs.append(np.float32(0.0))
                else:
                    zs = np.divide(np.float32(zq), s, dtype=np.float32)
                    qs.append((np.float32(1.0) / np.maximum(zs, np.float32(1e-3))).astype(np.float32))
            lo.append(qs[0])
            hi.append(qs[1])
        return PriorStats(scale=s, lo=np.float32(min(lo)), hi=np.float32(max(hi)))


def prior_to_x4(
    points: np.ndarray,
    mask: np.ndarray,
    size: tuple[int, int],
    stats: PriorStats,
    nan_guard: bool = False,
) -> np.ndarray:
    """(T,H0,W0,3) f32 points + (T,H0,W0) bool mask -> x4 (T,4,H,W) f32 = [fnorm, zlog, disparity, mask+-1].

    ``size`` = processing (H, W); resizes are bilinear (align_corners off), log-depth through
    ``ln(bilinear(exp(min(zlog, 10))))`` (spec 4.2 step 7).
    """
    t, h0, w0, _ = points.shape
    if mask.shape != (t, h0, w0):
        raise ValueError(f"prior mask shape {mask.shape} does not match prior points {points.shape}")
    if h0 % 2 or w0 % 2:
        raise ValueError(f"prior size {h0}x{w0} must be even in both dimensions (spec 7.7)")
    points = np.asarray(points, np.float32)
    mask = np.asarray(mask, bool)
    return prior_to_x4_frames(lambda i: (points[i], mask[i]), t, (h0, w0), size, stats, nan_guard)


def prior_to_x4_frames(
    frame: Callable[[int], tuple[np.ndarray, np.ndarray]],
    t: int,
    src: tuple[int, int],
    size: tuple[int, int],
    stats: PriorStats,
    nan_guard: bool = False,
) -> np.ndarray:
    """:func:`prior_to_x4` on ``t`` frames fetched one at a time: ``frame(i)`` = (points (H0,W0,3) f32, mask
    (H0,W0) bool) of frame i, so the source-size priors need not be in memory together (offline runs read
    them back from a spill file, daemon/offline/spill.py). Same float32 values as :func:`prior_to_x4`.
    One frame's maps at the source size are held at a time: each frame is resized into x4 before the next
    is fetched (without a resize, the maps are x4's own channels)."""
    h0, w0 = src
    h, w = int(size[0]), int(size[1])
    resize = (h0, w0) != (h, w)
    x4 = np.empty((t, 4, h, w), np.float32)
    gx, gy = resample.normalized_grid(h0, w0)
    gy = gy[:, None]
    den = stats.hi - stats.lo + _F(1e-4)
    # zlog (or its exp), disparity, mask+-1 of one frame at the prior size
    frame_maps = np.empty((3, h0, w0), np.float32) if resize else None
    rb = max(1, _BLOCK_VALUES // w0)
    sc = _BlockScratch(min(rb, h0), w0)
    px = np.empty((h0, w0), np.float32)
    py = np.empty((h0, w0), np.float32)
    tmp = np.empty((h0, w0), np.float32)
    focal = np.empty((t, 2), np.float32)
    for i in range(t):
        pts, valid = frame(i)
        pts = np.asarray(pts, np.float32)
        valid = np.asarray(valid, bool)
        maps = frame_maps if frame_maps is not None else x4[i, 1:]
        zlog, d, m = maps[0], maps[1], maps[2]
        for r0 in range(0, h0, rb):  # the elementwise steps on blocks of rows that stay in cache
            r1 = min(r0 + rb, h0)
            _frame_block(pts[r0:r1], valid[r0:r1], stats, den, nan_guard, resize,
                         zlog[r0:r1], d[r0:r1], m[r0:r1], px[r0:r1], py[r0:r1], sc)
        # step 5: principal point c and inverse focals in grid units (float64 sums of contiguous
        # maps; an interleaved (H, W, 2) mean was 100x slower in numpy)
        np.subtract(px, _mean(px), out=tmp)
        np.divide(tmp, gx, out=tmp)
        focal[i, 0] = _mean(tmp)
        np.subtract(py, _mean(py), out=tmp)
        np.divide(tmp, gy, out=tmp)
        focal[i, 1] = _mean(tmp)
        if frame_maps is not None:  # step 7: bilinear to the processing size, straight into x4 (channels 1-3)
            for ch in range(3):
                resample.resize_into(frame_maps[ch], x4[i, 1 + ch])
            with np.errstate(invalid="ignore", divide="ignore"):
                np.log(x4[i, 1], out=x4[i, 1])
    if resize:
        x4[:, 0] = _fnorm_resized(focal, (h0, w0), (h, w))
    else:
        x4[:, 0] = np.sqrt(focal[:, 0] ** 2 + focal[:, 1] ** 2)[:, None, None]
    return x4


class _BlockScratch:
    """Buffers of :func:`_frame_block` for blocks of up to ``rows`` rows of width ``w``."""

    def __init__(self, rows: int, w: int) -> None:
        self.p = np.empty((rows, w, 3), np.float32)
        self.zp = np.empty((rows, w), np.float32)
        self.vf = np.empty((rows, w), np.float32)
        self.keep = np.empty((rows, w), np.int32)


def _frame_block(pts: np.ndarray, valid: np.ndarray, stats: PriorStats, den: np.float32, nan_guard: bool,
                 exp_zlog: bool, zlog: np.ndarray, d: np.ndarray, m: np.ndarray, px: np.ndarray,
                 py: np.ndarray, sc: _BlockScratch) -> None:
    """Spec 4.2 steps 1-4 on a block of rows of one frame (pts (r, W0, 3), valid (r, W0)): the mask in
    {-1, 1}, the normalised disparity, xy / z and the log-depth (its exp when it is resized next), each
    written into its map's rows.

    The same float32 operations as the whole-frame formulas: ``valid`` enters as 0.0 / 1.0 (what numpy
    casts the bool to), the clip is max-then-min, and the NaN guard's ``where(valid, zlog, 0) * valid``
    is a bit mask (zlog or +0)."""
    r = pts.shape[0]
    p, zp, vf = sc.p[:r], sc.zp[:r], sc.vf[:r]
    np.copyto(vf, valid)
    np.divide(pts, stats.scale, out=p)  # step 2: p = points / s (the three channels in one pass)
    # step 1: mask in {-1, 1}
    np.multiply(vf, _F(2.0), out=m)
    np.subtract(m, _F(1.0), out=m)
    # step 3: disparity 1/max(z/s, 1e-3) * valid, normalised to [-1, 1]
    np.copyto(zp, p[..., 2])
    np.maximum(zp, _F(1e-3), out=d)
    np.divide(_F(1.0), d, out=d)
    np.multiply(d, vf, out=d)
    np.subtract(d, stats.lo, out=d)
    np.divide(d, den, out=d)
    np.maximum(d, _F(0.0), out=d)
    np.minimum(d, _F(1.0), out=d)
    np.multiply(d, _F(2.0), out=d)
    np.subtract(d, _F(1.0), out=d)
    # step 4: xy = p_xy / (p_z + 1e-7), zlog = ln(p_z + 1e-7) * valid
    np.add(zp, _F(1e-7), out=zp)
    np.divide(p[..., 0], zp, out=px)
    np.divide(p[..., 1], zp, out=py)
    with np.errstate(invalid="ignore", divide="ignore"):
        np.log(zp, out=zlog)
    if nan_guard:
        keep = sc.keep[:r]
        np.right_shift(m.view(np.int32), 31, out=keep)  # -1 where m = -1.0 (invalid), else 0
        np.invert(keep, out=keep)
        np.bitwise_and(zlog.view(np.int32), keep, out=zlog.view(np.int32))
    else:
        np.multiply(zlog, vf, out=zlog)
    if exp_zlog:
        np.minimum(zlog, _F(10.0), out=zlog)
        with np.errstate(over="ignore", invalid="ignore"):
            np.exp(zlog, out=zlog)


def _fnorm_resized(focal: np.ndarray, src: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Channel 0 after step 7: sqrt(fx^2 + fy^2) of the bilinearly resized, per-frame constant focal maps.

    Resizing a constant map gives a value that depends on the output row (vertical weights, a handful of
    distinct values) and on the output column, so the resize runs on one column and on the distinct rows
    only; the result is the same float32 map as resizing the full constant maps
    (tests/pipeline/test_glue_fast.py).
    """
    t = focal.shape[0]
    (h0, w0), (h, w) = src, size
    cols = np.ascontiguousarray(np.broadcast_to(focal.reshape(t * 2, 1, 1), (t * 2, h0, 8)))
    rows = resample.resize_rows(cols, h, "bilinear")  # (2T, H, 8): every column the same
    if not (rows == rows[..., :1]).all():  # a BLAS that treats columns differently: do it in full
        full = np.broadcast_to(focal.reshape(t, 2, 1, 1), (t, 2, h0, w0))
        r = resample.resize(np.ascontiguousarray(full), size, "bilinear")
        return np.sqrt(r[:, 0] ** 2 + r[:, 1] ** 2)
    rv = rows[..., 0].reshape(t, 2, h)
    out = np.empty((t, h, w), np.float32)
    for i in range(t):
        pairs, inv = np.unique(rv[i].T, axis=0, return_inverse=True)  # distinct (fx, fy) per output row
        line = np.ascontiguousarray(np.broadcast_to(pairs.T[:, :, None], (2, pairs.shape[0], w0)))
        fr = resample.resize_cols(line, w, "bilinear")  # (2, k, W)
        table = np.sqrt(fr[0] ** 2 + fr[1] ** 2)
        out[i] = table[inv.reshape(-1)]
    return out
