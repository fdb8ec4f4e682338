"""End-to-end parity: the Jittor pipeline (GeometryCrafter.from_pretrained on a make-tiny folder, production
loaders) vs the torch reference pipeline (reference/pipeline.py: diffusers/transformers networks and the
torch point-map VAE reference) on the same weights, injected noise and priors, everything fp32.

Setup: 7 frames 72x100 processed at 64x128 (so both resizes run), window 3 / overlap 1 (3 windows),
2 denoising steps, decode chunk 3 (does not divide 7), both variants. Sizes are small because Jittor's CPU
convolutions are slow (the point-map decoder dominates: ~20 s CPU for 4 frames at 64x128). 64x64 is avoided:
its 1x1 deepest UNet level makes GroupNorm statistics ill-conditioned (rel. error grew to 8e-4 there).
Measured at this setup: diff 3.8e-5 / determ 1.9e-5 relative, masks 100 % equal.
Bounds (~3x the measured error, docs/parity.md): point maps max|a-b| / max|b| <= 1.2e-4 on the common mask,
masks >= 99.98 % equal.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from daemon.scenes import tilted_plane
from helpers.pipeline_fixtures import tiny_model_dir

T, H0, W0, H, W = 7, 72, 100, 64, 128
KW = dict(height=H, width=W, window_size=3, overlap=1, num_inference_steps=2, decode_chunk_size=3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def torch_pmap(model_dir: Path):
    from reference.point_map_vae import load_torch_point_map_vae

    return load_torch_point_map_vae(model_dir / "point_map_vae")


@pytest.mark.parametrize("variant", ["diff", "determ"])
def test_jittor_pipeline_matches_torch_reference(model_dir: Path, torch_pmap, variant: str) -> None:
    from daemon.pipeline import GeometryCrafter
    from reference.pipeline import TorchRefPipeline

    frames, points, mask = tilted_plane(T, H0, W0, seed=21)
    noise = np.random.default_rng(5).standard_normal((1, KW["window_size"], 4, H // 8, W // 8)).astype(np.float32)
    want = TorchRefPipeline(model_dir, variant, torch_pmap)(frames, points, mask, noise=noise, **KW)
    gc = GeometryCrafter.from_pretrained(model_dir, variant=variant, dtype="fp32")
    got = gc(frames, points, mask, noise=noise, quiet=True, **KW)
    both = got.mask & want.mask
    assert both.mean() > 0.1, both.mean()
    err = float(np.abs(got.point_map - want.point_map)[both].max() / np.abs(want.point_map[both]).max())
    agree = float((got.mask == want.mask).mean())
    print(f"{variant}: point map rel err {err:.3e}, mask agreement {agree:.6f}, timings {got.timings}")
    assert err <= 1.2e-4, err
    assert agree >= 0.9998, agree


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("daemon.jittor_env", fromlist=["x"]).detect_cuda().driver_ok, reason="needs CUDA")
def test_fp16_policy_close_to_fp32_reference(model_dir: Path, torch_pmap) -> None:
    """Official precision policy (UNet + CLIP fp16, VAEs fp32) vs the fp32 torch reference. The bound is a
    first estimate (not yet measured on a GPU: no device was available to this task)."""
    from daemon.pipeline import GeometryCrafter
    from reference.pipeline import TorchRefPipeline

    frames, points, mask = tilted_plane(T, H0, W0, seed=21)
    noise = np.random.default_rng(5).standard_normal((1, KW["window_size"], 4, H // 8, W // 8)).astype(np.float16)
    want = TorchRefPipeline(model_dir, "diff", torch_pmap)(frames, points, mask, noise=noise.astype(np.float32), **KW)
    got = GeometryCrafter.from_pretrained(model_dir, variant="diff", dtype="fp16")(frames, points, mask, noise=noise,
                                                                                  quiet=True, **KW)
    both = got.mask & want.mask
    err = float(np.abs(got.point_map - want.point_map)[both].max() / np.abs(want.point_map[both]).max())
    agree = float((got.mask == want.mask).mean())
    print(f"fp16 policy vs fp32 reference: rel err {err:.3e}, mask agreement {agree:.5f}")
    assert err <= 5e-2 and agree >= 0.98
