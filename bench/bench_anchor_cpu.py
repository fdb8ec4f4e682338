"""The CPU anchor (issue 19): geometryd's pipeline vs the torch reference pipeline, per stage, same run.

Both sides get the same tiny random weights in the official layout (``daemon.weights.tiny.make_tiny``, MoGe
left out), the same frames and priors (``daemon.scenes.tilted_plane``), the same injected noise, fp32.
The torch side is ``reference.pipeline.TorchRefPipeline`` (diffusers/transformers networks + the torch
point-map VAE reference); its stages are cut at the same boundaries as geometryd's ``GeometryOutput.timings``
(see :class:`TorchSide`): encode (resizes, CLIP, both VAE encoders), denoise (UNet, scheduler, stitching),
decode (point-map decoder). "total" is the wall time of one whole call on either side (prior/post included).

Anchor (full): 26 frames 136x232 -> 128x256, window 9, overlap 3, 4 steps, decode chunk 5.
``--short``: 7 frames 72x100 -> 64x128, window 3, overlap 1, 2 steps, decode chunk 3 (the parity test's
setup).
geometryd runs once untimed first (Jittor compiles its kernels for the shapes; torch has nothing to warm up
beyond its first layer calls), then ``--runs`` timed rounds in which the two sides alternate (the machine is
shared: a ratio is taken within a round, and the reported
ratio is the median over rounds). The point maps of the two sides are compared too.

Writes ``bench/results/anchor_cpu.json`` (``--out``).
Usage: ``python bench/bench_anchor_cpu.py [--short] [--runs 1] [--variants diff determ]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.e2e_cpu import machine_info  # noqa: E402

STAGES = ("encode", "denoise", "decode")


@dataclass(frozen=True)
class AnchorConfig:
    frames: int
    in_height: int
    in_width: int
    height: int
    width: int
    window_size: int
    overlap: int
    num_inference_steps: int
    decode_chunk_size: int

    def call_kwargs(self) -> dict[str, int]:
        return dict(height=self.height, width=self.width, window_size=self.window_size, overlap=self.overlap,
                    num_inference_steps=self.num_inference_steps, decode_chunk_size=self.decode_chunk_size)


ANCHOR = AnchorConfig(26, 136, 232, 128, 256, 9, 3, 4, 5)
SHORT = AnchorConfig(7, 72, 100, 64, 128, 3, 1, 2, 3)


class _Marks:
    """Start time of the first call and summed wall time of the wrapped calls, per name."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}
        self.total: dict[str, float] = {}

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            self.first.setdefault(name, t0)
            try:
                return fn(*args, **kwargs)
            finally:
                self.total[name] = self.total.get(name, 0.0) + time.perf_counter() - t0

        return timed


class TorchSide:
    """The reference's stages by the boundaries geometryd uses: encode = the chunk loop (resizes, CLIP, both
    VAE encoders) = first UNet call - start - prior; denoise = first decoder call - first UNet call
    (UNet, scheduler, stitching); decode = the point-map decoder calls."""

    def __init__(self, model_dir: Path, variant: str) -> None:
        import reference.pipeline as ref_mod
        from reference.point_map_vae import load_torch_point_map_vae

        self.pmap = load_torch_point_map_vae(model_dir / "point_map_vae")
        self.ref = ref_mod.TorchRefPipeline(model_dir, variant, self.pmap)
        self._prior, self._decode = self.ref.prior, self.pmap.decode
        self._unet = ref_mod.vid2vid_unet_forward
        self._mod = ref_mod

    def __call__(self, inputs: dict[str, np.ndarray], cfg: AnchorConfig) -> tuple[dict[str, float],
                                                                                  np.ndarray,
                                                                                   np.ndarray]:
        marks = _Marks()
        self.ref.prior = marks.wrap("prior", self._prior)
        self.pmap.decode = marks.wrap("decode", self._decode)
        self._mod.vid2vid_unet_forward = marks.wrap("unet", self._unet)
        try:
            t0 = time.perf_counter()
            out = self.ref(inputs["frames"], inputs["points"], inputs["mask"], noise=inputs["noise"],
                           **cfg.call_kwargs())
            total = time.perf_counter() - t0
        finally:
            self._mod.vid2vid_unet_forward = self._unet
            self.ref.prior, self.pmap.decode = self._prior, self._decode
        times = {"encode": marks.first["unet"] - t0 - marks.total["prior"],
                 "denoise": marks.first["decode"] - marks.first["unet"],
                 "decode": marks.total["decode"], "total": total}
        return times, out.point_map, out.mask


class GeometrydSide:
    def __init__(self, model_dir: Path, variant: str) -> None:
        from daemon.pipeline import GeometryCrafter

        self.gc = GeometryCrafter.from_pretrained(model_dir, variant=variant, dtype="fp32")

    def __call__(self, inputs: dict[str, np.ndarray], cfg: AnchorConfig) -> tuple[dict[str, float],
                                                                                  np.ndarray,
                                                                                   np.ndarray]:
        t0 = time.perf_counter()
        out = self.gc(inputs["frames"], inputs["points"], inputs["mask"], noise=inputs["noise"], quiet=True,
                      **cfg.call_kwargs())
        total = time.perf_counter() - t0
        return {**{s: float(out.timings.get(s, 0.0)) for s in STAGES},
                "total": total}, out.point_map, out.mask


def make_inputs(cfg: AnchorConfig) -> dict[str, np.ndarray]:
    from daemon.scenes import tilted_plane

    frames, points, mask = tilted_plane(cfg.frames, cfg.in_height, cfg.in_width, seed=21)
    shape = (1, cfg.window_size, 4, cfg.height // 8, cfg.width // 8)
    noise = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    return {"frames": frames, "points": points, "mask": mask, "noise": noise}


def compare(pm_a: np.ndarray, m_a: np.ndarray, pm_b: np.ndarray, m_b: np.ndarray) -> dict[str, float]:
    both = m_a & m_b
    err = float(np.abs(pm_a - pm_b)[both].max() / np.abs(pm_b[both]).max()) if both.any() else float("nan")
    return {"point_map_rel_err": err, "mask_agreement": float((m_a == m_b).mean())}


def summarise(rounds: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    keys = (*STAGES, "total")
    med = {side: {k: statistics.median(r[side][k] for r in rounds) for k in keys} for side in ("geometryd",
                                                                                               "torch")}
    ratio = {k: statistics.median(r["geometryd"][k] / r["torch"][k] for r in rounds if r["torch"][k] > 0)
             for k in keys}
    return {"median_s": med, "ratio_geometryd_over_torch": ratio}


def run_variant(model_dir: Path, variant: str, cfg: AnchorConfig, runs: int,
                log: Callable[[str], None]) -> dict:
    inputs = make_inputs(cfg)
    torch_side = TorchSide(model_dir, variant)
    gd_side = GeometrydSide(model_dir, variant)
    warm, pm_g, m_g = gd_side(inputs, cfg)  # compiles Jittor's kernels for these shapes
    log(f"{variant} geometryd warm-up {warm['total']:.1f} s")
    rounds = []
    pm_t = m_t = None
    for i in range(runs):
        order = ("torch", "geometryd") if i % 2 == 0 else ("geometryd", "torch")
        r: dict[str, dict[str, float]] = {}
        for side in order:
            if side == "torch":
                r[side], pm_t, m_t = torch_side(inputs, cfg)
            else:
                r[side] = gd_side(inputs, cfg)[0]
        rounds.append(r)
        log(f"{variant} round {i}: " + ", ".join(
            f"{k} {r['geometryd'][k]:.2f}/{r['torch'][k]:.2f} s" for k in (*STAGES, "total")))
    assert pm_t is not None and m_t is not None
    return {"variant": variant, "geometryd_warmup": warm, "rounds": rounds, **summarise(rounds),
            "parity": compare(pm_g, m_g, pm_t, m_t)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--short", action="store_true",
                    help="the parity test's small setup instead of the anchor")
    ap.add_argument("--runs", type=int, default=1, help="timed rounds per variant (sides alternate)")
    ap.add_argument("--variants", nargs="+", default=["diff", "determ"], choices=["diff", "determ"])
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="a make-tiny folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "anchor_cpu.json")
    args = ap.parse_args(argv)

    import torch

    from daemon.model.conv_cpu import backend
    from daemon.weights.tiny import PARTS, make_tiny

    cfg = SHORT if args.short else ANCHOR

    def log(msg: str) -> None:
        print(msg, flush=True)

    with tempfile.TemporaryDirectory(prefix="anchor-cpu-") as tmp:
        model_dir = args.model_dir or Path(tmp) / "tiny"
        make_tiny(model_dir, seed=0, parts=[p for p in PARTS if p != "moge"])
        t0 = time.monotonic()
        results = [run_variant(model_dir, v, cfg, args.runs, log) for v in args.variants]
    name, reason = backend()
    out = {"name": "anchor_cpu", "short": args.short, "config": asdict(cfg), "runs": args.runs,
           "cpu_conv_backend": name, "cpu_conv_backend_reason": reason,
           "torch_threads": torch.get_num_threads(),
           "wall_s": round(time.monotonic() - t0, 1), "results": results, "machine": machine_info()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    for r in results:
        ratio = r["ratio_geometryd_over_torch"]
        log(f"{r['variant']}: geometryd/torch " + ", ".join(f"{k} {ratio[k]:.2f}" for k in ratio)
            + f"; parity {r['parity']}")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
