"""Euler/Karras schedule vs spec 4.4's table and diffusers EulerDiscreteScheduler (spec 1.2 config)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from daemon.model.scheduler import load_scheduler_config, make_schedule, schedule_from_config
from daemon.weights.tiny import SCHEDULER_CONFIG

SPEC_TABLE = [  # i, sigma, c_noise (spec 4.4)
    (0, 700.0, 1.6377701),
    (1, 134.854446, 1.2260490),
    (2, 15.5899677, 0.6866569),
    (3, 0.67814600, -0.0970982),
    (4, 0.0020000001, -1.5536520),
]


def _diffusers(n: int) -> EulerDiscreteScheduler:
    cfg = {k: v for k, v in SCHEDULER_CONFIG.items() if not k.startswith("_")}
    sched = EulerDiscreteScheduler(**cfg)
    sched.set_timesteps(n)
    return sched


def test_five_steps_match_spec_table() -> None:
    s = make_schedule(5)
    for i, sigma, c_noise in SPEC_TABLE:
        assert s.sigmas[i] == pytest.approx(sigma, rel=1e-7)
        assert s.timesteps[i] == pytest.approx(c_noise, abs=1e-7)
    assert s.sigmas[5] == 0.0
    assert s.init_noise_sigma == np.float32(700.000714)


@pytest.mark.parametrize("n", [1, 2, 5, 25])
def test_schedule_matches_diffusers(n: int) -> None:
    ref = _diffusers(n)
    s = make_schedule(n)
    np.testing.assert_array_equal(s.sigmas, ref.sigmas.numpy())
    np.testing.assert_array_equal(s.timesteps, ref.timesteps.numpy())
    assert s.init_noise_sigma == np.float32(ref.init_noise_sigma)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_scale_and_step_match_diffusers_bitwise(dtype: type) -> None:
    """Upstream on CUDA applies the float32 scalar tensors (1/sqrt(sigma^2+1), c_out) to an fp16 sample in
    float32 opmath and rounds once; torch >= 2.x on CPU does the same for a 0-dim float32 operand, so diffusers
    on CPU is a bitwise reference here. The explicit opmath form is checked too, so the test does not depend on
    torch's CPU kernels."""
    n = 5
    ref = _diffusers(n)
    s = make_schedule(n)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((1, 3, 4, 8, 8)) * 700).astype(dtype)
    xt = torch.from_numpy(x)
    for i in range(n):
        t = ref.timesteps[i]
        np.testing.assert_array_equal(s.scale_model_input(x, i), ref.scale_model_input(xt, t).numpy())
        u = rng.standard_normal(x.shape).astype(dtype)
        sigma = ref.sigmas[i]
        c_out = -sigma / (sigma**2 + 1) ** 0.5  # diffusers' v-prediction factor, a 0-dim float32 tensor
        opmath = (torch.from_numpy(u).float() * c_out).to(torch.from_numpy(u).dtype)
        assert torch.equal(torch.from_numpy(u) * c_out, opmath)
        xt = ref.step(torch.from_numpy(u), t, xt).prev_sample
        x = s.step(u, i, x)
        assert x.dtype == dtype
        np.testing.assert_array_equal(x, xt.numpy())


def test_fp16_step_rounds_the_product_once() -> None:
    """c_out rounded to fp16 before the multiply (the old formula) differs by one ulp in many elements: the
    bitwise test above can tell the two apart."""
    s = make_schedule(5)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 3, 4, 8, 8)).astype(np.float16)  # a late step: |x| ~ 1
    u = rng.standard_normal(x.shape).astype(np.float16)
    sigma, sigma_next = s.sigmas[3], s.sigmas[4]  # c_out = -0.56: not an fp16 number
    c_out = np.float32(-sigma / np.sqrt(sigma * sigma + np.float32(1.0)))
    xf = x.astype(np.float32)

    def finish(prod: np.ndarray) -> np.ndarray:
        den = prod.astype(np.float32) + xf / (sigma * sigma + np.float32(1.0))
        return (xf + (xf - den) / sigma * (sigma_next - sigma)).astype(np.float16)

    once = finish((u.astype(np.float32) * c_out).astype(np.float16))
    twice = finish(u * np.float16(c_out))
    np.testing.assert_array_equal(s.step(u, 3, x), once)
    assert (once != twice).mean() > 0.2  # measured 0.36


def test_config_checks(tmp_path) -> None:
    import json

    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(SCHEDULER_CONFIG))
    cfg = load_scheduler_config(path)
    assert schedule_from_config(cfg, 5).sigmas[0] == np.float32(700.0)
    path.write_text(json.dumps({**SCHEDULER_CONFIG, "prediction_type": "epsilon"}))
    with pytest.raises(ValueError, match="prediction_type='epsilon'"):
        load_scheduler_config(path)
    with pytest.raises(ValueError, match=">= 1"):
        make_schedule(0)
