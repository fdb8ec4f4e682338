"""Parity of the Jittor CLIP vision tower (daemon/model/clip.py) with transformers'
``CLIPVisionModelWithProjection`` at TINY_CLIP_VISION, loaded through the production loader.

Tolerance fp32: max|a-b|/max|b| <= 1.2e-6 (~3x the measured 4.0e-7 gelu / 2.0e-7 quick_gelu); fp16 (weights and activations) vs the fp32 reference <= 3e-3
(reached 6.0e-4; torch's own fp16 forward: 6.8e-4).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from daemon.jittor_env import import_jittor  # noqa: E402

jt = import_jittor()

from daemon.model import load_clip  # noqa: E402
from daemon.weights.configs import TINY_CLIP_VISION  # noqa: E402
from helpers.model_testutil import perturb_, rel_err  # noqa: E402

TOL = 1.2e-6
TOL16 = 3e-3


def _save(folder: Path, seed: int, **overrides) -> torch.nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**{**TINY_CLIP_VISION, **overrides})).eval()
    perturb_(model, seed + 100, 0.02)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_clip_parity_fp32(tmp_path: Path, pixels: np.ndarray, act: str):
    ref = _save(tmp_path, 0, hidden_act=act)
    assert (tmp_path / "model.safetensors").is_file()
    clip = load_clip(tmp_path, dtype="fp32")
    with torch.no_grad():
        want = ref(pixel_values=torch.from_numpy(pixels)).image_embeds.numpy()
    got = clip.image_embeds(pixels)
    assert tuple(got.shape) == (2, TINY_CLIP_VISION["projection_dim"])
    err = rel_err(got.numpy(), want)
    print(f"clip {act} fp32 rel err {err:.3e}")
    assert err < TOL, err


def test_clip_fp16_default_and_position_ids_ignored(tmp_path: Path, pixels: np.ndarray):
    from safetensors.numpy import load_file, save_file

    ref = _save(tmp_path, 1)
    state = load_file(str(tmp_path / "model.safetensors"))
    # older files carry this int64 buffer
    state["vision_model.embeddings.position_ids"] = np.arange(257, dtype=np.int64)[None]
    save_file({k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in state.items()},
              str(tmp_path / "model.fp16.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    clip = load_clip(tmp_path)  # default dtype fp16, file model.fp16.safetensors
    assert clip.visual_projection.weight.dtype == "float16"
    with torch.no_grad():
        want = ref(pixel_values=torch.from_numpy(pixels)).image_embeds.numpy()
    got = clip.image_embeds(jt.array(pixels))
    assert got.dtype == "float16"
    assert rel_err(got.numpy(), want) < TOL16
    with pytest.raises(ValueError, match=r"expected pixels \[N,3,224,224\]"):
        clip.image_embeds(pixels[:, :, :112, :112])
