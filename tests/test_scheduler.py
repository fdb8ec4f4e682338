"""Euler/Karras schedule vs spec 4.4's table and diffusers EulerDiscreteScheduler (spec 1.2 config)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from daemon.model.scheduler import load_scheduler_config, make_schedule, schedule_from_config
from daemon.tiny import SCHEDULER_CONFIG

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
def test_scale_and_step_match_diffusers(dtype: type) -> None:
    n = 5
    ref = _diffusers(n)
    s = make_schedule(n)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((1, 3, 4, 2, 3)) * 700).astype(dtype)
    xt = torch.from_numpy(x)
    for i in range(n):
        t = ref.timesteps[i]
        inp_ref = ref.scale_model_input(xt, t).numpy()
        inp = s.scale_model_input(x, i)
        # fp16: torch on CPU rounds the fp32 scalar to fp16 before the op, upstream (CUDA) and we do not,
        # so allow one fp16 ulp (|x| < 4 here -> 2e-3 absolute, 1e-3 relative).
        tol = 1e-6 if dtype == np.float32 else 1e-3
        atol = 1e-6 if dtype == np.float32 else 2e-3
        np.testing.assert_allclose(inp.astype(np.float32), inp_ref.astype(np.float32), rtol=tol, atol=atol)
        u = rng.standard_normal(x.shape).astype(dtype)
        xt = ref.step(torch.from_numpy(u), t, xt).prev_sample
        x = s.step(u, i, x)
        assert x.dtype == dtype
        np.testing.assert_allclose(x.astype(np.float32), xt.numpy().astype(np.float32), rtol=tol, atol=atol)


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
