"""The network tolerances can catch a misreading: perturbing one constant of the torch reference UNet moves
its output far more than the Jittor-vs-torch tolerance (tests/model/test_model_unet.py ``FP32_TOL``, ~3x the
measured error), so the parity tests would fail on such a change.

- GroupNorm eps 1e-6 <-> 1e-5 in every GroupNorm (the diffusers UNet uses 1e-5 for resnets, 1e-6 for the
  transformer norms; a swap is the plausible misreading);
- attention softmax scale 1/sqrt(head_dim) off by 1 % in every attention.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from daemon.jittor_env import import_jittor  # noqa: E402

jt = import_jittor()

import test_model_unet as U  # noqa: E402


def _swap_group_norm_eps(module: torch.nn.Module) -> int:
    n = 0
    for m in module.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.eps = 1e-5 if m.eps < 5e-6 else 1e-6
            n += 1
    return n


def _scale_attention(module: torch.nn.Module, factor: float) -> int:
    from diffusers.models.attention_processor import Attention, AttnProcessor

    module.set_attn_processor(AttnProcessor())  # the processor that reads ``Attention.scale`` (sdpa does not)
    n = 0
    for m in module.modules():
        if isinstance(m, Attention):
            m.scale = m.scale * factor
            n += 1
    return n


def test_unet_tolerance_is_far_below_an_eps_or_scale_change(tmp_path_factory) -> None:
    ref, model, _ = U.built(12, tmp_path_factory)
    inp = U.inputs(2, 12, distinct=True, seed=1)
    inp["sample"] = inp["sample"] * np.float32(0.1)  # small activations: the eps matters more (4.4e-5 at 1.0)
    want = U.torch_vid2vid(ref, inp["sample"], U.C_NOISE, inp["context"], inp["ids"])
    got = model(jt.array(inp["sample"]), U.C_NOISE, jt.array(inp["context"]), jt.array(inp["ids"])).numpy()
    err = U.rel_err(got, want)

    eps_ref = copy.deepcopy(ref)
    assert _swap_group_norm_eps(eps_ref) > 10
    eps_effect = U.rel_err(U.torch_vid2vid(eps_ref, inp["sample"], U.C_NOISE, inp["context"], inp["ids"]), want)

    scale_ref = copy.deepcopy(ref)
    assert _scale_attention(scale_ref, 1.01) > 4
    scale_effect = U.rel_err(
        U.torch_vid2vid(scale_ref, inp["sample"], U.C_NOISE, inp["context"], inp["ids"]), want)
    print(f"unet fp32 err {err:.3e}, tol {U.FP32_TOL:.1e}; eps swap {eps_effect:.3e}, scale 1% {scale_effect:.3e}")
    assert err <= U.FP32_TOL
    assert eps_effect > 20 * U.FP32_TOL  # measured 7.6e-4 (err 2.5e-6)
    assert scale_effect > 20 * U.FP32_TOL
