"""Temporal mixing (daemon/model/blocks.py ``AlphaBlender``) vs diffusers' ``AlphaBlender``, bitwise in fp16.

diffusers computes alpha = sigmoid(mix_factor) in the parameter dtype, casts it to the activation dtype and
blends in that dtype, one rounding per op (torch's CPU and CUDA fp16 kernels both form each op in float32
and round once). The UNet uses "learned_with_images" (image_only_indicator all zero), the temporal decoders
"learned" with ``switch_spatial_to_temporal_mix``.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from diffusers.models.resnet import AlphaBlender as TorchAlphaBlender  # noqa: E402

from daemon.jittor_env import import_jittor  # noqa: E402

jt = import_jittor()

from daemon.model import blocks as B  # noqa: E402


def _inputs(dtype: type) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    shape = (1, 64, 3, 8, 8)  # [B, C, F, H, W]
    xs = (rng.standard_normal(shape) * 3).astype(dtype)
    xt = (rng.standard_normal(shape) * 3).astype(dtype)
    return xs, xt


@pytest.mark.parametrize("switch", [False, True])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_alpha_blender_matches_diffusers_bitwise(switch: bool, dtype: type) -> None:
    mix = 0.3137  # not a fp16 number: the parameter rounding matters in fp16
    strategy = "learned" if switch else "learned_with_images"
    ref = TorchAlphaBlender(alpha=mix, merge_strategy=strategy, switch_spatial_to_temporal_mix=switch)
    tdtype = torch.float16 if dtype == np.float16 else torch.float32
    ref = ref.to(tdtype)
    blender = B.AlphaBlender(switch=switch, alpha=mix)
    blender.mix_factor.assign(jt.array(np.array([mix], dtype)))
    xs, xt = _inputs(dtype)
    indicator = torch.zeros(1, 3)
    with torch.no_grad():
        want = ref(torch.from_numpy(xs), torch.from_numpy(xt), image_only_indicator=indicator).numpy()
    got = blender(jt.array(xs), jt.array(xt)).numpy()
    assert got.dtype == dtype
    if dtype == np.float16:
        np.testing.assert_array_equal(got, want)
    else:  # Jittor's and torch's float32 sigmoid differ in the last bit
        np.testing.assert_allclose(got, want, rtol=0, atol=4e-7 * np.abs(want).max())


def test_fp16_blend_differs_from_a_float32_blend() -> None:
    """The rounding rule is observable: blending in float32 and rounding at the end (the old code) differs
    from diffusers' fp16 blend in a large fraction of elements, so the bitwise test above catches it."""
    mix = 0.3137
    xs, xt = _inputs(np.float16)
    a32 = np.float32(1.0 / (1.0 + np.exp(-np.float32(np.float16(mix)))))
    fp32_blend = (a32 * xs.astype(np.float32) + (1 - a32) * xt.astype(np.float32)).astype(np.float16)
    blender = B.AlphaBlender(switch=False, alpha=mix)
    blender.mix_factor.assign(jt.array(np.array([mix], np.float16)))
    got = blender(jt.array(xs), jt.array(xt)).numpy()
    assert (got != fp32_blend).mean() > 0.1
