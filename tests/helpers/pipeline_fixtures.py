"""Shared inputs for the pipeline tests (the synthetic clip with a plausible prior is ``daemon.scenes.tilted_plane``):
torch adapters, and a small torch point-map VAE stand-in (used only where both
sides share the same torch module)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from daemon.weights.tiny import make_tiny
from reference.pipeline import vid2vid_unet_forward


class StandInPointMapVAE(torch.nn.Module):
    """Small torch module with the point-map VAE interface (encode -> 0.1*offset (N,4,h,w);
    decode(z, F) -> 3 heads (N,1,8h,8w)), with a temporal mix so decode depends on chunking like the real one."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.enc = torch.nn.Sequential(
            torch.nn.Conv2d(4, 16, 3, stride=2, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(16, 16, 3, stride=2, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(16, 4, 3, stride=2, padding=1),
        )
        self.dec = torch.nn.Sequential(
            torch.nn.Conv2d(4, 16, 3, padding=1), torch.nn.SiLU(), torch.nn.Upsample(scale_factor=8),
            torch.nn.Conv2d(16, 3, 3, padding=1),
        )
        self.time = torch.nn.Conv3d(3, 3, (3, 1, 1), padding=(1, 0, 0))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return 0.1 * self.enc(x)

    def decode(self, z: torch.Tensor, num_frames: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y = self.dec(z)  # (N,3,H,W)
        y = y + self.time(y.permute(1, 0, 2, 3)[None])[0].permute(1, 0, 2, 3)
        return y[:, 0:1] + 1.0, y[:, 1:2] * 0.3, y[:, 2:3] + 0.5


def _t(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


class TorchNets:
    """Adapters giving the torch reference networks the daemon.model interface (numpy in, numpy out)."""

    def __init__(self, ref: Any) -> None:
        self.ref = ref
        self._fwd = vid2vid_unet_forward
        outer = self

        class _Unet:
            @torch.no_grad()
            def __call__(self, sample, timestep, ehs, ids):  # noqa: ANN001
                dt = outer.ref.dtype
                return outer._fwd(outer.ref.unet, _t(sample).to(dt), float(timestep), _t(ehs).to(dt), _t(ids).to(dt)).numpy()

        class _Vae:
            @torch.no_grad()
            def encode(self, x):  # noqa: ANN001
                return outer.ref.vae.encode(_t(x).float()).latent_dist.mode().numpy()

        class _Clip:
            @torch.no_grad()
            def image_embeds(self, px):  # noqa: ANN001
                return outer.ref.clip(pixel_values=_t(px).to(outer.ref.dtype)).image_embeds.numpy()

        class _Pmap:
            @torch.no_grad()
            def encode(self, x):  # noqa: ANN001
                return outer.ref.pmap.encode(_t(x).float()).numpy()

            @torch.no_grad()
            def decode(self, z, num_frames):  # noqa: ANN001
                return tuple(h.numpy() for h in outer.ref.pmap.decode(_t(z).float(), num_frames))

        self.unet, self.svd_vae, self.clip, self.point_map_vae = _Unet(), _Vae(), _Clip(), _Pmap()


def tiny_model_dir(base: Path, seed: int = 0) -> Path:
    """The full make_tiny folder (all parts incl. point-map VAE and MoGe) under a pytest basetemp; make_tiny
    skips complete parts, so every test module can call this and only the first one pays."""
    d = base / f"tiny_model_seed{seed}"
    make_tiny(d, seed=seed)
    return d
