"""Exact float16 <-> float32 conversions and fp16 rounding on float32 bits, chunked to stay in cache.

numpy 1.26 converts float16 with scalar loops (~3-4 ns per element on the 2-core box, 10x a float32 pass);
torch uses F16C. These functions give the same bits as ``astype`` with a handful of vectorised float32 and
uint32 passes over chunks of :data:`CHUNK` elements (the chunk and its scratch buffers stay in L2):

* rounding to the fp16 grid: adding ``c = 1.5 * 2^(e + 13)`` (e = the binade of ``|x|``, at least -14, fp16's
  subnormal step) moves ``|x|`` into a float32 binade whose step is the fp16 step of ``x``, so ``|x| + c``
  is rounded once, to nearest even, exactly as the cast rounds; ``(|x| + c) - c`` is then exact (Sterbenz);
* fp16 bits from a value on the fp16 grid: ``y * 2^-112`` has the fp16 exponent and mantissa in its float32
  bits 13..27 (fp16 subnormals become float32 subnormals, exactly);
* float32 from fp16 bits: the reverse, ``(bits << 13)`` as float32 times ``2^112``.

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
_TO_F16 = np.float32(2.0**-112)
_TO_F32 = np.float32(2.0**112)


def _chunks(n: int, body: Callable[[int, int], None]) -> None:
    for s in range(0, n, CHUNK):
        body(s, min(s + CHUNK, n))


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
    ab = np.empty(min(CHUNK, flat.size), np.uint32)
    cb = np.empty_like(ab)

    def body(s: int, e: int) -> None:
        k = e - s
        if not _round_abs(xb[s:e], ab[:k], cb[:k], out[s:e]):
            out[s:e] = flat[s:e].astype(np.float16)
            return
        np.bitwise_and(xb[s:e], ~_ABS, out=ab[:k])  # the sign of x (a -0 result keeps it, like the cast)
        np.bitwise_or(ob[s:e], ab[:k], out=ob[s:e])

    _chunks(flat.size, body)
    return out.reshape(x.shape)


def to_f16(x: np.ndarray) -> np.ndarray:
    """``x.astype(np.float16)`` for float32 ``x`` (the same bits), a new C-contiguous array."""
    x = np.ascontiguousarray(x, np.float32)
    flat = x.reshape(-1)
    out = np.empty(flat.shape, np.float16)
    ou = out.view(np.uint16)
    xb = flat.view(np.uint32)
    m = min(CHUNK, flat.size)
    ab, cb, y = np.empty(m, np.uint32), np.empty(m, np.uint32), np.empty(m, np.float32)

    def body(s: int, e: int) -> None:
        k = e - s
        if not _round_abs(xb[s:e], ab[:k], cb[:k], y[:k]):
            out[s:e] = flat[s:e].astype(np.float16)
            return
        np.multiply(y[:k], _TO_F16, out=y[:k])
        yb = y[:k].view(np.uint32)
        np.right_shift(yb, np.uint32(13), out=yb)
        np.right_shift(xb[s:e], np.uint32(16), out=ab[:k])
        np.bitwise_and(ab[:k], _SIGN16, out=ab[:k])
        np.bitwise_or(yb, ab[:k], out=ou[s:e], casting="unsafe")

    _chunks(flat.size, body)
    return out.reshape(x.shape)


def to_f32(h: np.ndarray) -> np.ndarray:
    """``h.astype(np.float32)`` for float16 ``h`` (the same bits), a new C-contiguous array."""
    h = np.ascontiguousarray(h, np.float16)
    flat = h.view(np.uint16).reshape(-1)
    out = np.empty(flat.shape, np.float32)
    ob = out.view(np.uint32)
    sb = np.empty(min(CHUNK, flat.size), np.uint32)

    def body(s: int, e: int) -> None:
        k = e - s
        o = ob[s:e]
        np.bitwise_and(flat[s:e], np.uint16(0x7FFF), out=o, casting="unsafe")
        if o.max(initial=np.uint32(0)) >= 0x7C00:  # inf / NaN
            out[s:e] = h.reshape(-1)[s:e].astype(np.float32)
            return
        np.left_shift(o, np.uint32(13), out=o)
        np.multiply(out[s:e], _TO_F32, out=out[s:e])
        np.bitwise_and(flat[s:e], np.uint16(0x8000), out=sb[:k], casting="unsafe")
        np.left_shift(sb[:k], np.uint32(16), out=sb[:k])
        np.bitwise_or(o, sb[:k], out=o)

    _chunks(flat.size, body)
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
    m = min(CHUNK, flat.size)
    ab, cb = np.empty(m, np.uint32), np.empty(m, np.uint32)

    def body(s: int, e: int) -> None:
        k = e - s
        x, o = flat[s:e], out[s:e]
        if not (x.min(initial=np.float32(0.0)) >= 0 and x.max(initial=np.float32(0.0)) <= 1):
            w = round_to_fp16(x)
            np.multiply(w, np.float32(2.0), out=w)
            np.subtract(w, np.float32(1.0), out=w)
            o[:] = round_to_fp16(w)
            return
        _round_abs(xb[s:e], ab[:k], cb[:k], o)  # in [0, 1]: always the fast path; |x| = x
        np.multiply(o, np.float32(2.0), out=o)
        np.add(o, np.float32(6143.0), out=o)
        np.subtract(o, np.float32(6144.0), out=o)

    _chunks(flat.size, body)
    return out.reshape(v.shape)
