"""Scaled dot-product attention: THE single function every attention block of geometryd calls.

Reference: spec section 3.7 (softmax(Q K^T * d^-0.5) V, no mask, no dropout) and diffusers
``AttnProcessor`` (``attention_processor.py``). A fused CUDA kernel can later replace :func:`attention`
without touching the blocks.

Precision: for fp16 inputs the softmax and its normalisation are computed in fp32 and the probabilities
are cast back to the value dtype for the ``P @ V`` product (what torch's math SDPA does). The scores are
fp32 GEMMs on CPU; on CUDA they are fp16 tensor-core GEMMs with fp32 accumulation (q pre-scaled), rounded
to fp16 once before the fp32 softmax. [CUDA branch not run on a GPU yet.]

Memory: the score matrix is ``N * Lq * Lk`` entries. When that exceeds :data:`MAX_SCORE_BYTES` (fp32
bytes) the work is split into chunks over ``N`` (and over ``Lq`` when a single batch entry is still too
large), and every chunk is executed before the next one is built, so peak memory stays near the bound.
Full-size spatial attention at 576x1024 (9216 tokens, 5 heads x F frames) then fits.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from daemon.jittor_env import import_jittor
from daemon.model import attention_cuda, conv_cpu

log = logging.getLogger(__name__)

# Bytes of fp32 scores materialised at once; override with GEOMETRYD_ATTN_MAX_BYTES.
MAX_SCORE_BYTES: int = int(os.environ.get("GEOMETRYD_ATTN_MAX_BYTES", str(1 << 30)))

Var = Any  # jittor.Var (Jittor is imported lazily)


def set_max_score_bytes(n_bytes: int) -> None:
    """Change the memory bound used to chunk attention (bytes of fp32 scores held at once)."""
    global MAX_SCORE_BYTES
    if n_bytes <= 0:
        raise ValueError(f"max score bytes must be > 0, got {n_bytes}")
    MAX_SCORE_BYTES = n_bytes


def _attention_dense(q: Var, k: Var, v: Var, scale: float) -> Var:
    jt = import_jittor()
    out_dtype = v.dtype
    if q.dtype == "float16" and jt.flags.use_cuda:
        # tensor-core GEMM with fp32 accumulation (cuBLAS, use_tensorcore=0), fp16 scores; q is scaled
        # first (like torch's math SDPA) so the scores stay far from fp16 overflow; softmax in fp32
        qs = (q.float32() * scale).float16()
        scores = jt.nn.bmm(qs, k.transpose(0, 2, 1)).float32()  # [N,Lq,Lk]
    else:
        scores = jt.nn.bmm(q.float32(), k.float32().transpose(0, 2, 1)) * scale  # [N,Lq,Lk] fp32
    scores = scores - scores.max(dim=-1, keepdims=True)
    probs = scores.exp()
    probs = probs / probs.sum(dim=-1, keepdims=True)
    if out_dtype == "float16" and not jt.flags.use_cuda:
        # Jittor's CPU bmm accumulates fp16 in fp16; cuBLAS (CUDA) accumulates in fp32
        return jt.nn.bmm(probs.cast(out_dtype).float32(), v.float32()).cast(out_dtype)
    return jt.nn.bmm(probs.cast(out_dtype), v)  # [N,Lq,dv]


def attention(q: Var, k: Var, v: Var, scale: float | None = None, max_bytes: int | None = None) -> Var:
    """softmax(q k^T * scale) v for q [N,Lq,d], k [N,Lk,d], v [N,Lk,dv] -> [N,Lq,dv].

    ``scale`` defaults to d**-0.5. ``N`` is batch*heads. Output dtype is v's dtype.
    """
    jt = import_jittor()
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(f"attention expects 3-D q/k/v, got {q.shape}, {k.shape}, {v.shape}")
    n, lq, d = q.shape
    lk = k.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(d)

    if attention_cuda.supports(q, k, v):
        return attention_cuda.fused_attention(q, k, v, scale)
    bound = MAX_SCORE_BYTES if max_bytes is None else max_bytes
    per_item = lq * lk * 4
    if n * per_item <= bound:
        return _attention_dense(q, k, v, scale)
    outs = []
    if per_item <= bound:
        step = max(1, bound // per_item)
        for s in range(0, n, step):
            o = _attention_dense(q[s : s + step], k[s : s + step], v[s : s + step], scale)
            o.sync()
            outs.append(o)
        return jt.concat(outs, dim=0)
    q_step = max(1, bound // (lk * 4))
    for s in range(n):
        row = []
        for t in range(0, lq, q_step):
            o = _attention_dense(q[s : s + 1, t : t + q_step], k[s : s + 1], v[s : s + 1], scale)
            o.sync()
            row.append(o)
        outs.append(jt.concat(row, dim=1))
    return jt.concat(outs, dim=0)


def split_heads(x: Var, heads: int) -> Var:
    """[B,L,heads*d] -> [B*heads,L,d] (head-major within each batch entry, like diffusers)."""
    b, length, c = x.shape
    if c % heads:
        raise ValueError(f"channels {c} not divisible by heads {heads}")
    d = c // heads
    return x.reshape(b, length, heads, d).transpose(0, 2, 1, 3).reshape(b * heads, length, d)


def merge_heads(x: Var, heads: int) -> Var:
    """[B*heads,L,d] -> [B,L,heads*d]; inverse of :func:`split_heads`."""
    bh, length, d = x.shape
    b = bh // heads
    return x.reshape(b, heads, length, d).transpose(0, 2, 1, 3).reshape(b, length, heads * d)


def multi_head_attention(q: Var, k: Var, v: Var, heads: int, scale: float | None = None) -> Var:
    """:func:`attention` per head on token-major layouts: q [B,Lq,H*d], k [B,Lk,H*d], v [B,Lk,H*dv] ->
    [B,Lq,H*dv] (heads split and merged like diffusers). On CPU with oneDNN and fp32 operands this is one
    fused op (``conv_cpu.attention_heads``: no head transposes, no full score tensor in memory)."""
    jt = import_jittor()
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1] // heads)
    if not jt.flags.use_cuda and q.dtype == "float32" and k.dtype == "float32" and v.dtype == "float32":
        out = conv_cpu.attention_heads(q, k, v, heads, scale)
        if out is not None:
            return out
    return merge_heads(attention(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads), scale),
                       heads)
