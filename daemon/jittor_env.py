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
import signal
import sys
import threading
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


# Jittor's core library installs process-wide handlers when it loads (jittor/src/utils/log.cc
# register_sigaction): SIGCHLD "quick-exits" the whole process when ANY child dies from a signal other than
# SIGTERM *or is stopped* (the MoGe sidecar or the geometry worker killed by the OOM killer, kill -9,
# SIGSTOP),
# and SIGINT quick-exits too, bypassing the daemon's supervision and graceful shutdown. Python's
# ``signal.signal`` only works on the main thread, so the raw dispositions are saved before the import and put
# back after it with libc's sigaction(2), which works from any thread (the demo imports Jittor in
# ``asyncio.to_thread``). Jittor keeps its SIGSEGV/SIGBUS/SIGFPE trace handlers.
_GUARDED_SIGNALS = ("SIGCHLD", "SIGINT")
_SIGACTION_BYTES = 256  # >= sizeof(struct sigaction) on every Linux ABI (152 on x86-64); treated as opaque


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def save_signal_dispositions() -> dict[int, ctypes.Array[ctypes.c_char]]:
    """The raw ``struct sigaction`` of each guarded signal, as the kernel holds it now."""
    libc = _libc()
    saved = {}
    for name in _GUARDED_SIGNALS:
        signum = int(getattr(signal, name))
        buf = ctypes.create_string_buffer(_SIGACTION_BYTES)
        if libc.sigaction(signum, None, buf) != 0:
            raise OSError(ctypes.get_errno(), f"sigaction({name}) query failed")
        saved[signum] = buf
    return saved


def restore_signal_dispositions(saved: dict[int, ctypes.Array[ctypes.c_char]]) -> None:
    """Put back what :func:`save_signal_dispositions` returned (any thread)."""
    libc = _libc()
    for signum, buf in saved.items():
        if libc.sigaction(signum, buf, None) != 0:
            raise OSError(ctypes.get_errno(), f"sigaction({signum}) restore failed")


def signal_handler_address(signum: int) -> int:
    """The handler pointer currently installed for ``signum`` (0 = SIG_DFL, 1 = SIG_IGN); for tests."""
    buf = ctypes.create_string_buffer(_SIGACTION_BYTES)
    if _libc().sigaction(signum, None, buf) != 0:
        raise OSError(ctypes.get_errno(), "sigaction query failed")
    return int(ctypes.c_void_p.from_buffer(buf).value or 0)


_IMPORTED: ModuleType | None = None  # set once import_jittor() has configured and imported Jittor


def import_jittor() -> ModuleType:
    """Configure the environment, import Jittor, and select CUDA when it is usable.

    Safe from any thread: Jittor's process-wide SIGCHLD/SIGINT handlers never survive the first import
    (see ``_GUARDED_SIGNALS``). Off the main thread Jittor's compile pool is turned off as well: its workers
    are forked with PR_SET_PDEATHSIG=SIGKILL, which fires when the *thread* that forked them exits, so a pool
    made in a worker thread is killed under Jittor's feet (the SIGCHLD ``si_status: 9`` of the first
    ``geometryd demo``) and its atexit cleanup then waits forever for a lock a killed worker held. Kernels
    are then compiled one by one; commands do their Jittor work on the main thread.
    """
    global _IMPORTED
    if _IMPORTED is not None:  # the model code calls this per op: no driver probe after the first call
        return _IMPORTED
    first_import = "jittor" not in sys.modules
    cuda = configure()
    if first_import:
        if threading.current_thread() is not threading.main_thread():
            os.environ["DISABLE_MULTIPROCESSING"] = "1"
        saved = save_signal_dispositions()
        try:
            import jittor
        finally:
            restore_signal_dispositions(saved)
    import jittor

    jittor.flags.use_cuda = 1 if cuda.driver_ok and jittor.has_cuda else 0
    _IMPORTED = jittor
    return jittor
