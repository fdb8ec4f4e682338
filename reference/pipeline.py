"""PyTorch reference of the GeometryCrafter pipeline, written from spec section 4 (not from
daemon/pipeline.py): torch ops for every resize/quantile/grid, diffusers ``EulerDiscreteScheduler`` for the
steps, diffusers/transformers reference networks (UNet with a vid2vid forward, SVD VAE, CLIP) and a torch
point-map VAE reference (passed in: an object with ``encode(x4) -> 0.1*offset`` and
``decode(z, num_frames) -> (fnorm, log_depth, validity)``, each (N,1,H,W)).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def vid2vid_unet_forward(unet: Any, sample: torch.Tensor, timestep: float, ehs: torch.Tensor,
                         added_time_ids: torch.Tensor) -> torch.Tensor:
    """diffusers UNetSpatioTemporalConditionModel.forward with one context per frame (spec 2.1):
    ``ehs`` (B,F,D) is flattened to (B*F,1,D) instead of repeating a single (B,1,D) context."""
    b, f = sample.shape[:2]
    t = torch.tensor([timestep], dtype=torch.float32).expand(b)
    t_emb = unet.time_proj(t).to(sample.dtype)
    emb = unet.time_embedding(t_emb)
    time_embeds = unet.add_time_proj(added_time_ids.flatten()).reshape((b, -1)).to(emb.dtype)
    emb = emb + unet.add_embedding(time_embeds)
    sample = sample.flatten(0, 1)
    emb = emb.repeat_interleave(f, dim=0)
    ehs = ehs.reshape(b * f, 1, -1)
    sample = unet.conv_in(sample)
    indicator = torch.zeros(b, f, dtype=sample.dtype)
    res = (sample,)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            sample, r = block(hidden_states=sample, temb=emb, encoder_hidden_states=ehs, image_only_indicator=indicator)
        else:
            sample, r = block(hidden_states=sample, temb=emb, image_only_indicator=indicator)
        res += r
    sample = unet.mid_block(hidden_states=sample, temb=emb, encoder_hidden_states=ehs, image_only_indicator=indicator)
    for block in unet.up_blocks:
        r = res[-len(block.resnets):]
        res = res[: -len(block.resnets)]
        if getattr(block, "has_cross_attention", False):
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=r, encoder_hidden_states=ehs,
                           image_only_indicator=indicator)
        else:
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=r, image_only_indicator=indicator)
    sample = unet.conv_out(unet.conv_act(unet.conv_norm_out(sample)))
    return sample.reshape(b, f, *sample.shape[1:])


def _grid(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs = (torch.linspace(0, w - 1, w) / (w - 1) - 0.5) * 2
    ys = (torch.linspace(0, h - 1, h) / (h - 1) - 0.5) * 2
    return xs, ys


def _bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@dataclass
class RefOutput:
    point_map: np.ndarray
    mask: np.ndarray
    latents: np.ndarray  # stitched (T,4,h,w) fp32, already / 0.18215


class TorchRefPipeline:
    def __init__(self, model_dir: Path, variant: str, pmap_vae: Any, dtype: torch.dtype = torch.float32) -> None:
        from diffusers import (
            AutoencoderKLTemporalDecoder,
            EulerDiscreteScheduler,
            UNetSpatioTemporalConditionModel,
        )
        from transformers import CLIPVisionModelWithProjection

        model_dir = Path(model_dir)
        self.variant = variant
        self.dtype = dtype
        self.unet = UNetSpatioTemporalConditionModel.from_pretrained(model_dir / f"unet_{variant}").eval().to(dtype)
        self.vae = AutoencoderKLTemporalDecoder.from_pretrained(model_dir / "vae").eval()
        self.clip = CLIPVisionModelWithProjection.from_pretrained(model_dir / "image_encoder").eval().to(dtype)
        self.pmap = pmap_vae
        self.scheduler = EulerDiscreteScheduler.from_pretrained(model_dir / "scheduler")
        pre = json.loads((model_dir / "feature_extractor" / "preprocessor_config.json").read_text())
        self.mean = torch.tensor(pre["image_mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(pre["image_std"]).view(1, 3, 1, 1)

    # spec 4.2
    def prior(self, points: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        t, h0, w0, _ = points.shape
        p = points.permute(0, 3, 1, 2)  # (T,3,H0,W0)
        m = mask.float() * 2 - 1
        valid = (m > 0).float()
        s = (p[:, 2] * valid).mean() / (valid.mean() + 1e-8)
        s = torch.clamp(s, min=1e-3)
        p = p / s
        d = (1.0 / torch.clamp(p[:, 2], min=1e-3)) * valid
        lo = min(torch.quantile(d[i].flatten(), 1 - 0.99, interpolation="nearest") for i in range(t))
        hi = max(torch.quantile(d[i].flatten(), 0.99, interpolation="nearest") for i in range(t))
        d = torch.clamp((d - lo) / (hi - lo + 1e-4), 0, 1) * 2 - 1
        xy = p[:, :2] / (p[:, 2:3] + 1e-7)
        zlog = torch.log(p[:, 2] + 1e-7) * valid
        gx, gy = _grid(h0, w0)
        c = xy.mean(dim=(2, 3), keepdim=True)  # (T,2,1,1)
        fx = ((xy[:, 0:1] - c[:, 0:1]) / gx.view(1, 1, 1, w0)).mean(dim=(2, 3), keepdim=True)
        fy = ((xy[:, 1:2] - c[:, 1:2]) / gy.view(1, 1, h0, 1)).mean(dim=(2, 3), keepdim=True)
        focal = torch.cat([fx, fy], 1).expand(t, 2, h0, w0)
        d, m, zlog = d[:, None], m[:, None], zlog[:, None]
        if (h0, w0) != size:
            d, m, focal = _bilinear(d, size), _bilinear(m, size), _bilinear(focal, size)
            zlog = torch.log(_bilinear(torch.exp(torch.clamp(zlog, max=10)), size))
        fnorm = torch.sqrt(focal[:, 0:1] ** 2 + focal[:, 1:2] ** 2)
        return torch.cat([fnorm, zlog, d, m], 1)

    @torch.no_grad()
    def __call__(self, frames: np.ndarray, prior_points: np.ndarray, prior_mask: np.ndarray, *, height: int,
                 width: int, window_size: int, overlap: int, num_inference_steps: int, decode_chunk_size: int,
                 noise: np.ndarray | None = None, force_projection: bool = True, force_fixed_focal: bool = True,
                 use_extract_interp: bool = False, guidance_scale: float = 1.0) -> RefOutput:
        from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
            _resize_with_antialiasing,
        )

        dt = self.dtype
        size = (height, width)
        video = torch.from_numpy(frames).float().permute(0, 3, 1, 2) / 255.0
        t, _, h0, w0 = video.shape
        if t <= window_size:
            window_size, overlap = t, 0
        x4 = self.prior(torch.from_numpy(prior_points), torch.from_numpy(prior_mask), size)
        embs, vlats, plats = [], [], []
        for s in range(0, t, decode_chunk_size):
            v = video[s: s + decode_chunk_size]
            if (h0, w0) != size:
                v = F.interpolate(v, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
            v = v.to(dt) * 2 - 1
            c = _resize_with_antialiasing(v.float(), (224, 224))
            c = ((c + 1) / 2 - self.mean) / self.std
            embs.append(self.clip(pixel_values=c.to(dt)).image_embeds)
            vlats.append(self.vae.encode(v.float()).latent_dist.mode().to(dt))
            xs = x4[s: s + decode_chunk_size]
            mean = self.vae.encode(xs[:, 2:3].repeat(1, 3, 1, 1)).latent_dist.mode()
            plats.append(((mean + self.pmap.encode(xs)) * 0.18215).to(dt))
        emb, vlat, plat = torch.cat(embs)[None], torch.cat(vlats)[None], torch.cat(plats)[None]
        ids = torch.tensor([[7, 127, 0.02]], dtype=dt)

        stride = window_size - overlap
        sch = self.scheduler
        if self.variant == "diff":
            sch.set_timesteps(num_inference_steps)
            bank = torch.from_numpy(noise).to(dt) * sch.init_noise_sigma
        A = None
        s = 0
        while s < t - overlap:
            e = min(s + window_size, t)
            if self.variant == "determ":
                u = vid2vid_unet_forward(self.unet, torch.cat([plat[:, s:e], vlat[:, s:e]], 2), 1.6378, emb[:, s:e], ids)
                x = -u
            else:
                x = bank[:, : e - s].clone()
                bank = torch.cat([bank[:, -overlap:], bank[:, :stride]], 1)
                if A is not None and overlap > 0:
                    x[:, :overlap] = A[:, -overlap:] + x[:, :overlap] / sch.init_noise_sigma * sch.sigmas[0]
                sch.set_timesteps(num_inference_steps)
                for tt in sch.timesteps:
                    inp = sch.scale_model_input(x, tt)
                    u = vid2vid_unet_forward(self.unet, torch.cat([inp, vlat[:, s:e], plat[:, s:e]], 2), float(tt),
                                             emb[:, s:e], ids)
                    if guidance_scale > 1:  # upstream diff_ppl.py: a second call on [inp, 0, 0], zero context
                        uncond = torch.cat([inp, torch.zeros_like(inp), torch.zeros_like(inp)], 2)
                        uu = vid2vid_unet_forward(self.unet, uncond, float(tt), torch.zeros_like(emb[:, s:e]), ids)
                        u = uu + guidance_scale * (u - uu)
                    x = sch.step(u, tt, x).prev_sample
            if A is None:
                A = x
            else:
                if overlap > 0:
                    w = torch.linspace(0, 1, overlap).view(1, -1, 1, 1, 1)
                    A[:, -overlap:] = w * x[:, :overlap] + (1 - w) * A[:, -overlap:]
                A = torch.cat([A, x[:, overlap:]], 1)
            s += stride
        z = A[0].float() / 0.18215

        heads: list[list[torch.Tensor]] = [[], [], []]
        for s in range(0, t, decode_chunk_size):
            out = self.pmap.decode(z[s: s + decode_chunk_size], z[s: s + decode_chunk_size].shape[0])
            for k in range(3):
                heads[k].append(out[k])
        a, dl, vl = (torch.cat(h) for h in heads)
        if (h0, w0) != size:
            if use_extract_interp:
                dl = F.interpolate(dl, (h0, w0), mode="nearest-exact")
                vl = F.interpolate(vl, (h0, w0), mode="nearest-exact")
            else:
                dl = torch.log(_bilinear(torch.exp(torch.clamp(dl, max=10)), (h0, w0)))
                vl = _bilinear(vl, (h0, w0))
            a = _bilinear(a, (h0, w0))
        diag = (w0 ** 2 + h0 ** 2) ** 0.5
        fx, fy = a * w0 / diag, a * h0 / diag
        valid = vl > 0
        if force_projection:
            dims = None if force_fixed_focal else (1, 2, 3)
            vf = valid.float()
            if dims is None:
                fx = (fx * vf).mean() / (vf.mean() + 1e-4)
                fy = (fy * vf).mean() / (vf.mean() + 1e-4)
            else:
                fx = (fx * vf).mean(dims, keepdim=True) / (vf.mean(dims, keepdim=True) + 1e-4)
                fy = (fy * vf).mean(dims, keepdim=True) / (vf.mean(dims, keepdim=True) + 1e-4)
        gx, gy = _grid(h0, w0)
        zz = torch.exp(torch.clamp(dl, max=10))
        pts = torch.cat([fx * gx.view(1, 1, 1, w0) * zz, fy * gy.view(1, 1, h0, 1) * zz, zz], 1)
        return RefOutput(point_map=pts.permute(0, 2, 3, 1).numpy(), mask=valid[:, 0].numpy(), latents=z.numpy())
