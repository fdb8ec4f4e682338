"""Jittor side of the GPU benchmark (bench/gpu/run.sh), run with Jittor + numpy 1.26 from their own
--target dir (torch is not imported here: it would need the image's numpy 2).

Measures, in priority order under the time budget:
1. Jittor's import (+ CUDA core compile on a fresh machine) and its first op, apart from everything else;
2. the fused attention kernel (daemon/model/attention_cuda.py) against the float32 torch SDPA reference the
   torch side wrote (gate: max |err| / max |ref| <= 2e-3 in fp16) and its time, next to the plain path;
3. per working size: per-stage times of the networks (first call = kernel compile, timed apart) and one
   end-to-end window through ``GeometryCrafter.__call__`` for each variant, with NVML peak device memory.
Writes jittor.json.

    python bench/gpu/jittor_side.py --model-dir DIR --work DIR [--out FILE]
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

ATTN_TOL_FP16 = 2e-3


def bench_attention(plan: common.Plan, jt: Any, work: Path) -> list[dict[str, Any]]:
    import numpy as np

    from daemon.model import attention_cuda
    from daemon.model.attention import attention

    sync = lambda: jt.sync_all(True)  # noqa: E731
    rows = []
    for name, n, length, d in plan.attn_cases:
        qn, kn, vn = (np.load(work / f"attn_{name}_{t}.npy") for t in "qkv")
        ref = np.load(work / f"attn_{name}_ref.npy")
        q, k, v = jt.array(qn), jt.array(kn), jt.array(vn)
        row: dict[str, Any] = {"case": name, "N": n, "L": length, "d": d, "dtype": str(q.dtype)}
        paths = [("jittor_plain", False)]
        if attention_cuda.supports(q, k, v):
            paths.insert(0, ("jittor_fused", True))
        else:
            row["jittor_fused"] = {"skipped": "fused kernel not applicable here (needs CUDA and fp16/bf16)"}
        for label, fused in paths:
            attention_cuda.set_enabled(fused)
            try:
                fn = lambda q=q, k=k, v=v: attention(q, k, v)  # noqa: E731
                t0 = time.perf_counter()
                out = fn().numpy().astype(np.float32)
                compile_s = time.perf_counter() - t0
                err = float(np.abs(out - ref).max() / np.abs(ref).max())
                row[label] = {**common.timed(fn, sync, 5), "first_incl_compile_s": round(compile_s, 3),
                              "rel_err_vs_fp32_ref": err}
                if fused:
                    row[label]["parity_ok"] = err <= ATTN_TOL_FP16
            except Exception as exc:  # noqa: BLE001 - record and go on: the rest of the run still matters
                row[label] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            finally:
                attention_cuda.set_enabled(True)
        print(f"[bench] jittor attention {json.dumps(row)}", flush=True)
        rows.append(row)
        del q, k, v, fn  # fn holds them too
        jt.gc()
    return rows


def _window(plan: common.Plan, size: tuple[int, int], n: int) -> tuple[Any, Any, Any]:
    """Frames at the working size and a plane prior (as the daemon's warm-up uses)."""
    import numpy as np

    h, w = size
    rng = np.random.default_rng(plan.seed)
    frames = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    ys, xs = np.meshgrid(np.linspace(-0.5, 0.5, h), np.linspace(-0.5, 0.5, w), indexing="ij")
    plane = np.stack([xs, ys, np.ones_like(xs)], -1).astype(np.float32)
    points = np.broadcast_to(plane, (n, h, w, 3)).copy()
    return frames, points, np.ones((n, h, w), dtype=bool)


def bench_stages(plan: common.Plan, jt: Any, gcs: dict[str, Any], size: tuple[int, int]) -> dict[str, Any]:
    import numpy as np

    from daemon.model.attention import attention  # noqa: F401  (same path the networks use)

    c, f = plan.chunk, plan.frames
    h, w = size[0] // 8, size[1] // 8
    rng = np.random.default_rng(plan.seed + 11)
    ld = np.float16 if plan.dtype == "fp16" else np.float32
    gc = next(iter(gcs.values()))
    video = (rng.random((c, 3) + size, dtype=np.float32) * 2 - 1)
    x4 = np.clip(rng.standard_normal((c, 4) + size, dtype=np.float32), -1, 1)
    px = rng.standard_normal((c, 3, 224, 224), dtype=np.float32).astype(ld)
    z = rng.standard_normal((c, 4, h, w), dtype=np.float32)
    emb = rng.standard_normal((1, f, common.clip_config(plan)["projection_dim"]), dtype=np.float32).astype(ld)
    ids = np.asarray([[7.0, 127.0, 0.02]], ld)
    fns: dict[str, tuple[Any, int]] = {
        "clip": (lambda: gc.clip.image_embeds(px).numpy(), c),
        "svd_vae_encode": (lambda: gc.svd_vae.encode(video).numpy(), c),
        "pmap_encode": (lambda: gc.point_map_vae.encode(x4).numpy(), c),
        "pmap_decode": (lambda: [t.numpy() for t in gc.point_map_vae.decode(z, c)], c),
    }
    for v, g in gcs.items():
        cin = 12 if v == "diff" else 8
        sample = rng.standard_normal((1, f, cin, h, w), dtype=np.float32).astype(ld)
        fns[f"unet_{v}_step"] = (lambda g=g, sample=sample: g.unet(sample, 1.0, emb, ids).numpy(), f)
    out: dict[str, Any] = {}
    for name, (fn, frames) in fns.items():
        try:
            r = common.timed(fn, lambda: jt.sync_all(True), plan.reps)
            out[name] = {**r, "frames": frames, "per_frame_ms": round(1e3 * r["median_s"] / frames, 3),
                         "compile_s_est": round(max(0.0, r["first_s"] - r["median_s"]), 3)}
        except Exception as exc:  # noqa: BLE001
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        jt.gc()
    return out


def e2e_window(plan: common.Plan, jt: Any, gc: Any, size: tuple[int, int], variant: str,
               mem: common.NvmlPeak, n_frames: int | None = None) -> dict[str, Any]:
    """One window of ``plan.frames`` (or ``n_frames``) frames through ``GeometryCrafter.__call__`` (prior
    post-processing, encoders, denoise, decode, post): frames/s, stage timings and the NVML peak."""
    import numpy as np

    n = n_frames or plan.frames
    frames, points, mask = _window(plan, size, n)
    jt.sync_all(True)
    jt.gc()
    mem.reset()
    t0 = time.perf_counter()
    out = gc(frames, points, mask, height=size[0], width=size[1], window_size=n, overlap=0,
             num_inference_steps=plan.steps, decode_chunk_size=plan.chunk, quiet=True)
    total = time.perf_counter() - t0
    timings = {k: round(v, 4) for k, v in out.timings.items()}
    net = sum(out.timings.get(k, 0.0) for k in ("encode", "denoise", "decode"))
    return {"total_s": round(total, 4), "stages_s": timings, "frames": n,
            "frames_per_s": round(n / total, 3), "network_frames_per_s": round(n / net, 3),
            "steps": plan.steps if variant == "diff" else 1, "nvml_peak_mib": mem.peak_mib,
            "finite_fraction": round(float(np.isfinite(out.depth).mean()), 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    plan = common.plan_from_env()
    budget = common.Budget()
    out_path = args.out or args.work / "jittor.json"
    res: dict[str, Any] = {"device": plan.device, "plan": {"frames": plan.frames, "chunk": plan.chunk,
                                                           "steps": plan.steps, "dtype": plan.dtype}}

    def save() -> None:
        res["skipped"] = budget.skipped
        res["machine"] = common.machine_info()
        common.write_json(out_path, res)

    mem = common.NvmlPeak()
    mem.start()
    t0 = time.perf_counter()
    from daemon.jittor_env import import_jittor

    jt = import_jittor()
    res["jittor_import_s"] = round(time.perf_counter() - t0, 2)  # fresh machine: compiles Jittor's core
    res["jittor"] = jt.__version__
    res["use_cuda"] = int(jt.flags.use_cuda)
    t0 = time.perf_counter()
    (jt.array([1.0, 2.0]) * 2).sum().numpy()
    res["first_op_s"] = round(time.perf_counter() - t0, 2)
    print(f"[bench] jittor {res['jittor']} use_cuda={res['use_cuda']} import {res['jittor_import_s']} s, "
          f"first op {res['first_op_s']} s", flush=True)
    if plan.device == "cuda" and not jt.flags.use_cuda:
        res["error"] = "Jittor did not select CUDA (see the patch / doctor output above)"
        save()
        return 1
    save()

    if budget.allow("jittor attention", 30):
        res["attention"] = bench_attention(plan, jt, args.work)
        save()

    from daemon.pipeline import GeometryCrafter

    if not budget.allow("jittor load", 60):
        save()
        return 0
    t0 = time.perf_counter()
    gcs = {"diff": GeometryCrafter.from_pretrained(args.model_dir, variant="diff", dtype=plan.dtype)}
    if "determ" in plan.variants:
        from daemon.model import load_unet

        d = gcs["diff"]
        gcs["determ"] = GeometryCrafter(unet=load_unet(args.model_dir / "unet_determ", dtype=plan.dtype),
                                        svd_vae=d.svd_vae, point_map_vae=d.point_map_vae, clip=d.clip,
                                        scheduler_config=d.scheduler_config,
                                        clip_mean=tuple(d.clip_mean.ravel()),
                                        clip_std=tuple(d.clip_std.ravel()), variant="determ",
                                        dtype=plan.dtype)
    res["load_s"] = round(time.perf_counter() - t0, 2)
    res["sizes"] = {}
    for size in plan.sizes:
        key = f"{size[0]}x{size[1]}"
        entry: dict[str, Any] = {}
        res["sizes"][key] = entry
        if budget.allow(f"jittor stages {key}", 60):
            mem.reset()
            entry["stages"] = bench_stages(plan, jt, gcs, size)
            entry["stages_nvml_peak_mib"] = mem.peak_mib
            entry["compile_s_est"] = round(sum(v.get("compile_s_est", 0.0) for v in entry["stages"].values()),
                                           2)
            save()
        for v, gc in gcs.items():
            if budget.allow(f"jittor e2e {v} {key}", 60):
                try:
                    first = e2e_window(plan, jt, gc, size, v, mem)
                    entry[f"e2e_{v}"] = first
                    save()
                    # a second window, when it fits, separates compile (odd chunk shapes) from steady time
                    if budget.allow(f"jittor e2e {v} {key} (2nd window)", 2 * first["total_s"] + 30):
                        steady = e2e_window(plan, jt, gc, size, v, mem)
                        steady["first_window_total_s"] = first["total_s"]
                        entry[f"e2e_{v}"] = steady
                except Exception as exc:  # noqa: BLE001
                    entry[f"e2e_{v}"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
                save()
        if size == plan.sizes[0] and "e2e_diff" in entry and "error" not in entry["e2e_diff"]:
            # The daemon warms up on one full window; a shorter window (end of a file source; other decode
            # chunk sizes) must not compile again. Per-frame time of a shorter window vs the steady one:
            n = max(2, plan.frames - plan.chunk // 2 - 3)
            if budget.allow(f"jittor shorter-window recompile check {key}",
                            entry["e2e_diff"]["total_s"] + 30):
                try:
                    r = e2e_window(plan, jt, gcs["diff"], size, "diff", mem, n_frames=n)
                    r["steady_s_per_frame"] = round(1 / entry["e2e_diff"]["frames_per_s"], 4)
                    r["this_s_per_frame"] = round(1 / r["frames_per_s"], 4)
                    entry["shorter_window_diff"] = r
                except Exception as exc:  # noqa: BLE001
                    entry["shorter_window_diff"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
                save()
        print(f"[bench] jittor {key}: {json.dumps(entry)[:600]}", flush=True)
    mem.stop()
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
