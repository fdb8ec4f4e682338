"""`geometryd bench [--short] [--gpu [--dry-run-cpu]] [--glue]`: the benchmark suite (bench/suite.py), the GPU
benchmark script (bench/gpu/run.sh) or the host-glue benchmark alone (bench/bench_glue.py). Results: JSON in bench/results/, a report in bench/REPORT.md.

The bench/ folder is part of the source checkout (not of an installed wheel): the command says so when it
is absent.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="run the benchmarks (CPU suite; --gpu: the GPU script)",
        description="CPU suite: end-to-end daemon throughput/latency/RSS on a generated 576x1024 clip (tiny "
                    "pipeline, and the plumbing alone with an IDENTITY geometry stage), plus the component "
                    "benchmarks; JSON in bench/results/, report in bench/REPORT.md. --gpu runs bench/gpu/run.sh "
                    "(Jittor vs PyTorch on full-size random-weight networks) on a CUDA machine.",
    )
    p.add_argument("--short", action="store_true", help="small CI-sized run (< ~2 min on 2 cores), results in "
                                                       "bench/results/short/")
    p.add_argument("--results", type=Path, default=None, help="results folder (default bench/results[/short])")
    p.add_argument("--skip-components", action="store_true", help="only the end-to-end runs")
    p.add_argument("--gpu", action="store_true", help="run bench/gpu/run.sh instead (needs a CUDA device)")
    p.add_argument("--dry-run-cpu", action="store_true", help="with --gpu: the same script with tiny configs on CPU")
    p.add_argument("--glue", action="store_true", help="only the host-glue benchmark (bench/bench_glue.py: numpy "
                                                      "steps of one window vs torch); --short: a smaller window")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    if not (REPO / "bench" / "suite.py").is_file():
        print(f"geometryd bench: {REPO / 'bench'} not found (benchmarks run from a source checkout)", file=sys.stderr)
        return 2
    if args.gpu:
        script = REPO / "bench" / "gpu" / "run.sh"
        if not args.dry_run_cpu:
            from daemon.jittor_env import detect_cuda

            cuda = detect_cuda()
            if not cuda.driver_ok:
                print(f"geometryd bench --gpu: no usable CUDA device ({cuda.reason}); "
                      "`geometryd bench --gpu --dry-run-cpu` checks the script on CPU", file=sys.stderr)
                return 2
        return subprocess.call(["bash", str(script), *(["--dry-run-cpu"] if args.dry_run_cpu else [])], cwd=REPO)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    if args.glue:
        from bench.bench_glue import SHORT_ARGS
        from bench.bench_glue import main as glue_main

        out = (args.results or (REPO / "bench" / "results" / ("short" if args.short else ""))) / "glue.json"
        return glue_main([*(SHORT_ARGS if args.short else []), "--out", str(out)])  # last line: the summary
    from bench.e2e_cpu import exit_on_sigterm
    from bench.suite import run_suite

    exit_on_sigterm()

    results = args.results or (REPO / "bench" / "results" / ("short" if args.short else ""))
    suite = run_suite(args.short, Path(results).resolve(), args.skip_components)
    status = "ok" if suite["ok"] else "FAILED (see suite.json)"
    print(f"geometryd bench: {status} in {suite['wall_s']} s; results in {results}; report: {suite['report']}")
    return 0 if suite["ok"] else 1
