// See cpu_linear_op.h. The bias rows are written first (each row a copy of b), then sgemm adds x w^T
// with beta = 1: one pass over y, and the same sum as torch's addmm up to the order of the final add.
#include <dnnl.hpp>

#include <cstring>

#include "var.h"
#include "cpu_linear_op.h"

namespace jittor {

#ifndef JIT

CpuLinearOp::CpuLinearOp(Var* x, Var* w, Var* b) : x(x), w(w), b(b) {
    ASSERT(x->dtype() == ns_float32 && w->dtype() == ns_float32 && b->dtype() == ns_float32)
        << "cpu_linear: float32 only";
    y = create_output(nullptr, x->dtype());
}

void CpuLinearOp::infer_shape() {
    ASSERTop(x->shape.size(), ==, 2);
    ASSERTop(w->shape.size(), ==, 2);
    ASSERTop(b->shape.size(), ==, 1);
    ASSERTop(x->shape[1], ==, w->shape[1]);
    ASSERTop(b->shape[0], ==, w->shape[0]);
    y->set_shape({x->shape[0], w->shape[0]});
}

void CpuLinearOp::jit_prepare(JK& jk) {
    jk << "«T:" << x->dtype();
}

#else  // JIT
#ifdef JIT_cpu
void CpuLinearOp::jit_run() {
    const int64 m = x->shape[0], k = x->shape[1], n = w->shape[0];
    const float* bp = b->ptr<float>();
    float* yp = y->ptr<float>();
    for (int64 r = 0; r < m; r++) std::memcpy(yp + r * n, bp, sizeof(float) * n);
    ASSERTop(0, ==, dnnl_sgemm('N', 'T', m, n, k, 1.f, x->ptr<float>(), k, w->ptr<float>(), k, 1.f, yp, n));
}
#endif  // JIT_cpu
#endif  // JIT

}  // namespace jittor
