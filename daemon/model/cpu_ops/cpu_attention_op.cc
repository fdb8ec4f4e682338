// See cpu_attention_op.h. The two products are oneDNN sgemm calls (fp32 accumulation, like torch's
// CPU kernels); the softmax between them is a plain loop that the kernel flags (-Ofast -march=native)
// vectorise, exp included. Work items are (batch, head, block of query rows), spread over OpenMP
// threads; oneDNN runs single-threaded inside the parallel region.
#include <dnnl.hpp>

#include <algorithm>
#include <cmath>
#include <vector>

#include "var.h"
#include "cpu_attention_op.h"

namespace jittor {

#ifndef JIT

CpuAttentionOp::CpuAttentionOp(Var* q, Var* k, Var* v, int heads, float64 scale)
    : q(q), k(k), v(v), heads(heads), scale(scale) {
    ASSERT(q->dtype() == ns_float32 && k->dtype() == ns_float32 && v->dtype() == ns_float32)
        << "cpu_attention: float32 only";
    o = create_output(nullptr, q->dtype());
}

void CpuAttentionOp::infer_shape() {
    ASSERTop(q->shape.size(), ==, 3);
    ASSERTop(k->shape.size(), ==, 3);
    ASSERTop(v->shape.size(), ==, 3);
    ASSERTop(heads, >, 0);
    ASSERTop(k->shape[0], ==, q->shape[0]);
    ASSERTop(v->shape[0], ==, q->shape[0]);
    ASSERTop(v->shape[1], ==, k->shape[1]);
    ASSERTop(k->shape[2], ==, q->shape[2]);
    ASSERTop(q->shape[2] % heads, ==, 0);
    ASSERTop(v->shape[2] % heads, ==, 0);
    o->set_shape({q->shape[0], q->shape[1], v->shape[2]});
}

void CpuAttentionOp::jit_prepare(JK& jk) {
    jk << "«T:" << q->dtype();
}

#else  // JIT
#ifdef JIT_cpu
void CpuAttentionOp::jit_run() {
    const int64 n_batch = q->shape[0], lq = q->shape[1], lk = k->shape[1];
    const int64 c = q->shape[2], cv = v->shape[2];
    const int64 h = heads, d = c / h, dv = cv / h;
    const int64 rows = 64;  // query rows per work item: a 64 x Lk score block
    const int64 blocks = (lq + rows - 1) / rows;
    const int64 items = n_batch * h * blocks;
    const float alpha = (float)scale;
    const float* qp = q->ptr<float>();
    const float* kp = k->ptr<float>();
    const float* vp = v->ptr<float>();
    float* op = o->ptr<float>();
    #pragma omp parallel
    {
        std::vector<float> scores((size_t)(rows * lk));
        float* s = scores.data();
        #pragma omp for schedule(static)
        for (int64 item = 0; item < items; item++) {
            const int64 b = item / (h * blocks);
            const int64 head = (item / blocks) % h;
            const int64 r0 = (item % blocks) * rows;
            const int64 rb = std::min(rows, lq - r0);
            const float* qi = qp + (b * lq + r0) * c + head * d;
            const float* ki = kp + b * lk * c + head * d;
            const float* vi = vp + b * lk * cv + head * dv;
            float* oi = op + (b * lq + r0) * cv + head * dv;
            dnnl_sgemm('N', 'T', rb, lk, d, alpha, qi, c, ki, c, 0.f, s, lk);
            for (int64 r = 0; r < rb; r++) {
                float* row = s + r * lk;
                float m = row[0];
                for (int64 j = 1; j < lk; j++) m = std::max(m, row[j]);
                float sum = 0.f;
                for (int64 j = 0; j < lk; j++) {
                    row[j] = expf(row[j] - m);
                    sum += row[j];
                }
                const float inv = 1.f / sum;
                for (int64 j = 0; j < lk; j++) row[j] *= inv;
            }
            dnnl_sgemm('N', 'N', rb, dv, lk, 1.f, s, lk, vi, cv, 0.f, oi, cv);
        }
    }
}
#endif  // JIT_cpu
#endif  // JIT

}  // namespace jittor
