"""Fast checks of the benchmark helpers (no daemon run): RSS sampling, log parsing, the PIL plot, the GPU
script's plan / budget / merge table, run.sh syntax and the `geometryd bench --gpu` refusal without CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_tree_rss_counts_children() -> None:
    from bench.e2e_cpu import tree_rss_bytes

    own = tree_rss_bytes(os.getpid())
    assert own > 10 * 2**20  # this pytest process alone holds > 10 MiB
    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(64 << 20); time.sleep(30)"])
    try:
        import time

        deadline = time.monotonic() + 20
        grown = 0
        while time.monotonic() < deadline:
            grown = tree_rss_bytes(os.getpid()) - own
            if grown > 60 * 2**20:
                break
            time.sleep(0.1)
        assert grown > 60 * 2**20, grown
    finally:
        child.kill()
        child.wait()
    assert tree_rss_bytes(999_999_999) == 0


def test_log_times_reads_startup_milestones() -> None:
    from bench.e2e_cpu import _log_times

    sup = "daemon.supervisor"
    lines = [
        "some text line",
        json.dumps({"ts": 9.0, "logger": "daemon.stages.prior", "msg": "warm-up done"}),  # not the pipeline's
        json.dumps({"ts": 10.0, "logger": sup, "msg": "pipeline loaded; warming up (compiles kernels)"}),
        json.dumps({"ts": 14.5, "logger": sup, "msg": "warm-up done"}),
        json.dumps({"ts": 15.0, "logger": sup, "msg": "ready"}),
        json.dumps({"ts": 99.0, "logger": sup, "msg": "ready"}),  # first one wins
        "{not json",
    ]
    assert _log_times("\n".join(lines)) == {"loaded": 10.0, "warm": 14.5, "ready": 15.0}


def test_config_tables_write_a_valid_config(tmp_path: Path) -> None:
    from bench.e2e_cpu import E2EParams, config_tables
    from daemon.config import load_config, write_config

    cfg = tmp_path / "c.toml"
    written = write_config(cfg, config_tables(tmp_path / "model", tmp_path / "clip.mp4", E2EParams(), 1883))
    c = load_config(cfg)
    assert c == written
    assert (c.geometry.height, c.geometry.width, c.geometry.window_size) == (64, 128, 16)
    assert c.sources["clip"].type == "file" and c.mqtt.enabled and c.logging.format == "json"


def test_plot_and_report(tmp_path: Path) -> None:
    from PIL import Image

    from bench.report import plot_e2e, write_report

    runs = [{"mode": "plumbing", "frames_in": 12, "skipped": 0, "frames_out": 12, "frames_per_s": 8.0, "latency_s": {"p50": 0.2, "p90": 0.3, "max": 0.5},
             "peak_rss_mib": 900.0, "mqtt": {"published": 12, "dropped": 0}, "startup_s": 5.0, "warm_up_s": None},
            {"mode": "pipeline", "error": "boom"}]
    png = plot_e2e(runs, tmp_path / "p.png")
    with Image.open(png) as im:
        assert im.size == (640, 360)
        assert len(set(im.getdata())) > 3  # bars drawn, not a blank image
    runs[0]["params"] = {"frames": 12, "height": 576, "width": 1024}
    (tmp_path / "e2e_cpu.json").write_text(json.dumps({"runs": runs, "machine": {}}))
    (tmp_path / "suite.json").write_text(json.dumps({"short": True, "components": []}))
    md = write_report(tmp_path, tmp_path / "REPORT.md").read_text()
    assert "IDENTITY" in md and "| plumbing | 12 x 576x1024 |" in md and "| 12 / 12 / 0 | 8 |" in md and "ERROR" in md and "e2e_cpu.png" in md


def test_gpu_plan_budget_and_tokens() -> None:
    from bench.gpu import common

    full = common.make_plan(False)
    assert full.sizes == ((384, 640), (576, 1024)) and full.dtype == "fp16" and full.device == "cuda"
    assert ("spatial_3840x64", 80, 3840, 64) in full.attn_cases
    assert ("temporal_110x64", 19200, 110, 64) in full.attn_cases
    dry = common.make_plan(True)
    assert dry.device == "cpu" and dry.dtype == "fp32"
    th, tw = common.moge_tokens(576, 1024, 500_000)
    assert 0.9 * 500_000 / 196 <= th * tw <= 500_000 / 196 and abs(tw / th - 1024 / 576) < 0.1
    b = common.Budget(deadline=0.0)
    assert not b.allow("x", 1) and b.skipped and b.skipped[0].startswith("x (budget")
    assert common.Budget(deadline=1e12).allow("y", 10)
    assert common.unet_config(full)["block_out_channels"] == (320, 640, 1280, 1280)


def test_gpu_merge_table_on_partial_results(tmp_path: Path) -> None:
    from bench.gpu.merge import table

    res = {"gpu": "NVIDIA H100 80GB HBM3",
           "torch": {"load_s": 3.0, "attention": [{"case": "spatial_3840x64", "torch_sdpa": {"median_s": 0.001},
                                                   "torch_plain": {"median_s": 0.007}}],
                     "sizes": {"384x640": {"stages": {"clip": {"median_s": 0.01, "frames": 8}},
                                           "e2e_diff": {"frames_per_s": 20.0, "peak_allocated_mib": 9000}}},
                     "skipped": ["torch e2e determ 576x1024 (budget: 3 s left, needs ~40 s)"]},
           "jittor": {"jittor_import_s": 44.0, "attention": [{"case": "spatial_3840x64",
                                                             "jittor_fused": {"median_s": 0.01, "rel_err_vs_fp32_ref": 4e-4}}],
                      "sizes": {"384x640": {"e2e_diff": {"error": "RuntimeError: x"}}}}}
    text = table(res)
    assert "NVIDIA H100" in text and "spatial_3840x64" in text and "10.00" in text and "1.00" in text
    assert "jittor error: RuntimeError" in text and "skipped (time budget)" in text


def test_run_sh_syntax_and_bench_gpu_refuses_without_cuda() -> None:
    for script in ("bench/gpu/run.sh", "bench/gpu/prepare_wheels.sh"):
        assert subprocess.run(["bash", "-n", script], cwd=REPO).returncode == 0
    from daemon.jittor_env import detect_cuda

    if detect_cuda().driver_ok:
        pytest.skip("a CUDA device is present")
    proc = subprocess.run([sys.executable, "-m", "daemon", "bench", "--gpu"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "--dry-run-cpu" in proc.stderr


def test_bench_help_lists_options() -> None:
    proc = subprocess.run([sys.executable, "-m", "daemon", "bench", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "--short" in proc.stdout and "--gpu" in proc.stdout
