"""MoGe prior inference in the order of operations pinned by GeometryCrafter (spec 4.2).

The official pipeline calls the MoGe commit `dd158c0` (`moge_model.MoGeModel.infer(image, resolution_level=9,
apply_mask=False)`, force_projection=True, fov_x=None). dlr-moge 2.0.0 loads the same weights but its
`v1.MoGeModel.infer` differs (fp16 autocast by default; raw points/mask upsampled to full size *before*
focal/shift recovery). This module reproduces the pinned order with dlr-moge's modules and utilities:

  (a) bicubic antialiased resize of the [0,1] image to the area
      min_area + (max_area - min_area) * resolution_level / 9  of the checkpoint's `trained_area_range`
  (b) forward in fp32 (fp16 autocast only when asked, and never on CPU): normalise, bilinear antialiased
      resize to multiples of 14, DINOv2 intermediate layers, head, output remap
  (c) at that LOW resolution: focal + z-shift recovery (`moge.utils.geometry_torch.recover_focal_shift`,
      mask = raw mask > 0.5), fx = focal/2 * sqrt(1 + r^2) / r, fy = focal/2 * sqrt(1 + r^2) with the
      aspect ratio r = W0/H0 of the ORIGINAL image (pinned code), intrinsics with cx = cy = 0.5,
      depth = z + shift, points re-projected from depth on the resized pixel grid
      (`utils3d.pt.depth_map_to_point_map`, pixel centres = pinned `image_uv` + `unproject_cv`)
  (d) bilinear resize (align_corners off, no antialias) of points and raw mask to (H0, W0)
  (e) mask = resized mask > 0.5; points are not masked (apply_mask=False).

Kept differences (docs/parity.md): at exactly the expected area the pinned code raises NameError
(`expected_width` is only set when it resizes); here the grid is then the input's. Frames whose low-resolution
mask has fewer than 2 valid points get focal 1, shift 0 (dlr-moge's guard in `recover_focal_shift`) where the
pinned code would call the least-squares solver on them (0 points: scipy raises).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moge_sidecar.backbones import register_tiny_backbone

log = logging.getLogger(__name__)


# ``model`` below: a moge.model.v1/v2 MoGeModel (dlr-moge ships no type information)
class MoGePrior:
    """A loaded MoGe model plus the settings of the pinned inference; call it on (B,3,H0,W0) [0,1] images."""

    def __init__(self, model: Any, area_range: tuple[float, float], version: int,
                 resolution_level: int = 9, fp16: bool = False) -> None:
        if not 0 <= resolution_level <= 9:
            raise ValueError(f"resolution_level must be in 0..9, got {resolution_level}")
        self.model = model
        self.area_range = area_range
        self.version = version
        self.resolution_level = resolution_level
        self.device = next(model.parameters()).device
        if fp16 and self.device.type == "cpu":
            log.warning("fp16 MoGe requested on CPU; using fp32 (fp16 on CPU is 15-70x slower)")
            fp16 = False
        self.fp16 = fp16

    @torch.inference_mode()
    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image (B,3,H0,W0) float32 in [0,1] -> points (B,H0,W0,3) float32, mask (B,H0,W0) bool."""
        image = image.to(device=self.device, dtype=torch.float32)
        if self.version == 2:
            out = self.model.infer(image, resolution_level=self.resolution_level, apply_mask=False,
                                   use_fp16=self.fp16)
            return out["points"].float(), out["mask"]
        return infer_pinned(self.model, image, self.area_range, self.resolution_level, self.fp16)


def _forward_v1(model: Any, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pinned `MoGeModel.forward` on an already resized image: points (B,h,w,3), raw mask (B,h,w)."""
    h, w = image.shape[-2:]
    image = (image - model.image_mean) / model.image_std
    image_14 = F.interpolate(image, (h // 14 * 14, w // 14 * 14), mode="bilinear", align_corners=False,
                             antialias=True)
    features = model.backbone.get_intermediate_layers(image_14, model.intermediate_layers,
                                                      return_class_token=True)
    points, mask = model.head(features, image)
    points = points.permute(0, 2, 3, 1).float()
    remap = model.remap_output
    if remap is False:
        remap = "linear"
    elif remap is True:
        remap = "sinh"
    if remap != "linear":  # pinned forward remaps before any resize; same functions as dlr-moge
        saved, model.remap_output = model.remap_output, remap
        try:
            # PATCH(dlr-moge==2.0.0): its private remap, with the pinned code's remap mode set for the call
            points = model._remap_points(points)
        finally:
            model.remap_output = saved
    return points, mask.squeeze(1).float()


def infer_pinned(model: Any, image: torch.Tensor, area_range: tuple[float, float],
                 resolution_level: int = 9, fp16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps (a)-(e) of the module docstring. image (B,3,H0,W0) float32 [0,1] on the model's device."""
    import utils3d
    from moge.utils.geometry_torch import recover_focal_shift

    _, _, h0, w0 = image.shape
    area = h0 * w0
    min_area, max_area = area_range
    expected_area = min_area + (max_area - min_area) * (resolution_level / 9)
    if expected_area != area:
        scale = (expected_area / area) ** 0.5
        w, h = int(w0 * scale), int(h0 * scale)
        image = F.interpolate(image, (h, w), mode="bicubic", align_corners=False, antialias=True)
    else:
        h, w = h0, w0

    with torch.autocast(device_type=image.device.type, dtype=torch.float16, enabled=fp16):
        points, mask = _forward_v1(model, image)
    points, mask = points.float(), mask.float()

    focal, shift = recover_focal_shift(points, mask > 0.5)
    # pinned moge_model.py: the ORIGINAL aspect ratio, not the truncated resized one (for 16:9 input fx and fy
    # differ from the resized-size formula by ~1e-4 relative)
    aspect = w0 / h0
    fx = focal / 2 * (1 + aspect ** 2) ** 0.5 / aspect
    fy = focal / 2 * (1 + aspect ** 2) ** 0.5
    half = torch.full_like(fx, 0.5)
    intrinsics = utils3d.pt.intrinsics_from_focal_center(fx, fy, half, half)
    depth = points[..., 2] + shift[..., None, None]
    points = utils3d.pt.depth_map_to_point_map(depth, intrinsics=intrinsics)

    if (h, w) != (h0, w0):
        points = F.interpolate(points.permute(0, 3, 1, 2), (h0, w0), mode="bilinear", align_corners=False,
                               antialias=False).permute(0, 2, 3, 1)
        mask = F.interpolate(mask.unsqueeze(1), (h0, w0), mode="bilinear", align_corners=False,
                             antialias=False).squeeze(1)
    return points.contiguous(), mask > 0.5


def load_checkpoint(checkpoint: Path) -> dict[str, Any]:
    """`model.pt` = {'model_config': dict, 'model': state dict} (weights_only load, no hub)."""
    return torch.load(str(checkpoint), map_location="cpu", weights_only=True)


def area_range_of(model_config: dict[str, Any]) -> tuple[float, float]:
    """The checkpoint's `trained_area_range` (pinned MoGe's key); newer configs store num_tokens_range."""
    if "trained_area_range" in model_config:
        lo, hi = model_config["trained_area_range"]
    else:
        lo, hi = (t * 14 ** 2 for t in model_config.get("num_tokens_range", (1200, 2500)))
    return float(lo), float(hi)


def load_moge(checkpoint: Path, device: str = "cpu", fp16: bool = False, resolution_level: int = 9,
              version: int = 1) -> MoGePrior:
    """Build MoGe from a local model.pt exactly as `MoGeModel.from_pretrained` does (config -> cls(**config)
    -> load_state_dict), reading the file once. Offline: never calls init_weights / the hub."""
    register_tiny_backbone()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ckpt = load_checkpoint(checkpoint)
    config = dict(ckpt["model_config"])
    area_range = area_range_of(config)
    if version == 1:
        from moge.model.v1 import MoGeModel
    elif version == 2:
        from moge.model.v2 import MoGeModel
    else:
        raise ValueError(f"moge version must be 1 or 2, got {version}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The following deprecated/invalid arguments are ignored")
        model = MoGeModel(**config)
    model.load_state_dict(ckpt["model"])
    model = model.to(device).eval()
    log.info("loaded MoGe", extra={"checkpoint": str(checkpoint), "device": device, "version": version,
                                    "params": sum(p.numel() for p in model.parameters())})
    return MoGePrior(model, area_range, version, resolution_level, fp16)


def frames_to_image(frames: torch.Tensor) -> torch.Tensor:
    """(B,H,W,3) uint8 -> (B,3,H,W) float32 in [0,1] (the pipeline's frame conversion, spec 4.1)."""
    return frames.permute(0, 3, 1, 2).float() / 255.0
