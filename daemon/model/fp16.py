"""Exact float16 <-> float32 conversions and fp16 rounding on float32 bits, chunked to stay in cache.

numpy 1.26 converts float16 with scalar loops (~3-4 ns per element on the 2-core box, 10x a float32 pass);
torch uses F16C. These functions give the same bits as ``astype`` with a handful of vectorised float32 and
uint32 passes over chunks of :data:`CHUNK` elements (the chunk and its scratch buffers stay in L2):

* rounding to the fp16 grid: adding ``c = 1.5 * 2^(e + 13)`` (e = the binade of ``|x|``, at least -14, fp16's
  subnormal step) moves ``|x|`` into a float32 binade whose step is the fp16 step of ``x``, so ``|x| + c``
  is rounded once, to nearest even, exactly as the cast rounds; ``(|x| + c) - c`` is then exact (Sterbenz);
* fp16 bits from a value on the fp16 grid: its float32 bits shifted by 13 and re-biased (fp16 subnormals:
  the mantissa bits of ``y + 0.5``), integer work that flush-to-zero cannot change;
* float32 from fp16 bits: a lookup in numpy's casts of all 65536 fp16 patterns.

Chunks with a value of magnitude >= 2^15 (or inf/NaN: the overflow rules) take numpy's cast, so every
input gives the cast's result. Checked against the casts on every fp16 bit pattern and on random and edge
float32 values (tests/model/test_fp16.py).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

CHUNK = 1 << 16  # elements per chunk (measured best of 2^13..2^17 on the 2-core box)
_ABS = np.uint32(0x7FFFFFFF)
_EXP = np.uint32(0x7F800000)
_C_BIAS = np.uint32(0x06C00000)  # adds 13 to the exponent and sets the top mantissa bit (x 1.5)
_FAST_MAX = np.uint32((127 + 15) << 23)  # exponent field of 2^15: at and above it, numpy's cast
_SIGN16 = np.uint32(0x8000)
_F32_SMALL = np.float32(0.75)  # 1.5 * 2^-1: the c of fp16's subnormal step 2^-24
_F16_MIN_NORMAL = np.float32(2.0**-14)
_REBIAS = np.uint32((127 - 15) << 10)  # float32 exponent bias -> fp16's, in bits >> 13
_HALF_BITS = np.uint32(0x3F000000)  # 0.5
# numpy's own cast of every fp16 bit pattern: float32 from fp16 is a lookup
_F32_OF_F16 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def _chunks(n: int, body: Callable[[int, int], None]) -> None:
    for s in range(0, n, CHUNK):
        body(s, min(s + CHUNK, n))


class _Scratch:
    """Chunk-sized uint32 scratch buffers (reused across chunks; allocating per chunk costs mmap calls)."""

    def __init__(self, n: int, k: int = 3) -> None:
        m = max(min(CHUNK, n), 1)
        self.bufs = [np.empty(m, np.uint32) for _ in range(k)]

    def get(self, i: int, k: int) -> np.ndarray:
        return self.bufs[i][:k]


def _round_abs(xb: np.ndarray, ab: np.ndarray, cb: np.ndarray, y: np.ndarray) -> bool:
    """|x| rounded to the fp16 grid into ``y`` (float32), from x's bits ``xb``; scratch ``ab``, ``cb``
    (uint32). False (y undefined) when the chunk needs the cast's overflow rules."""
    np.bitwise_and(xb, _ABS, out=ab)
    np.bitwise_and(ab, _EXP, out=cb)
    if cb.max(initial=np.uint32(0)) >= _FAST_MAX:
        return False
    cb += _C_BIAS
    c = cb.view(np.float32)
    np.maximum(c, _F32_SMALL, out=c)
    np.add(ab.view(np.float32), c, out=y)
    np.subtract(y, c, out=y)
    return True


def round_to_fp16(x: np.ndarray) -> np.ndarray:
    """float32 -> the float32 value of ``x.astype(float16)`` (round to nearest even, signed zeros, inf and
    NaN like the cast); a new array."""
    x = np.ascontiguousarray(x, np.float32)
    flat = x.reshape(-1)
    out = np.empty_like(flat)
    ob = out.view(np.uint32)
    xb = flat.view(np.uint32)
    sc = _Scratch(flat.size, 2)

    def body(s: int, e: int) -> None:
        k = e - s
        ab, cb = sc.get(0, k), sc.get(1, k)
        if not _round_abs(xb[s:e], ab, cb, out[s:e]):
            out[s:e] = flat[s:e].astype(np.float16)
            return
        np.bitwise_and(xb[s:e], ~_ABS, out=ab)  # the sign of x (a -0 result keeps it, like the cast)
        np.bitwise_or(ob[s:e], ab, out=ob[s:e])

    _chunks(flat.size, body)
    return out.reshape(x.shape)


def to_f16(x: np.ndarray) -> np.ndarray:
    """``x.astype(np.float16)`` for float32 ``x`` (the same bits), a new C-contiguous array."""
    x = np.ascontiguousarray(x, np.float32)
    flat = x.reshape(-1)
    out = np.empty(flat.shape, np.float16)
    ou = out.view(np.uint16)
    sc = _Scratch(flat.size, 2)
    y = np.empty(max(min(CHUNK, flat.size), 1), np.float32)

    def body(s: int, e: int) -> None:
        k = e - s
        _bits16_from_f32(flat[s:e], ou[s:e], sc.get(0, k), sc.get(1, k), y[:k])

    _chunks(flat.size, body)
    return out.reshape(x.shape)


def to_f32(h: np.ndarray) -> np.ndarray:
    """``h.astype(np.float32)`` for float16 ``h`` (the same bits), a new C-contiguous array."""
    h = np.ascontiguousarray(h, np.float16)
    flat = h.view(np.uint16).reshape(-1)
    out = np.empty(flat.shape, np.float32)
    _chunks(flat.size, lambda s, e: _f32_from_bits16(flat[s:e], out[s:e]))
    return out.reshape(h.shape)


def signed_unit_fp16(v: np.ndarray) -> np.ndarray:
    """float32 ``v`` -> float32 values of fp16 ``fp16(v) * 2 - 1`` (each op rounded to fp16), a new array.

    For ``a = fp16(v)`` in [0, 1], ``2a - 1`` is exact in float32 and on the 2^-11 grid wherever fp16's step
    is finer than 2^-11 (a >= 1/4), while fp16's step is 2^-11 on [-1, -1/2]: so fp16(2a - 1) is 2a - 1
    rounded to the 2^-11 grid, which ``(2a + 6143) - 6144`` does (one rounding in the binade of 6144, whose
    step is 2^-11). Chunks with values outside [0, 1] (or NaN) round twice in full.
    """
    v = np.ascontiguousarray(v, np.float32)
    flat = v.reshape(-1)
    out = np.empty_like(flat)
    xb = flat.view(np.uint32)
    sc = _Scratch(flat.size, 2)

    def body(s: int, e: int) -> None:
        k = e - s
        x, o = flat[s:e], out[s:e]
        if not (x.min(initial=np.float32(0.0)) >= 0 and x.max(initial=np.float32(0.0)) <= 1):
            w = round_to_fp16(x)
            np.multiply(w, np.float32(2.0), out=w)
            np.subtract(w, np.float32(1.0), out=w)
            o[:] = round_to_fp16(w)
            return
        # in [0, 1]: |x| = x and no overflow, so _round_abs's first and last checks are not needed
        cb = sc.get(1, k)
        np.bitwise_and(xb[s:e], _EXP, out=cb)
        cb += _C_BIAS
        c = cb.view(np.float32)
        np.maximum(c, _F32_SMALL, out=c)
        np.add(x, c, out=o)
        np.subtract(o, c, out=o)  # fp16(v)
        np.multiply(o, np.float32(2.0), out=o)
        np.add(o, np.float32(6143.0), out=o)
        np.subtract(o, np.float32(6144.0), out=o)

    _chunks(flat.size, body)
    return out.reshape(v.shape)


def _f32_from_bits16(hb: np.ndarray, out: np.ndarray, sb: np.ndarray | None = None) -> None:
    """fp16 bits ``hb`` (uint16 chunk) -> float32 ``out``: a lookup in the table of all 65536 casts (256 KiB,
    cached; 4x the bit arithmetic)."""
    np.take(_F32_OF_F16, hb, out=out, mode="clip")


def _bits16_from_f32(x: np.ndarray, out: np.ndarray, ab: np.ndarray, cb: np.ndarray, y: np.ndarray) -> None:
    """float32 chunk ``x`` -> fp16 bits ``out`` (uint16, the cast's); scratch ``ab``, ``cb`` (uint32),
    ``y`` (float32).

    No float32 subnormal is formed (Jittor's -Ofast kernels set flush-to-zero in the daemon): a normal
    fp16 value's bits are its float32 bits shifted and re-biased; the few subnormal ones (|y| < 2^-14) are
    read off ``y + 0.5``, whose low mantissa bits are y / 2^-24."""
    xb = x.view(np.uint32)
    if not _round_abs(xb, ab, cb, y):
        out[:] = x.astype(np.float16).view(np.uint16)
        return
    yb = y.view(np.uint32)
    small = y < _F16_MIN_NORMAL
    np.right_shift(yb, np.uint32(13), out=cb)
    np.subtract(cb, _REBIAS, out=cb)  # wraps for the small ones: replaced below
    if small.any():
        cb[small] = (y[small] + np.float32(0.5)).view(np.uint32) - _HALF_BITS
    np.right_shift(xb, np.uint32(16), out=ab)
    np.bitwise_and(ab, _SIGN16, out=ab)
    np.bitwise_or(cb, ab, out=out, casting="unsafe")


def _round_in_place(x: np.ndarray, ab: np.ndarray, cb: np.ndarray, y: np.ndarray) -> None:
    """float32 chunk ``x`` -> its fp16 value, in place."""
    xb = x.view(np.uint32)
    if not _round_abs(xb, ab, cb, y):
        x[:] = x.astype(np.float16)
        return
    np.bitwise_and(xb, ~_ABS, out=ab)
    yb = y.view(np.uint32)
    np.bitwise_or(yb, ab, out=xb)


Kernel = Callable[..., np.ndarray]
Rounder = Callable[[np.ndarray], None]


def fused_f16(kernel: Kernel, inputs: tuple[np.ndarray, ...], n_tmp: int = 1) -> np.ndarray:
    """One elementwise float32 computation on fp16 arrays, chunk by chunk: ``kernel(*f32_inputs, *tmps,
    rnd)`` gets each input chunk as float32 (exact), ``n_tmp`` float32 scratch chunks and ``rnd(a)``, which
    rounds a float32 chunk to its fp16 value in place; it returns the float32 result chunk (one of its
    buffers), stored rounded to fp16. All inputs have the shape of the first; returns a new fp16 array."""
    shape = inputs[0].shape
    flats = [np.ascontiguousarray(a, np.float16).view(np.uint16).reshape(-1) for a in inputs]
    if any(f.size != flats[0].size for f in flats):
        raise ValueError(f"fused_f16 needs inputs of one shape, got {[a.shape for a in inputs]}")
    n = flats[0].size
    out = np.empty(n, np.float16)
    ou = out.view(np.uint16)
    sc = _Scratch(n, 2)
    m = max(min(CHUNK, n), 1)
    f32 = [np.empty(m, np.float32) for _ in range(len(flats) + n_tmp + 1)]

    def body(s: int, e: int) -> None:
        k = e - s
        ab, cb = sc.get(0, k), sc.get(1, k)
        y = f32[-1][:k]

        def rnd(a: np.ndarray) -> None:
            _round_in_place(a, ab, cb, y)

        args = []
        for j, f in enumerate(flats):
            _f32_from_bits16(f[s:e], f32[j][:k])
            args.append(f32[j][:k])
        args += [f32[len(flats) + j][:k] for j in range(n_tmp)]
        res = kernel(*args, rnd)
        _bits16_from_f32(res, ou[s:e], ab, cb, y)

    _chunks(n, body)
    return out.reshape(shape)
