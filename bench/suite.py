"""The CPU benchmark suite behind `geometryd bench [--short]`.

1. bench/e2e_cpu.py: end-to-end daemon throughput, per-frame latency percentiles and peak RSS on a
   generated 576x1024 clip, for the whole tiny pipeline and for the plumbing alone (identity geometry,
   labelled as such);
2. the component scripts of the other owners, each as its own process: bench/bench_shm.py,
   bench/bench_prior.py, bench/bench_glue.py (host glue vs torch), bench/bench_networks_cpu.py and
   bench/bench_anchor_cpu.py when present (smaller arguments with --short);
3. bench/report.py: bench/REPORT.md (or REPORT.md beside a custom results folder) with a PIL plot.

Results: ``<results>/suite.json`` (what ran, exit codes, wall times, machine) and each script's own JSON in
the same folder. ``--short`` (CI: tests/bench/test_bench_suite.py) targets < ~2 min on 2 cores; it writes to
bench/results/short/ by default so it never overwrites the full run's files.

    python bench/suite.py [--short] [--results DIR] [--skip-components]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.e2e_cpu import E2EParams, exit_on_sigterm, machine_info, run_e2e  # noqa: E402

# The CPU pipeline run is small: Jittor's CPU convolutions (no MKL offline) make the tiny decoder the cost.
# The daemon resizes frames to the working size at ingest (ring, prior, outputs are at that size): the
# plumbing runs work at the clip's full 576x1024; the tiny pipeline at 64x128.
_FULL = {"work_height": 576, "work_width": 1024}
FULL_E2E = {"plumbing": E2EParams(frames=96, window=16, overlap=4, steps=1, **_FULL),
            "plumbing-realtime": E2EParams(frames=96, window=16, overlap=4, steps=1, realtime=True, **_FULL),
            "pipeline": E2EParams(frames=24, window=8, overlap=2, steps=2)}
SHORT_E2E = {"plumbing": E2EParams(frames=24, window=8, overlap=2, steps=1, timeout_s=300, **_FULL),
             "pipeline": E2EParams(frames=6, window=4, overlap=2, steps=1, timeout_s=600)}


def component_commands(short: bool, results: Path) -> list[tuple[str, list[str], float]]:
    """(name, argv, timeout_s) of the other owners' scripts that exist in this checkout."""
    py = sys.executable
    cmds: list[tuple[str, list[str], float]] = []
    if (REPO / "bench" / "bench_shm.py").exists():
        extra = ["--frames", "30"] if short else []
        cmds.append(("shm", [py, "bench/bench_shm.py", *extra, "--out", str(results / "shm.json")], 300))
    if (REPO / "bench" / "bench_prior.py").exists():
        extra = ["--configs", "tiny", "--sizes", "576x1024", "--frames", "4"] if short else []
        cmds.append(("prior", [py, "bench/bench_prior.py", *extra, "--out", str(results / "prior.json")],
                     900))
    if (REPO / "bench" / "bench_glue.py").exists():
        from bench.bench_glue import SHORT_ARGS

        extra = SHORT_ARGS if short else []
        cmds.append(("glue", [py, "bench/bench_glue.py", *extra, "--out", str(results / "glue.json")], 900))
    if (REPO / "bench" / "bench_networks_cpu.py").exists():
        # short: the two cheap cases, one run (Jittor's CPU convolutions make the VAE cases slow)
        extra = ["--runs", "1", "--only", "clip_vision", "--only", "unet_vid2vid"] if short else []
        cmds.append(("networks_cpu", [py, "bench/bench_networks_cpu.py", *extra,
                                      "--out", str(results / "networks_cpu.json")], 1200))
    if (REPO / "bench" / "bench_anchor_cpu.py").exists():
        # the issue-19 anchor: geometryd vs the torch reference pipeline per stage; short: determ, small clip
        extra = ["--short", "--variants", "determ"] if short else []
        cmds.append(("anchor_cpu", [py, "bench/bench_anchor_cpu.py", *extra,
                                    "--out", str(results / "anchor_cpu.json")], 900 if short else 3600))
    return cmds


def run_component(name: str, cmd: list[str], timeout_s: float) -> dict[str, Any]:
    t0 = time.monotonic()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, env=env)
        rc, tail = proc.returncode, (proc.stdout[-800:] + proc.stderr[-1200:]).strip()
    except subprocess.TimeoutExpired:
        rc, tail = None, f"timed out after {timeout_s} s"
    rec = {"name": name, "cmd": [Path(cmd[0]).name, *cmd[1:]], "returncode": rc,
           "wall_s": round(time.monotonic() - t0, 2)}
    if rc != 0:
        rec["tail"] = tail
    return rec


def run_suite(short: bool, results: Path, skip_components: bool = False,
              report_path: Path | None = None) -> dict[str, Any]:
    from bench.report import write_report
    from daemon.jittor_env import JittorEnvError  # noqa: F401  (fail early on a broken venv)

    results.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    plan = SHORT_E2E if short else FULL_E2E
    e2e_t0 = time.monotonic()
    (REPO / "var").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-e2e-", dir=REPO / "var"))  # concurrent suites do not collide
    try:
        runs = run_e2e(plan, work)
    finally:
        for log in work.glob("*.log"):  # the daemons' JSON logs, for inspection
            shutil.copy(log, results / f"e2e_{log.name}")
        shutil.rmtree(work, ignore_errors=True)
    e2e = {"name": "e2e_cpu", "short": short, "runs": runs, "machine": machine_info()}
    _write(results / "e2e_cpu.json", e2e)
    suite: dict[str, Any] = {"name": "suite", "short": short,
                             "e2e_wall_s": round(time.monotonic() - e2e_t0, 2),
                             "components": []}
    if not skip_components:
        for name, cmd, timeout_s in component_commands(short, results):
            suite["components"].append(run_component(name, cmd, timeout_s))
    suite["wall_s"] = round(time.monotonic() - t0, 2)
    suite["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    suite["machine"] = machine_info()
    suite["ok"] = (all("error" not in r for r in runs)
                   and all(c["returncode"] == 0 for c in suite["components"]))
    _write(results / "suite.json", suite)
    if report_path is None:
        default = results == REPO / "bench" / "results"
        report_path = REPO / "bench" / "REPORT.md" if default else results / "REPORT.md"
    suite["report"] = str(write_report(results, report_path))
    return suite


def _write(path: Path, data: dict[str, Any]) -> None:
    import json

    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--short", action="store_true")
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--skip-components", action="store_true")
    args = ap.parse_args(argv)
    exit_on_sigterm()
    results = args.results or (REPO / "bench" / "results" / ("short" if args.short else ""))
    suite = run_suite(args.short, results.resolve(), args.skip_components)
    status = "ok" if suite["ok"] else "FAILED (see suite.json)"
    print(f"geometryd bench: {status} in {suite['wall_s']} s; results in {results}; "
          f"report: {suite['report']}")
    return 0 if suite["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
