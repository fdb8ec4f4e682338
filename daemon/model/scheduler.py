"""Euler / Karras sampling schedule of GeometryCrafter's diffusion variant (spec 1.2, 4.4).

Matches diffusers ``EulerDiscreteScheduler`` with ``use_karras_sigmas=True``, ``timestep_type="continuous"``,
``prediction_type="v_prediction"``, ``final_sigmas_type="zero"``: sigmas are computed in float64 and stored
as float32 (like diffusers), the UNet timestep is ``0.25 * ln(sigma)`` in float32, and one Euler step is

    x0 = c_out * u + x / (sigma^2 + 1),  c_out = -sigma / sqrt(sigma^2 + 1)
    x  = x + (x - x0) / sigma * (sigma_next - sigma)

with ``x`` upcast to float32 and ``c_out * u`` formed in the dtype of ``u`` (fp16 in the official run) the way
upstream's CUDA kernels form it: ``u`` times the float32 scalar tensor ``c_out`` in float32 opmath, rounded
once to
fp16 (torch on CPU rounds ``c_out`` to fp16 first instead; 1 fp16 ulp apart in 14-59 % of elements).
Pure numpy; no Jittor needed (the step runs host-side on small latents).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from daemon.model import fp16

RHO = 7.0


@dataclass(frozen=True)
class EulerKarrasSchedule:
    sigmas: np.ndarray  # (N+1,) float32, last is 0
    timesteps: np.ndarray  # (N,) float32, c_noise = 0.25 ln sigma
    init_noise_sigma: np.float32

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def scale_model_input(self, x: np.ndarray, i: int, out: np.ndarray | None = None) -> np.ndarray:
        """x / sqrt(sigma^2 + 1), computed in float32 and rounded once to the dtype of ``x`` (into ``out``
        when given, e.g. the UNet input's first channels).

        (On CUDA torch applies the CPU scalar in float opmath, so an fp16 sample is rounded only once.)
        """
        sigma = self.sigmas[i]
        k = np.sqrt(sigma * sigma + np.float32(1.0))
        if x.dtype == np.float16:
            res = fp16.fused_f16(lambda xf, rnd: np.divide(xf, k, out=xf), (x,), n_tmp=0)
        else:
            res = (x.astype(np.float32) / k).astype(x.dtype)
        if out is None:
            return res
        out[...] = res
        return out

    def step(self, u: np.ndarray, i: int, x: np.ndarray) -> np.ndarray:
        """One Euler step for v-prediction ``u``; returns the new sample in the dtype of ``u``."""
        sigma = self.sigmas[i]
        sigma_next = self.sigmas[i + 1]
        c_out = (-sigma / np.sqrt(sigma * sigma + np.float32(1.0))).astype(np.float32)
        k = sigma * sigma + np.float32(1.0)
        dsig = sigma_next - sigma
        if u.dtype == np.float16 and x.dtype == np.float16:
            def kernel(uf: np.ndarray, xf: np.ndarray, t: np.ndarray, rnd: fp16.Rounder) -> np.ndarray:
                np.multiply(uf, c_out, out=uf)
                rnd(uf)  # c_out * u in the dtype of u
                np.divide(xf, k, out=t)
                np.add(uf, t, out=uf)  # denoised
                np.subtract(xf, uf, out=t)
                np.divide(t, sigma, out=t)  # derivative
                np.multiply(t, dsig, out=t)
                return np.add(xf, t, out=t)

            return fp16.fused_f16(kernel, (u, x), n_tmp=1)
        xf = x.astype(np.float32)
        denoised = (u.astype(np.float32) * c_out).astype(u.dtype).astype(np.float32) + xf / k
        derivative = (xf - denoised) / sigma
        return (xf + derivative * dsig).astype(u.dtype)


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 700.0) -> np.ndarray:
    """(N+1,) float32: Karras ramp from sigma_max to sigma_min (float64 math), then a final 0."""
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
    ramp = np.linspace(0, 1, num_steps)
    min_inv, max_inv = sigma_min ** (1 / RHO), sigma_max ** (1 / RHO)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** RHO
    return np.concatenate([sigmas, [0.0]]).astype(np.float32)


def make_schedule(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 700.0) -> EulerKarrasSchedule:
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max)
    # ln in float64 then rounded: equals torch's correctly rounded float32 log (numpy's float32 log is not)
    log_sigma = np.log(sigmas[:-1].astype(np.float64)).astype(np.float32)
    timesteps = (np.float32(0.25) * log_sigma).astype(np.float32)
    # diffusers: (max_sigma^2 + 1)^0.5 for "leading" spacing, computed on the float32 sigma tensor.
    init = np.sqrt(sigmas.max() * sigmas.max() + np.float32(1.0)).astype(np.float32)
    return EulerKarrasSchedule(sigmas=sigmas, timesteps=timesteps, init_noise_sigma=np.float32(init))


def load_scheduler_config(path: Path) -> dict:
    """Read ``scheduler/scheduler_config.json`` and check that it describes the supported schedule."""
    cfg = json.loads(Path(path).read_text())
    expected = {
        "prediction_type": "v_prediction",
        "use_karras_sigmas": True,
        "timestep_type": "continuous",
    }
    for key, value in expected.items():
        if cfg.get(key, value) != value:
            raise ValueError(f"{path}: {key}={cfg.get(key)!r} is not supported (expected {value!r})")
    if cfg.get("timestep_spacing", "leading") in ("linspace", "trailing"):
        spacing = cfg["timestep_spacing"]
        raise ValueError(f"{path}: timestep_spacing={spacing!r} is not supported (expected 'leading')")
    return cfg


def schedule_from_config(cfg: dict, num_steps: int) -> EulerKarrasSchedule:
    return make_schedule(num_steps, float(cfg.get("sigma_min", 0.002)), float(cfg.get("sigma_max", 700.0)))
