"""`geometryd doctor` run for real in subprocesses; the Jittor environment flags of daemon/jittor_env.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

from daemon import jittor_env, jittor_patches
from daemon.commands import doctor
from daemon.model.conv_cpu import dnnl_paths

ROOT = Path(__file__).resolve().parents[2]
CUDA = jittor_env.detect_cuda()


def run_doctor(
    *args: str, env: dict[str, str] | None = None, standalone: bool = False
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", *(["daemon.commands.doctor"] if standalone else ["daemon", "doctor"])]
    return subprocess.run([*cmd, *args], cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)


def test_doctor_reports_every_check_and_exits_0() -> None:
    out = run_doctor()
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    line_re = re.compile(r"^(ok|warn|FAIL)\s+(.+?)  +(.*)$")
    checks = {m.group(2): (m.group(1), m.group(3)) for line in lines if (m := line_re.match(line))}
    for name in ["python", "numpy", "jittor", "jittor import", "jittor cache", "cpu conv", "cuda", "nvcc", "cudnn",
                 "jittor patches", "gpu", "torch", "moge", "diffusers", "transformers", "pyav", "mosquitto",
                 "gst-rtsp-server", "chromium"]:
        assert name in checks, f"{name} missing from:\n{out.stdout}"
    assert checks["numpy"] == ("ok", f"{numpy.__version__} (<2, as Jittor needs)")
    status, detail = checks["jittor import"]
    assert status == "ok"
    assert ("Jittor runs on CUDA" if CUDA.driver_ok else "Jittor runs on CPU") in detail
    if dnnl_paths() is not None:  # setup.sh installs libdnnl-dev: the ops must build and be chosen
        assert checks["cpu conv"][0] == "ok" and checks["cpu conv"][1].startswith("oneDNN"), checks["cpu conv"]
    assert lines[-1].endswith("FAIL -> exit 0") and " 0 FAIL" in lines[-1]


def test_doctor_fix_patches_the_given_tree_and_json_parses(tmp_path: Path) -> None:
    tree = tmp_path / "jittor"
    shutil.copytree(jittor_patches.installed_jittor_dir(), tree, ignore=shutil.ignore_patterns("__pycache__"))
    jittor_patches.revert(tree)  # start unpatched even where this machine's Jittor was patched
    out = run_doctor("--fix", "--json", "--jittor-dir", str(tree))
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] is True and report["exit_code"] == 0
    assert report["jittor_runs_on"] == ("cuda" if CUDA.driver_ok else "cpu")
    by_name = {c["name"]: c for c in report["checks"]}
    for patch in jittor_patches.PATCHES:
        assert by_name[f"fix {patch.name}"]["detail"].startswith("applied:")
    assert "next import recompiles" in by_name["fix"]["detail"]
    assert by_name["jittor patches"]["status"] == "ok"
    assert by_name["jittor patches"]["data"] == {p.name: "applied" for p in jittor_patches.PATCHES}
    assert "cuda::maximum<>()" in (tree / "other/code_softmax.py").read_text()
    assert by_name["numpy"]["data"]["version"] == numpy.__version__


def test_doctor_refuses_numpy_2(tmp_path: Path) -> None:
    fake = tmp_path / "fake" / "numpy"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "2.1.0"\n')
    env = dict(os.environ, PYTHONPATH=str(fake.parent))
    # `python -m daemon doctor` would fail before any check: the CLI imports every command module, and some
    # use numpy at import time. The doctor alone imports numpy only inside its numpy check.
    out = run_doctor(env=env, standalone=True)
    assert out.returncode == 1, out.stdout + out.stderr
    numpy_line = next(ln for ln in out.stdout.splitlines() if re.match(r"^FAIL\s+numpy\s", ln))
    assert "numpy 2.1.0 is installed, but Jittor 1.3.11 needs numpy<2" in numpy_line
    not_tried = r"^FAIL\s+jittor import\s+Jittor cannot run here \(not tried: numpy check failed\)"
    assert re.search(not_tried, out.stdout, re.M)


def test_jittor_import_timeout_is_reported() -> None:
    result, error = doctor.run_jittor_import(timeout_s=0.3, notice=lambda s: None)
    assert result is None and "did not finish within 0 s (killed)" in error


def test_cudnn_search_finds_versioned_libraries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ["libcudnn.so.9.14.0", "libcudnn_ops.so.9", "libcudnn_cnn.so", "libcudnnx.txt"]:
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setattr(doctor, "_CUDNN_DIRS", (str(tmp_path),))
    monkeypatch.setenv("LD_LIBRARY_PATH", "")
    found = [Path(p).name for p in doctor.find_cudnn()]
    assert found == ["libcudnn.so.9.14.0", "libcudnn_cnn.so", "libcudnn_ops.so.9"]
    assert doctor.check_cudnn().detail.startswith("9.14.0 (3 files")


# --- daemon/jittor_env.py -----------------------------------------------------------------------------------


@pytest.mark.skipif(CUDA.driver_ok, reason="this machine has a CUDA driver")
def test_fake_nvcc_without_driver_gives_cpu_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "nvcc"
    fake.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.88'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("GEOMETRYD_NVCC", raising=False)
    info = jittor_env.detect_cuda()
    assert info.nvcc == str(fake) and not info.driver_ok
    flags = jittor_env.jittor_flags(info)
    assert flags["nvcc_path"] == ""
    assert {k: flags[k] for k in ("use_mkl", "use_cutt", "use_cutlass", "use_nccl")} == dict.fromkeys(
        ("use_mkl", "use_cutt", "use_cutlass", "use_nccl"), "0")
    assert flags["cache_name"] == "main"
    usable = jittor_env.CudaInfo(True, 1, str(fake), "ok")
    assert jittor_env.jittor_flags(usable)["nvcc_path"] == str(fake)


_FOREIGN_IMPORT = """
import os, jittor
from daemon.jittor_env import JittorEnvError, configure
try:
    configure()
    print("ACCEPTED")
except JittorEnvError as exc:
    print("REFUSED", exc)
os.environ["log_silent"] = "1"  # now the environment matches what configure() wants
configure()
print("ACCEPTED-MATCHING")
"""


@pytest.mark.skipif(CUDA.driver_ok, reason="the probe imports Jittor on CPU")
def test_configure_refuses_after_jittor_was_imported_with_other_flags() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), nvcc_path="", use_mkl="0", use_cutt="0", use_cutlass="0",
               use_nccl="0", cache_name="main", log_silent="0")
    env.pop("GEOMETRYD_JITTOR_VERBOSE", None)
    out = subprocess.run([sys.executable, "-c", _FOREIGN_IMPORT], capture_output=True, text=True, timeout=900,
                         env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("REFUSED", "ACCEPTED"))]
    assert lines[0].startswith("REFUSED jittor was imported before daemon.jittor_env configured it")
    assert "'log_silent': '1'" in lines[0]
    assert lines[1:] == ["ACCEPTED-MATCHING"]
