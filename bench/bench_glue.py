"""Host-side glue of one streaming window, step by step, numpy (what the daemon runs) vs torch CPU
(reference).

One window of ``window`` frames with ``stride`` new ones (default 110 / 85, the shipped config) at a
processing size H x W from a source (frames, prior, outputs) of H0 x W0:

    compute_stats    prior statistics s / lo / hi over the window's prior (first window; offline: whole clip)
    prior_to_x4      prior post-processing of the new frames -> x4 (new, 4, H, W)
    source_resize    uint8 frames -> float [0,1] at the processing size (antialiased bicubic)
    vae_inputs       2v - 1 in fp16 as float32 (what the encoders take), the pseudo-RGB disparity
    clip_input       resize224 (blur + bicubic) and the CLIP normalisation
    denoise_glue     noise bank, renoise, per step: scale_model_input, UNet input concat, Euler step
    stitch           latent blending and the decoder input z
    decode_post      decoder heads (new, H, W) -> output size (bilinear, log-depth through exp)
    focal            projected focal (per frame)
    points           pinhole points (new, H0, W0, 3) and depth

Each step is timed as ms per new frame (best of ``--repeats``), with a torch implementation of the same
step timed in the same run, interleaved (the box is shared: read the ratio). The networks are not run.

    python bench/bench_glue.py [--sizes 384x640 576x1024] [--window 110 --stride 85] [--repeats 3]
Writes bench/results/glue.json; the last line printed is
``glue 384x640: total X ms per new frame; slowest step NAME A ms (torch B ms)``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from daemon import pipeline as P  # noqa: E402
from daemon.model import resample  # noqa: E402
from daemon.model.prior_post import Q_HI, Q_LO, compute_stats, prior_to_x4  # noqa: E402
from daemon.model.scheduler import make_schedule  # noqa: E402

SHORT_ARGS = ["--sizes", "384x640", "--window", "22", "--stride", "17", "--repeats", "2"]  # CI: ~1/5 window
TARGET_MS = 10.0  # issue #16: all host glue of one window <= 10 ms per new frame at 384x640 on 2 cores
SOURCE_OF = {(384, 640): (576, 1024), (576, 1024): (576, 1024)}  # processing size -> source size
CLIP_MEAN = np.asarray([0.48145466, 0.4578275, 0.40821073], np.float32).reshape(1, 3, 1, 1)
CLIP_STD = np.asarray([0.26862954, 0.26130258, 0.27577711], np.float32).reshape(1, 3, 1, 1)


def machine_info() -> dict[str, Any]:
    import torch

    return {"cpu_count": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_avg": os.getloadavg()}


# --------------------------------------------------------------------------------------------------
# inputs


def make_inputs(window: int, stride: int, size: tuple[int, int], src: tuple[int, int], seed: int = 0) -> dict:
    """Synthetic window: a noisy tilted plane as prior (~85 % valid), textured frames, random decoder
    heads."""
    rng = np.random.default_rng(seed)
    (h, w), (h0, w0) = size, src
    yy = np.linspace(-1, 1, h0, dtype=np.float32)[:, None]
    xx = np.linspace(-1, 1, w0, dtype=np.float32)[None, :]
    plane = (2.0 + 0.6 * yy + 0.3 * np.sin(3 * xx)).astype(np.float32)
    points = np.empty((window, h0, w0, 3), np.float32)
    for i in range(window):
        z = plane + np.float32(0.05) * rng.standard_normal((h0, w0), dtype=np.float32)
        np.maximum(z, np.float32(0.3), out=z)
        points[i, ..., 0] = xx * z * np.float32(0.6)
        points[i, ..., 1] = yy * z * np.float32(0.4)
        points[i, ..., 2] = z
    mask = rng.random((window, h0, w0), dtype=np.float32) > 0.15
    new = stride
    base = rng.integers(0, 256, (1, h0, w0, 3), dtype=np.uint8)
    frames = np.clip(base.astype(np.int16) + rng.integers(-20, 21, (new, 1, 1, 3)), 0, 255).astype(np.uint8)
    lh, lw = h // 8, w // 8
    lat = lambda *s: rng.standard_normal(s, dtype=np.float32).astype(np.float16)  # noqa: E731
    return {
        "window": window, "stride": stride, "size": size, "src": src,
        "points": points, "mask": mask, "frames": frames,
        "v01": rng.random((new, 3, h, w), dtype=np.float32),
        "heads": [rng.standard_normal((new, h, w), dtype=np.float32) * np.float32(0.3) for _ in range(3)],
        "noise": lat(1, window, 4, lh, lw), "vlat": lat(1, window, 4, lh, lw),
        "plat": lat(1, window, 4, lh, lw),
        "u": lat(1, window, 4, lh, lw), "prev": lat(1, window, 4, lh, lw),
    }


# --------------------------------------------------------------------------------------------------
# numpy steps (the daemon's code)


def numpy_steps(d: dict) -> dict[str, Callable[[], Any]]:
    window, stride, size, src = d["window"], d["stride"], d["size"], d["src"]
    overlap = window - stride
    stats = compute_stats(d["points"], d["mask"])
    sched = make_schedule(5)
    x4 = prior_to_x4(d["points"][overlap:], d["mask"][overlap:], size, stats, nan_guard=True)
    heads = d["heads"]

    def vae_inputs() -> Any:  # as GeometryCrafter.encode
        pseudo = np.empty((x4.shape[0], 3, *x4.shape[2:]), np.float32)
        pseudo[:] = x4[:, 2:3]
        return P.to_signed_unit(d["v01"], np.float16), pseudo

    def clip_input() -> Any:
        c = resample.resize224(d["v01"])
        np.add(c, np.float32(1.0), out=c)
        np.divide(c, np.float32(2.0), out=c)
        np.subtract(c, CLIP_MEAN, out=c)
        np.divide(c, CLIP_STD, out=c)
        return c.astype(np.float16)

    def denoise_glue() -> Any:
        bank = P.NoiseBank(d["noise"], sched.init_noise_sigma, overlap, stride)
        x = bank.take(window)
        x = P.GeometryCrafter.renoise(_GC, x, d["prev"][:, -overlap:], overlap, sched)
        sample = np.empty((*x.shape[:2], 12, *x.shape[3:]), x.dtype)  # like denoise_window: one buffer
        sample[:, :, 4:8], sample[:, :, 8:] = d["vlat"], d["plat"]
        for i in range(sched.num_steps):
            sched.scale_model_input(x, i, out=sample[:, :, :4])
            x = sched.step(d["u"], i, x)
        return x

    def stitch() -> Any:
        lat = P.stitch(d["prev"], d["u"], overlap)
        return P.GeometryCrafter.latents_to_z(lat[:, : stride])

    def decode_post() -> Any:
        return P.decode_post(heads[0], heads[1], heads[2], src, False)

    maps = decode_post()

    return {
        "compute_stats": lambda: compute_stats(d["points"], d["mask"]),
        "prior_to_x4": lambda: prior_to_x4(d["points"][overlap:], d["mask"][overlap:], size, stats,
                                           nan_guard=True),
        "source_resize": lambda: P.frames_at_size(d["frames"], size),
        "vae_inputs": vae_inputs,
        "clip_input": clip_input,
        "denoise_glue": denoise_glue,
        "stitch": stitch,
        "decode_post": decode_post,
        "focal": lambda: P.projected_focal(maps, per_frame=True),
        "points": lambda: P.points_from_maps(maps, np.float32(0.8), np.float32(0.9)),
    }


class _GCStub:
    latent_dtype = np.float16


_GC = _GCStub()


# --------------------------------------------------------------------------------------------------
# torch steps (the reference: the same step as torch CPU code, like upstream)


def torch_steps(d: dict) -> dict[str, Callable[[], Any]]:
    import torch
    import torch.nn.functional as F
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
        _resize_with_antialiasing,
    )

    window, stride, size, src = d["window"], d["stride"], d["size"], d["src"]
    overlap = window - stride
    points, mask = torch.from_numpy(d["points"]), torch.from_numpy(d["mask"])
    frames = torch.from_numpy(d["frames"])
    v01 = torch.from_numpy(d["v01"])
    heads = [torch.from_numpy(h)[:, None] for h in d["heads"]]
    lat = {k: torch.from_numpy(d[k]) for k in ("noise", "vlat", "plat", "u", "prev")}
    mean, std = torch.from_numpy(CLIP_MEAN), torch.from_numpy(CLIP_STD)
    sched = make_schedule(5)
    sig = [float(s) for s in sched.sigmas]
    bil = lambda x, s: F.interpolate(x, size=s, mode="bilinear", align_corners=False)  # noqa: E731

    def grid(h: int, w: int) -> tuple[Any, Any]:
        gx = (torch.linspace(0, w - 1, w) / (w - 1) - 0.5) * 2
        gy = (torch.linspace(0, h - 1, h) / (h - 1) - 0.5) * 2
        return gx, gy

    def stats() -> tuple[Any, Any, Any]:
        pz, valid = points[..., 2], mask.float()
        s = torch.clamp((pz * valid).mean() / (valid.mean() + 1e-8), min=1e-3)
        dd = (1.0 / torch.clamp(pz / s, min=1e-3)) * valid
        lo = min(torch.quantile(dd[i].flatten(), Q_LO, interpolation="nearest") for i in range(dd.shape[0]))
        hi = max(torch.quantile(dd[i].flatten(), Q_HI, interpolation="nearest") for i in range(dd.shape[0]))
        return s, lo, hi

    s, lo, hi = stats()

    def x4() -> Any:
        p = points[overlap:].permute(0, 3, 1, 2) / s
        m = mask[overlap:].float() * 2 - 1
        valid = (m > 0).float()
        dd = (1.0 / torch.clamp(p[:, 2], min=1e-3)) * valid
        dd = torch.clamp((dd - lo) / (hi - lo + 1e-4), 0, 1) * 2 - 1
        xy = p[:, :2] / (p[:, 2:3] + 1e-7)
        zlog = torch.log(p[:, 2] + 1e-7)
        zlog = torch.where(valid > 0, zlog, torch.zeros(())) * valid
        gx, gy = grid(*src)
        c = xy.mean(dim=(2, 3), keepdim=True)
        fx = ((xy[:, 0:1] - c[:, 0:1]) / gx.view(1, 1, 1, -1)).mean(dim=(2, 3), keepdim=True)
        fy = ((xy[:, 1:2] - c[:, 1:2]) / gy.view(1, 1, -1, 1)).mean(dim=(2, 3), keepdim=True)
        focal = torch.cat([fx, fy], 1).expand(-1, 2, *src)
        dd, m, zlog = dd[:, None], m[:, None], zlog[:, None]
        if tuple(src) != tuple(size):
            dd, m, focal = bil(dd, size), bil(m, size), bil(focal, size)
            zlog = torch.log(bil(torch.exp(torch.clamp(zlog, max=10)), size))
        return torch.cat([torch.sqrt(focal[:, 0:1] ** 2 + focal[:, 1:2] ** 2), zlog, dd, m], 1)

    x4_t = x4()

    def source_resize() -> Any:
        v = frames.permute(0, 3, 1, 2).float() / 255.0
        if tuple(src) != tuple(size):
            v = F.interpolate(v, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        return v.contiguous()

    def vae_inputs() -> Any:
        return (v01.half() * 2 - 1).float(), x4_t[:, 2:3].repeat(1, 3, 1, 1)

    def clip_input() -> Any:
        c = _resize_with_antialiasing(v01, (224, 224))
        return (((c + 1.0) / 2.0 - mean) / std).half()

    def denoise_glue() -> Any:
        x = lat["noise"].float() * float(sched.init_noise_sigma)
        x = x.half()
        n = (x[:, :overlap].float() / float(sched.init_noise_sigma)).half()
        n = (n.float() * sig[0]).half()
        x = x.clone()
        x[:, :overlap] = (lat["prev"][:, -overlap:].float() + n.float()).half()
        for i in range(sched.num_steps):
            inp = (x.float() / (sig[i] ** 2 + 1) ** 0.5).half()
            torch.cat([inp, lat["vlat"], lat["plat"]], dim=2)
            xf = x.float()
            c_out = -sig[i] / (sig[i] ** 2 + 1) ** 0.5
            den = (lat["u"] * c_out).float() + xf / (sig[i] ** 2 + 1)
            x = (xf + (xf - den) / sig[i] * (sig[i + 1] - sig[i])).half()
        return x

    def stitch() -> Any:
        w = torch.linspace(0, 1, overlap).view(1, -1, 1, 1, 1)
        out = lat["prev"].clone()
        out[:, -overlap:] = (w * lat["u"][:, :overlap].float() + (1 - w) * out[:, -overlap:].float()).half()
        z = torch.cat([out, lat["u"][:, overlap:]], 1)
        return z[0, :stride].float() / 0.18215

    def decode_post() -> Any:
        a, dl, vl = heads
        dl = torch.log(bil(torch.exp(torch.clamp(dl, max=10)), src))
        vl, a = bil(vl, src), bil(a, src)
        diag = (src[0] ** 2 + src[1] ** 2) ** 0.5
        return a * src[1] / diag, a * src[0] / diag, dl, vl > 0

    fx_t, fy_t, dl_t, valid_t = decode_post()

    def focal() -> Any:
        vf = valid_t.float()
        den = vf.mean((1, 2, 3), keepdim=True) + 1e-4
        fx = (fx_t * vf).mean((1, 2, 3), keepdim=True) / den
        fy = (fy_t * vf).mean((1, 2, 3), keepdim=True) / den
        return fx, fy

    gx_o, gy_o = grid(*src)

    def pts() -> Any:
        zz = torch.exp(torch.clamp(dl_t, max=10))
        p = torch.cat([0.8 * gx_o.view(1, 1, 1, -1) * zz, 0.9 * gy_o.view(1, 1, -1, 1) * zz, zz], 1)
        return p.permute(0, 2, 3, 1).contiguous(), zz

    return {"compute_stats": stats, "prior_to_x4": x4, "source_resize": source_resize,
            "vae_inputs": vae_inputs,
            "clip_input": clip_input, "denoise_glue": denoise_glue, "stitch": stitch,
            "decode_post": decode_post,
            "focal": focal, "points": pts}


# --------------------------------------------------------------------------------------------------


def _best(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    del out
    return dt


def bench_size(size: tuple[int, int], window: int, stride: int, repeats: int,
               source: tuple[int, int] | None = None) -> dict[str, Any]:
    import torch

    src = source or SOURCE_OF.get(tuple(size), tuple(size))
    d = make_inputs(window, stride, size, src)
    ours, ref = numpy_steps(d), torch_steps(d)
    steps: dict[str, Any] = {}
    with torch.no_grad():
        for name in ours:
            if name == "source_resize" and tuple(src) == tuple(size):
                name_shown = "frames_to_unit"
            else:
                name_shown = name
            a, b = [], []
            for _ in range(repeats):  # interleaved, best of each
                gc.collect()
                a.append(_best(ours[name]))
                gc.collect()
                b.append(_best(ref[name]))
            ms_a = min(a) * 1e3 / stride
            ms_b = min(b) * 1e3 / stride
            steps[name_shown] = {"numpy_ms_per_new_frame": round(ms_a, 3),
                                 "torch_ms_per_new_frame": round(ms_b, 3),
                                 "ratio_numpy_over_torch": round(ms_a / ms_b, 3) if ms_b > 0 else None}
            print(f"[glue] {size[0]}x{size[1]} {name_shown:15s} numpy {ms_a:8.3f} ms  torch {ms_b:8.3f} ms  "
                  f"ratio {ms_a / ms_b:6.2f}", flush=True)
    total = sum(s["numpy_ms_per_new_frame"] for s in steps.values())
    total_t = sum(s["torch_ms_per_new_frame"] for s in steps.values())
    slowest = max(steps, key=lambda k: steps[k]["numpy_ms_per_new_frame"])
    return {
        "size": f"{size[0]}x{size[1]}", "source": f"{src[0]}x{src[1]}", "window": window, "stride": stride,
        "steps": steps, "total_numpy_ms_per_new_frame": round(total, 3),
        "total_torch_ms_per_new_frame": round(total_t, 3),
        "slowest_step": slowest,
        "steps_slower_than_torch": [k for k, s in steps.items() if s["ratio_numpy_over_torch"] and
                                    s["ratio_numpy_over_torch"] > 1.0],
        "meets_total_target": total <= TARGET_MS,
    }


def summary_line(res: dict[str, Any]) -> str:
    s = res["steps"][res["slowest_step"]]
    return (f"glue {res['size']}: total {res['total_numpy_ms_per_new_frame']:.2f} ms per new frame; "
            f"slowest step {res['slowest_step']} {s['numpy_ms_per_new_frame']:.2f} ms "
            f"(torch {s['torch_ms_per_new_frame']:.2f} ms)")


def run(sizes: list[tuple[int, int]], window: int, stride: int, repeats: int, out: Path,
        source: tuple[int, int] | None = None) -> dict[str, Any]:
    res = {"name": "glue", "target_ms_per_new_frame": TARGET_MS, "machine": machine_info(), "sizes": []}
    for size in sizes:
        res["sizes"].append(bench_size(size, window, stride, repeats, source))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1) + "\n")
    res["machine_after"] = machine_info()["load_avg"]
    out.write_text(json.dumps(res, indent=1) + "\n")
    return res


def _size(s: str) -> tuple[int, int]:
    h, w = s.lower().split("x")
    return int(h), int(w)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--short" in argv:  # `geometryd bench --glue --short`: the CI-sized window
        argv = [*SHORT_ARGS, *(a for a in argv if a != "--short")]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", type=_size, default=[(384, 640), (576, 1024)])
    ap.add_argument("--window", type=int, default=110)
    ap.add_argument("--stride", type=int, default=85)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--source", type=_size, default=None,
                    help="source size for every processing size (default: "
                                                               "576x1024)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "glue.json")
    args = ap.parse_args(argv)
    if not 0 < args.stride < args.window:
        ap.error("need 0 < stride < window")
    res = run(args.sizes, args.window, args.stride, args.repeats, args.out, args.source)
    first = next((r for r in res["sizes"] if r["size"] == "384x640"), res["sizes"][0])
    print(summary_line(first))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
