"""Merge the torch and Jittor results of bench/gpu/run.sh into one JSON and print one table.

    python bench/gpu/merge.py --work DIR --out FILE [--started EPOCH]
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


def _load(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {"error": f"{path.name}: {exc}"}


def _ms(x: Any) -> str:
    return f"{1e3 * x:.2f}" if isinstance(x, (int, float)) else "-"


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def table(res: dict[str, Any]) -> str:
    """Plain-text table: attention, then per size the stages (ms per call, median) and end-to-end frames/s."""
    t, j = res.get("torch", {}), res.get("jittor", {})
    lines = [f"GPU benchmark on: {res.get('gpu') or 'CPU (dry run)'}",
             f"jittor import {j.get('jittor_import_s')} s, first op {j.get('first_op_s')} s, "
             f"torch load {t.get('load_s')} s, jittor load {j.get('load_s')} s"]
    lines.append("")
    lines.append(f"{'attention case':<22}{'torch sdpa ms':>15}{'torch plain ms':>16}{'jittor fused ms':>17}"
                 f"{'jittor plain ms':>17}{'fused rel err':>15}")
    jatt = {r["case"]: r for r in j.get("attention", []) or []}
    for r in t.get("attention", []) or []:
        ja = jatt.get(r["case"], {})
        lines.append(f"{r['case']:<22}{_ms(_get(r, 'torch_sdpa', 'median_s')):>15}"
                     f"{_ms(_get(r, 'torch_plain', 'median_s')):>16}"
                     f"{_ms(_get(ja, 'jittor_fused', 'median_s')):>17}"
                     f"{_ms(_get(ja, 'jittor_plain', 'median_s')):>17}"
                     f"{str(_get(ja, 'jittor_fused', 'rel_err_vs_fp32_ref') or '-')[:10]:>15}")
    for size in sorted(set(t.get("sizes", {})) | set(j.get("sizes", {}))):
        ts, js = _get(t, "sizes", size) or {}, _get(j, "sizes", size) or {}
        lines.append("")
        lines.append(f"[{size}]  stage (median ms per call)   torch      jittor    jittor-first(compile)")
        names = list((ts.get("stages") or {}).keys()) or list((js.get("stages") or {}).keys())
        if ts.get("prior"):
            lines.append(f"  prior substitute x{ts['prior']['frames']:<3}          "
                         f"{_ms(ts['prior']['median_s']):>9}  "
                         f"{'(torch only)':>12}")
        for n in names:
            tv, jv = _get(ts, "stages", n) or {}, _get(js, "stages", n) or {}
            frames = tv.get("frames", jv.get("frames", ""))
            lines.append(f"  {n + ' x' + str(frames):<30}{_ms(tv.get('median_s')):>9}"
                         f"{_ms(jv.get('median_s')):>12}{_ms(jv.get('first_s')):>14}")
        for v in ("diff", "determ"):
            te, je = ts.get(f"e2e_{v}") or {}, js.get(f"e2e_{v}") or {}
            if te or je:
                lines.append(f"  e2e {v:<6} frames/s: torch {te.get('frames_per_s', '-')} "
                             f"(peak {te.get('peak_allocated_mib', '-')} MiB alloc)  jittor "
                             f"{je.get('frames_per_s', '-')} (networks only "
                             f"{je.get('network_frames_per_s', '-')}; NVML peak "
                             f"{je.get('nvml_peak_mib', '-')} MiB)"
                             + (f"  jittor error: {je['error'][:120]}" if "error" in je else ""))
        sw = js.get("shorter_window_diff")
        if sw:
            lines.append(f"  jittor shorter window ({sw.get('frames')} frames): "
                         f"{sw.get('this_s_per_frame')} s/frame vs "
                         f"steady {sw.get('steady_s_per_frame')} s/frame (much slower = recompiles after "
                         "warm-up)"
                         if "error" not in sw else f"  jittor shorter window: error {sw['error'][:120]}")
    skipped = (t.get("skipped") or []) + (j.get("skipped") or [])
    if skipped:
        lines.append("")
        lines.append("skipped (time budget): " + "; ".join(skipped))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--started", type=float, default=None)
    args = ap.parse_args(argv)
    plan = common.plan_from_env()
    res = {"name": "gpu_bench", "dry_run_cpu": plan.dry_run_cpu, "gpu": common.gpu_name(),
           "plan": {"sizes": plan.sizes, "frames": plan.frames, "chunk": plan.chunk, "steps": plan.steps,
                    "reps": plan.reps, "dtype": plan.dtype, "attn_cases": plan.attn_cases},
           "notes": ["stage and end-to-end timings use windows of plan.frames frames (upstream: 110) to fit "
                     "the 10-minute device limit",
                     "prior = ViT-L/14-shaped torch encoder at MoGe's token count "
                     "(substitute; MoGe head excluded), same for both pipelines since the prior is a torch "
                     "sidecar",
                     "jittor first_s includes kernel compilation; compile is also in jittor_import_s on a "
                     "fresh "
                     "machine"],
           "prepare": _load(args.work / "torch_prepare.json"), "torch": _load(args.work / "torch.json"),
           "jittor": _load(args.work / "jittor.json"), "machine": common.machine_info()}
    if args.started:
        res["wall_s"] = round(time.time() - args.started, 1)
    common.write_json(args.out, res)
    print(table(res))
    print(f"\n[bench] wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
