// torch.nn.Linear on the CPU for geometryd (fp32): y [M,N] = x [M,K] @ w[N,K]^T + b[N], one oneDNN sgemm
// with the bias as its initial C (no transposed weight copy, no separate bias pass).
#pragma once
#include "op.h"

namespace jittor {

struct CpuLinearOp : Op {
    Var *x, *w, *b, *y;
    CpuLinearOp(Var* x, Var* w, Var* b);

    const char* name() const override { return "cpu_linear"; }
    void infer_shape() override;
    DECLARE_jit_run;
};

}  // namespace jittor
