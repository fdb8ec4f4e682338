"""CPU convolution, linear and attention backend of the Jittor networks: oneDNN from the system (Debian
``libdnnl-dev``).

Jittor ships oneDNN ops (``jittor/extern/mkl/ops``) but would download oneDNN 2.2.0 to build them
(``use_mkl=1``), which cannot work offline, so :mod:`daemon.jittor_env` sets ``use_mkl=0``. Here Jittor's
``mkl_matmul`` and geometryd's own ops (``daemon/model/cpu_ops``: ``cpu_conv`` with bias and residual
inside the primitive, ``cpu_linear``, the fused ``cpu_attention``) are compiled once against the system's
oneDNN 2.x (the kernel cache keeps the build) and called directly: no Jittor tuner pass is involved.
Jittor's own CPU kernels are single-threaded; these run on all cores (oneDNN's and OpenMP threads).

Backends (``GEOMETRYD_CPU_CONV`` overrides the choice): ``onednn`` when ``dnnl.hpp`` and ``libdnnl.so`` are
found (``GEOMETRYD_DNNL_PREFIX``, default ``/usr``), else ``im2col`` (shifted slices + Jittor's own loop
matmul, no dependency, ~10x slower). oneDNN's kernels are prebuilt: Jittor's ``-Ofast`` does not touch their
arithmetic (fp32 with fp32 accumulation, like torch's CPU kernels); the softmax loop of ``cpu_attention``
is compiled with it (vectorised exp).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

from daemon.jittor_env import import_jittor

log = logging.getLogger(__name__)

Var = Any  # jittor.Var

ONEDNN, IM2COL = "onednn", "im2col"
_BACKENDS = (ONEDNN, IM2COL)
_OPS = ("mkl_matmul",)
# geometryd's own oneDNN-backed ops (daemon/model/cpu_ops), built in the same module as Jittor's
_OWN_OPS_DIR = Path(__file__).resolve().parent / "cpu_ops"
_OWN_OPS = ("cpu_attention", "cpu_conv", "cpu_linear")
_state: dict[str, Any] = {}


def dnnl_paths(prefix: str | None = None) -> tuple[Path, Path] | None:
    """(include dir, lib dir) of a oneDNN 2.x install, or None. 3.x is refused: Jittor's ops use 2.x's
    ``convolution_forward::desc``."""
    root = Path(prefix or os.environ.get("GEOMETRYD_DNNL_PREFIX") or "/usr")
    incs = [root / "include"]
    libs = [root / "lib" / "x86_64-linux-gnu", root / "lib" / "aarch64-linux-gnu", root / "lib64",
            root / "lib"]
    inc = next((d for d in incs if (d / "dnnl.hpp").is_file()), None)
    lib = next((d for d in libs if (d / "libdnnl.so").exists()), None)
    if inc is None or lib is None:
        return None
    version = inc / "oneapi" / "dnnl" / "dnnl_version.h"
    if not version.is_file():
        version = inc / "dnnl_version.h"
    if version.is_file() and "#define DNNL_VERSION_MAJOR 2" not in version.read_text():
        return None
    return inc, lib


def _staged_sources(cache: Path) -> tuple[list[str], str]:
    """Op sources at a content-addressed path in Jittor's cache, and a module name with the same hash.

    Jittor rebuilds a custom-op module whenever its compile command changes, into a path named after the
    op names only. Compiled from a checkout, the command holds the checkout's path: two checkouts (or
    worktrees) on one machine would rebuild the same ``.so`` in turns, under processes that have it
    loaded (a segfault, seen). Staged by content, equal sources give one command and one module, and
    different sources never share a module."""
    import jittor

    jt_ops = Path(jittor.__file__).parent / "extern" / "mkl" / "ops"
    sources = [jt_ops / f"{name}_op{ext}" for name in _OPS for ext in (".cc", ".h")]
    sources += [_OWN_OPS_DIR / f"{name}_op{ext}" for name in _OWN_OPS for ext in (".cc", ".h")]
    digest = hashlib.sha256()
    for src in sources:
        digest.update(src.name.encode() + b"\0" + src.read_bytes())
    tag = digest.hexdigest()[:12]
    stage = cache / "geometryd_cpu_ops" / tag
    if not all((stage / src.name).is_file() for src in sources):
        stage.mkdir(parents=True, exist_ok=True)
        for src in sources:
            tmp = stage / f".{src.name}.{os.getpid()}"
            shutil.copyfile(src, tmp)
            os.replace(tmp, stage / src.name)  # atomic: a concurrent stager never sees half a file
    return [str(stage / src.name) for src in sources], f"geometryd_cpu_ops_{tag}"


def _compile_ops(paths: tuple[Path, Path]) -> ModuleType:
    jt = import_jittor()
    import jittor.compiler

    files, module = _staged_sources(Path(jittor.compiler.cache_path))
    inc, lib = paths
    flags = f' -I"{inc}" -L"{lib}" -Wl,-rpath,"{lib}" -ldnnl '
    ops = jittor.compiler.compile_custom_ops(files, extra_flags=flags, gen_name_=module)
    del jt
    return ops


def _select() -> tuple[str, ModuleType | None, str]:
    want = os.environ.get("GEOMETRYD_CPU_CONV", "").strip().lower()
    if want and want not in _BACKENDS:
        raise ValueError(f"GEOMETRYD_CPU_CONV must be one of {_BACKENDS}, got {want!r}")
    if want == IM2COL:
        return IM2COL, None, "GEOMETRYD_CPU_CONV=im2col"
    paths = dnnl_paths()
    if paths is None:
        reason = "oneDNN 2.x not found (apt-get install libdnnl-dev)"
        if want == ONEDNN:
            raise RuntimeError(f"GEOMETRYD_CPU_CONV=onednn: {reason}")
        return IM2COL, None, reason
    try:
        ops = _compile_ops(paths)
    except Exception as exc:  # a broken toolchain/header must not take the networks down
        if want == ONEDNN:
            raise
        log.warning("oneDNN ops do not build (%s); CPU convolutions use im2col", exc)
        return IM2COL, None, f"oneDNN ops do not build: {exc}"
    return ONEDNN, ops, f"oneDNN from {paths[1]}"


def backend() -> tuple[str, str]:
    """(name, reason) of the CPU backend, chosen (and the oneDNN ops built) at the first call."""
    if "name" not in _state:
        name, ops, reason = _select()
        _state.update(name=name, ops=ops, reason=reason)
    return _state["name"], _state["reason"]


def _ops() -> ModuleType | None:
    backend()
    return _state["ops"]


def conv2d(
    x: Var, w: Var, b: Var | None, stride: int, padding: int | tuple[int, ...], residual: Var | None = None
) -> Var | None:
    """fp32 NCHW convolution + bias (+ ``residual`` of the output's shape) as one oneDNN primitive
    (``cpu_ops/cpu_conv_op``), or None when that backend is off (the caller falls back). ``padding``
    (zeros): int, (h, w), or (top, left, bottom, right)."""
    ops = _ops()
    if ops is None or x.dtype != "float32" or w.dtype != "float32":
        return None
    pads: tuple[int, ...]
    if isinstance(padding, int):
        pads = (padding,) * 4
    elif len(padding) == 2:
        pads = (padding[0], padding[1], padding[0], padding[1])
    else:
        pads = tuple(padding)
    if len(pads) != 4:
        raise ValueError(f"padding must be an int, (h, w) or (top, left, bottom, right), got {padding}")
    bias = b.float32() if b is not None else import_jittor().zeros((w.shape[0],), "float32")
    inputs = [x, w, bias] if residual is None else [x, w, bias, residual.float32()]
    return ops.cpu_conv(inputs, stride, *pads)


def matmul2d(a: Var, b: Var) -> Var | None:
    """fp32 [n,k] @ [k,m] through oneDNN's sgemm, or None when that backend is off."""
    ops = _ops()
    if ops is None or a.ndim != 2 or b.ndim != 2 or a.dtype != "float32" or b.dtype != "float32":
        return None
    return ops.mkl_matmul(a, b, False, False)


def linear(x: Var, w: Var, b: Var | None) -> Var | None:
    """fp32 torch.nn.Linear on [M,K] with weight [N,K] (not transposed) and optional bias [N]: one oneDNN
    sgemm (``cpu_ops/cpu_linear_op`` with a bias), or None when that backend is off."""
    ops = _ops()
    if ops is None or x.ndim != 2 or x.dtype != "float32" or w.dtype != "float32":
        return None
    if b is None:
        return ops.mkl_matmul(x, w, False, True)
    return ops.cpu_linear(x, w, b.float32())


def attention_heads(q: Var, k: Var, v: Var, heads: int, scale: float) -> Var | None:
    """Fused fp32 softmax(q k^T * scale) v per head on token-major layouts (``cpu_ops/cpu_attention_op``):
    q [N,Lq,H*d], k [N,Lk,H*d], v [N,Lk,H*dv] -> [N,Lq,H*dv]; None when oneDNN is off."""
    ops = _ops()
    if ops is None or not all(t.dtype == "float32" for t in (q, k, v)):
        return None
    return ops.cpu_attention(q, k, v, heads, scale)
