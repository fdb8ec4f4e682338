"""`geometryd bench [--short] [--gpu [--dry-run-cpu]] [--glue]`: the benchmark suite (bench/suite.py), the GPU
benchmark script (bench/gpu/run.sh) or the host-glue benchmark alone (bench/bench_glue.py). Results: JSON in
bench/results/, a report in bench/REPORT.md.

The bench/ folder is part of the source checkout (not of an installed wheel): the command says so when it
is absent.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path

from daemon.jittor_env import detect_cuda

REPO = Path(__file__).resolve().parents[2]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="run the benchmarks (CPU suite; --gpu: the GPU script)",
        description="CPU suite: end-to-end daemon throughput/latency/RSS on a generated 576x1024 clip (tiny "
                    "pipeline, and the plumbing alone with an IDENTITY geometry stage), plus the component "
                    "benchmarks; JSON in bench/results/, report in bench/REPORT.md. --gpu runs "
                    "bench/gpu/run.sh (Jittor vs PyTorch on full-size random-weight networks) on a CUDA "
                    "machine.",
    )
    p.add_argument("--short", action="store_true",
                   help="small CI-sized run (< ~2 min on 2 cores), results in "
                                                       "bench/results/short/")
    p.add_argument("--results", type=Path, default=None,
                   help="results folder (default bench/results[/short])")
    p.add_argument("--skip-components", action="store_true", help="only the end-to-end runs")
    p.add_argument("--gpu", action="store_true", help="run bench/gpu/run.sh instead (needs a CUDA device)")
    p.add_argument("--dry-run-cpu", action="store_true",
                   help="with --gpu: the same script with tiny configs on CPU")
    p.add_argument("--glue", action="store_true",
                   help="only the host-glue benchmark (bench/bench_glue.py: numpy steps of one window vs "
                        "torch); --short: a smaller window")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    if not (REPO / "bench" / "suite.py").is_file():
        print(f"geometryd bench: {REPO / 'bench'} not found (benchmarks run from a source checkout)",
              file=sys.stderr)
        return 2
    if args.gpu:
        script = REPO / "bench" / "gpu" / "run.sh"
        if not args.dry_run_cpu:
            cuda = detect_cuda()
            if not cuda.driver_ok:
                print(f"geometryd bench --gpu: no usable CUDA device ({cuda.reason}); "
                      "`geometryd bench --gpu --dry-run-cpu` checks the script on CPU", file=sys.stderr)
                return 2
        return subprocess.call(["bash", str(script), *(["--dry-run-cpu"] if args.dry_run_cpu else [])],
                               cwd=REPO)
    # bench/ runs as its own scripts: nothing under daemon/ imports bench/ (layout rule 5).
    results = args.results or (REPO / "bench" / "results" / ("short" if args.short else ""))
    if args.glue:
        glue = [sys.executable, str(REPO / "bench" / "bench_glue.py"), *(["--short"] if args.short else []),
                "--out", str(Path(results) / "glue.json")]
        return _run(glue)  # last line: the summary
    suite = [sys.executable, str(REPO / "bench" / "suite.py"), *(["--short"] if args.short else []),
             "--results", str(Path(results).resolve()),
             *(["--skip-components"] if args.skip_components else [])]
    return _run(suite)


def _run(cmd: list[str]) -> int:
    """Run a bench script; SIGTERM is passed on so that the daemon and broker it started are stopped."""
    proc = subprocess.Popen(cmd, cwd=REPO)
    previous = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
