// Fused CPU attention for geometryd (fp32): softmax(q k^T * scale) v per head, on token-major layouts.
// q [N,Lq,H*d], k [N,Lk,H*d], v [N,Lk,H*dv] -> o [N,Lq,H*dv]; heads are read and written in place
// (no split/merge transposes), the scores of one block of query rows stay in cache.
#pragma once
#include "op.h"

namespace jittor {

struct CpuAttentionOp : Op {
    Var *q, *k, *v, *o;
    int heads;
    float64 scale;
    CpuAttentionOp(Var* q, Var* k, Var* v, int heads, float64 scale);

    const char* name() const override { return "cpu_attention"; }
    void infer_shape() override;
    DECLARE_jit_run;
};

}  // namespace jittor
