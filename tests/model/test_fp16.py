"""daemon.model.fp16 against numpy's casts: every fp16 bit pattern, float32 values around every fp16 value
and every rounding midpoint, a sweep of float32 bit patterns (NaN, inf, overflow, subnormals)."""

from __future__ import annotations

import numpy as np
import pytest

from daemon.model import fp16

ALL16 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    u = np.uint16 if a.dtype == np.float16 else np.uint32
    return bool(((a.view(u) == b.view(u)) | (np.isnan(a) & np.isnan(b))).all())


def _float32_cases() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    fin = ALL16[np.isfinite(ALL16)].astype(np.float32)
    pos = np.unique(np.abs(fin).astype(np.float64))
    mid = ((pos[1:] + pos[:-1]) / 2).astype(np.float32)  # exact ties (ties to even)
    sweep = np.arange(0, 2**31, 997, dtype=np.uint32)
    return [
        fin, np.nextafter(fin, np.float32(np.inf)), np.nextafter(fin, -np.float32(np.inf)), mid, -mid,
        *(rng.standard_normal(200_000).astype(np.float32) * np.float32(s) for s in (1e-7, 1e-3, 1, 3e4, 7e4)),
        sweep.view(np.float32), (sweep | np.uint32(0x80000000)).view(np.float32),
        np.array([0.0, -0.0, 65504.0, 65519.0, 65520.0, -65520.0, 32768.0, np.inf, -np.inf, np.nan],
                 np.float32),
    ]


def test_to_f32_every_fp16() -> None:
    assert _bits_equal(fp16.to_f32(ALL16), ALL16.astype(np.float32))


@pytest.mark.filterwarnings("ignore:overflow")
def test_to_f16_and_round_equal_the_cast() -> None:
    for x in _float32_cases():
        with np.errstate(all="ignore"):
            want = x.astype(np.float16)
        assert _bits_equal(fp16.to_f16(x), want)
        assert _bits_equal(fp16.round_to_fp16(x), want.astype(np.float32))


def test_shapes_and_chunk_edges() -> None:
    rng = np.random.default_rng(2)
    for n in (0, 1, fp16.CHUNK - 1, fp16.CHUNK, fp16.CHUNK + 1, 3 * fp16.CHUNK + 5):
        x = rng.standard_normal((n, 1)).astype(np.float32)
        assert _bits_equal(fp16.to_f16(x), x.astype(np.float16))
        assert _bits_equal(fp16.to_f32(x.astype(np.float16)), x.astype(np.float16).astype(np.float32))
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)[:, ::2]  # not contiguous
    assert _bits_equal(fp16.to_f16(x), x.astype(np.float16))


def test_signed_unit_equals_fp16_arithmetic() -> None:
    every = np.arange(0, 0x3C01, dtype=np.uint16).view(np.float16).astype(np.float32)  # all of [0, 1]
    rng = np.random.default_rng(3)
    cases = [every, np.nextafter(every, np.float32(2)), np.nextafter(every, np.float32(-1)),
             rng.random(500_000, dtype=np.float32),
             np.array([0.0, -0.0, 1.0, np.nan, 2.0, -0.5, 7e4], np.float32)]
    for v in cases:
        with np.errstate(all="ignore"):
            h = v.astype(np.float16)
            want = (h * np.float16(2.0) - np.float16(1.0)).astype(np.float32)
        assert _bits_equal(fp16.signed_unit_fp16(v), want)


def test_to_f16_under_flush_to_zero() -> None:
    """Jittor's -Ofast CPU kernels set FTZ/DAZ for the thread that loads them (the daemon's main thread):
    the conversions must not pass through float32 subnormals (the first version's y * 2^-112 did: fp16
    subnormal results became 0, found by test order)."""
    from daemon.jittor_env import import_jittor
    from daemon.model.attention import attention

    jt = import_jittor()
    rng = np.random.default_rng(4)
    q = rng.standard_normal((6, 37, 64)).astype(np.float32)
    k = rng.standard_normal((6, 29, 64)).astype(np.float32)
    attention(jt.array(q), jt.array(k), jt.array(k), max_bytes=12876).numpy()  # loads such a kernel
    x = np.concatenate([rng.standard_normal(100_000).astype(np.float32) * np.float32(1e-6),
                        ALL16[np.isfinite(ALL16)].astype(np.float32)])
    assert _bits_equal(fp16.to_f16(x), x.astype(np.float16))
    assert _bits_equal(fp16.round_to_fp16(x), x.astype(np.float16).astype(np.float32))
    assert _bits_equal(fp16.to_f32(ALL16), ALL16.astype(np.float32))
