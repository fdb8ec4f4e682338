"""Jittor building blocks shared by the UNet, the VAEs and CLIP.

Each class mirrors the diffusers module of the same name (diffusers 0.31 ``models/resnet.py``,
``models/embeddings.py``, ``models/upsampling.py``, ``models/downsampling.py``,
``models/attention_processor.py``); attribute names equal the checkpoint keys (spec 2.1-2.3, tables A/B).
Numerics follow spec section 3.

Precision: parameters may be fp16 or fp32. Normalisations (GroupNorm, LayerNorm) and activations compute
in fp32 and cast back to the input dtype, like torch's CUDA kernels (fp32 "opmath") do for fp16 tensors.
Jittor's own ``nn.GroupNorm`` is not used: it computes var = E[x^2] - E[x]^2 (cancellation for
large-mean activations) and its reshape drops extra dims only by accident; this one does a two-pass
variance over (C/G x all trailing dims), which is what torch does for 4-D and 5-D (B,C,F,H,W) inputs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from daemon.jittor_env import import_jittor
from daemon.model import conv_cpu, norm_cpu
from daemon.model.attention import multi_head_attention

jt: Any = import_jittor()  # a module; typed Any so that jt.nn.Module can be a base class
nn: Any = jt.nn

Var = Any  # jittor.Var


# --------------------------------------------------------------------------------------------------
# activations (spec 3.1)


def silu(x: Var) -> Var:
    """x * sigmoid(x), computed in fp32 for fp16 inputs."""
    xf = x.float32()
    return (xf * xf.sigmoid()).cast(x.dtype)


def gelu(x: Var) -> Var:
    """Exact (erf) GELU, computed in fp32 for fp16 inputs."""
    xf = x.float32()
    return (0.5 * xf * (1.0 + jt.erf(xf * (1.0 / math.sqrt(2.0))))).cast(x.dtype)


def quick_gelu(x: Var) -> Var:
    """CLIP's quick_gelu: x * sigmoid(1.702 x)."""
    xf = x.float32()
    return (xf * (1.702 * xf).sigmoid()).cast(x.dtype)


def relu(x: Var) -> Var:
    # Jittor's nn.relu compares an fp16 Var with a float literal, which does not compile on CPU
    return x.float32().maximum(0.0).cast(x.dtype)


ACTIVATIONS = {"silu": silu, "gelu": gelu, "quick_gelu": quick_gelu, "relu": relu}


# --------------------------------------------------------------------------------------------------
# normalisation (spec 3.2)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm(num_groups, num_channels, eps, affine=True) for [N,C,*] inputs (4-D or 5-D).

    Statistics of a group are taken over its C/G channels and every trailing dim jointly (for 5-D
    temporal tensors: all frames too, spec 3.2). Keys: ``weight``, ``bias``.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5) -> None:
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels not divisible by {num_groups} groups")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.weight = jt.ones((num_channels,), "float32")
        self.bias = jt.zeros((num_channels,), "float32")

    def execute(self, x: Var, act: str = "") -> Var:
        """``act="silu"`` applies SiLU to the result (fused into the kernel on CPU)."""
        if not jt.flags.use_cuda:
            return norm_cpu.group_norm(x, self.weight, self.bias, self.num_groups, self.eps,
                                       act).cast(x.dtype)
        out = self._graph(x)
        return silu(out) if act == "silu" else out

    def _graph(self, x: Var) -> Var:
        shape = x.shape
        n, c = shape[0], shape[1]
        g = self.num_groups
        xf = x.float32().reshape(n, g, -1)  # [N,G,C/G*rest]
        # shift by one sample of the group first: Jittor's reductions sum sequentially, and large-mean
        # activations would otherwise lose ~n*eps relative precision in the mean
        xs = xf - xf[:, :, :1]
        xc = xs - xs.mean(dim=2, keepdims=True)
        var = (xc * xc).mean(dim=2, keepdims=True)
        xn = (xc / jt.sqrt(var + self.eps)).reshape(n, c, -1)
        bshape = [1, c, 1]
        out = xn * self.weight.float32().reshape(bshape) + self.bias.float32().reshape(bshape)
        return out.reshape(shape).cast(x.dtype)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm(dim, eps) over the last dim; fp32 statistics. Keys: ``weight``, ``bias``."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        self.dim = dim
        self.eps = eps
        self.weight = jt.ones((dim,), "float32")
        self.bias = jt.zeros((dim,), "float32")

    def execute(self, x: Var) -> Var:
        if not jt.flags.use_cuda:
            return norm_cpu.layer_norm(x, self.weight, self.bias, self.eps).cast(x.dtype)
        xf = x.float32()
        mean = xf.mean(dim=-1, keepdims=True)
        xc = xf - mean
        var = (xc * xc).mean(dim=-1, keepdims=True)
        out = xc / jt.sqrt(var + self.eps) * self.weight.float32() + self.bias.float32()
        return out.cast(x.dtype)


# --------------------------------------------------------------------------------------------------
# linear layers and convolutions (thin wrappers so dtypes of input and weights agree)


def matmul(a: Var, b: Var) -> Var:
    """jt.matmul with fp32 accumulation for fp16 operands.

    On CUDA Jittor's cuBLAS call already accumulates fp16 in fp32 (CUBLAS_COMPUTE_32F while the
    ``use_tensorcore`` flag stays 0 -- never set it: it switches fp16 GEMMs to fp16 accumulation).
    Jittor's CPU matmul accumulates in the operand type, ~5x the error of torch's fp16, so on CPU fp16
    operands are multiplied in fp32 and the product is rounded once.
    """
    if jt.flags.use_cuda:
        return jt.matmul(a, b)
    if a.ndim == 2 and b.ndim == 2:
        y = conv_cpu.matmul2d(a.float32(), b.float32())
        if y is not None:
            return y.cast(a.dtype)
    if a.dtype == "float16":
        return jt.matmul(a.float32(), b.float32()).float16()
    return jt.matmul(a, b)


class Linear(nn.Module):
    """torch.nn.Linear; keys ``weight`` [out,in], ``bias`` [out] (optional). Works on [..., in]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        self.in_features = in_features
        self.out_features = out_features
        bound = 1.0 / math.sqrt(in_features)
        self.weight = jt.init.uniform((out_features, in_features), "float32", -bound, bound)
        self.bias = jt.init.uniform((out_features,), "float32", -bound, bound) if bias else None

    def execute(self, x: Var) -> Var:
        return linear(x, self.weight, self.bias)


def linear(x: Var, w: Var, b: Var | None) -> Var:
    """x [..., in] @ w[out,in]^T + b: the Linear layers' function (also on row slices of one weight)."""
    x = x.cast(w.dtype)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    y = None if jt.flags.use_cuda or x.dtype != "float32" else conv_cpu.linear(x2, w, b)
    if y is None:
        y = matmul(x2, w.transpose(1, 0))
        if b is not None:
            y = y + b
    return y.reshape(*shape[:-1], w.shape[0])


class Conv2d(nn.Module):
    """torch.nn.Conv2d (square kernel, zero padding); keys ``weight`` [out,in,k,k], ``bias`` [out]."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
        bias: bool = True,
    ) -> None:
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        self.weight = jt.init.uniform(shape, "float32", -bound, bound)
        self.bias = jt.init.uniform((out_channels,), "float32", -bound, bound) if bias else None

    def execute(self, x: Var, residual: Var | None = None, padding: tuple[int, ...] | None = None) -> Var:
        """conv(x) + bias (+ ``residual``); ``padding`` (top, left, bottom, right) overrides the layer's."""
        w = self.weight
        x = x.cast(w.dtype)
        if not jt.flags.use_cuda:
            y = conv_cpu.conv2d(x.float32(), w.float32(), self.bias, self.stride,
                                self.padding if padding is None else padding, residual)
            if y is not None:
                return y.cast(x.dtype)
        pad = self.padding
        if padding is not None:
            top, left, bottom, right = padding
            x, pad = nn.pad(x, (left, right, top, bottom)), 0
        if jt.flags.use_cuda:
            y = nn.conv2d(x, w, self.bias, self.stride, pad)
        else:
            y = conv2d_im2col(x, w, self.bias, self.stride, pad)
        return y if residual is None else y + residual.cast(y.dtype)


def conv2d_im2col(x: Var, w: Var, b: Var | None, stride: int, padding: int) -> Var:
    """CPU convolution as shifted slices + one matmul: the fallback without oneDNN (daemon.model.conv_cpu).
    Jittor's own CPU conv (no MKL offline) is ~7x slower; this costs k*k times the input in memory."""
    n, ci, h, wd = x.shape
    co, _, kh, kw = w.shape
    if padding:
        x = nn.pad(x, (padding, padding, padding, padding))
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (wd + 2 * padding - kw) // stride + 1
    if kh == 1 and kw == 1:
        col = x[:, :, ::stride, ::stride] if stride > 1 else x
        col = col.reshape(n, ci, ho * wo)
    else:
        taps = [
            x[:, :, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride]
            for i in range(kh)
            for j in range(kw)
        ]
        col = jt.stack(taps, dim=2).reshape(n, ci * kh * kw, ho * wo)  # [N, Ci*kh*kw, Ho*Wo]
    out = matmul(w.reshape(co, ci * kh * kw), col)  # [N, Co, Ho*Wo]
    if b is not None:
        out = out + b.reshape(1, co, 1)
    return out.reshape(n, co, ho, wo)


class TemporalConv(nn.Module):
    """torch.nn.Conv3d(in, out, kernel_size=(k,1,1), padding=(k//2,0,0)) on [B,C,F,H,W].

    Key ``weight`` [out,in,k,1,1], ``bias`` [out]. Computed as a sum of k frame-shifted 1x1 channel
    matmuls (zero padding in time), which is exact and avoids a generic 3-D convolution kernel.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_frames: int = 3) -> None:
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_frames = kernel_frames
        bound = 1.0 / math.sqrt(in_channels * kernel_frames)
        shape = (out_channels, in_channels, kernel_frames, 1, 1)
        self.weight = jt.init.uniform(shape, "float32", -bound, bound)
        self.bias = jt.init.uniform((out_channels,), "float32", -bound, bound)

    def execute(self, x: Var, residual: Var | None = None) -> Var:
        """conv(x) + bias (+ ``residual`` [B,out,F,H,W])."""
        w = self.weight
        x = x.cast(w.dtype)
        b, c, f, h, wd = x.shape
        k = self.kernel_frames
        p = k // 2
        if not jt.flags.use_cuda:
            # a (k,1) 2-D convolution over [B,C,F,H*W]: one oneDNN call, no layout change
            r = None if residual is None else residual.reshape(b, self.out_channels, f, h * wd)
            y = conv_cpu.conv2d(x.float32().reshape(b, c, f, h * wd), w.float32().reshape(*w.shape[:3], 1),
                                self.bias, 1, (p, 0), r)
            if y is not None:
                return y.reshape(b, self.out_channels, f, h, wd).cast(x.dtype)
        # [B,C,F,H*W] -> [B,F,H*W,C] so each tap is one matmul over channels
        xt = x.reshape(b, c, f, h * wd).transpose(0, 2, 3, 1)
        if p:
            zeros = jt.zeros((b, p, h * wd, c), dtype=x.dtype)
            xt = jt.concat([zeros, xt, zeros], dim=1)
        out = None
        for tap in range(k):
            wt = w[:, :, tap, 0, 0].transpose(1, 0)  # [in,out]
            y = matmul(xt[:, tap : tap + f].reshape(-1, c), wt)
            out = y if out is None else out + y
        out = out + self.bias
        out = out.reshape(b, f, h * wd, self.out_channels).transpose(0, 3, 1, 2)
        out = out.reshape(b, self.out_channels, f, h, wd)
        return out if residual is None else out + residual.cast(out.dtype)


# --------------------------------------------------------------------------------------------------
# time embeddings (spec 3.3, 3.11)


def sinusoid(t: Any, dim: int) -> Var:
    """diffusers ``get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)``.

    t: scalar, numpy array or Var of shape [N] -> Var [N, dim] fp32, cosine half first.
    """
    if dim % 2:
        raise ValueError(f"sinusoid dim must be even, got {dim}")
    half = dim // 2
    exponent = (-math.log(10000.0) * np.arange(half, dtype=np.float32)).astype(np.float32) / np.float32(half)
    freqs = jt.array(np.exp(exponent).astype(np.float32))
    if not isinstance(t, jt.Var):
        t = jt.array(np.asarray(t, dtype=np.float32).reshape(-1))
    a = t.float32().reshape(-1, 1) * freqs.reshape(1, half)
    return jt.concat([a.cos(), a.sin()], dim=1)


class TimestepEmbedding(nn.Module):
    """diffusers ``TimestepEmbedding(in, out)``: linear_1 -> SiLU -> linear_2."""

    def __init__(self, in_channels: int, time_embed_dim: int) -> None:
        self.linear_1 = Linear(in_channels, time_embed_dim)
        self.linear_2 = Linear(time_embed_dim, time_embed_dim)

    def execute(self, x: Var) -> Var:
        return self.linear_2(silu(self.linear_1(x)))


# --------------------------------------------------------------------------------------------------
# resnets (spec 3.4-3.6)


class ResnetBlock2D(nn.Module):
    """diffusers ``ResnetBlock2D`` (groups 32, SiLU, default time-embedding norm, output scale 1)."""

    def __init__(self, in_channels: int, out_channels: int | None = None, temb_channels: int | None = None,
                 eps: float = 1e-6) -> None:
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = GroupNorm(32, in_channels, eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = GroupNorm(32, out_channels, eps)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def execute(self, x: Var, temb: Var | None = None) -> Var:
        h = self.conv1(self.norm1(x, act="silu"))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(silu(temb)).reshape(temb.shape[0], -1, 1, 1).cast(h.dtype)
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return self.conv2(self.norm2(h, act="silu"), residual=skip)  # skip + conv2(..), one pass


class TemporalResnetBlock(nn.Module):
    """diffusers ``TemporalResnetBlock`` on [B,C,F,H,W]; Conv3d kernels (3,1,1), zero padding in time."""

    def __init__(self, channels: int, temb_channels: int | None = None, eps: float = 1e-6) -> None:
        self.channels = channels
        self.norm1 = GroupNorm(32, channels, eps)
        self.conv1 = TemporalConv(channels, channels, 3)
        self.time_emb_proj = Linear(temb_channels, channels) if temb_channels is not None else None
        self.norm2 = GroupNorm(32, channels, eps)
        self.conv2 = TemporalConv(channels, channels, 3)

    def execute(self, x: Var, temb: Var | None = None) -> Var:
        """x [B,C,F,H,W]; temb [B,F,E] or None."""
        h = self.conv1(self.norm1(x, act="silu"))
        if self.time_emb_proj is not None and temb is not None:
            t = self.time_emb_proj(silu(temb))  # [B,F,C]
            h = h + t.transpose(0, 2, 1).reshape(t.shape[0], t.shape[2], t.shape[1], 1, 1).cast(h.dtype)
        return self.conv2(self.norm2(h, act="silu"), residual=x)  # x + conv2(..), one pass


class AlphaBlender(nn.Module):
    """diffusers ``AlphaBlender`` with a learned ``mix_factor`` [1] (strategies "learned" and
    "learned_with_images" with an all-zero image_only_indicator are the same, spec 3.6).

    a = sigmoid(mix_factor); out = a*spatial + (1-a)*temporal, or with ``switch`` (point-map decoder)
    out = (1-a)*spatial + a*temporal.
    """

    def __init__(self, switch: bool = False, alpha: float = 0.5) -> None:
        self.switch = switch
        self.mix_factor = jt.array(np.array([alpha], dtype=np.float32))

    def execute(self, x_spatial: Var, x_temporal: Var) -> Var:
        # diffusers rounds like this in fp16: alpha = sigmoid(mix_factor) in the parameter dtype, cast to the
        # activation dtype, then every op of the blend in that dtype. Each op is formed here in float32 and
        # rounded to the activation dtype once, as torch's CUDA kernels do (float32 opmath); in fp32 all casts
        # are no-ops.
        dt = x_spatial.dtype
        a = self.mix_factor.float32().sigmoid().cast(self.mix_factor.dtype).cast(dt)
        if self.switch:
            a = (1.0 - a.float32()).cast(dt)
        b = (1.0 - a.float32()).cast(dt)
        spatial = (a.float32() * x_spatial.float32()).cast(dt)
        temporal = (b.float32() * x_temporal.float32()).cast(dt)
        return (spatial.float32() + temporal.float32()).cast(dt)


class SpatioTemporalResBlock(nn.Module):
    """diffusers ``SpatioTemporalResBlock``: spatial resnet on [B*F,C,H,W], temporal resnet on the same
    activations viewed as [B,C,F,H,W], blended by ``time_mixer`` (spec 3.6)."""

    def __init__(self, in_channels: int, out_channels: int | None = None, temb_channels: int | None = None,
                 eps: float = 1e-6, temporal_eps: float | None = None,
                 switch_spatial_to_temporal_mix: bool = False) -> None:
        out_channels = in_channels if out_channels is None else out_channels
        self.spatial_res_block = ResnetBlock2D(in_channels, out_channels, temb_channels, eps)
        self.temporal_res_block = TemporalResnetBlock(
            out_channels, temb_channels, temporal_eps if temporal_eps is not None else eps
        )
        self.time_mixer = AlphaBlender(switch=switch_spatial_to_temporal_mix)

    def execute(self, x: Var, temb: Var | None, num_frames: int) -> Var:
        """x [B*F,Cin,H,W], temb [B*F,E] or None -> [B*F,C,H,W]."""
        s = self.spatial_res_block(x, temb)
        bf, c, h, w = s.shape
        b = bf // num_frames
        s5 = s.reshape(b, num_frames, c, h, w).transpose(0, 2, 1, 3, 4)  # [B,C,F,H,W]
        t_emb = temb.reshape(b, num_frames, -1) if temb is not None else None
        t5 = self.temporal_res_block(s5, t_emb)
        out = self.time_mixer(s5, t5)
        return out.transpose(0, 2, 1, 3, 4).reshape(bf, c, h, w)


# --------------------------------------------------------------------------------------------------
# samplers (spec 3.12)


class Downsample2D(nn.Module):
    """diffusers ``Downsample2D(use_conv=True)``; key ``conv``.

    padding_mode "unet": 3x3 conv stride 2 padding 1. "vae" (diffusers padding=0): zero pad right and
    bottom by one, then 3x3 conv stride 2 padding 0.
    """

    def __init__(self, channels: int, padding_mode: str = "unet") -> None:
        if padding_mode not in ("unet", "vae"):
            raise ValueError(f"padding_mode must be 'unet' or 'vae', got {padding_mode!r}")
        self.padding_mode = padding_mode
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=1 if padding_mode == "unet" else 0)

    def execute(self, x: Var) -> Var:
        if self.padding_mode == "vae":
            return self.conv(x, padding=(0, 0, 1, 1))
        return self.conv(x)


def upsample_nearest2x(x: Var) -> Var:
    """Nearest-neighbour x2 on [N,C,H,W] (source index floor(i/2)), exact via broadcast."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h, 1, w, 1).broadcast((n, c, h, 2, w, 2)).reshape(n, c, 2 * h, 2 * w)


class Upsample2D(nn.Module):
    """diffusers ``Upsample2D(use_conv=True)``: nearest x2 then 3x3 conv padding 1; key ``conv``."""

    def __init__(self, channels: int, out_channels: int | None = None) -> None:
        self.conv = Conv2d(channels, out_channels or channels, 3, padding=1)

    def execute(self, x: Var) -> Var:
        return self.conv(upsample_nearest2x(x))


# --------------------------------------------------------------------------------------------------
# VAE mid-block attention (spec 2.2 / 3.7)


class VaeAttention(nn.Module):
    """diffusers ``Attention`` as built for VAE mid blocks: GN(32, eps), single head of width C,
    to_q/to_k/to_v/to_out.0 with bias, residual add, rescale 1."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        self.channels = channels
        self.group_norm = GroupNorm(32, channels, eps)
        self.to_q = Linear(channels, channels)
        self.to_k = Linear(channels, channels)
        self.to_v = Linear(channels, channels)
        self.to_out = nn.ModuleList([Linear(channels, channels)])

    def execute(self, x: Var) -> Var:
        n, c, h, w = x.shape
        hs = self.group_norm(x).reshape(n, c, h * w).transpose(0, 2, 1)  # [N,HW,C]
        q = self.to_q(hs)
        k = self.to_k(hs)
        v = self.to_v(hs)
        o = self.to_out[0](multi_head_attention(q, k, v, 1))
        o = o.transpose(0, 2, 1).reshape(n, c, h, w)
        return o + x.cast(o.dtype)
