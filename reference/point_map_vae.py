"""PyTorch reference of GeometryCrafter's point-map VAE (spec 2.2), assembled from diffusers
building blocks exactly as the spec describes (no pip package ships the class).

Encoder: ``diffusers.models.autoencoders.vae.Encoder(double_z=False)``. Decoder: ``conv_in`` ->
``MidBlockTemporalDecoder`` -> ``UpBlockTemporalDecoder`` x4 -> three heads
``out_blocks.k = [GN, ReLU, conv3x3 C->C/2, SpatioTemporalResBlock(C/2), ReLU, conv1x1]`` each followed by
``time_conv_outs.k`` (Conv3d (3,1,1) on [B,c,F,H,W]).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers.models.autoencoders.vae import Encoder
from diffusers.models.resnet import SpatioTemporalResBlock
from diffusers.models.unets.unet_3d_blocks import MidBlockTemporalDecoder, UpBlockTemporalDecoder
from safetensors.torch import load_file
from torch import nn


class TorchPointMapDecoder(nn.Module):
    def __init__(self, latent_channels: int, block_out_channels: list[int], layers_per_block: int,
                 out_channels: tuple[int, ...]) -> None:
        super().__init__()
        chans = list(block_out_channels)
        rev = chans[::-1]
        self.conv_in = nn.Conv2d(latent_channels, chans[-1], 3, padding=1)
        self.mid_block = MidBlockTemporalDecoder(
            num_layers=layers_per_block, in_channels=chans[-1], out_channels=chans[-1],
            attention_head_dim=chans[-1],
        )
        self.up_blocks = nn.ModuleList()
        prev = rev[0]
        for i, ch in enumerate(rev):
            self.up_blocks.append(
                UpBlockTemporalDecoder(num_layers=layers_per_block + 1, in_channels=prev, out_channels=ch,
                                       add_upsample=i < len(rev) - 1)
            )
            prev = ch
        c0, half = chans[0], chans[0] // 2
        self.out_blocks = nn.ModuleList()
        self.time_conv_outs = nn.ModuleList()
        for oc in out_channels:
            self.out_blocks.append(nn.ModuleList([
                nn.GroupNorm(32, c0, eps=1e-6),
                nn.ReLU(),
                nn.Conv2d(c0, half, 3, padding=1),
                SpatioTemporalResBlock(half, half, temb_channels=None, eps=1e-6, temporal_eps=1e-5,
                                       merge_factor=0.0, merge_strategy="learned",
                                       switch_spatial_to_temporal_mix=True),
                nn.ReLU(),
                nn.Conv2d(half, oc, 1),
            ]))
            self.time_conv_outs.append(nn.Conv3d(oc, oc, kernel_size=(3, 1, 1), padding=(1, 0, 0)))

    def forward(self, z: torch.Tensor, num_frames: int) -> list[torch.Tensor]:
        ioi = torch.zeros(z.shape[0] // num_frames, num_frames, dtype=z.dtype, device=z.device)
        x = self.conv_in(z)
        x = self.mid_block(x, image_only_indicator=ioi)
        for up in self.up_blocks:
            x = up(x, image_only_indicator=ioi)
        outs = []
        for head, tconv in zip(self.out_blocks, self.time_conv_outs):
            y = head[1](head[0](x))
            y = head[2](y)
            y = head[4](head[3](y, None, image_only_indicator=ioi))
            y = head[5](y)
            bf, c, h, w = y.shape
            y5 = y.reshape(bf // num_frames, num_frames, c, h, w).permute(0, 2, 1, 3, 4)
            y5 = tconv(y5)
            outs.append(y5.permute(0, 2, 1, 3, 4).reshape(bf, c, h, w))
        return outs


class TorchPointMapVae(nn.Module):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.offset_scale_factor = float(config.get("offset_scale_factor", 0.1))
        self.encoder = Encoder(
            in_channels=config["in_channels"],
            out_channels=config["latent_channels"],
            down_block_types=tuple(config["enc_down_block_types"]),
            block_out_channels=tuple(config["enc_block_out_channels"]),
            layers_per_block=config["enc_layers_per_block"],
            double_z=False,
            mid_block_add_attention=config.get("mid_block_add_attention", True),
        )
        self.decoder = TorchPointMapDecoder(
            config["latent_channels"], list(config["dec_block_out_channels"]), config["dec_layers_per_block"],
            tuple(config.get("out_channels", (1, 1, 1))),
        )

    def encode_offset(self, x: torch.Tensor) -> torch.Tensor:
        return self.offset_scale_factor * self.encoder(x)

    def decode(self, z: torch.Tensor, num_frames: int) -> list[torch.Tensor]:
        return self.decoder(z, num_frames)


class _TorchPmapAdapter:
    """TorchPointMapVae with the interface ``reference.pipeline.TorchRefPipeline`` uses."""

    def __init__(self, module: Any) -> None:
        self.module = module

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.encode_offset(x)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, num_frames: int) -> tuple[torch.Tensor, ...]:
        return tuple(self.module.decode(z, num_frames))


def load_torch_point_map_vae(folder: Path) -> _TorchPmapAdapter:
    """The torch point-map VAE reference with the weights of ``folder`` (official layout), strict load."""
    config = json.loads((Path(folder) / "config.json").read_text())
    module = TorchPointMapVae(config).eval()
    module.load_state_dict(load_file(str(Path(folder) / "diffusion_pytorch_model.safetensors")), strict=True)
    return _TorchPmapAdapter(module)
