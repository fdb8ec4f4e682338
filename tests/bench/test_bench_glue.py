"""bench/bench_glue.py on a tiny window: every step timed beside its torch reference, JSON written, and the
summary line last (the format `geometryd bench --glue` promises)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench import bench_glue

STEPS = {"compute_stats", "prior_to_x4", "source_resize", "vae_inputs", "clip_input", "denoise_glue", "stitch",
         "decode_post", "focal", "points"}


def test_glue_bench_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "glue.json"
    rc = bench_glue.main(["--sizes", "64x128", "--source", "96x160", "--window", "6", "--stride", "4",
                          "--repeats", "1", "--out", str(out)])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"glue 64x128: total \d+\.\d\d ms per new frame; slowest step \w+ \d+\.\d\d ms "
                        r"\(torch \d+\.\d\d ms\)", last), last
    res = json.loads(out.read_text())
    (r,) = res["sizes"]
    assert r["source"] == "96x160" and r["window"] == 6 and r["stride"] == 4
    assert set(r["steps"]) == STEPS
    for s in r["steps"].values():
        assert s["numpy_ms_per_new_frame"] > 0 and s["torch_ms_per_new_frame"] > 0 and s["ratio_numpy_over_torch"] > 0
    assert abs(r["total_numpy_ms_per_new_frame"] - sum(s["numpy_ms_per_new_frame"] for s in r["steps"].values())) < 0.01
    assert r["slowest_step"] in STEPS and res["machine"]["cpu_count"] >= 1
