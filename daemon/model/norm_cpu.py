"""GroupNorm (optionally fused with SiLU) and LayerNorm as Jittor CPU kernels with OpenMP.

Jittor's CPU kernels run on one thread and the graph version of GroupNorm takes three passes over the
activations plus one for the SiLU that usually follows; this kernel reads the input twice (statistics) and
writes the output once, on all cores (OpenMP over the N*G groups). Statistics are accumulated in double,
two-pass (mean, then the centred sum of squares), so -Ofast's reassociation of the sums cannot hurt them,
and every value is centred in double before it is scaled.
fp32 only; the caller casts.
"""

from __future__ import annotations

from typing import Any

from daemon.jittor_env import import_jittor

Var = Any  # jittor.Var

_SRC = """
const int N = in0_shape0, C = in0_shape1, S = in0_shape2;
const int G = {groups};
const int CG = C / G;
const long long L = (long long)CG * S;
const float* x = in0_p;
const float* w = in1_p;
const float* b = in2_p;
float* y = out0_p;
#pragma omp parallel for schedule(dynamic, 1)
for (int ng = 0; ng < N * G; ng++) {{
    const int n = ng / G, g = ng % G;
    const long long base = ((long long)n * C + (long long)g * CG) * S;
    const float* xs = x + base;
    float* ys = y + base;
    double sum = 0.0;
    #pragma omp simd reduction(+:sum)
    for (long long i = 0; i < L; i++) sum += xs[i];
    const double mean = sum / (double)L;
    double ss = 0.0;
    #pragma omp simd reduction(+:ss)
    for (long long i = 0; i < L; i++) {{ const double d = xs[i] - mean; ss += d * d; }}
    const double rstd = 1.0 / sqrt(ss / (double)L + (double){eps!r});
    for (int cc = 0; cc < CG; cc++) {{
        const int c = g * CG + cc;
        const double a = rstd * (double)w[c];
        const float sh = b[c];
        const float* xr = xs + (long long)cc * S;
        float* yr = ys + (long long)cc * S;
        #pragma omp simd
        for (int i = 0; i < S; i++) {{
            // centre in double: x*a + (b - mean*a) in fp32 cancels badly for large-mean activations
            float v = (float)(((double)xr[i] - mean) * a) + sh;
            {act}
            yr[i] = v;
        }}
    }}
}}
"""

_LAYER_SRC = """
const long long M = in0_shape0;
const int C = in0_shape1;
const float* x = in0_p;
const float* w = in1_p;
const float* b = in2_p;
float* y = out0_p;
#pragma omp parallel for schedule(static)
for (long long r = 0; r < M; r++) {{
    const float* xr = x + r * C;
    float* yr = y + r * C;
    double sum = 0.0;
    for (int i = 0; i < C; i++) sum += xr[i];
    const double mean = sum / (double)C;
    double ss = 0.0;
    for (int i = 0; i < C; i++) {{ const double d = xr[i] - mean; ss += d * d; }}
    const double rstd = 1.0 / sqrt(ss / (double)C + (double){eps!r});
    for (int i = 0; i < C; i++) yr[i] = (float)(((double)xr[i] - mean) * rstd * (double)w[i]) + b[i];
}}
"""

_ACT = {"": "", "silu": "v = v / (1.0f + expf(-v));"}


def group_norm(x: Var, weight: Var, bias: Var, groups: int, eps: float, act: str = "") -> Var:
    """torch GroupNorm over [N, C, *] (statistics over C/G channels x all trailing dims), then ``act``
    ("" or "silu"); fp32 in and out."""
    jt = import_jittor()
    if act not in _ACT:
        raise ValueError(f"unknown activation {act!r}")
    shape = x.shape
    n, c = shape[0], shape[1]
    x3 = x.float32().reshape(n, c, -1)
    src = _SRC.format(groups=int(groups), eps=float(eps), act=_ACT[act])
    out = jt.code(x3.shape, "float32", [x3, weight.float32(), bias.float32()], cpu_src=src)
    return out.reshape(shape)


def layer_norm(x: Var, weight: Var, bias: Var, eps: float) -> Var:
    """torch LayerNorm over the last dim of [..., C] as one OpenMP kernel over the rows (statistics in
    double, two-pass); fp32 in and out."""
    jt = import_jittor()
    shape = x.shape
    x2 = x.float32().reshape(-1, shape[-1])
    out = jt.code(x2.shape, "float32", [x2, weight.float32(), bias.float32()],
                  cpu_src=_LAYER_SRC.format(eps=float(eps)))
    return out.reshape(shape)
