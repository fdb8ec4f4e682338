"""PyTorch side of the GPU benchmark (bench/gpu/run.sh), run with the image's torch and numpy 2.

``prepare``: writes FULL-SIZE random-weight networks from the official configs (spec 1.2) in the official
folder layout (unet_diff/, unet_determ/, vae/, image_encoder/, point_map_vae/, scheduler/,
feature_extractor/) -- the Jittor side loads the very same weights -- and the attention test cases (fp16
q/k/v and a float32 torch SDPA reference of those fp16 inputs) as .npy files.

``bench``: the PyTorch reference of the same networks on the same card: diffusers
``UNetSpatioTemporalConditionModel`` through ``reference.pipeline.vid2vid_unet_forward``, diffusers
``AutoencoderKLTemporalDecoder`` (encoder), transformers ``CLIPVisionModelWithProjection``,
``reference.point_map_vae.TorchPointMapVae``; per-stage times, an end-to-end window in the stage order of
reference/pipeline.py (device-resident, prior post-processing excluded), torch SDPA attention, and
the prior substitute (ViT-L/14-shaped encoder at MoGe's token count, fp32). Writes torch.json.

    python bench/gpu/torch_side.py {prepare,bench} --model-dir DIR --work DIR [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.gpu import common  # noqa: E402

ADDED_TIME_IDS = (7.0, 127.0, 0.02)  # spec 4.4 (fps 7, motion bucket 127, noise aug 0.02)
DETERM_TIMESTEP = 1.6378
VAE_SCALING = 0.18215


def _torch_dtype(name: str) -> Any:
    import torch

    return torch.float16 if name == "fp16" else torch.float32


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# ---- prepare ---------------------------------------------------------------------------------------------

def prepare(plan: common.Plan, model_dir: Path, work: Path) -> dict[str, Any]:
    """Random-weight networks (initialised on the device: fast) saved in the official layout."""
    import numpy as np
    import safetensors.torch  # noqa: F401  (diffusers save_pretrained needs it imported)
    import torch
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from daemon.weights.configs import UNET_IN_CHANNELS
    from daemon.weights.tiny import PREPROCESSOR_CONFIG, SCHEDULER_CONFIG
    from reference.point_map_vae import TorchPointMapVae

    dev, net_dt = plan.device, _torch_dtype(plan.dtype)
    t_all = time.perf_counter()
    times: dict[str, float] = {}
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(plan.seed)
    with torch.device(dev):
        for variant in plan.variants:
            t0 = time.perf_counter()
            unet = UNetSpatioTemporalConditionModel(in_channels=UNET_IN_CHANNELS[variant],
                                                    **common.unet_config(plan))
            unet.to(net_dt).save_pretrained(model_dir / f"unet_{variant}", safe_serialization=True)
            times[f"unet_{variant}"] = time.perf_counter() - t0
            del unet
        t0 = time.perf_counter()
        AutoencoderKLTemporalDecoder(**common.svd_vae_config(plan)).save_pretrained(model_dir / "vae",
                                                                                    safe_serialization=True)
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**common.clip_config(plan)))
        clip.to(net_dt).save_pretrained(model_dir / "image_encoder", safe_serialization=True)
        del clip
        cfg = common.point_map_vae_config(plan)
        pmap = TorchPointMapVae(cfg)
        out = model_dir / "point_map_vae"
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in pmap.state_dict().items()},
                  str(out / "diffusion_pytorch_model.safetensors"))
        (out / "config.json").write_text(json.dumps({"_class_name": "PMapAutoencoderKLTemporalDecoder",
                                                     **cfg}))
        times["vae_clip_pmap"] = time.perf_counter() - t0
        del pmap
    for name, fname, data in (("scheduler", "scheduler_config.json", SCHEDULER_CONFIG),
                              ("feature_extractor", "preprocessor_config.json", PREPROCESSOR_CONFIG)):
        (model_dir / name).mkdir(parents=True, exist_ok=True)
        (model_dir / name / fname).write_text(json.dumps(data, indent=2))

    # attention cases: fp16 inputs (fp32 in the CPU dry run) and a float32 reference computed from them
    import torch.nn.functional as F

    work.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=dev).manual_seed(plan.seed + 7)
    in_dt = torch.float16 if dev == "cuda" else torch.float32
    for name, n, length, d in plan.attn_cases:
        q, k, v = (torch.randn(n, length, d, generator=gen, device=dev).to(in_dt) for _ in range(3))
        ref = F.scaled_dot_product_attention(q.float()[None], k.float()[None], v.float()[None])[0]
        for tag, t in (("q", q), ("k", k), ("v", v), ("ref", ref)):
            np.save(work / f"attn_{name}_{tag}.npy", t.cpu().numpy())
    times["total"] = time.perf_counter() - t_all
    return {"prepare_s": {k: round(v, 2) for k, v in times.items()}}


# ---- bench -----------------------------------------------------------------------------------------------

class Nets:
    def __init__(self, plan: common.Plan, model_dir: Path) -> None:
        import torch
        from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
        from transformers import CLIPVisionModelWithProjection

        from reference.point_map_vae import load_torch_point_map_vae

        dev, dt = plan.device, _torch_dtype(plan.dtype)
        t0 = time.perf_counter()
        self.unets = {v: UNetSpatioTemporalConditionModel.from_pretrained(model_dir / f"unet_{v}",
                                                                          torch_dtype=dt).eval().to(dev)
                      for v in plan.variants}
        self.vae = AutoencoderKLTemporalDecoder.from_pretrained(model_dir / "vae",
                                                                torch_dtype=torch.float32).eval().to(dev)
        self.clip = CLIPVisionModelWithProjection.from_pretrained(model_dir / "image_encoder",
                                                                  torch_dtype=dt).eval().to(dev)
        self.pmap = load_torch_point_map_vae(model_dir / "point_map_vae")
        self.pmap.module.to(dev)
        self.model_dir = model_dir
        self.dt, self.dev = dt, dev
        self.load_s = round(time.perf_counter() - t0, 2)

    def unet(self, variant: str, sample: Any, timestep: float, emb: Any, ids: Any) -> Any:
        from reference.pipeline import vid2vid_unet_forward

        return vid2vid_unet_forward(self.unets[variant], sample, timestep, emb, ids)


def bench_attention(plan: common.Plan, work: Path) -> list[dict[str, Any]]:
    import numpy as np
    import torch
    import torch.nn.functional as F

    dev = plan.device
    rows = []
    for name, n, length, d in plan.attn_cases:
        q, k, v = (torch.from_numpy(np.load(work / f"attn_{name}_{t}.npy")).to(dev) for t in "qkv")
        ref = np.load(work / f"attn_{name}_ref.npy")

        def sdpa(q: Any = q, k: Any = k, v: Any = v) -> Any:
            return F.scaled_dot_product_attention(q[None], k[None], v[None])[0]

        def plain(q: Any = q, k: Any = k, v: Any = v, d: int = d) -> Any:
            s = torch.bmm(q, k.transpose(1, 2)).float() * d ** -0.5
            return torch.bmm(s.softmax(-1).to(v.dtype), v)

        row: dict[str, Any] = {"case": name, "N": n, "L": length, "d": d, "dtype": str(q.dtype)}
        for label, fn in (("torch_sdpa", sdpa), ("torch_plain", plain)):
            with torch.inference_mode():
                out = fn().float().cpu().numpy()
                row[label] = {**common.timed(fn, lambda: _sync(dev), 5),
                              "rel_err_vs_fp32_ref": float(np.abs(out - ref).max() / np.abs(ref).max())}
        rows.append(row)
        del q, k, v, sdpa, plain, fn  # the closures hold them too
    return rows


def _inputs(plan: common.Plan, size: tuple[int, int], n: int) -> dict[str, Any]:
    import torch

    gen = torch.Generator(device=plan.device).manual_seed(plan.seed + 11)
    h, w = size

    def r(*shape: int) -> Any:
        return torch.randn(*shape, generator=gen, device=plan.device)

    return {"video": torch.rand(n, 3, h, w, generator=gen, device=plan.device),
            "x4": r(n, 4, h, w).clamp(-1, 1),
            "px": r(n, 3, 224, 224), "z": r(n, 4, h // 8, w // 8)}


def bench_stages(plan: common.Plan, nets: Nets, size: tuple[int, int]) -> dict[str, Any]:
    """Per-stage times at one working size: encoders and decoder per chunk of ``plan.chunk`` frames, the UNet
    per step on a window of ``plan.frames`` frames; ``per_frame_ms`` divides by the frames processed."""
    import torch

    c, f = plan.chunk, plan.frames
    inp = _inputs(plan, size, c)
    emb = torch.randn(1, f, nets.clip.config.projection_dim, device=plan.device).to(nets.dt)
    ids = torch.tensor([ADDED_TIME_IDS], device=plan.device).to(nets.dt)
    h, w = size[0] // 8, size[1] // 8
    sync = lambda: _sync(plan.device)  # noqa: E731
    fns = {
        "clip": (lambda: nets.clip(pixel_values=inp["px"].to(nets.dt)).image_embeds, c),
        "svd_vae_encode": (lambda: nets.vae.encode(inp["video"] * 2 - 1).latent_dist.mode(), c),
        "pmap_encode": (lambda: nets.pmap.encode(inp["x4"]), c),
        "pmap_decode": (lambda: nets.pmap.decode(inp["z"], c), c),
    }
    for v in plan.variants:
        cin = 12 if v == "diff" else 8
        sample = torch.randn(1, f, cin, h, w, device=plan.device).to(nets.dt)
        fns[f"unet_{v}_step"] = (lambda v=v, sample=sample: nets.unet(v, sample, 1.0, emb, ids), f)
    out: dict[str, Any] = {}
    with torch.inference_mode():
        for name, (fn, frames) in fns.items():
            r = common.timed(fn, sync, plan.reps)
            out[name] = {**r, "frames": frames, "per_frame_ms": round(1e3 * r["median_s"] / frames, 3)}
    return out


def e2e_window(plan: common.Plan, nets: Nets, size: tuple[int, int], variant: str) -> dict[str, Any]:
    """One window of ``plan.frames`` frames through encoders -> UNet (steps) -> decoder, in the stage order of
    reference/pipeline.py, inputs already on the device and at the working size."""
    import torch
    import torch.nn.functional as F
    from diffusers import EulerDiscreteScheduler

    dev, dt, c, f = plan.device, nets.dt, plan.chunk, plan.frames
    inp = _inputs(plan, size, f)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=dev).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=dev).view(1, 3, 1, 1)
    ids = torch.tensor([ADDED_TIME_IDS], device=dev).to(dt)
    sch = EulerDiscreteScheduler.from_pretrained(nets.model_dir / "scheduler")
    stages: dict[str, float] = {}

    def run() -> None:
        t0 = time.perf_counter()
        embs, vlats, plats = [], [], []
        for s in range(0, f, c):
            v = inp["video"][s:s + c].to(dt) * 2 - 1
            px = F.interpolate(v.float(), (224, 224), mode="bicubic", align_corners=False, antialias=True)
            embs.append(nets.clip(pixel_values=(((px + 1) / 2 - mean) / std).to(dt)).image_embeds)
            vlats.append(nets.vae.encode(v.float()).latent_dist.mode().to(dt))
            xs = inp["x4"][s:s + c]
            m = nets.vae.encode(xs[:, 2:3].repeat(1, 3, 1, 1)).latent_dist.mode()
            plats.append(((m + nets.pmap.encode(xs)) * VAE_SCALING).to(dt))
        emb, vlat, plat = torch.cat(embs)[None], torch.cat(vlats)[None], torch.cat(plats)[None]
        _sync(dev)
        t1 = time.perf_counter()
        if variant == "determ":
            x = -nets.unet("determ", torch.cat([plat, vlat], 2), DETERM_TIMESTEP, emb, ids)
        else:
            sch.set_timesteps(plan.steps, device=dev)
            x = torch.randn(vlat.shape, device=dev).to(dt) * sch.init_noise_sigma
            for tt in sch.timesteps:
                u = nets.unet("diff", torch.cat([sch.scale_model_input(x, tt), vlat, plat], 2), float(tt),
                              emb, ids)
                x = sch.step(u, tt, x).prev_sample
        _sync(dev)
        t2 = time.perf_counter()
        z = x[0].float() / VAE_SCALING
        for s in range(0, f, c):
            nets.pmap.decode(z[s:s + c], z[s:s + c].shape[0])
        _sync(dev)
        t3 = time.perf_counter()
        stages.update({"encode_s": t1 - t0, "denoise_s": t2 - t1, "decode_s": t3 - t2, "total_s": t3 - t0})

    with torch.inference_mode():
        if dev == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        r = common.timed(run, lambda: _sync(dev), 1)
    res = {k: round(v, 4) for k, v in stages.items()}  # stages of the last (steady) run
    res.update({"first_s": r["first_s"], "frames": f, "frames_per_s": round(f / stages["total_s"], 3),
                "steps": plan.steps if variant == "diff" else 1})
    if dev == "cuda":
        res["peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return res


def bench_prior(plan: common.Plan, size: tuple[int, int]) -> dict[str, Any]:
    """Prior substitute: ViT-L/14-shaped encoder (torch.nn.TransformerEncoder, fp32, SDPA) on ``plan.chunk``
    frames at MoGe's token grid for this aspect ratio; MoGe's conv head and resizes are not included."""
    import torch

    cfg = common.vit_config(plan)
    th, tw = common.moge_tokens(size[0], size[1], cfg["area"])
    layer = torch.nn.TransformerEncoderLayer(cfg["dim"], cfg["heads"], cfg["mlp"], batch_first=True,
                                             norm_first=True,
                                             activation="gelu")
    enc = torch.nn.TransformerEncoder(layer, cfg["depth"], enable_nested_tensor=False).eval().to(plan.device)
    patch = torch.nn.Conv2d(3, cfg["dim"], 14, 14).to(plan.device)
    x = torch.rand(plan.chunk, 3, th * 14, tw * 14, device=plan.device)

    def run() -> Any:
        return enc(patch(x).flatten(2).transpose(1, 2))

    with torch.inference_mode():
        r = common.timed(run, lambda: _sync(plan.device), plan.reps)
    return {**r, "tokens": th * tw, "grid": [th, tw], "frames": plan.chunk,
            "per_frame_ms": round(1e3 * r["median_s"] / plan.chunk, 3),
            "what": "ViT-L/14-shaped torch encoder at MoGe's token count "
                    "(substitute for MoGe ViT-L; head excluded)"}


def bench(plan: common.Plan, model_dir: Path, work: Path, budget: common.Budget, out: Path) -> dict[str, Any]:
    """Every item is saved to ``out`` as soon as it is measured (a hard stop keeps what was measured)."""
    import torch

    res: dict[str, Any] = {"torch": torch.__version__, "device": plan.device, "cuda": torch.version.cuda,
                           "gpu": torch.cuda.get_device_name(0) if plan.device == "cuda" else None}

    def save(what: str) -> None:
        res["skipped"] = budget.skipped
        res["machine"] = common.machine_info()
        common.write_json(out, res)
        print(f"[bench] torch {what} done ({budget.left():.0f} s left)", flush=True)

    if budget.allow("torch attention", 10):
        res["attention"] = bench_attention(plan, work)
        save("attention")
    if not budget.allow("torch load", 30):
        save("nothing more")
        return res
    nets = Nets(plan, model_dir)
    res["load_s"] = nets.load_s
    res["sizes"] = {}
    save("load")
    for size in plan.sizes:
        key = f"{size[0]}x{size[1]}"
        entry: dict[str, Any] = {}
        res["sizes"][key] = entry
        if budget.allow(f"torch prior {key}", 20):
            entry["prior"] = bench_prior(plan, size)
            save(f"prior {key}")
        if budget.allow(f"torch stages {key}", 30):
            entry["stages"] = bench_stages(plan, nets, size)
            save(f"stages {key}")
        for v in plan.variants:
            if budget.allow(f"torch e2e {v} {key}", 40):
                entry[f"e2e_{v}"] = e2e_window(plan, nets, size, v)
                save(f"e2e {v} {key}")
    save("all")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["prepare", "bench"])
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    plan = common.plan_from_env()
    out = args.out or args.work / f"torch_{args.command}.json"
    if args.command == "prepare":
        res = prepare(plan, args.model_dir, args.work)
    else:
        res = bench(plan, args.model_dir, args.work, common.Budget(), out)
    res["machine"] = common.machine_info()
    common.write_json(out, res)
    print(f"[bench] torch {args.command} -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
