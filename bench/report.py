"""Markdown report + PNG plot from the benchmark JSON files in a results folder (written by bench/suite.py).

The plot is drawn with PIL (no matplotlib dependency): per-frame latency percentiles (p50 / p90 / max) and
frames/s of the end-to-end runs, one bar group per mode.

    python bench/report.py [--results bench/results] [--out bench/REPORT.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


GPU_STATUS = [
    "`bench/gpu/run.sh` (one device call, < 10 min; bench/results/README.md says how) compares the Jittor "
    "pipeline with a PyTorch reference of the same full-size random-weight networks on one card: "
    "fused-attention parity (<= 2e-3 fp16) and time at 80x3840x64 and 19200x110x64, per-stage times "
    "(compile timed apart), end-to-end 25-frame windows (diff, determ) at 384x640 and 576x1024, peak "
    "device memory.",
    "",
    "Fused attention (daemon/model/attention_cuda.py): verified without a GPU only -- the kernel source is "
    "compiled for sm_90 by nvcc (ptxas: 168 registers at head dim 64, 237 at 80, no spills, 16 / 20 KiB "
    "shared memory per 128-thread block) and executed on the CPU by a g++ emulation of its threads (max "
    "rel. error <= 1e-5 vs float64, tests/model/test_attention_fused.py). Its speed and its parity through "
    "Jittor on a GPU await a GPU session.",
    "",
    "Prediction to check there: the spatial case is 2 x 2 x 80 x 3840^2 x 64 = 302 GFLOP and 157 MB of "
    "q/k/v/o, so compute-bound; on CUDA-core fp32 FMA (~60 TFLOP/s on an H100) the floor is ~5 ms, "
    "expected 8-15 ms -- against 34 ms for Jittor's plain fp16 path (../shared/notes/jittor-cuda13.md) and "
    "~1 ms for torch's flash SDPA. Closing the rest needs tensor-core MMA (the next step if the "
    "measurement matches the prediction).",
]


def _fmt(x: Any, nd: int = 3) -> str:
    if isinstance(x, float):
        return f"{x:.{nd}g}"
    return "-" if x is None else str(x)


def plot_e2e(runs: list[dict[str, Any]], path: Path) -> Path:
    """Bar chart (PIL): latency p50/p90/max in seconds per mode, and frames/s written on each group."""
    from PIL import Image, ImageDraw

    ok = [r for r in runs if r.get("latency_s")]
    w, h, pad, top = 640, 360, 60, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((pad, 10), "end-to-end per-frame latency (s): p50 / p90 / max, and frames/s", fill="black")
    if not ok:
        d.text((pad, h // 2), "no successful end-to-end run", fill="red")
        img.save(path)
        return path
    vmax = max(max(r["latency_s"].values()) for r in ok) or 1.0
    d.line((pad, top, pad, h - pad), fill="black")
    d.line((pad, h - pad, w - 20, h - pad), fill="black")
    for i in range(5):
        y = h - pad - (h - pad - top) * i / 4
        d.line((pad - 4, y, pad, y), fill="black")
        d.text((4, y - 6), f"{vmax * i / 4:.2f}", fill="black")
    colours = {"p50": (66, 133, 244), "p90": (251, 188, 5), "max": (234, 67, 53)}
    group_w = (w - pad - 40) / len(ok)
    for gi, r in enumerate(ok):
        x0 = pad + 20 + gi * group_w
        bw = min(50.0, (group_w - 40) / 3)
        for bi, key in enumerate(("p50", "p90", "max")):
            v = float(r["latency_s"].get(key, 0.0))
            y = h - pad - (h - pad - top) * v / vmax
            d.rectangle((x0 + bi * bw, y, x0 + (bi + 1) * bw - 4, h - pad), fill=colours[key])
        d.text((x0, h - pad + 6), f"{r['mode']}", fill="black")
        d.text((x0, h - pad + 20), f"{_fmt(r.get('frames_per_s'))} frames/s", fill="black")
    for i, (key, c) in enumerate(colours.items()):  # legend on one line under the title, clear of the bars
        d.rectangle((pad + i * 70, 28, pad + i * 70 + 10, 38), fill=c)
        d.text((pad + i * 70 + 14, 27), key, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _e2e_section(e2e: dict[str, Any], png_rel: str | None) -> list[str]:
    m = e2e.get("machine", {})
    out = ["## End-to-end daemon (CPU)", "",
           "`geometryd run --exit-when-done` on a generated clip (file source, not real-time) with the real "
           "sidecar (tiny random-weight MoGe), the shared-memory ring, windows and a real mosquitto. "
           "`pipeline` = tiny random-weight GeometryCrafter at the working size below; **`plumbing` = "
           "IDENTITY geometry stage (result = prior): it measures the daemon's own overhead, not the "
           "model.** frames/s is over the serving period (READY=1 to exit); latency is per frame from "
           "decode to published -- in a run that is not paced, every frame is offered at once, so latency "
           "there includes queueing behind earlier windows.", "",
           f"Machine: {m.get('cpu_count')} CPUs ({m.get('cpu_model')}), load average at the end "
           f"{m.get('load_avg')}, Python {m.get('python')}, torch {m.get('torch')}, jittor "
           f"{m.get('jittor')}, {m.get('timestamp')}. Other jobs shared these cores: treat the numbers as an "
           "upper bound on cost.", "",
           "| mode | clip | working size, window/overlap, decode chunk, steps | frames in / out / skipped "
           "| frames/s (serving) | latency p50 s | p90 s | max s | startup s | warm-up s | peak RSS MiB "
           "(daemon+worker+sidecar) | MQTT published / dropped |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in e2e.get("runs", []):
        p = r.get("params", {})
        paced = ", paced 24 fps" if p.get("realtime") else ""
        clip = f"{p.get('frames')} x {p.get('height')}x{p.get('width')}{paced}"
        geo = (f"{p.get('work_height')}x{p.get('work_width')}, {p.get('window')}/{p.get('overlap')}, "
               f"decode chunk {p.get('decode_chunk_size')}, {p.get('steps')} step(s)")
        if "error" in r:
            out.append(f"| {r['mode']} | {clip} | {geo} | ERROR: {r['error'][-200:]!r} | | | | | | | | |")
            continue
        lat = r.get("latency_s") or {}
        mq = r.get("mqtt") or {}
        out.append(f"| {r['mode']} | {clip} | {geo} | "
                   f"{r.get('frames_in')} / {r['frames_out']} / {r.get('skipped')} | "
                   f"{_fmt(r['frames_per_s'])} | "
                   f"{_fmt(lat.get('p50'))} | {_fmt(lat.get('p90'))} | {_fmt(lat.get('max'))} | "
                   f"{_fmt(r.get('startup_s'))} | {_fmt(r.get('warm_up_s'))} | {r['peak_rss_mib']:.0f} | "
                   f"{mq.get('published')} / {_fmt(mq.get('dropped'))} |")
    if png_rel:
        out += ["", f"![end-to-end latency]({png_rel})"]
    return out + [""]


def _sub_section(name: str, data: dict[str, Any] | None, run: dict[str, Any] | None) -> list[str]:
    out = [f"### {name}", ""]
    if run:
        out.append(f"`{' '.join(run.get('cmd', []))}` -> rc {run.get('returncode')}, {run.get('wall_s')} s")
    if data is None:
        out.append("" if run else "not run")
        return out + [""]
    if name == "prior":
        out += ["", "| config | size | in-process frames/s | sidecar frames/s |", "|---|---|---|---|"]
        for r in data.get("runs", []):
            out.append(f"| {r['config']} | {r['height']}x{r['width']} | "
                       f"{_fmt(r['in_process']['frames_per_s'])} | "
                       f"{_fmt(r['sidecar']['frames_per_s'])} |")
    elif name == "networks_cpu" and isinstance(data.get("results"), list):
        out += ["", f"Tiny configs, {data.get('precision', '?')}, CPU.", "",
                "| network | inputs | torch ms | jittor ms | jittor / torch | max rel. err |",
                "|---|---|---|---|---|---|"]
        for r in data["results"]:
            shapes = ", ".join(f"{k} {tuple(v)}" for k, v in (r.get("inputs") or {}).items() if v)
            out.append(f"| {r.get('name')} | {shapes} | {_fmt(r.get('torch_ms_median'))} | "
                       f"{_fmt(r.get('jittor_ms_median'))} | {_fmt(r.get('jittor_over_torch'))} | "
                       f"{_fmt(r.get('max_rel_err'), 2)} |")
    elif name == "anchor_cpu" and isinstance(data.get("results"), list):
        cfg = data.get("config", {})
        out += ["", f"{cfg.get('frames')} frames {cfg.get('in_height')}x{cfg.get('in_width')} -> "
                f"{cfg.get('height')}x{cfg.get('width')}, window {cfg.get('window_size')}, overlap "
                f"{cfg.get('overlap')}, {cfg.get('num_inference_steps')} steps, decode chunk "
                f"{cfg.get('decode_chunk_size')}; fp32, CPU conv backend {data.get('cpu_conv_backend')}; "
                f"median of {data.get('runs')} interleaved round(s).",
                "",
                "| variant | stage | geometryd s | torch s | geometryd / torch |", "|---|---|---|---|---|"]
        for r in data["results"]:
            med, ratio = r.get("median_s", {}), r.get("ratio_geometryd_over_torch", {})
            for stage in ("encode", "denoise", "decode", "total"):
                out.append(f"| {r.get('variant')} | {stage} | {_fmt(med.get('geometryd', {}).get(stage))} | "
                           f"{_fmt(med.get('torch', {}).get(stage))} | {_fmt(ratio.get(stage))} |")
    elif name == "glue" and isinstance(data.get("sizes"), list):
        for r in data["sizes"]:
            out += ["", f"Host glue of one window at {r['size']} (source {r['source']}, "
                    f"window {r['window']}, "
                    f"{r['stride']} new frames), ms per new frame; total "
                    f"{_fmt(r['total_numpy_ms_per_new_frame'])} (torch "
                    f"{_fmt(r['total_torch_ms_per_new_frame'])}), target "
                    f"{data.get('target_ms_per_new_frame')}.",
                    "", "| step | numpy ms | torch ms | numpy / torch |", "|---|---|---|---|"]
            for k, st in r["steps"].items():
                out.append(f"| {k} | {_fmt(st['numpy_ms_per_new_frame'])} | "
                           f"{_fmt(st['torch_ms_per_new_frame'])} | "
                           f"{_fmt(st['ratio_numpy_over_torch'])} |")
    elif name == "shm" and "shm" in data:
        b = data.get("socket_bytes_baseline", {})
        out += ["", f"{data.get('frames')} frames of {data.get('height')}x{data.get('width')} "
                f"({_fmt(data.get('frame_mib'))} MiB):"
                f" shared memory {_fmt(data['shm'].get('frames_per_s'))} frames/s, latency median "
                f"{_fmt(data['shm'].get('latency_ms_median'))} ms / p99 "
                f"{_fmt(data['shm'].get('latency_ms_p99'))} ms; "
                f"bytes over the socket {_fmt(b.get('frames_per_s'))} frames/s."]
    else:
        keys = [k for k in data if k not in ("machine",)]
        out += ["", "```", json.dumps({k: data[k] for k in keys}, indent=1, default=str)[:1500], "```"]
    return out + [""]


def write_report(results: Path, out: Path) -> Path:
    suite = _load(results / "suite.json") or {}
    e2e = _load(results / "e2e_cpu.json")
    lines = ["# geometryd benchmarks", "",
             f"Generated by `geometryd bench{' --short' if suite.get('short') else ''}` (bench/suite.py) at "
             f"{suite.get('finished', '?')}; raw JSON in "
             f"`{results.relative_to(REPO) if results.is_relative_to(REPO) else results}/`. CPU numbers "
             "only: GPU numbers come from `bench/gpu/run.sh` on a GPU machine "
             "(`bench/results/gpu_*.json`); none is claimed here unless such a file exists.", ""]
    if e2e:
        png = plot_e2e(e2e.get("runs", []), results / "e2e_cpu.png")
        try:
            rel = str(png.relative_to(out.parent))
        except ValueError:
            rel = str(png)
        lines += _e2e_section(e2e, rel)
    lines += ["## Component benchmarks (scripts by their owners, run by the suite)", ""]
    runs = {r["name"]: r for r in suite.get("components", [])}
    if not runs:
        lines += ["(This suite run skipped the components: the files below are the owners' own latest runs; "
                  "each JSON carries its machine block and timestamp.)", ""]
    for name in ("shm", "prior", "glue", "networks_cpu", "anchor_cpu"):
        if name in runs or (results / f"{name}.json").exists():
            lines += _sub_section(name, _load(results / f"{name}.json"), runs.get(name))
    gpu = sorted(set(results.glob("gpu_*.json")) | set((REPO / "bench" / "results").glob("gpu_*.json")))
    lines += ["## GPU", "", *GPU_STATUS, ""]
    if gpu:
        for g in gpu:
            data = _load(g) or {}
            dry = "DRY RUN on CPU (tiny configs; checks the script, measures nothing about a GPU)"
            lines.append(f"- `{g.name}`: {dry if data.get('dry_run_cpu') else data.get('gpu')}")
    else:
        lines.append("No GPU results yet: run `bench/gpu/run.sh` on a GPU machine "
                     "(see bench/results/README.md).")
    lines.append("")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "REPORT.md")
    args = ap.parse_args(argv)
    print(write_report(args.results.resolve(), args.out.resolve()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
