"""Write a complete random-weight GeometryCrafter model folder in the official layout (tiny configs).

Layout (spec 1.1): ``unet_diff/`` (in_channels 12), ``unet_determ/`` (in_channels 8), ``point_map_vae/``,
``vae/`` (SVD AutoencoderKLTemporalDecoder), ``image_encoder/`` (CLIPVisionModelWithProjection),
``feature_extractor/preprocessor_config.json``, ``scheduler/scheduler_config.json``, ``moge/model.pt``.
Configs come from :mod:`daemon.weights.configs`. The reference classes are diffusers/transformers (torch);
the point-map VAE has no library class, so it is built by ``daemon.model.init_point_map_vae`` and
``moge/model.pt`` by ``moge_sidecar.tiny.make_tiny_moge``. torch, diffusers and transformers are imported
lazily (only this function needs them).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon.weights import configs as tiny_configs

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# spec 1.2: EulerDiscreteScheduler of SVD-xt.
SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": False,
    "sigma_max": 700.0,
    "sigma_min": 0.002,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "timestep_type": "continuous",
    "trained_betas": None,
    "use_karras_sigmas": True,
    "final_sigmas_type": "zero",
}

PREPROCESSOR_CONFIG: dict[str, Any] = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": list(CLIP_MEAN),
    "image_processor_type": "CLIPImageProcessor",
    "image_std": list(CLIP_STD),
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 224},
}

# part -> files that must exist for the part to count as complete.
PARTS: dict[str, tuple[str, ...]] = {
    "unet_diff": ("config.json", "diffusion_pytorch_model.safetensors"),
    "unet_determ": ("config.json", "diffusion_pytorch_model.safetensors"),
    "vae": ("config.json", "diffusion_pytorch_model.safetensors"),
    "image_encoder": ("config.json", "model.safetensors"),
    "point_map_vae": ("config.json", "diffusion_pytorch_model.safetensors"),
    "feature_extractor": ("preprocessor_config.json",),
    "scheduler": ("scheduler_config.json",),
    "moge": ("model.pt",),
}


def missing_parts(model_dir: Path) -> list[str]:
    """Parts of the official layout that are absent or incomplete in ``model_dir``."""
    model_dir = Path(model_dir)
    return [p for p, files in PARTS.items() if not all((model_dir / p / f).is_file() for f in files)]


def _perturb_zero_params(module: Any, seed: int, std: float = 0.02) -> None:
    """Give all-zero tensors (zero-init biases, projections) small random values so no branch is dead."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in module.parameters():
            if not torch.any(param != 0):
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def _write_unet(out: Path, variant: str, seed: int) -> None:
    import safetensors.torch  # noqa: F401  (diffusers save_pretrained needs it imported)
    import torch
    from diffusers import UNetSpatioTemporalConditionModel

    torch.manual_seed(seed + tiny_configs.UNET_IN_CHANNELS[variant])
    unet = UNetSpatioTemporalConditionModel(
        in_channels=tiny_configs.UNET_IN_CHANNELS[variant], **tiny_configs.TINY_UNET
    )
    _perturb_zero_params(unet, seed)
    unet.save_pretrained(out, safe_serialization=True)


def _write_svd_vae(out: Path, seed: int) -> None:
    import safetensors.torch  # noqa: F401
    import torch
    from diffusers import AutoencoderKLTemporalDecoder

    torch.manual_seed(seed + 100)
    vae = AutoencoderKLTemporalDecoder(**tiny_configs.TINY_SVD_VAE)
    _perturb_zero_params(vae, seed + 100)
    vae.save_pretrained(out, safe_serialization=True)


def _write_clip(out: Path, seed: int) -> None:
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed + 200)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**tiny_configs.TINY_CLIP_VISION))
    _perturb_zero_params(clip, seed + 200)
    clip.save_pretrained(out, safe_serialization=True)


def _write_point_map_vae(out: Path, seed: int) -> None:
    from daemon.model.vae import init_point_map_vae, save_point_map_vae  # imports Jittor

    module = init_point_map_vae(dict(tiny_configs.TINY_POINT_MAP_VAE), seed + 300)
    save_point_map_vae(module, out)


def _write_json(out: Path, name: str, data: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(data, indent=2) + "\n")


def _write_moge(out: Path, seed: int) -> None:
    from moge_sidecar.tiny import make_tiny_moge

    out.mkdir(parents=True, exist_ok=True)
    make_tiny_moge(out / "model.pt", seed=seed + 400)


def make_tiny(
    model_dir: Path | str, seed: int = 0, force: bool = False, parts: list[str] | None = None
) -> Path:
    """Write every missing part (all parts with ``force``) of a tiny random-weight model folder.

    ``parts`` restricts the work to those parts (names of :data:`PARTS`), e.g. for tests that do not need
    the MoGe checkpoint.

    Each part is written into a temporary sibling folder and renamed into place, so an interrupted run
    never leaves a half-written part that would count as complete. Returns the folder.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    writers: dict[str, Callable[[Path], None]] = {
        "unet_diff": lambda p: _write_unet(p, "diff", seed),
        "unet_determ": lambda p: _write_unet(p, "determ", seed),
        "vae": lambda p: _write_svd_vae(p, seed),
        "image_encoder": lambda p: _write_clip(p, seed),
        "point_map_vae": lambda p: _write_point_map_vae(p, seed),
        "feature_extractor": lambda p: _write_json(p, "preprocessor_config.json", PREPROCESSOR_CONFIG),
        "scheduler": lambda p: _write_json(p, "scheduler_config.json", SCHEDULER_CONFIG),
        "moge": lambda p: _write_moge(p, seed),
    }
    wanted = list(PARTS) if parts is None else list(parts)
    unknown = [p for p in wanted if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown part(s) {unknown}; allowed: {', '.join(PARTS)}")
    todo = wanted if force else [p for p in missing_parts(model_dir) if p in wanted]
    for part in todo:
        tmp = model_dir / f".{part}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        writers[part](tmp)
        final = model_dir / part
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        log.info("wrote tiny part %s in %s", part, model_dir)
    if not todo:
        log.info("tiny model folder %s complete, nothing to do", model_dir)
    return model_dir
