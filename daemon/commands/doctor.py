"""`geometryd doctor`: what this machine can run, one line per check; `--fix` patches Jittor for CUDA 13.

Checks the stack named in ``/work/shared/notes/dependencies.md`` and ``jittor-cuda13.md``. A check is ``ok``,
``warn`` (works, degraded or optional) or ``FAIL`` (blocking: numpy>=2, Jittor does not import, torch
missing, or CUDA 13 usable with Jittor unpatched); any FAIL makes the exit code 1. Jittor is imported in a
subprocess through :func:`daemon.jittor_env.import_jittor` with a timeout, so a first import (which compiles
Jittor's core for minutes) shows a notice instead of hanging silently.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from daemon import jittor_patches
from daemon.jittor_env import JittorEnvError, detect_cuda
from daemon.jittor_env import check_numpy as _check

log = logging.getLogger(__name__)

OK, WARN, FAIL = "ok", "warn", "FAIL"
_JSON_MARK = "GEOMETRYD_DOCTOR_JSON:"
_PROJECT_ROOT = Path(__file__).resolve().parents[2]
_CUDNN_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/local/cuda/lib64",
               "/usr/local/cuda/lib", "/usr/lib64", "/usr/lib")


@dataclass
class Check:
    name: str
    status: str
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


# --- individual checks --------------------------------------------------------------------------------------


def check_python() -> Check:
    ver = platform.python_version()
    status = OK if sys.version_info >= (3, 11) else WARN
    data = {"version": ver, "executable": sys.executable}
    return Check("python", status, f"{ver} ({sys.executable})", data)


def check_numpy() -> Check:
    try:
        version = _check()
    except ImportError as exc:
        return Check("numpy", FAIL, f"not importable: {exc}")
    except JittorEnvError as exc:
        return Check("numpy", FAIL, str(exc), {"version": _dist_version("numpy")})
    return Check("numpy", OK, f"{version} (<2, as Jittor needs)", {"version": version})


def check_jittor_package(jittor_dir: Path | None) -> Check:
    try:
        path = jittor_dir or jittor_patches.installed_jittor_dir()
        version = jittor_patches.jittor_version(path)
    except jittor_patches.PatchError as exc:
        return Check("jittor", FAIL, str(exc))
    status = OK if version.startswith(jittor_patches.SUPPORTED_VERSION) else WARN
    return Check("jittor", status, f"{version} at {path}", {"version": version, "dir": str(path)})


_IMPORT_PROBE = f"""
import json, time
t0 = time.monotonic()
from daemon.jittor_env import import_jittor
jt = import_jittor()
assert (jt.array([1.0, 2.0]) * 2).numpy().tolist() == [2.0, 4.0]
import jittor.compiler
seconds = round(time.monotonic() - t0, 2)
from daemon.model.conv_cpu import backend
conv, conv_reason = backend()
print({_JSON_MARK!r} + json.dumps({{
    "seconds": seconds, "version": jt.__version__, "file": jt.__file__,
    "use_cuda": int(jt.flags.use_cuda), "has_cuda": int(jittor.compiler.has_cuda),
    "cache_path": jittor.compiler.cache_path, "cpu_conv": conv, "cpu_conv_reason": conv_reason}}), flush=True)
"""


def run_jittor_import(timeout_s: float, notice: Callable[[str], None]) -> tuple[dict[str, Any] | None, str]:
    """Import Jittor in a child; returns (probe result, error text). Prints a notice while it compiles."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), str(_PROJECT_ROOT)) if p)
    proc = subprocess.Popen([sys.executable, "-c", _IMPORT_PROBE], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=str(_PROJECT_ROOT))
    t0 = time.monotonic()
    next_notice = 15.0
    while True:
        try:
            out, _ = proc.communicate(timeout=1.0)
            break
        except subprocess.TimeoutExpired:
            waited = time.monotonic() - t0
            if waited >= timeout_s:
                proc.kill()
                proc.communicate()
                return None, f"import did not finish within {timeout_s:.0f} s (killed)"
            if waited >= next_notice:
                notice(f"importing Jittor: {waited:.0f} s so far (a first import compiles Jittor's core into "
                       f"~/.cache/jittor: minutes on few cores; timeout {timeout_s:.0f} s)")
                next_notice = waited + 30.0
    for line in out.splitlines():
        if line.startswith(_JSON_MARK):
            return json.loads(line[len(_JSON_MARK):]), ""
    tail = [ln for ln in out.strip().splitlines() if ln.strip()][-3:]
    return None, f"exit {proc.returncode}: " + " | ".join(tail)[-400:]


def check_jittor_import(result: dict | None, error: str, cuda_reason: str) -> Check:
    if result is None and error.startswith("not tried"):
        return Check("jittor import", FAIL, f"Jittor cannot run here ({error})")
    if result is None:
        return Check("jittor import", FAIL, f"Jittor does not import: {error}")
    took = f"imports in {result['seconds']:.1f} s"
    if result["use_cuda"]:
        return Check("jittor import", OK, f"{took}; Jittor runs on CUDA", result)
    if cuda_reason == "ok":  # a usable device, but Jittor built without CUDA
        return Check("jittor import", WARN, f"{took}; Jittor runs on CPU although CUDA is usable", result)
    return Check("jittor import", OK, f"{took}; Jittor runs on CPU ({cuda_reason})", result)


def check_cpu_conv(result: dict | None) -> Check:
    """The CPU backend of the networks' convolutions/GEMMs (daemon/model/conv_cpu.py): oneDNN or the slow
    im2col fallback (used when Jittor runs on the CPU)."""
    if result is None or "cpu_conv" not in result:
        return Check("cpu conv", WARN, "unknown (Jittor did not import)")
    name, reason = result["cpu_conv"], result.get("cpu_conv_reason", "")
    data = {"backend": name, "reason": reason}
    if name == "onednn":
        return Check("cpu conv", OK, f"oneDNN ({reason})", data)
    return Check("cpu conv", WARN, f"im2col fallback, ~10x slower on CPU ({reason})", data)


def check_cuda() -> Check:
    info = detect_cuda()
    data = asdict(info)
    if info.driver_ok:
        return Check("cuda", OK, f"{info.device_count} device(s), nvcc {info.nvcc}", data)
    return Check("cuda", WARN, f"no usable CUDA: {info.reason}; Jittor runs on CPU", data)


def nvcc_release(nvcc: str | None) -> tuple[int, int] | None:
    if not nvcc:
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_nvcc(nvcc: str | None, release: tuple[int, int] | None) -> Check:
    if not nvcc:
        return Check("nvcc", WARN, "not found (Jittor cannot compile CUDA kernels)")
    if release is None:
        return Check("nvcc", WARN, f"{nvcc} does not report a version")
    data = {"path": nvcc, "release": list(release)}
    return Check("nvcc", OK, f"CUDA {release[0]}.{release[1]} ({nvcc})", data)


def find_cudnn() -> list[str]:
    dirs = list(_CUDNN_DIRS)
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            dirs.append(os.path.join(os.environ[var], "lib64"))
    dirs += [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if d]
    found: list[str] = []
    for d in dict.fromkeys(dirs):
        try:
            names = os.listdir(d)
        except OSError:
            continue
        found += sorted(os.path.join(d, n) for n in names if re.fullmatch(r"libcudnn[a-z_]*\.so(\.\d+)*", n))
    return found


def check_cudnn() -> Check:
    libs = find_cudnn()
    if not libs:
        return Check("cudnn", WARN, "no libcudnn*.so* found (needed for fast convs on CUDA)")
    versions = sorted({m.group(1) for p in libs if (m := re.search(r"libcudnn\.so\.(\d+(?:\.\d+)*)$", p))})
    main = versions[-1] if versions else "unknown version"
    return Check("cudnn", OK, f"{main} ({len(libs)} files in {os.path.dirname(libs[0])})", {"files": libs})


def check_patches(jittor_dir: Path | None, cuda_ok: bool, release: tuple[int, int] | None) -> Check:
    try:
        states = jittor_patches.status(jittor_dir)
    except jittor_patches.PatchError as exc:
        return Check("jittor patches", FAIL if cuda_ok else WARN, str(exc))
    data = {s.name: s.state for s in states}
    applied = sum(s.state == jittor_patches.APPLIED for s in states)
    missing = [s for s in states if s.state == jittor_patches.ANCHOR_MISSING]
    need = cuda_ok and release is not None and release[0] >= 13
    if missing:
        text = "; ".join(f"{s.name}: {s.detail}" for s in missing)
        return Check("jittor patches", FAIL if need else WARN, f"anchor missing ({text})", data)
    if applied == len(states):
        return Check("jittor patches", OK, f"CUDA 13 patches {applied}/{len(states)} applied", data)
    pending = ", ".join(s.name for s in states if s.state == jittor_patches.PENDING)
    if need:
        return Check("jittor patches", FAIL, f"CUDA 13 needs them, {applied}/{len(states)} applied (pending: "
                     f"{pending}); run: geometryd doctor --fix", data)
    return Check("jittor patches", OK, f"CUDA 13 patches {applied}/{len(states)} applied (only needed with "
                 "CUDA 13; geometryd doctor --fix applies them)", data)


def check_gpu() -> Check:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return Check("gpu", WARN, "nvidia-smi not found (no NVIDIA GPU driver)")
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return Check("gpu", WARN, "nvidia-smi timed out")
    rows = [r.strip() for r in out.stdout.splitlines() if r.strip()]
    if out.returncode != 0 or not rows:
        return Check("gpu", WARN, f"nvidia-smi failed: {(out.stderr or out.stdout).strip()[:200]}")
    return Check("gpu", OK, "; ".join(rows), {"gpus": rows})


def check_torch() -> Check:
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - any import failure is the finding
        return Check("torch", FAIL, f"not importable: {exc}")
    cuda = bool(torch.cuda.is_available())
    cuda_text = f"available (CUDA {torch.version.cuda})" if cuda else "not available"
    detail = f"{torch.__version__}, CUDA {cuda_text}"
    return Check("torch", OK, detail, {"version": torch.__version__, "cuda_available": cuda})


def check_moge() -> Check:
    try:
        importlib.import_module("moge.model.v1")
    except Exception as exc:  # noqa: BLE001
        return Check("moge", WARN, f"moge.model.v1 not importable ({exc}); the prior sidecar cannot start")
    return Check("moge", OK, f"moge.model.v1 importable (dlr-moge {_dist_version('dlr-moge') or '?'})")


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_dist(name: str, why: str) -> Check:
    version = _dist_version(name)
    if version is None:
        return Check(name, WARN, f"not installed ({why})")
    return Check(name, OK, version, {"version": version})


def check_pyav() -> Check:
    try:
        import av
    except Exception as exc:  # noqa: BLE001
        return Check("pyav", WARN, f"not importable ({exc}); file/RTSP ingest cannot run")
    return Check("pyav", OK, f"{av.__version__} (FFmpeg {getattr(av, 'ffmpeg_version_info', '?')})")


def check_mosquitto() -> Check:
    exe = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None)
    if exe is None:
        return Check("mosquitto", WARN, "broker binary not found (MQTT tests and demo need it)")
    try:
        out = subprocess.run([exe, "-h"], capture_output=True, text=True, timeout=10)
        m = re.search(r"mosquitto version (\S+)", out.stdout + out.stderr)
    except (OSError, subprocess.TimeoutExpired):
        m = None
    return Check("mosquitto", OK, f"{m.group(1) if m else 'unknown version'} ({exe})", {"path": exe})


def check_gst_rtsp() -> Check:
    py = "/usr/bin/python3"
    if not os.path.exists(py):
        return Check("gst-rtsp-server", WARN, f"{py} not found (the RTSP camera fixture needs python3-gi)")
    code = ("import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); "
            "from gi.repository import Gst, GstRtspServer; Gst.init(None); print(Gst.version_string())")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    try:
        out = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=30, env=env)
    except subprocess.TimeoutExpired:
        return Check("gst-rtsp-server", WARN, "GStreamer check timed out")
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return Check("gst-rtsp-server", WARN, f"not available via {py}: {last}")
    return Check("gst-rtsp-server", OK, f"{out.stdout.strip()} via {py}")


def check_chromium() -> Check:
    exe = next((p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None)
    if exe is None:
        return Check("chromium", WARN, "not found (the WebRTC viewer test needs it)")
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
        version = next((ln.strip() for ln in out.stdout.splitlines() if "hrom" in ln), "")
    except (OSError, subprocess.TimeoutExpired):
        version = ""
    return Check("chromium", OK, f"{version or 'unknown version'} ({exe})", {"path": exe})


# --- orchestration ------------------------------------------------------------------------------------------


def _guard(name: str, fn: Callable[[], Check], blocking: bool = False) -> Check:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a crashing check is reported, never fatal to the doctor
        log.debug("check %s crashed", name, exc_info=True)
        return Check(name, FAIL if blocking else WARN, f"check failed: {type(exc).__name__}: {exc}")


def run_checks(jittor_dir: Path | None = None, jittor_timeout_s: float = 900.0,
               notice: Callable[[str], None] = lambda s: None) -> list[Check]:
    numpy_check = _guard("numpy", check_numpy, blocking=True)
    jittor_check = _guard("jittor", lambda: check_jittor_package(jittor_dir), blocking=True)
    cuda_check = _guard("cuda", check_cuda)
    nvcc = cuda_check.data.get("nvcc")
    with ThreadPoolExecutor(max_workers=4) as pool:
        if numpy_check.status == FAIL or jittor_check.status == FAIL:
            why = "numpy check failed" if numpy_check.status == FAIL else "Jittor is not installed"
            not_tried: tuple[dict[str, Any] | None, str] = (None, f"not tried: {why}")
            imported = pool.submit(lambda: not_tried)
        else:
            imported = pool.submit(run_jittor_import, jittor_timeout_s, notice)
        release_f = pool.submit(nvcc_release, nvcc)
        side = {name: pool.submit(_guard, name, fn) for name, fn in (
            ("gpu", check_gpu), ("mosquitto", check_mosquitto), ("gst-rtsp-server", check_gst_rtsp),
            ("chromium", check_chromium))}
        # In-process imports run while the subprocesses do.
        torch_check = _guard("torch", check_torch, blocking=True)
        moge_check = _guard("moge", check_moge)
        pyav_check = _guard("pyav", check_pyav)
        release = release_f.result()
        result, error = imported.result()
    cuda_reason = str(cuda_check.data.get("reason", "no CUDA"))
    cuda_ok = bool(cuda_check.data.get("driver_ok"))
    return [
        _guard("python", check_python),
        numpy_check,
        jittor_check,
        _guard("jittor import", lambda: check_jittor_import(result, error, cuda_reason), blocking=True),
        Check("jittor cache", OK, str((result or {}).get("cache_path") or Path.home() / ".cache" / "jittor")),
        _guard("cpu conv", lambda: check_cpu_conv(result)),
        cuda_check,
        _guard("nvcc", lambda: check_nvcc(nvcc, release)),
        _guard("cudnn", check_cudnn),
        _guard("jittor patches", lambda: check_patches(jittor_dir, cuda_ok, release)),
        side["gpu"].result(),
        torch_check,
        moge_check,
        _guard("diffusers", lambda: check_dist("diffusers", "test-time reference only")),
        _guard("transformers", lambda: check_dist("transformers", "test-time reference only")),
        pyav_check,
        side["mosquitto"].result(),
        side["gst-rtsp-server"].result(),
        side["chromium"].result(),
    ]


def fix_patches(jittor_dir: Path | None, force: bool, revert: bool) -> list[Check]:
    try:
        if revert:
            restored = jittor_patches.revert(jittor_dir, force=force)
            detail = f"restored {len(restored)} files" if restored else "nothing to revert"
            return [Check("revert patches", OK, detail)]
        results = jittor_patches.apply(jittor_dir, force=force)
    except (jittor_patches.PatchError, OSError) as exc:
        return [Check("fix patches", FAIL, str(exc))]
    checks = [Check(f"fix {r.name}", OK, f"{r.state}: {r.summary}") for r in results]
    if any(r.state == jittor_patches.APPLIED for r in results):
        note = "Jittor sources and flags changed: its next import recompiles (minutes)"
        checks.append(Check("fix", OK, note))
    return checks


def _print_human(checks: list[Check], code: int) -> None:
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"{c.status:<4}  {c.name:<{width}}  {c.detail}")
    counts = {s: sum(c.status == s for c in checks) for s in (OK, WARN, FAIL)}
    print(f"{counts[OK]} ok, {counts[WARN]} warn, {counts[FAIL]} FAIL -> exit {code}")


def main(args: argparse.Namespace) -> int:
    jittor_dir = Path(args.jittor_dir) if args.jittor_dir else None
    checks: list[Check] = []
    if args.fix or args.revert_patches:
        checks += fix_patches(jittor_dir, args.force, args.revert_patches)

    def notice(text: str) -> None:
        print(f"doctor: {text}", file=sys.stderr, flush=True)

    checks += run_checks(jittor_dir, args.jittor_timeout, notice)
    code = 1 if any(c.status == FAIL for c in checks) else 0
    if args.json:
        runs_on = next((("cuda" if c.data.get("use_cuda") else "cpu") for c in checks
                        if c.name == "jittor import" and c.status == OK), None)
        print(json.dumps({"ok": code == 0, "exit_code": code, "jittor_runs_on": runs_on,
                          "checks": [asdict(c) for c in checks]}, indent=2, default=str))
    else:
        _print_human(checks, code)
    return code


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "doctor", help="check this machine's stack (numpy, Jittor, CUDA, torch, MoGe, PyAV, mosquitto, ...)",
        description="One line per check (ok / warn / FAIL); exit 1 on a blocking problem. --fix applies the "
                    "Jittor CUDA 13 compatibility patches (idempotent, reversible).")
    p.add_argument("--fix", action="store_true", help="apply the Jittor CUDA 13 patches, then check")
    p.add_argument("--revert-patches", action="store_true",
                   help="restore Jittor's original sources, then check")
    p.add_argument("--force", action="store_true", help="with --fix: patch a Jittor other than 1.3.11; with "
                   "--revert-patches: overwrite files changed after patching")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--jittor-dir", default="",
                   help="Jittor package dir to check and patch (default: the installed one; the import "
                        "check always uses this interpreter's Jittor)")
    p.add_argument("--jittor-timeout", type=float, default=900.0, metavar="S",
                   help="seconds allowed for the Jittor import (a first import compiles for minutes)")
    p.set_defaults(func=main)


def standalone(argv: list[str] | None = None) -> int:
    """``python -m daemon.commands.doctor``: the doctor without the CLI, which imports every command module
    (and so
    fails before any check when, say, numpy is broken)."""
    parser = argparse.ArgumentParser(prog="geometryd")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["doctor", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(standalone())
