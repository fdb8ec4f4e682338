// See cpu_conv_op.h. oneDNN picks its own (blocked) layouts for the computation ("any"); the input and
// weights are reordered into them when they differ from plain NCHW / OIHW, the result back to NCHW.
// oneDNN's primitive cache keeps the generated kernels between calls of equal shape.
#include <dnnl.hpp>

#include <unordered_map>

#include "var.h"
#include "cpu_conv_op.h"

namespace jittor {

#ifndef JIT

CpuConvOp::CpuConvOp(vector<Var*>&& inputs, int stride, int pad_top, int pad_left, int pad_bottom,
                     int pad_right)
    : ins(inputs), stride(stride), pad_top(pad_top), pad_left(pad_left), pad_bottom(pad_bottom),
      pad_right(pad_right) {
    ASSERT(ins.size() == 3 || ins.size() == 4) << "cpu_conv: inputs are x, w, b and optionally r";
    for (Var* v : ins) ASSERT(v->dtype() == ns_float32) << "cpu_conv: float32 only";
    y = create_output(nullptr, ins[0]->dtype());
}

void CpuConvOp::infer_shape() {
    Var *x = ins[0], *w = ins[1], *b = ins[2];
    ASSERTop(x->shape.size(), ==, 4);
    ASSERTop(w->shape.size(), ==, 4);
    ASSERTop(b->shape.size(), ==, 1);
    ASSERTop(x->shape[1], ==, w->shape[1]);
    ASSERTop(b->shape[0], ==, w->shape[0]);
    ASSERTop(stride, >, 0);
    const int64 ho = (x->shape[2] + pad_top + pad_bottom - w->shape[2]) / stride + 1;
    const int64 wo = (x->shape[3] + pad_left + pad_right - w->shape[3]) / stride + 1;
    ASSERT(ho > 0 && wo > 0) << "cpu_conv: empty output";
    y->set_shape({x->shape[0], w->shape[0], ho, wo});
    if (ins.size() == 4) {
        const NanoVector& rs = ins[3]->shape;
        ASSERT(rs.size() == 4 && rs[0] == x->shape[0] && rs[1] == w->shape[0] && rs[2] == ho && rs[3] == wo)
            << "cpu_conv: the residual must have the output's shape";
    }
}

void CpuConvOp::jit_prepare(JK& jk) {
    jk << "«T:" << ins[0]->dtype();
}

#else  // JIT
#ifdef JIT_cpu
void CpuConvOp::jit_run() {
    using namespace dnnl;
    using tag = memory::format_tag;
    Var *x = ins[0], *w = ins[1], *b = ins[2];
    const bool residual = ins.size() == 4;
    const auto f32 = memory::data_type::f32;
    const memory::dims src_dims = {x->shape[0], x->shape[1], x->shape[2], x->shape[3]};
    const memory::dims wei_dims = {w->shape[0], w->shape[1], w->shape[2], w->shape[3]};
    const memory::dims dst_dims = {y->shape[0], y->shape[1], y->shape[2], y->shape[3]};
    const memory::dims bias_dims = {b->shape[0]};

    engine eng(engine::kind::cpu, 0);
    stream strm(eng);
    memory user_src({src_dims, f32, tag::nchw}, eng, x->mem_ptr);
    memory user_wei({wei_dims, f32, tag::oihw}, eng, w->mem_ptr);
    memory user_dst({dst_dims, f32, tag::nchw}, eng, y->mem_ptr);
    memory bias({bias_dims, f32, tag::x}, eng, b->mem_ptr);

    auto desc = convolution_forward::desc(
        prop_kind::forward_inference, algorithm::convolution_direct,
        memory::desc(src_dims, f32, tag::any), memory::desc(wei_dims, f32, tag::any),
        memory::desc(bias_dims, f32, tag::x), memory::desc(dst_dims, f32, tag::any),
        {stride, stride}, {0, 0}, {pad_top, pad_left}, {pad_bottom, pad_right});
    primitive_attr attr;
    if (residual) {
        post_ops ops;
        ops.append_sum(1.f);  // dst = conv(x) + b + dst, dst holding r beforehand
        attr.set_post_ops(ops);
    }
    auto pd = convolution_forward::primitive_desc(desc, attr, eng);

    auto as_needed = [&](memory& user, const memory::desc& want) {
        if (user.get_desc() == want) return user;
        memory m(want, eng);
        reorder(user, m).execute(strm, user, m);
        return m;
    };
    memory src = as_needed(user_src, pd.src_desc());
    memory wei = as_needed(user_wei, pd.weights_desc());
    memory dst = pd.dst_desc() == user_dst.get_desc() ? user_dst : memory(pd.dst_desc(), eng);
    if (residual) {
        memory user_r({dst_dims, f32, tag::nchw}, eng, ins[3]->mem_ptr);
        reorder(user_r, dst).execute(strm, user_r, dst);
    }
    convolution_forward(pd).execute(strm, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei},
                                           {DNNL_ARG_BIAS, bias}, {DNNL_ARG_DST, dst}});
    if (dst != user_dst) reorder(dst, user_dst).execute(strm, dst, user_dst);
    strm.wait();
}
#endif  // JIT_cpu
#endif  // JIT

}  // namespace jittor
