"""GeometryCrafter's vid2vid spatio-temporal UNet in Jittor.

Matches diffusers 0.31 ``UNetSpatioTemporalConditionModel`` (models/unets/unet_spatio_temporal_condition.py)
and its blocks ``CrossAttnDownBlockSpatioTemporal``, ``DownBlockSpatioTemporal``,
``UNetMidBlockSpatioTemporal``, ``UpBlockSpatioTemporal``, ``CrossAttnUpBlockSpatioTemporal``
(models/unets/unet_3d_blocks.py), with the vid2vid input contract of spec
../shared/spec/geometrycrafter.md section 2.1: one cross-attention context per frame,
``encoder_hidden_states`` (B, F, D) flattened to (B*F, 1, D). Attribute names equal the checkpoint keys
(spec 2.1; manifest geometrycrafter_keys/unet_*.tsv).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from daemon.jittor_env import import_jittor
from daemon.model.blocks import (
    Conv2d,
    Downsample2D,
    GroupNorm,
    SpatioTemporalResBlock,
    TimestepEmbedding,
    Upsample2D,
    silu,
    sinusoid,
)
from daemon.model.loader import CheckpointError, find_weights, load_into, read_config
from daemon.model.transformer import TransformerSpatioTemporalModel

jt: Any = import_jittor()  # a module; typed Any so that jt.nn.Module can be a base class
nn: Any = jt.nn
log = logging.getLogger(__name__)

Var = Any  # jittor.Var

DOWN_TYPES = ("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal")
UP_TYPES = ("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal")


@dataclass(frozen=True)
class UNetConfig:
    """The config.json keys that shape the network (diffusers ``UNetSpatioTemporalConditionModel``);
    ``sample_size`` and ``num_frames`` are read but have no effect at inference."""

    in_channels: int = 12
    out_channels: int = 4
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlockSpatioTemporal",
        "CrossAttnDownBlockSpatioTemporal",
        "CrossAttnDownBlockSpatioTemporal",
        "DownBlockSpatioTemporal",
    )
    up_block_types: tuple[str, ...] = (
        "UpBlockSpatioTemporal",
        "CrossAttnUpBlockSpatioTemporal",
        "CrossAttnUpBlockSpatioTemporal",
        "CrossAttnUpBlockSpatioTemporal",
    )
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    addition_time_embed_dim: int = 256
    projection_class_embeddings_input_dim: int = 768
    layers_per_block: int | tuple[int, ...] = 2
    cross_attention_dim: int | tuple[int, ...] = 1024
    transformer_layers_per_block: int | tuple[int, ...] = 1
    num_attention_heads: int | tuple[int, ...] = (5, 10, 20, 20)
    sample_size: int | None = None
    num_frames: int = 25

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> UNetConfig:
        """Keep known keys (lists become tuples); ``_class_name`` etc. are ignored."""
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()
                                  if k in known}
        return cls(**kwargs)


def _per_level(value: int | tuple[int, ...], n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    if len(value) != n:
        raise ValueError(f"UNet config {name}={list(value)} must have {n} entries (one per level)")
    if any(not isinstance(v, int) for v in value):
        raise ValueError(f"UNet config {name}={list(value)}: nested per-layer values are not supported")
    return tuple(value)


def _transformers(n: int, channels: int, heads: int, cross_dim: int, layers: int) -> Any:
    return nn.ModuleList(
        [
            TransformerSpatioTemporalModel(heads, channels // heads, channels, cross_dim, layers)
            for _ in range(n)
        ]
    )


class CrossAttnDownBlockSpatioTemporal(nn.Module):
    """Resnet (eps 1e-6) + transformer pairs, then a stride-2 conv; every output goes on the skip stack."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, num_layers: int,
                 transformer_layers: int, heads: int, cross_dim: int, add_downsample: bool) -> None:
        self.resnets = nn.ModuleList([
            SpatioTemporalResBlock(
                in_channels if i == 0 else out_channels, out_channels, temb_channels, eps=1e-6
            )
            for i in range(num_layers)
        ])
        self.attentions = _transformers(num_layers, out_channels, heads, cross_dim, transformer_layers)
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, "unet")]) if add_downsample else None

    def execute(self, x: Var, temb: Var, context: Var, num_frames: int) -> tuple[Var, list[Var]]:
        skips = []
        for resnet, attn in zip(self.resnets, self.attentions):
            x = resnet(x, temb, num_frames)
            x = attn(x, context, num_frames)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class DownBlockSpatioTemporal(nn.Module):
    """Resnets only (eps 1e-5, as diffusers hard-codes for this block)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, num_layers: int,
                 add_downsample: bool) -> None:
        self.resnets = nn.ModuleList([
            SpatioTemporalResBlock(
                in_channels if i == 0 else out_channels, out_channels, temb_channels, eps=1e-5
            )
            for i in range(num_layers)
        ])
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, "unet")]) if add_downsample else None

    def execute(self, x: Var, temb: Var, context: Var, num_frames: int) -> tuple[Var, list[Var]]:
        skips = []
        for resnet in self.resnets:
            x = resnet(x, temb, num_frames)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UNetMidBlockSpatioTemporal(nn.Module):
    """resnet -> (transformer -> resnet) x num_layers, eps 1e-5."""

    def __init__(self, channels: int, temb_channels: int, transformer_layers: int, heads: int, cross_dim: int,
                 num_layers: int = 1) -> None:
        self.resnets = nn.ModuleList([
            SpatioTemporalResBlock(channels, channels, temb_channels, eps=1e-5) for _ in range(num_layers + 1)
        ])
        self.attentions = _transformers(num_layers, channels, heads, cross_dim, transformer_layers)

    def execute(self, x: Var, temb: Var, context: Var, num_frames: int) -> Var:
        x = self.resnets[0](x, temb, num_frames)
        for attn, resnet in zip(self.attentions, list(self.resnets)[1:]):
            x = attn(x, context, num_frames)
            x = resnet(x, temb, num_frames)
        return x


def _up_resnets(in_channels: int, prev_channels: int, out_channels: int, temb_channels: int,
                num_layers: int) -> Any:
    resnets = []
    for i in range(num_layers):
        skip_channels = in_channels if i == num_layers - 1 else out_channels
        resnet_in = prev_channels if i == 0 else out_channels
        resnets.append(
            SpatioTemporalResBlock(resnet_in + skip_channels, out_channels, temb_channels, eps=1e-6)
        )
    return nn.ModuleList(resnets)


class UpBlockSpatioTemporal(nn.Module):
    """Resnets on [current, skip] concatenations (eps 1e-6), then nearest x2 + conv."""

    def __init__(self, in_channels: int, prev_channels: int, out_channels: int, temb_channels: int,
                 num_layers: int, add_upsample: bool) -> None:
        self.resnets = _up_resnets(in_channels, prev_channels, out_channels, temb_channels, num_layers)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def execute(self, x: Var, skips: list[Var], temb: Var, context: Var, num_frames: int) -> Var:
        for resnet in self.resnets:
            x = resnet(jt.concat([x, skips.pop()], dim=1), temb, num_frames)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class CrossAttnUpBlockSpatioTemporal(nn.Module):
    """(resnet on [current, skip] -> transformer) x num_layers, then nearest x2 + conv."""

    def __init__(self, in_channels: int, prev_channels: int, out_channels: int, temb_channels: int,
                 num_layers: int, transformer_layers: int, heads: int, cross_dim: int,
                 add_upsample: bool) -> None:
        self.resnets = _up_resnets(in_channels, prev_channels, out_channels, temb_channels, num_layers)
        self.attentions = _transformers(num_layers, out_channels, heads, cross_dim, transformer_layers)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def execute(self, x: Var, skips: list[Var], temb: Var, context: Var, num_frames: int) -> Var:
        for resnet, attn in zip(self.resnets, self.attentions):
            x = resnet(jt.concat([x, skips.pop()], dim=1), temb, num_frames)
            x = attn(x, context, num_frames)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


def _as_var(x: Any, dtype: str) -> Var:
    if isinstance(x, jt.Var):
        return x.cast(dtype)
    return jt.array(np.ascontiguousarray(np.asarray(x, dtype=np.float32))).cast(dtype)


class UNetVid2Vid(nn.Module):
    """vid2vid UNet; the constructor mirrors config.json (see :class:`UNetConfig`)."""

    def __init__(self, config: UNetConfig | None = None, **kwargs: Any) -> None:
        cfg = config if config is not None else UNetConfig.from_dict(kwargs)
        self.config = cfg
        n = len(cfg.down_block_types)
        if len(cfg.up_block_types) != n or len(cfg.block_out_channels) != n:
            raise ValueError(
                "UNet config: down_block_types, up_block_types and block_out_channels differ in length"
            )
        bad = [t for t in cfg.down_block_types if t not in DOWN_TYPES] + [
            t for t in cfg.up_block_types if t not in UP_TYPES
        ]
        if bad:
            raise ValueError(f"UNet config: unsupported block types {bad}")
        channels = tuple(cfg.block_out_channels)
        heads = _per_level(cfg.num_attention_heads, n, "num_attention_heads")
        cross = _per_level(cfg.cross_attention_dim, n, "cross_attention_dim")
        layers = _per_level(cfg.layers_per_block, n, "layers_per_block")
        tlayers = _per_level(cfg.transformer_layers_per_block, n, "transformer_layers_per_block")
        if cfg.projection_class_embeddings_input_dim != 3 * cfg.addition_time_embed_dim:
            raise ValueError(
                "UNet config: projection_class_embeddings_input_dim "
                f"{cfg.projection_class_embeddings_input_dim}"
                f" != 3 x addition_time_embed_dim {cfg.addition_time_embed_dim} (three added time ids)"
            )
        temb = channels[0] * 4

        self.conv_in = Conv2d(cfg.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb)
        self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb)

        down = []
        out_ch = channels[0]
        for i, kind in enumerate(cfg.down_block_types):
            in_ch, out_ch = out_ch, channels[i]
            last = i == n - 1
            if kind == "CrossAttnDownBlockSpatioTemporal":
                down.append(CrossAttnDownBlockSpatioTemporal(
                    in_ch, out_ch, temb, layers[i], tlayers[i], heads[i], cross[i], add_downsample=not last))
            else:
                down.append(DownBlockSpatioTemporal(in_ch, out_ch, temb, layers[i], add_downsample=not last))
        self.down_blocks = nn.ModuleList(down)

        self.mid_block = UNetMidBlockSpatioTemporal(channels[-1], temb, tlayers[-1], heads[-1], cross[-1])

        up = []
        rch, rheads, rlayers, rcross, rtl = (
            tuple(reversed(v)) for v in (channels, heads, layers, cross, tlayers)
        )
        out_ch = rch[0]
        for i, kind in enumerate(cfg.up_block_types):
            prev, out_ch = out_ch, rch[i]
            in_ch = rch[min(i + 1, n - 1)]
            last = i == n - 1
            if kind == "UpBlockSpatioTemporal":
                up.append(
                    UpBlockSpatioTemporal(in_ch, prev, out_ch, temb, rlayers[i] + 1, add_upsample=not last)
                )
            else:
                up.append(CrossAttnUpBlockSpatioTemporal(
                    in_ch, prev, out_ch, temb, rlayers[i] + 1, rtl[i], rheads[i], rcross[i],
                    add_upsample=not last))
        self.up_blocks = nn.ModuleList(up)
        self.num_upsamplers = n - 1

        self.conv_norm_out = GroupNorm(32, channels[0], eps=1e-5)
        self.conv_out = Conv2d(channels[0], cfg.out_channels, 3, padding=1)

    @property
    def dtype(self) -> str:
        return str(self.conv_in.weight.dtype)

    def _context(self, encoder_hidden_states: Var, b: int, f: int) -> Var:
        """(B,F,D) -> (B*F,1,D): frame i attends to its own embedding; (B,1,D) is shared by all frames."""
        ctx = encoder_hidden_states
        if ctx.ndim != 3 or ctx.shape[0] != b or ctx.shape[1] not in (1, f):
            raise ValueError(
                f"encoder_hidden_states must be (B,F,D) or (B,1,D) with B={b}, F={f}; got {ctx.shape}"
            )
        d = ctx.shape[2]
        if ctx.shape[1] == 1 and f != 1:
            ctx = ctx.broadcast((b, f, d))
        return ctx.reshape((b * f, 1, d))

    def execute(self, sample: Any, timestep: Any, encoder_hidden_states: Any, added_time_ids: Any) -> Var:
        """sample (B,F,Cin,h,w), scalar timestep (c_noise), context (B,F,D) or (B,1,D), added ids (B,3)
        -> (B,F,out_channels,h,w) in the weights' dtype."""
        dtype = self.dtype
        sample = _as_var(sample, dtype)
        b, f, c, h, w = sample.shape
        factor = 2**self.num_upsamplers
        if h % factor or w % factor:
            raise ValueError(f"latent size {h}x{w} must be a multiple of {factor}")
        if c != self.config.in_channels:
            raise ValueError(f"sample has {c} channels, the UNet expects {self.config.in_channels}")

        # 1. time embedding: the same timestep for every batch element, fp32 sinusoid cast to weight dtype
        t = timestep if isinstance(timestep, jt.Var) else jt.array(np.asarray(timestep, np.float32))
        t = t.float32().reshape(-1)
        if t.shape[0] == 1 and b > 1:
            t = t.broadcast((b,))
        emb = self.time_embedding(sinusoid(t, self.config.block_out_channels[0]).cast(dtype))  # (B,E)

        # 2. added time ids (fps, motion bucket, noise aug) -> (B, 3*256) -> add_embedding
        ids = added_time_ids if isinstance(added_time_ids, jt.Var) else jt.array(
            np.asarray(added_time_ids, np.float32))
        ids = ids.reshape((b, -1))
        add = sinusoid(ids.reshape(-1), self.config.addition_time_embed_dim).reshape((b, -1)).cast(dtype)
        emb = emb + self.add_embedding(add)
        e = emb.shape[1]
        emb = emb.reshape((b, 1, e)).broadcast((b, f, e)).reshape((b * f, e))  # repeat-interleave over frames

        # 3. per-frame cross-attention context
        ctx = self._context(_as_var(encoder_hidden_states, dtype), b, f)

        # 4. pre-process
        x = self.conv_in(sample.reshape((b * f, c, h, w)))

        # 5. down levels, pushing every intermediate on the skip stack
        skips = [x]
        for block in self.down_blocks:
            x, level_skips = block(x, emb, ctx, f)
            skips.extend(level_skips)

        # 6. mid
        x = self.mid_block(x, emb, ctx, f)

        # 7. up levels, each popping its skips newest first
        for block in self.up_blocks:
            x = block(x, skips, emb, ctx, f)

        # 8. post-process and back to (B,F,C,h,w)
        x = self.conv_out(silu(self.conv_norm_out(x)))
        return x.reshape((b, f) + tuple(x.shape[1:]))


def load_unet(folder: str | Path, dtype: str = "fp16") -> UNetVid2Vid:
    """Build the UNet from ``<folder>/config.json`` and load its safetensors through the checked loader.

    ``dtype``: "fp16" (official run precision, spec 1.3) or "fp32". Raises CheckpointError when the
    config and the file disagree, e.g. conv_in is not [block_out_channels[0], in_channels, 3, 3] or the
    model does not predict 4 channels.
    """
    if dtype not in ("fp16", "fp32"):
        raise ValueError(f"dtype must be 'fp16' or 'fp32', got {dtype!r}")
    folder = Path(folder)
    cfg = UNetConfig.from_dict(read_config(folder))
    if cfg.out_channels != 4:
        raise CheckpointError(
            f"{folder}/config.json: out_channels {cfg.out_channels}, the scheduler step needs 4"
        )
    model = UNetVid2Vid(cfg)
    weights = find_weights(folder, ("diffusion_pytorch_model",), variant="fp16" if dtype == "fp16" else None)
    load_into(model, weights, dtype=dtype)
    c0 = cfg.block_out_channels[0]
    expect = {"conv_in.weight": [c0, cfg.in_channels, 3, 3], "conv_out.weight": [4, c0, 3, 3]}
    got = {
        "conv_in.weight": list(model.conv_in.weight.shape),
        "conv_out.weight": list(model.conv_out.weight.shape),
    }
    if got != expect:
        raise CheckpointError(f"{weights}: expected {expect}, got {got}")
    log.info("loaded UNet from %s (%s, in_channels %d)", weights, dtype, cfg.in_channels)
    return model
