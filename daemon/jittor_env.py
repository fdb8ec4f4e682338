"""The one place that configures Jittor before its first import.

Every module that needs Jittor calls :func:`import_jittor` instead of ``import jittor``. The flags are
environment variables that Jittor reads at import time, so they must be set before the first import:

- ``use_mkl=0 use_cutt=0 use_cutlass=0 use_nccl=0``: each would otherwise download a library (offline here).
- ``nvcc_path=`` (empty) when no usable CUDA driver is present: these machines ship ``nvcc`` without a
  runtime, and with ``nvcc`` visible Jittor's first import prints "jit_utils updated, please rerun your
  command." and exits 0 without running anything (a silent green CI run).
- ``log_silent=1``: Jittor's compile logs are noise for a daemon; ``GEOMETRYD_JITTOR_VERBOSE=1`` keeps them.
- ``cache_name=main``: otherwise Jittor names its kernel-cache subdir after ``git branch`` run in the
  directory of ``jittor_utils`` -- inside this checkout when the venv lives in it -- so a detached HEAD (CI),
  another branch or a repo without commits each recompile the core (minutes). "main" keeps the caches
  built so far.

numpy>=2 makes ``jt.array(float32 array)`` return garbage silently, so it is refused here.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
from dataclasses import dataclass
from types import ModuleType

_OFFLINE_FLAGS = {"use_mkl": "0", "use_cutt": "0", "use_cutlass": "0", "use_nccl": "0"}
_CACHE_NAME = "main"


class JittorEnvError(RuntimeError):
    """Jittor cannot be used in this environment (wrong numpy, broken install)."""


@dataclass(frozen=True)
class CudaInfo:
    driver_ok: bool
    device_count: int
    nvcc: str | None
    reason: str


def check_numpy() -> str:
    import numpy

    major = int(numpy.__version__.split(".")[0])
    if major >= 2:
        raise JittorEnvError(
            f"numpy {numpy.__version__} is installed, but Jittor 1.3.11 needs numpy<2 "
            "(with numpy 2 jt.array() silently returns garbage); run: pip install 'numpy<2'"
        )
    return numpy.__version__


def detect_cuda() -> CudaInfo:
    """A CUDA device is usable when the driver library loads, cuInit succeeds and a device exists."""
    nvcc = os.environ.get("GEOMETRYD_NVCC") or shutil.which("nvcc")
    if nvcc is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        nvcc = "/usr/local/cuda/bin/nvcc"
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return CudaInfo(False, 0, nvcc, "libcuda.so.1 not found (no NVIDIA driver)")
    if libcuda.cuInit(0) != 0:
        return CudaInfo(False, 0, nvcc, "cuInit failed (driver present, no usable device)")
    count = ctypes.c_int(0)
    if libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return CudaInfo(False, 0, nvcc, "no CUDA device")
    if nvcc is None:
        return CudaInfo(False, count.value, None, "CUDA device present but no nvcc to compile kernels")
    return CudaInfo(True, count.value, nvcc, "ok")


def jittor_flags(cuda: CudaInfo) -> dict[str, str]:
    flags = dict(_OFFLINE_FLAGS)
    flags["nvcc_path"] = cuda.nvcc if cuda.driver_ok and cuda.nvcc else ""
    flags["cache_name"] = _CACHE_NAME
    if os.environ.get("GEOMETRYD_JITTOR_VERBOSE") != "1":
        flags["log_silent"] = "1"
    return flags


def configure() -> CudaInfo:
    """Set Jittor's environment flags. Idempotent; refuses once Jittor is already imported elsewhere."""
    check_numpy()
    cuda = detect_cuda()
    flags = jittor_flags(cuda)
    if "jittor" in sys.modules:
        stale = {k: v for k, v in flags.items() if os.environ.get(k) != v}
        if stale:
            raise JittorEnvError(
                f"jittor was imported before daemon.jittor_env configured it (flags not applied: {stale})"
            )
        return cuda
    # JITTOR_HOME would be persisted into ~/.cache/jittor/config.json by Jittor: never set it here.
    os.environ.update(flags)
    return cuda


def restore_signal_handlers() -> bool:
    """Undo Jittor's process-wide SIGCHLD and SIGINT handlers (installed when its core library loads).

    Jittor's handler "quick-exits" the whole process when ANY child dies from a signal other than SIGTERM
    (e.g. the MoGe sidecar killed by the OOM killer or kill -9), and on SIGINT, bypassing the daemon's
    supervision and graceful shutdown. Python's defaults are put back; Jittor keeps its SIGSEGV/SIGBUS/SIGFPE
    trace handlers. Only possible from the main thread: returns False (and the caller must call this again
    from the main thread) elsewhere.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return True


def import_jittor() -> ModuleType:
    """Configure the environment, import Jittor, and select CUDA when it is usable.

    Import it first from the main thread (the daemon does at startup) so that Jittor's process-wide signal
    handlers can be removed (see :func:`restore_signal_handlers`).
    """
    first_import = "jittor" not in sys.modules
    cuda = configure()
    import jittor

    if first_import:
        restore_signal_handlers()
    jittor.flags.use_cuda = 1 if cuda.driver_ok and jittor.has_cuda else 0
    return jittor
