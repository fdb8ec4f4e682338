// 2-D convolution with bias on the CPU for geometryd (fp32, NCHW in and out, zero padding, top/left and
// bottom/right padding apart): one oneDNN convolution primitive with the bias inside it and, given a
// fourth input r, "+ r" as its sum post-op (a residual), so no separate pass adds either afterwards.
// inputs: {x [N,Ci,H,W], w [Co,Ci,kh,kw], b [Co]} or {x, w, b, r [N,Co,Ho,Wo]}.
#pragma once
#include "op.h"

namespace jittor {

struct CpuConvOp : Op {
    vector<Var*> ins;
    Var* y;
    int stride, pad_top, pad_left, pad_bottom, pad_right;
    CpuConvOp(vector<Var*>&& inputs, int stride, int pad_top, int pad_left, int pad_bottom, int pad_right);

    const char* name() const override { return "cpu_conv"; }
    void infer_shape() override;
    DECLARE_jit_run;
};

}  // namespace jittor
