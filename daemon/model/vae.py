"""SVD VAE encoder and GeometryCrafter's point-map VAE in Jittor.

References: spec 2.2 (``PMapAutoencoderKLTemporalDecoder``: diffusers ``Encoder(double_z=False)`` +
a temporal decoder built from ``MidBlockTemporalDecoder``/``UpBlockTemporalDecoder`` with three heads)
and 2.3 (SVD ``AutoencoderKLTemporalDecoder``: only ``encoder.*`` and ``quant_conv.*`` are used; the
``decoder.*`` keys of the file are skipped on purpose). Numerics: spec 3.

Semantics exposed to the pipeline (daemon/pipeline.py):
- ``SvdVaeEncoder.encode(x[N,3,H,W]) -> mean[N,4,h,w]``: quant_conv applied, first half of the moments
  (the Gaussian's mode), no scaling factor. Runs in fp32 (spec 1.3: force_upcast).
- ``PointMapVae.encode(x4[N,4,H,W]) -> offset[N,4,h,w] = offset_scale_factor * encoder(x4)``; the
  pipeline forms the prior latent as ``(svd_mean(pseudo) + offset) * 0.18215`` (spec 2.2 "Encode semantics").
- ``PointMapVae.decode(z[N,4,h,w], num_frames) -> (fnorm, log_depth, validity_logit)`` each [N,1,H,W];
  N = B*num_frames (frames of one batch entry consecutive). Temporal convs and temporal GroupNorm span the
  num_frames of this call only (spec 4.7).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from daemon.jittor_env import import_jittor
from daemon.model.blocks import (
    Conv2d,
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    SpatioTemporalResBlock,
    TemporalConv,
    Upsample2D,
    VaeAttention,
    relu,
    silu,
)
from daemon.model.loader import (
    CheckpointError,
    cast_module,
    find_weights,
    load_into,
    read_config,
    save_module,
)

jt: Any = import_jittor()  # a module; typed Any so that jt.nn.Module can be a base class
nn: Any = jt.nn
log = logging.getLogger(__name__)

Var = Any

POINT_MAP_VAE_CLASS = "PMapAutoencoderKLTemporalDecoder"
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_RE = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")


def legacy_attention_key(key: str) -> str:
    """Map old diffusers VAE attention names (query/key/value/proj_attn) to to_q/to_k/to_v/to_out.0."""
    m = _LEGACY_RE.match(key)
    if m is None:
        return key
    return f"{m.group(1)}{_LEGACY_ATTN[m.group(2)]}.{m.group(3)}"


def _as_var(x: Any, dtype: str) -> Var:
    if isinstance(x, jt.Var):
        return x.cast(dtype)
    return jt.array(np.ascontiguousarray(np.asarray(x, dtype=np.float32))).cast(dtype)


def _param_dtype(module: Any) -> str:
    return str(next(iter(module.state_dict().values())).dtype)


# --------------------------------------------------------------------------------------------------
# encoder (diffusers models/autoencoders/vae.py ``Encoder``)


class DownEncoderBlock2D(nn.Module):
    """diffusers ``DownEncoderBlock2D`` (no temb, eps 1e-6, VAE downsampler with right/bottom pad)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, add_downsample: bool) -> None:
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, 1e-6)
             for i in range(num_layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, "vae")]) if add_downsample else None

    def execute(self, x: Var) -> Var:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UNetMidBlock2D(nn.Module):
    """diffusers ``UNetMidBlock2D`` as used by VAE encoders: resnet -> attention -> resnet (1 head)."""

    def __init__(self, channels: int, add_attention: bool = True) -> None:
        self.attentions = nn.ModuleList([VaeAttention(channels, 1e-6)]) if add_attention else None
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, None, 1e-6) for _ in range(2)])

    def execute(self, x: Var) -> Var:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """diffusers ``Encoder`` (DownEncoderBlock2D levels, GN 32, SiLU)."""

    def __init__(self, in_channels: int, out_channels: int, block_out_channels: Sequence[int],
                 layers_per_block: int, double_z: bool, mid_block_add_attention: bool = True) -> None:
        chans = list(block_out_channels)
        self.conv_in = Conv2d(in_channels, chans[0], 3, padding=1)
        blocks = []
        prev = chans[0]
        for i, ch in enumerate(chans):
            blocks.append(DownEncoderBlock2D(prev, ch, layers_per_block, add_downsample=i < len(chans) - 1))
            prev = ch
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = UNetMidBlock2D(chans[-1], mid_block_add_attention)
        self.conv_norm_out = GroupNorm(32, chans[-1], 1e-6)
        self.conv_out = Conv2d(chans[-1], 2 * out_channels if double_z else out_channels, 3, padding=1)

    def execute(self, x: Var) -> Var:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(silu(self.conv_norm_out(x)))


def _check_down_types(types: Sequence[str], where: str) -> None:
    bad = [t for t in types if t != "DownEncoderBlock2D"]
    if bad:
        raise CheckpointError(f"{where}: unsupported down block types {bad} (only DownEncoderBlock2D)")


# --------------------------------------------------------------------------------------------------
# SVD VAE encoder (spec 2.3)


class SvdVaeEncoder(nn.Module):
    """Encoder + quant_conv of SVD's ``AutoencoderKLTemporalDecoder``; ``encode`` returns the mean."""

    def __init__(self, config: dict) -> None:
        _check_down_types(config.get("down_block_types", ["DownEncoderBlock2D"]), "svd vae config")
        self.latent_channels = int(config.get("latent_channels", 4))
        self.scaling_factor = float(config.get("scaling_factor", 0.18215))
        self.encoder = Encoder(
            int(config.get("in_channels", 3)),
            self.latent_channels,
            config.get("block_out_channels", (128, 256, 512, 512)),
            int(config.get("layers_per_block", 2)),
            double_z=True,
        )
        self.quant_conv = Conv2d(2 * self.latent_channels, 2 * self.latent_channels, 1)

    def execute(self, x: Var) -> Var:
        return self.encode(x)

    def encode(self, x: Any) -> Var:
        """x [N,3,H,W] in [-1,1] (numpy or Var) -> mean [N,4,H/8,W/8] in the parameters' dtype."""
        x = _as_var(x, _param_dtype(self))
        moments = self.quant_conv(self.encoder(x))
        return moments[:, : self.latent_channels]


def load_svd_vae(folder: str | Path, dtype: str = "fp32") -> SvdVaeEncoder:
    """Load the encoder half of an SVD ``vae`` folder (prefers the ``.fp16`` file, upcast per ``dtype``)."""
    folder = Path(folder)
    config = read_config(folder)
    module = SvdVaeEncoder(config)
    weights = find_weights(folder, ("diffusion_pytorch_model",), variant="fp16")
    load_into(module, weights, dtype=dtype, key_map=legacy_attention_key, ignore=("decoder.*",))
    module.eval()
    return module


# --------------------------------------------------------------------------------------------------
# point-map VAE (spec 2.2)


class MidBlockTemporalDecoder(nn.Module):
    """diffusers ``MidBlockTemporalDecoder``: STRes -> attention -> STRes ... (learned + switched mix)."""

    def __init__(self, num_layers: int, channels: int) -> None:
        self.resnets = nn.ModuleList(
            [SpatioTemporalResBlock(channels, channels, None, 1e-6, 1e-5, True) for _ in range(num_layers)]
        )
        self.attentions = nn.ModuleList([VaeAttention(channels, 1e-6)])

    def execute(self, x: Var, num_frames: int) -> Var:
        x = self.resnets[0](x, None, num_frames)
        for resnet, attn in zip(self.resnets[1:], self.attentions):
            x = attn(x)
            x = resnet(x, None, num_frames)
        return x


class UpBlockTemporalDecoder(nn.Module):
    """diffusers ``UpBlockTemporalDecoder``: STRes x num_layers, then nearest x2 + conv."""

    def __init__(self, num_layers: int, in_channels: int, out_channels: int, add_upsample: bool) -> None:
        self.resnets = nn.ModuleList(
            [SpatioTemporalResBlock(in_channels if i == 0 else out_channels, out_channels, None, 1e-6, 1e-5,
                                    True)
             for i in range(num_layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def execute(self, x: Var, num_frames: int) -> Var:
        for resnet in self.resnets:
            x = resnet(x, None, num_frames)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


def out_head(channels: int, out_channels: int) -> Any:
    """One ``decoder.out_blocks.k`` head as a ModuleList (keys ``k.0``, ``k.2``, ``k.3``, ``k.5``):
    0 GN(32,1e-6) -> 1 ReLU -> 2 conv3x3 C->C/2 -> 3 STRes(C/2) -> 4 ReLU -> 5 conv1x1 C/2->out."""
    half = channels // 2
    return nn.ModuleList([
        GroupNorm(32, channels, 1e-6),
        nn.ReLU(),
        Conv2d(channels, half, 3, padding=1),
        SpatioTemporalResBlock(half, half, None, 1e-6, 1e-5, True),
        nn.ReLU(),
        Conv2d(half, out_channels, 1),
    ])


def run_out_head(head: Any, x: Var, num_frames: int) -> Var:
    x = relu(head[0](x))
    x = head[2](x)
    x = relu(head[3](x, None, num_frames))
    return head[5](x)


class PointMapDecoder(nn.Module):
    """Temporal decoder of the point-map VAE with three heads (fnorm, log-depth, validity)."""

    def __init__(self, latent_channels: int, block_out_channels: Sequence[int], layers_per_block: int,
                 out_channels: Sequence[int]) -> None:
        chans = list(block_out_channels)
        rev = chans[::-1]
        self.conv_in = Conv2d(latent_channels, chans[-1], 3, padding=1)
        self.mid_block = MidBlockTemporalDecoder(layers_per_block, chans[-1])
        ups = []
        prev = rev[0]
        for i, ch in enumerate(rev):
            ups.append(UpBlockTemporalDecoder(layers_per_block + 1, prev, ch, add_upsample=i < len(rev) - 1))
            prev = ch
        self.up_blocks = nn.ModuleList(ups)
        self.out_blocks = nn.ModuleList([out_head(chans[0], oc) for oc in out_channels])
        self.time_conv_outs = nn.ModuleList([TemporalConv(oc, oc, 3) for oc in out_channels])

    def execute(self, z: Var, num_frames: int) -> list[Var]:
        x = self.conv_in(z)
        x = self.mid_block(x, num_frames)
        for up in self.up_blocks:
            x = up(x, num_frames)
        outs = []
        for head, tconv in zip(self.out_blocks, self.time_conv_outs):
            y = run_out_head(head, x, num_frames)  # [B*F,c,H,W]
            bf, c, h, w = y.shape
            b = bf // num_frames
            y5 = y.reshape(b, num_frames, c, h, w).transpose(0, 2, 1, 3, 4)
            y5 = tconv(y5)
            outs.append(y5.transpose(0, 2, 1, 3, 4).reshape(bf, c, h, w))
        return outs


class PointMapVae(nn.Module):
    """GeometryCrafter ``PMapAutoencoderKLTemporalDecoder`` (spec 2.2); fp32 by default (spec 1.3)."""

    def __init__(self, config: dict) -> None:
        self.config = dict(config)
        down_types = config.get("enc_down_block_types", ["DownEncoderBlock2D"] * 4)
        _check_down_types(down_types, "point-map vae config")
        self.latent_channels = int(config.get("latent_channels", 4))
        self.offset_scale_factor = float(config.get("offset_scale_factor", 0.1))
        out_channels = tuple(config.get("out_channels", (1, 1, 1)))
        self.encoder = Encoder(
            int(config.get("in_channels", 4)),
            self.latent_channels,
            config.get("enc_block_out_channels", (128, 256, 512, 512)),
            int(config.get("enc_layers_per_block", 2)),
            double_z=False,
            mid_block_add_attention=bool(config.get("mid_block_add_attention", True)),
        )
        self.decoder = PointMapDecoder(
            self.latent_channels,
            config.get("dec_block_out_channels", (128, 256, 512, 512)),
            int(config.get("dec_layers_per_block", 2)),
            out_channels,
        )

    def execute(self, z: Var, num_frames: int) -> tuple[Var, Var, Var]:
        return self.decode(z, num_frames)

    def encode(self, x: Any) -> Var:
        """x4 [N,4,H,W] -> offset [N,4,H/8,W/8] = offset_scale_factor * encoder(x4) (already scaled)."""
        x = _as_var(x, _param_dtype(self))
        return self.encoder(x) * self.offset_scale_factor

    def decode(self, z: Any, num_frames: int) -> tuple[Var, Var, Var]:
        """z [N,4,h,w] unscaled latents, N = B*num_frames -> (fnorm, log_depth, validity) each [N,1,H,W]."""
        z = _as_var(z, _param_dtype(self))
        if z.shape[0] % num_frames:
            raise ValueError(f"decode: {z.shape[0]} latents is not a multiple of num_frames={num_frames}")
        fnorm, log_depth, validity = self.decoder(z, num_frames)
        return fnorm, log_depth, validity


def _config_for_file(config: dict) -> dict:
    out = {"_class_name": POINT_MAP_VAE_CLASS}
    out.update({k: v for k, v in config.items() if not k.startswith("_")})
    return out


def init_point_map_vae(config: dict, seed: int = 0) -> PointMapVae:
    """A point-map VAE with seeded random weights (for make-tiny, tests, benchmarks)."""
    jt.set_global_seed(seed)
    module = PointMapVae(config)
    rng = np.random.default_rng(seed)
    # Perturb mix factors and norms so nothing downstream can pass on constant-initialised params.
    for key, var in module.state_dict().items():
        if key.endswith("mix_factor") or ".norm" in key or "group_norm" in key or "conv_norm_out" in key:
            base = var.numpy()
            var.assign(jt.array((base + 0.1 * rng.standard_normal(base.shape)).astype(np.float32)))
    module.eval()
    return module


def save_point_map_vae(module: PointMapVae, folder: str | Path) -> Path:
    """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` in the official layout."""
    return save_module(module, folder, _config_for_file(module.config), "diffusion_pytorch_model.safetensors")


def load_point_map_vae(folder: str | Path, dtype: str = "fp32") -> PointMapVae:
    """Load the official ``point_map_vae`` folder (fp32 file; spec 1.1)."""
    folder = Path(folder)
    config = read_config(folder)
    module = PointMapVae(config)
    weights = find_weights(folder, ("diffusion_pytorch_model",))
    load_into(module, weights, dtype=dtype, key_map=legacy_attention_key)
    module.eval()
    return module


__all__ = [
    "CheckpointError", "SvdVaeEncoder", "PointMapVae", "load_svd_vae", "load_point_map_vae",
    "init_point_map_vae", "save_point_map_vae", "cast_module", "legacy_attention_key",
]
