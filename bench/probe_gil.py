"""Does Jittor release the GIL while it computes? (issue #16: overlap host glue with network work in a thread)

A pure-Python counter runs in a second thread while the main thread (1) sleeps, (2) syncs Jittor CPU
matmuls, (3) runs numpy BLAS matmuls. If Jittor held the GIL, the counter's rate drops to ~0 during (2);
numpy releases the GIL, so (3) keeps it going. Only where (2) keeps the counter going can a thread overlap
host glue with the networks.

    python bench/probe_gil.py [--n 1024 --reps 4]
Writes bench/results/gil_probe.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from daemon.jittor_env import import_jittor  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gil_probe.json")
    args = ap.parse_args(argv)
    jt = import_jittor()
    a = jt.array(np.random.default_rng(0).random((args.n, args.n), dtype=np.float32))
    (a @ a).sync()  # compile outside the measurement
    b = np.ones((args.n, args.n), np.float32)
    count = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            count[0] += 1

    th = threading.Thread(target=spin, daemon=True)
    th.start()
    work = {"sleep": lambda: time.sleep(1.0),
            "jittor_sync": lambda: [(a @ a + 1).sync() for _ in range(args.reps)],
            "numpy_blas": lambda: [b @ b for _ in range(args.reps)]}
    res = {}
    for name, fn in work.items():
        c0, t0 = count[0], time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        res[name] = {"counter_per_s": round((count[0] - c0) / dt), "wall_s": round(dt, 3)}
        print(f"{name:12s} counter {res[name]['counter_per_s']:>10d}/s over {dt:.2f} s", flush=True)
    stop.set()
    th.join()
    frac = res["jittor_sync"]["counter_per_s"] / max(res["sleep"]["counter_per_s"], 1)
    out = {"name": "gil_probe", "jittor": jt.__version__, "results": res,
           "jittor_releases_gil": frac > 0.3, "counter_fraction_during_jittor": round(frac, 4),
           "load_avg": os.getloadavg(), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"jittor releases the GIL while computing: {out['jittor_releases_gil']} "
          f"(counter at {frac:.1%} of its idle rate)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
