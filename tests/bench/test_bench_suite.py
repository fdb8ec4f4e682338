"""`geometryd bench --short` end to end: the real daemon twice (tiny pipeline, identity plumbing) on a
generated 576x1024 clip with a real sidecar and mosquitto, then the component scripts and the report.
Checks that the JSON is written and sane (counts balance, percentiles ordered, rates positive, labels)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("mosquitto") is None and not os.path.exists("/usr/sbin/mosquitto"),
                       reason="mosquitto not installed"),
    pytest.mark.slow,
]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    results = tmp_path_factory.mktemp("bench-short")
    proc = subprocess.run([sys.executable, "-m", "daemon", "bench", "--short", "--results", str(results)],
                          cwd=REPO, capture_output=True, text=True, timeout=840,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return results, proc


def test_short_suite_exits_ok(short_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    results, proc = short_run
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:],
                                  (results / "suite.json").read_text() if (results / "suite.json").exists() else "")
    suite = json.loads((results / "suite.json").read_text())
    assert suite["short"] is True and suite["ok"] is True
    assert suite["machine"]["cpu_count"] >= 1 and suite["machine"]["python"] and suite["machine"]["timestamp"]
    names = {c["name"] for c in suite["components"]}
    assert {"shm", "prior"} <= names
    for c in suite["components"]:
        assert (results / f"{c['name']}.json").is_file(), c


def test_e2e_json_is_sane(short_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    results, _ = short_run
    e2e = json.loads((results / "e2e_cpu.json").read_text())
    runs = {r["mode"]: r for r in e2e["runs"]}
    assert set(runs) == {"pipeline", "plumbing"}
    assert "IDENTITY" in runs["plumbing"]["geometry"] and "IDENTITY" not in runs["pipeline"]["geometry"]
    for mode, r in runs.items():
        assert "error" not in r, (mode, r.get("error"))
        p = r["params"]
        assert (p["height"], p["width"]) == (576, 1024)
        assert r["returncode"] == 0
        # a file source, not real-time, no overload: every frame decoded is processed and published
        assert r["frames_in"] == r["frames_out"] == p["frames"], r
        assert r["balanced"] is True and r["skipped"] == 0
        lat = r["latency_s"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["max"] < r["wall_s_total"]
        assert 0 < r["frames_per_s"] and 0 < r["serving_s"] < r["wall_s_total"]
        assert 0 < r["startup_s"] < r["wall_s_total"]
        assert 200 < r["peak_rss_mib"] < 16_000  # daemon + geometry worker + sidecar
        if r["mqtt_broker"]:
            assert r["mqtt"]["published"] >= r["frames_out"], r["mqtt"]
    # kernels compile in the warm-up, before READY=1; the identity processor has nothing to compile
    assert runs["pipeline"]["warm_up_s"] is not None and runs["pipeline"]["warm_up_s"] > 0
    assert (runs["plumbing"]["warm_up_s"] or 0.0) < runs["pipeline"]["warm_up_s"]


def test_report_and_plot_written(short_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    from PIL import Image

    results, _ = short_run
    md = (results / "REPORT.md").read_text()
    assert "IDENTITY" in md and "| pipeline |" in md and "| plumbing |" in md and "e2e_cpu.png" in md
    with Image.open(results / "e2e_cpu.png") as im:
        assert im.size == (640, 360)
