"""Spatio-temporal transformer of the vid2vid UNet, in Jittor.

Matches diffusers 0.31 ``TransformerSpatioTemporalModel`` (models/transformers/transformer_temporal.py)
with its ``BasicTransformerBlock``, ``TemporalBasicTransformerBlock``, ``FeedForward``/``GEGLU``
(models/attention.py) and ``Attention`` with the default processor (models/attention_processor.py).
Numerics: spec ../shared/spec/geometrycrafter.md sections 3.7-3.10. Attribute names equal the
checkpoint keys (spec 2.1, suffix table B).

Every attention goes through :func:`daemon.model.attention.attention`. A cross-attention whose context
has exactly one token (always the case in the vid2vid UNet: one CLIP embedding per frame) uses the
exact shortcut of spec 3.7: softmax over one key is exactly 1, so the output is ``to_out(to_v(ctx))``
broadcast over all queries, bit-identical to the full computation and free of the Lq x 1 score matrix.
"""

from __future__ import annotations

from typing import Any

from daemon.jittor_env import import_jittor
from daemon.model.attention import multi_head_attention
from daemon.model.blocks import AlphaBlender, GroupNorm, LayerNorm, Linear, gelu, linear, silu, sinusoid

jt: Any = import_jittor()  # a module; typed Any so that jt.nn.Module can be a base class
nn: Any = jt.nn

Var = Any  # jittor.Var


def add_broadcast(hidden: Var, delta: Var) -> Var:
    """hidden [N, L, C] + delta [Nd, 1, C] where N = Nd * k and row n of hidden belongs to delta row n // k.

    Covers the single-token cross-attention outputs: spatial (Nd = N = B*F, one context per frame) and
    temporal (Nd = B, hidden rows ordered b-major as (B*S, F, C))."""
    n, length, c = hidden.shape
    nd = delta.shape[0]
    if nd == n:
        return hidden + delta
    return (hidden.reshape((nd, -1, c)) + delta).reshape((n, length, c))


class Attention(nn.Module):
    """diffusers ``Attention`` (heads x dim_head, bias-free q/k/v, ``to_out.0`` Linear with bias)."""

    def __init__(self, query_dim: int, heads: int, dim_head: int,
                 cross_attention_dim: int | None = None) -> None:
        inner = heads * dim_head
        context_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        self.to_q = Linear(query_dim, inner, bias=False)
        self.to_k = Linear(context_dim, inner, bias=False)
        self.to_v = Linear(context_dim, inner, bias=False)
        # Index 1 of diffusers' to_out is a parameter-free Dropout(0): only index 0 is kept.
        self.to_out = nn.ModuleList([Linear(inner, query_dim)])

    def execute(self, x: Var, context: Var | None = None) -> Var:
        """x [N, L, C]; context [Nc, Lc, D] or None (self-attention).

        Returns [N, L, C], except for a one-token context: then [Nc, 1, C] (combine with
        :func:`add_broadcast`)."""
        if context is not None and context.shape[1] == 1:
            return self.to_out[0](self.to_v(context))  # exact: softmax over a single key is 1
        source = x if context is None else context
        if source.shape[0] != x.shape[0]:
            raise ValueError(
                f"context batch {source.shape[0]} != query batch {x.shape[0]} (multi-token context)"
            )
        out = multi_head_attention(self.to_q(x), self.to_k(source), self.to_v(source), self.heads, self.scale)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    """Linear dim -> 2*inner, split (value first, gate second), value * gelu(gate) (exact erf GELU)."""

    def __init__(self, dim: int, inner: int) -> None:
        self.inner = inner
        self.proj = Linear(dim, inner * 2)

    def execute(self, x: Var) -> Var:
        # two products on the row halves of the weight: cheaper than slicing the [.., 2*inner] activation
        w, b, n = self.proj.weight, self.proj.bias, self.inner
        assert b is not None  # GEGLU's projection has a bias
        return linear(x, w[:n], b[:n]) * gelu(linear(x, w[n:], b[n:]))


class FeedForward(nn.Module):
    """diffusers ``FeedForward(dim, dim_out, activation_fn="geglu")``: keys net.0.proj, net.2 (net.1 is
    Dropout(0), parameter-free and skipped)."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4) -> None:
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Identity(), Linear(inner, dim_out or dim)])

    def execute(self, x: Var) -> Var:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """Per-frame block (tokens = pixels): self-attn, cross-attn, GEGLU FF, pre-LayerNorm (spec 3.9)."""

    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int) -> None:
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim_head, cross_attention_dim)
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim)

    def execute(self, x: Var, context: Var) -> Var:
        """x [B*F, S, C]; context [B*F, Lc, D]."""
        x = self.attn1(self.norm1(x)) + x
        x = add_broadcast(x, self.attn2(self.norm2(x), context))
        return self.ff(self.norm3(x)) + x


class TemporalBasicTransformerBlock(nn.Module):
    """Per-pixel block over frames (spec 3.10); ``time_mix_inner_dim == dim`` so both FFs are residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int) -> None:
        self.norm_in = LayerNorm(dim)
        self.ff_in = FeedForward(dim, dim_out=dim)
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim_head, cross_attention_dim)
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim)

    def execute(self, x: Var, num_frames: int, context: Var) -> Var:
        """x [B*F, S, C]; context [B, Lc, D] (the first frame's context of each batch element)."""
        bf, s, c = x.shape
        b = bf // num_frames
        # 0. regroup (B*F, S, C) -> (B*S, F, C)
        x = x.reshape((b, num_frames, s, c)).transpose((0, 2, 1, 3)).reshape((b * s, num_frames, c))
        # 1. input feed-forward
        x = self.ff_in(self.norm_in(x)) + x
        # 2. self-attention over the frames
        x = self.attn1(self.norm1(x)) + x
        # 3. cross-attention to the window's first-frame context
        if context.shape[1] != 1:
            context = _expand_context(context, s)
        x = add_broadcast(x, self.attn2(self.norm2(x), context))
        # 4. feed-forward
        x = self.ff(self.norm3(x)) + x
        # 5. regroup back
        return x.reshape((b, s, num_frames, c)).transpose((0, 2, 1, 3)).reshape((bf, s, c))


def _expand_context(context: Var, repeats: int) -> Var:
    """[B, Lc, D] -> [B*repeats, Lc, D], each batch row repeated consecutively (multi-token contexts only)."""
    b, lc, d = context.shape
    return context.reshape((b, 1, lc, d)).broadcast((b, repeats, lc, d)).reshape((b * repeats, lc, d))


class TimePosEmbedding(nn.Module):
    """diffusers ``TimestepEmbedding(C, 4C, out_dim=C)``: linear_1 C->4C, SiLU, linear_2 4C->C."""

    def __init__(self, channels: int, hidden: int) -> None:
        self.linear_1 = Linear(channels, hidden)
        self.linear_2 = Linear(hidden, channels)

    def execute(self, x: Var) -> Var:
        return self.linear_2(silu(self.linear_1(x)))


class TransformerSpatioTemporalModel(nn.Module):
    """Spec 3.8: GN -> proj_in -> spatial block / temporal block (+ frame position embedding) mixed by
    ``time_mixer`` -> proj_out -> residual. Input x [B*F, C, H, W], context [B*F, Lc, D]."""

    def __init__(self, heads: int, dim_head: int, in_channels: int, cross_attention_dim: int,
                 num_layers: int = 1) -> None:
        inner = heads * dim_head
        self.in_channels = in_channels
        self.norm = GroupNorm(32, in_channels, eps=1e-6)
        self.proj_in = Linear(in_channels, inner)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, cross_attention_dim) for _ in range(num_layers)]
        )
        self.temporal_transformer_blocks = nn.ModuleList(
            [
                TemporalBasicTransformerBlock(inner, heads, dim_head, cross_attention_dim)
                for _ in range(num_layers)
            ]
        )
        self.time_pos_embed = TimePosEmbedding(in_channels, in_channels * 4)
        self.time_mixer = AlphaBlender(switch=False)
        self.proj_out = Linear(inner, in_channels)

    def execute(self, x: Var, context: Var, num_frames: int) -> Var:
        bf, c, h, w = x.shape
        b = bf // num_frames
        # 1. first-frame context of every batch element (diffusers: time_context[::num_frames])
        ctx_first = context.reshape((b, num_frames) + tuple(context.shape[1:]))[:, 0]  # [B, Lc, D]
        # 2. input: GroupNorm, tokens, proj_in
        residual = x
        x = self.norm(x)
        x = x.transpose((0, 2, 3, 1)).reshape((bf, h * w, c))
        x = self.proj_in(x)
        # 3. frame-position embedding, frames counted from the start of this window
        frames = jt.arange(num_frames).float32()
        pos = self.time_pos_embed(sinusoid(frames, c).cast(x.dtype))  # [F, C]
        pos = pos.reshape((1, num_frames, 1, c)).broadcast((b, num_frames, 1, c)).reshape((bf, 1, c))
        # 4. spatial and temporal blocks, blended
        for block, temporal_block in zip(self.transformer_blocks, self.temporal_transformer_blocks):
            x = block(x, context)
            x_mix = temporal_block(x + pos, num_frames, ctx_first)
            x = self.time_mixer(x, x_mix)
        # 5. output
        x = self.proj_out(x)
        x = x.reshape((bf, h, w, c)).transpose((0, 3, 1, 2))
        return x + residual
