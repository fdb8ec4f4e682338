"""Random-weight MoGe v1 checkpoints for tests, the demo and benchmarks (no weights exist offline).

`make_tiny_moge` writes `model.pt` = {'model_config': ..., 'model': state_dict} in the layout of the official
`Ruicheng/moge-vitl` checkpoint, loadable by `moge.model.v1.MoGeModel.from_pretrained(path)` offline.
Constraint (../shared/notes/dependencies.md): head channel counts are multiples of 32 (GroupNorm(C // 32)).

- kind "tiny": a custom 4-block, 64-wide ViT/14 backbone registered in dlr-moge's backbone table under
  `TINY_ENCODER` (moge_sidecar/backbones.py; `moge_sidecar.infer.load_moge` registers it).
- kind "vits": stock DINOv2 ViT-S/14 with a 64/32-channel head (~22 M params), official area range; for
  benchmarks.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch

from moge_sidecar.backbones import TINY_ENCODER, register_tiny_backbone
from moge_sidecar.infer import _forward_v1

# Official moge-vitl config keys (pinned MoGe accepts them; dlr-moge v1 maps trained_area_range and ignores
# output_mask / split_head).
TINY_MOGE_CONFIG: dict[str, Any] = {
    "encoder": TINY_ENCODER,
    "intermediate_layers": 4,
    "dim_proj": 32,
    "dim_upsample": [32, 32, 32],
    "dim_times_res_block_hidden": 1,
    "num_res_blocks": 1,
    "output_mask": True,
    "split_head": True,
    "remap_output": "exp",
    "trained_area_range": [196 * 16, 196 * 36],
    "last_res_blocks": 0,
    "last_conv_channels": 32,
    "last_conv_size": 1,
}

VITS_MOGE_CONFIG: dict[str, Any] = {
    **TINY_MOGE_CONFIG,
    "encoder": "dinov2_vits14",
    "dim_proj": 64,
    "dim_upsample": [64, 32, 32],
    "trained_area_range": [250000, 500000],
}

CONFIGS = {"tiny": TINY_MOGE_CONFIG, "vits": VITS_MOGE_CONFIG}


def build_moge(config: dict[str, Any], seed: int = 0) -> Any:
    """Construct a random-weight MoGe v1 model from a checkpoint config (never touches the hub)."""
    from moge.model.v1 import MoGeModel

    register_tiny_backbone()
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The following deprecated/invalid arguments are ignored")
        model = MoGeModel(**dict(config))
    return model.eval()


def _calibrate_mask(model: Any, seed: int) -> None:
    """Rescale the mask head's last conv so that about half the pixels of an image are valid (raw > 0.5).

    A freshly initialised head puts every raw mask value near 0 (all invalid), which would leave focal/shift
    recovery with nothing to fit and make tests of the mask path vacuous.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    image = torch.rand((1, 3, 56, 84), generator=gen)
    with torch.inference_mode():
        _, raw = _forward_v1(model, image)
    mean, std = float(raw.mean()), float(raw.std())
    conv = model.head.output_block[1][-1]
    k = 0.5 / max(std, 1e-6)
    with torch.no_grad():
        conv.weight.mul_(k)
        conv.bias.copy_((conv.bias - mean) * k + 0.5)


def make_tiny_moge(path: Path, seed: int = 0, kind: str = "tiny") -> None:
    """Write a random-weight MoGe v1 `model.pt` ({'model_config', 'model'}) to `path` (kind: tiny | vits)."""
    if kind not in CONFIGS:
        raise ValueError(f"kind must be one of {sorted(CONFIGS)}, got {kind!r}")
    config = dict(CONFIGS[kind])
    model = build_moge(config, seed)
    _calibrate_mask(model, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model_config": config, "model": model.state_dict()}, str(tmp))
    tmp.replace(path)


# MoGe-2 (dlr-moge `moge.model.v2`): the structure of the official v2 config (configs/train/v2.json of
# microsoft/MoGe, as in Ruicheng/moge-2-vitl-normal: encoder + neck + points/normal/mask heads + the metric
# scale MLP on the class token), narrowed to the tiny 64-wide backbone. Norms are "none" as in the official
# config, so channel counts need not be multiples of 32.
def _v2_stack(dim_in: list[int], dim_out: list[int | None], num_res_blocks: list[int]) -> dict[str, Any]:
    return {"dim_in": dim_in, "dim_out": dim_out, "dim_res_blocks": [64, 32, 32, 32, 32],
            "num_res_blocks": num_res_blocks, "res_block_in_norm": "none", "res_block_hidden_norm": "none",
            "resamplers": ["conv_transpose", "conv_transpose", "conv_transpose", "bilinear"]}


TINY_MOGE2_CONFIG: dict[str, Any] = {
    "encoder": {"backbone": TINY_ENCODER, "intermediate_layers": [0, 1, 2, 3], "dim_out": 64},
    "neck": _v2_stack([66, 2, 2, 2, 2], None, [0, 1, 1, 1, 0]),  # type: ignore[arg-type]
    "points_head": _v2_stack([64, 32, 32, 32, 32], [None, None, None, None, 3], [0, 1, 1, 1, 0]),
    "normal_head": _v2_stack([64, 32, 32, 32, 32], [None, None, None, None, 3], [0, 1, 1, 1, 0]),
    "mask_head": _v2_stack([64, 32, 32, 32, 32], [None, None, None, None, 1], [0, 1, 1, 1, 0]),
    "scale_head": {"dims": [64, 64, 1]},
    "remap_output": "exp",
    "num_tokens_range": [16, 36],
}


def make_tiny_moge2(path: Path, seed: int = 0, metric_scale: float = 3.0) -> None:
    """Write a random-weight MoGe-2 `model.pt` ({'model_config', 'model'}, the official v2 layout) to `path`.

    The scale head's output bias is set so that its metric scale is about ``metric_scale`` (a random head
    gives ~1, which would make a metric test unable to tell scaled from unscaled output); the mask head's
    bias is shifted so that about half the pixels of an image are valid (sigmoid > 0.5)."""
    import torch
    from moge.model.v2 import MoGeModel

    register_tiny_backbone()
    torch.manual_seed(seed)
    config = json_copy(TINY_MOGE2_CONFIG)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The following deprecated/invalid arguments are ignored")
        model = MoGeModel(**json_copy(config)).eval()
    with torch.no_grad():
        last = model.scale_head[-1]
        last.weight.mul_(0.01)
        last.bias.fill_(math.log(metric_scale))
        image = torch.rand((1, 3, 56, 84), generator=torch.Generator().manual_seed(seed + 1))
        m = model.forward(image, num_tokens=24)["mask"].clamp(1e-6, 1 - 1e-6)
        model.mask_head.output_blocks[-1].bias.sub_(torch.logit(m).median())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model_config": config, "model": model.state_dict()}, str(tmp))
    tmp.replace(path)


def json_copy(data: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of a JSON-like config (MoGe's constructors keep references to the lists they get)."""
    return json.loads(json.dumps(data))
