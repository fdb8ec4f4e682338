"""Fused (flash-style) scaled dot-product attention for Jittor on CUDA, through ``jt.code``.

Computes the same function as :func:`daemon.model.attention.attention` (spec 3.7: softmax(Q K^T * scale) V,
no mask, no dropout) without materialising the ``N x Lq x Lk`` score matrix: one CUDA thread owns one
query row (its scaled q and its fp32 accumulator live in registers), K/V tiles of ``BLOCK_N`` keys are
staged in shared memory (as fp32) and shared by the ``BLOCK_M`` rows of a block, and the softmax is the
online (running max / running sum) form of FlashAttention (Dao et al. 2022, Algorithm 1), rescaling the
accumulator once per ``SUB`` keys. Inputs fp16 or bf16 (fp32 is instantiated too, for the CPU harness),
all arithmetic fp32, output in the input dtype. Memory is O(N * Lq * dv) for any sequence length.

Head dims: the head dim is a compile-time constant (one kernel per (dtype, d, dv); Jittor caches each),
so every ``d, dv <= MAX_HEAD_DIM`` works: 64 for the UNet (spatial and temporal attention), 80 for CLIP.
Larger heads (the point-map VAE's single 512-channel mid-block head) stay on the plain path because q and
the accumulator would no longer fit in registers.

This is CUDA-core FMA code, not tensor-core MMA: it removes the score-matrix traffic that makes Jittor's
plain attention 4x slower than torch (../shared/notes/jittor-cuda13.md), not the last factor a
tensor-core kernel would give. The kernel source is also compiled standalone by the tests (nvcc -c for
sm_90, and g++ with a thread-per-CUDA-thread emulation that executes it on the CPU).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from daemon.jittor_env import import_jittor

log = logging.getLogger(__name__)

Var = Any  # jittor.Var

BLOCK_M = 128  # query rows (threads) per block
BLOCK_N = 32  # keys per shared-memory tile
SUB = 16  # keys per online-softmax rescale
MAX_HEAD_DIM = 96  # q + accumulator registers per thread = d + dv (+ SUB scores)
_LOG2E = 1.4426950408889634

# Set GEOMETRYD_FUSED_ATTN=0 to force the plain path (e.g. to compare on a GPU).
_enabled: bool = os.environ.get("GEOMETRYD_FUSED_ATTN", "1") not in ("0", "false", "no")

_CTYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float"}

# Device code. Only CUDA built-ins the CPU harness can emulate are used (threadIdx, blockIdx, __shared__,
# __align__, __syncthreads, float4, exp2f, fmaxf, fmaf); the fp16/bf16 conversions are guarded by __CUDACC__.
KERNEL_SOURCE = r"""
#include <math.h>
#ifdef __CUDACC__
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#endif

namespace gd_attn {

template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
#ifdef __CUDACC__
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
#endif

// q [N, Lq, D], k [N, Lk, D], v [N, Lk, DV], o [N, Lq, DV], all contiguous.
// grid = (ceil(Lq / BM), N), block = BM threads; thread t of block (bx, n) owns query row bx * BM + t of n.
// scale_log2 = scale * log2(e): scores are kept in the log2 domain so exp2f replaces expf.
template <typename T, int D, int DV, int BM, int BN, int SUB>
__global__ void __launch_bounds__(BM) flash_fwd(const T* __restrict__ q, const T* __restrict__ k,
                                                const T* __restrict__ v, T* __restrict__ o,
                                                int Lq, int Lk, float scale_log2) {
    static_assert(D % 4 == 0 && DV % 4 == 0, "head dims must be multiples of 4 (float4 shared loads)");
    __shared__ __align__(16) float ks[BN][D];
    __shared__ __align__(16) float vs[BN][DV];
    const int n = blockIdx.y;
    const int row = blockIdx.x * BM + threadIdx.x;
    const bool active = row < Lq;
    const T* qp = q + ((size_t)n * Lq + (active ? row : 0)) * D;
    const T* kb = k + (size_t)n * Lk * D;
    const T* vb = v + (size_t)n * Lk * DV;

    float qr[D];
    float acc[DV];
#pragma unroll
    for (int d = 0; d < D; ++d) qr[d] = to_f<T>(qp[d]) * scale_log2;
#pragma unroll
    for (int d = 0; d < DV; ++d) acc[d] = 0.f;
    float m = -INFINITY;  // running max (log2 domain)
    float l = 0.f;        // running sum of exp2(s - m)

    for (int t0 = 0; t0 < Lk; t0 += BN) {
        const int nk = Lk - t0 < BN ? Lk - t0 : BN;
        __syncthreads();  // previous tile fully consumed
        for (int i = threadIdx.x; i < BN * D; i += BM) {
            const int r = i / D, c = i % D;
            ks[r][c] = r < nk ? to_f<T>(kb[(size_t)(t0 + r) * D + c]) : 0.f;
        }
        for (int i = threadIdx.x; i < BN * DV; i += BM) {
            const int r = i / DV, c = i % DV;
            vs[r][c] = r < nk ? to_f<T>(vb[(size_t)(t0 + r) * DV + c]) : 0.f;
        }
        __syncthreads();
        for (int j0 = 0; j0 < nk; j0 += SUB) {
            float s[SUB];
            float mt = m;
#pragma unroll
            for (int jj = 0; jj < SUB; ++jj) {
                const int j = j0 + jj;
                float dot = 0.f;
                if (j < nk) {
#pragma unroll
                    for (int d = 0; d < D; d += 4) {  // one 16-byte broadcast shared load per 4 FMAs
                        const float4 kk = *reinterpret_cast<const float4*>(&ks[j][d]);
                        dot = fmaf(qr[d], kk.x, dot);
                        dot = fmaf(qr[d + 1], kk.y, dot);
                        dot = fmaf(qr[d + 2], kk.z, dot);
                        dot = fmaf(qr[d + 3], kk.w, dot);
                    }
                } else {
                    dot = -INFINITY;
                }
                s[jj] = dot;
                mt = fmaxf(mt, dot);
            }
            // mt is finite: key j0 < nk always exists. exp2f(-inf) = 0 on the first sub-tile.
            const float corr = exp2f(m - mt);
            l *= corr;
#pragma unroll
            for (int d = 0; d < DV; ++d) acc[d] *= corr;
#pragma unroll
            for (int jj = 0; jj < SUB; ++jj) {
                const int j = j0 + jj;
                if (j < nk) {
                    const float p = exp2f(s[jj] - mt);
                    l += p;
#pragma unroll
                    for (int d = 0; d < DV; d += 4) {
                        const float4 vv = *reinterpret_cast<const float4*>(&vs[j][d]);
                        acc[d] = fmaf(p, vv.x, acc[d]);
                        acc[d + 1] = fmaf(p, vv.y, acc[d + 1]);
                        acc[d + 2] = fmaf(p, vv.z, acc[d + 2]);
                        acc[d + 3] = fmaf(p, vv.w, acc[d + 3]);
                    }
                }
            }
            m = mt;
        }
    }
    if (active) {
        const float inv = 1.f / l;
        T* op = o + ((size_t)n * Lq + row) * DV;
#pragma unroll
        for (int d = 0; d < DV; ++d) op[d] = from_f<T>(acc[d] * inv);
    }
}

}  // namespace gd_attn
"""  # noqa: E501 (two CUDA template lines; kernel source edits would recompile it)


def set_enabled(flag: bool) -> None:
    """Turn the fused kernel on or off at run time (the plain path is used while off)."""
    global _enabled
    _enabled = bool(flag)


def is_enabled() -> bool:
    return _enabled


def supports(q: Var, k: Var, v: Var) -> bool:
    """True when the fused kernel handles these inputs: CUDA on, kernel enabled, fp16/bf16, head dims
    within :data:`MAX_HEAD_DIM` and multiples of 4 (float4 shared-memory loads), q/k/v of one dtype."""
    if not _enabled:
        return False

    jt = import_jittor()
    if not jt.flags.use_cuda:
        return False
    dt = str(v.dtype)
    if dt not in ("float16", "bfloat16") or str(q.dtype) != dt or str(k.dtype) != dt:
        return False
    d, dv = q.shape[-1], v.shape[-1]
    return d <= MAX_HEAD_DIM and dv <= MAX_HEAD_DIM and d % 4 == 0 and dv % 4 == 0


def launch_source(ctype: str, d: int, dv: int, scale: float) -> str:
    """The ``cuda_src`` body of the jt.code op (in0 = q, in1 = k, in2 = v, out0 = o)."""
    scale_log2 = repr(float(scale) * _LOG2E)
    return (
        f"const int gd_lq = in0_shape1, gd_lk = in1_shape1, gd_n = in0_shape0;\n"
        f"if (gd_n > 0 && gd_lq > 0) {{\n"
        f"  dim3 gd_grid((gd_lq + {BLOCK_M} - 1) / {BLOCK_M}, gd_n);\n"
        f"  gd_attn::flash_fwd<{ctype}, {d}, {dv}, {BLOCK_M}, {BLOCK_N}, {SUB}><<<gd_grid, {BLOCK_M}>>>(\n"
        f"      ({ctype}*)in0_p, ({ctype}*)in1_p, ({ctype}*)in2_p, "
        f"({ctype}*)out0_p, gd_lq, gd_lk, {scale_log2}f);\n"
        f"}}\n"
    )


def fused_attention(q: Var, k: Var, v: Var, scale: float | None = None) -> Var:
    """softmax(q k^T * scale) v for q [N,Lq,d], k [N,Lk,d], v [N,Lk,dv] -> [N,Lq,dv] on CUDA, fused.

    Caller checks :func:`supports` first (the op has no CPU source). Lk must be >= 1.
    """
    jt = import_jittor()
    n, lq, d = q.shape
    lk, dv = k.shape[1], v.shape[2]
    if k.shape != (n, lk, d) or v.shape[:2] != (n, lk) or lk < 1:
        raise ValueError(f"fused attention: incompatible shapes q {q.shape}, k {k.shape}, v {v.shape}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    ctype = _CTYPES[str(v.dtype)]
    return jt.code((n, lq, dv), v.dtype, [q, k, v], cuda_header=KERNEL_SOURCE,
                   cuda_src=launch_source(ctype, d, dv, scale))
