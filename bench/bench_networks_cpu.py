"""CPU forward time of each Jittor network vs its PyTorch reference, at the tiny test configs.

Registry design: every network is a :class:`Case` ``(name, build_torch, build_jittor, inputs)``:
- ``build_torch() -> (run, save)``: a seeded random reference; ``run(inputs) -> list[np.ndarray]``,
  ``save(folder)`` writes it in the official layout (config.json + safetensors);
- ``build_jittor(folder) -> run``: the production loader on that folder;
- ``inputs() -> dict[str, np.ndarray]``.
Other helpers add their networks with :func:`register` (the UNet entry lives beside these).

Each case: build, save, load, one warm-up call per side (Jittor compiles kernels there), then the median
of ``--runs`` timed calls; the max relative error between the two outputs is reported too.
Writes ``bench/results/networks_cpu.json``.
Usage: ``python bench/bench_networks_cpu.py [--runs 5] [--only NAME]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

Arrays = dict[str, np.ndarray]
Run = Callable[[Arrays], list[np.ndarray]]


@dataclass(frozen=True)
class Case:
    name: str
    build_torch: Callable[[], tuple[Run, Callable[[Path], None]]]
    build_jittor: Callable[[Path], Run]
    inputs: Callable[[], Arrays]


CASES: list[Case] = []


def register(case: Case) -> Case:
    if any(c.name == case.name for c in CASES):
        raise ValueError(f"duplicate bench case {case.name}")
    CASES.append(case)
    return case


def _perturb(module: Any, seed: int, scale: float = 0.05) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _np(x: Any) -> np.ndarray:
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


# --------------------------------------------------------------------------------------------------
# SVD VAE encoder


def _svd_torch() -> tuple[Run, Callable[[Path], None]]:
    import safetensors.torch  # noqa: F401  (diffusers' save_pretrained needs it imported)
    import torch
    from diffusers import AutoencoderKLTemporalDecoder

    from daemon.weights.configs import TINY_SVD_VAE

    torch.manual_seed(0)
    m = AutoencoderKLTemporalDecoder(**TINY_SVD_VAE).eval()
    _perturb(m, 0)

    def run(inp: Arrays) -> list[np.ndarray]:
        with torch.no_grad():
            return [m.encode(torch.from_numpy(inp["x"])).latent_dist.mode().numpy()]

    return run, lambda folder: m.save_pretrained(folder)


def _svd_jittor(folder: Path) -> Run:
    from daemon.model import load_svd_vae

    enc = load_svd_vae(folder, dtype="fp32")
    return lambda inp: [enc.encode(inp["x"]).numpy()]


register(Case(
    "svd_vae_encoder",
    _svd_torch,
    _svd_jittor,
    lambda: {"x": np.random.default_rng(0).uniform(-1, 1, (4, 3, 64, 64)).astype(np.float32)},
))


# --------------------------------------------------------------------------------------------------
# point-map VAE (torch reference from reference/point_map_vae.py)

_PMAP_FRAMES = 4


def _pmap_torch(part: str) -> Callable[[], tuple[Run, Callable[[Path], None]]]:
    def build() -> tuple[Run, Callable[[Path], None]]:
        import torch
        from safetensors.torch import save_file

        from daemon.weights.configs import TINY_POINT_MAP_VAE
        from reference.point_map_vae import TorchPointMapVae

        torch.manual_seed(1)
        m = TorchPointMapVae(TINY_POINT_MAP_VAE).eval()
        _perturb(m, 1)

        def run(inp: Arrays) -> list[np.ndarray]:
            with torch.no_grad():
                if part == "encode":
                    return [m.encode_offset(torch.from_numpy(inp["x4"])).numpy()]
                return [o.numpy() for o in m.decode(torch.from_numpy(inp["z"]), _PMAP_FRAMES)]

        def save(folder: Path) -> None:
            folder.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in m.state_dict().items()},
                      str(folder / "diffusion_pytorch_model.safetensors"))
            (folder / "config.json").write_text(json.dumps(TINY_POINT_MAP_VAE))

        return run, save

    return build


def _pmap_jittor(part: str) -> Callable[[Path], Run]:
    def build(folder: Path) -> Run:
        from daemon.model import load_point_map_vae

        vae = load_point_map_vae(folder)
        if part == "encode":
            return lambda inp: [vae.encode(inp["x4"]).numpy()]
        return lambda inp: [_np(o) for o in vae.decode(inp["z"], _PMAP_FRAMES)]

    return build


register(Case(
    "point_map_vae_encode",
    _pmap_torch("encode"),
    _pmap_jittor("encode"),
    lambda: {"x4": np.random.default_rng(1).standard_normal((_PMAP_FRAMES, 4, 64, 64)).astype(np.float32)},
))
register(Case(
    "point_map_vae_decode",
    _pmap_torch("decode"),
    _pmap_jittor("decode"),
    lambda: {"z": np.random.default_rng(2).standard_normal((_PMAP_FRAMES, 4, 8, 8)).astype(np.float32)},
))


# --------------------------------------------------------------------------------------------------
# CLIP vision


def _clip_torch() -> tuple[Run, Callable[[Path], None]]:
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from daemon.weights.configs import TINY_CLIP_VISION

    torch.manual_seed(2)
    m = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP_VISION)).eval()
    _perturb(m, 2, 0.02)

    def run(inp: Arrays) -> list[np.ndarray]:
        with torch.no_grad():
            return [m(pixel_values=torch.from_numpy(inp["pixels"])).image_embeds.numpy()]

    return run, lambda folder: m.save_pretrained(folder)


def _clip_jittor(folder: Path) -> Run:
    from daemon.model import load_clip

    clip = load_clip(folder, dtype="fp32")
    return lambda inp: [clip.image_embeds(inp["pixels"]).numpy()]


register(Case(
    "clip_vision",
    _clip_torch,
    _clip_jittor,
    lambda: {"pixels": np.random.default_rng(3).standard_normal((4, 3, 224, 224)).astype(np.float32)},
))


# --------------------------------------------------------------------------------------------------
# vid2vid UNet (diffusion variant, in_channels 12); one shared (B,1,D) context so diffusers' own forward
# is the reference (daemon/model/unet.py broadcasts it to every frame)

_UNET_FRAMES = 5


def _unet_torch() -> tuple[Run, Callable[[Path], None]]:
    import safetensors.torch  # noqa: F401  (diffusers' save_pretrained needs it imported)
    import torch
    from diffusers import UNetSpatioTemporalConditionModel

    from daemon.weights.configs import TINY_UNET

    torch.manual_seed(3)
    m = UNetSpatioTemporalConditionModel(**TINY_UNET, in_channels=12).eval()
    _perturb(m, 3)

    def run(inp: Arrays) -> list[np.ndarray]:
        with torch.no_grad():
            out = m(torch.from_numpy(inp["sample"]), float(inp["timestep"]), torch.from_numpy(inp["context"]),
                    torch.from_numpy(inp["added_time_ids"]))
        return [out.sample.numpy()]

    return run, lambda folder: m.save_pretrained(folder)


def _unet_jittor(folder: Path) -> Run:
    from daemon.model import load_unet

    unet = load_unet(folder, dtype="fp32")

    def run(inp: Arrays) -> list[np.ndarray]:
        return [unet(inp["sample"], float(inp["timestep"]), inp["context"], inp["added_time_ids"]).numpy()]

    return run


def _unet_inputs() -> Arrays:
    rng = np.random.default_rng(4)
    return {
        "sample": rng.standard_normal((1, _UNET_FRAMES, 12, 16, 24)).astype(np.float32),
        "timestep": np.array(1.2260490, dtype=np.float32),
        "context": rng.standard_normal((1, 1, 32)).astype(np.float32),
        "added_time_ids": np.array([[7.0, 127.0, 0.02]], dtype=np.float32),
    }


register(Case("unet_vid2vid", _unet_torch, _unet_jittor, _unet_inputs))


# --------------------------------------------------------------------------------------------------


def _time(run: Run, inputs: Arrays, runs: int) -> tuple[float, float, list[np.ndarray]]:
    t0 = time.perf_counter()
    out = run(inputs)
    warm = time.perf_counter() - t0
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run(inputs)
        times.append(time.perf_counter() - t0)
    return warm * 1e3, statistics.median(times) * 1e3, out


def _rel_err(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    errs = [float(np.abs(x.astype(np.float64) - y).max() / max(np.abs(y).max(), 1e-30)) for x, y in zip(a, b)]
    return max(errs)


def bench_case(case: Case, runs: int, workdir: Path) -> dict[str, Any]:
    torch_run, save = case.build_torch()
    folder = workdir / case.name
    save(folder)
    jittor_run = case.build_jittor(folder)
    inputs = case.inputs()
    t_warm, t_med, t_out = _time(torch_run, inputs, runs)
    j_warm, j_med, j_out = _time(jittor_run, inputs, runs)
    return {
        "name": case.name,
        "inputs": {k: list(v.shape) for k, v in inputs.items()},
        "torch_ms_median": round(t_med, 2),
        "jittor_ms_median": round(j_med, 2),
        "jittor_over_torch": round(j_med / t_med, 3),
        "torch_first_call_ms": round(t_warm, 1),
        "jittor_first_call_ms": round(j_warm, 1),
        "max_rel_err": _rel_err(j_out, t_out),
        "runs": runs,
    }


def machine_info() -> dict[str, Any]:
    import torch

    from daemon.jittor_env import import_jittor

    jt = import_jittor()
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "jittor": jt.__version__,
        "jittor_cuda": bool(jt.flags.use_cuda),
        "numpy": np.__version__,
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only", action="append", help="case name (repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "networks_cpu.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cases = [c for c in CASES if not args.only or c.name in args.only]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_networks_") as tmp:
        for case in cases:
            res = bench_case(case, args.runs, Path(tmp))
            print(json.dumps(res), flush=True)
            results.append(res)
    report = {"machine": machine_info(), "precision": "fp32", "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.only and args.out.exists():  # keep other cases' earlier numbers
        old = json.loads(args.out.read_text())
        keep = [r for r in old.get("results", []) if r["name"] not in {r2["name"] for r2 in results}]
        report["results"] = keep + results
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
