"""Source patches that make stock Jittor 1.3.11 build and run on CUDA 13 / cuDNN 9 / CCCL 3.

The five patches are the ones measured on an H100 (``/work/shared/notes/jittor-cuda13.md``):

1. ``helper_cuda_props``: ``extern/cuda/inc/helper_cuda.h`` read ``cudaDeviceProp::computeMode`` and
   ``::clockRate``, which CUDA 13 removed; read them through ``cudaDeviceGetAttribute`` instead.
2. ``cxx17``: ``compiler.py`` compiles with ``-std=c++17`` for g++ and for nvcc (CCCL 3 rejects C++14), and
   no longer rewrites nvcc's ``-std=c++17`` to ``-std=c++14`` for nvcc >= 11.4.
3. ``cudnn9_libs``: ``compile_extern.py`` preloads cuDNN 9's ``libcudnn_ops.so``/``libcudnn_cnn.so`` instead
   of cuDNN 8's ``*_infer.so``/``*_train.so`` (Jittor issue #666).
4. ``drop_cudnn_rnn``: removes the cuDNN RNN ops (cuDNN 9 dropped that API). Only ``nn.RNN``-family modules
   on CUDA with cuDNN used them; geometryd has none.
5. ``softmax_cccl3``: ``other/code_softmax.py`` uses ``cuda::maximum<>()`` (CCCL 3 removed ``cub::Max``).

Every step is found by an exact anchor text. :func:`apply` checks all anchors before writing anything and
raises :class:`AnchorMissingError` when one is neither in its original nor in its patched form; a step whose
patched form is present is left alone (idempotent). The originals are backed up under the Jittor package
dir and recorded with their sha256 in a JSON manifest, so :func:`revert` restores them byte for byte. None of
this imports Jittor: it works on any copy of the package directory.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

SUPPORTED_VERSION = "1.3.11"
MANIFEST_NAME = ".geometryd_patches.json"
BACKUP_DIR = ".geometryd_patches_backup"
_TOOL = "geometryd.jittor_patches"

# Step and patch states.
PENDING = "pending"  # anchor found in its original form: apply() will change it
APPLIED = "applied"  # the patched form is present (status()), or apply() just wrote it
ALREADY_APPLIED = "already-applied"  # apply() found the patched form and changed nothing
ANCHOR_MISSING = "anchor-missing"  # neither form found: this Jittor is not the one the patch was written for


class PatchError(RuntimeError):
    """A patch cannot be applied or reverted safely."""


class AnchorMissingError(PatchError):
    """An anchor text is in neither its original nor its patched form."""


class VersionError(PatchError):
    """The Jittor tree is not the version the patches were written for."""


@dataclass(frozen=True)
class Replace:
    """Replace the one occurrence of ``old`` in ``path`` (relative to the Jittor package dir) by ``new``."""

    path: str
    old: str
    new: str

    def __post_init__(self) -> None:
        # State detection counts both texts; one containing the other would make it ambiguous.
        if self.old in self.new or self.new in self.old:
            raise ValueError(f"{self.path}: old and new texts must not contain each other")


@dataclass(frozen=True)
class Remove:
    """Delete ``path`` (relative to the Jittor package dir); the original is kept as a backup."""

    path: str


Step = Replace | Remove


@dataclass(frozen=True)
class Patch:
    name: str
    summary: str
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class StepStatus:
    path: str
    action: str  # "replace" | "remove"
    state: str
    detail: str = ""


@dataclass(frozen=True)
class PatchStatus:
    name: str
    summary: str
    state: str  # PENDING | APPLIED | ALREADY_APPLIED | ANCHOR_MISSING
    steps: tuple[StepStatus, ...] = field(default_factory=tuple)

    @property
    def detail(self) -> str:
        bad = [f"{s.path}: {s.detail}" for s in self.steps if s.state == ANCHOR_MISSING]
        if bad:
            return "; ".join(bad)
        done = sum(s.state != PENDING for s in self.steps)
        return f"{done}/{len(self.steps)} steps in place"


# --- the patches --------------------------------------------------------------------------------------------

_HELPER_CUDA = "extern/cuda/inc/helper_cuda.h"
_ATTR_ANCHOR = "#ifdef __CUDA_RUNTIME_H__\n// General GPU Device CUDA Initialization\n"
_ATTR_HELPER = """#ifdef __CUDA_RUNTIME_H__
// geometryd jittor_patches: CUDA 13 removed cudaDeviceProp::computeMode and ::clockRate.
inline int geometrydDeviceAttribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  cudaDeviceGetAttribute(&value, attr, device);
  return value;
}

// General GPU Device CUDA Initialization
"""

# PATCH(jittor==1.3.11): source edits of the installed Jittor for CUDA 13 (each one checked before applying)
PATCHES: tuple[Patch, ...] = (
    Patch(
        "helper_cuda_props",
        "helper_cuda.h: read computeMode/clockRate via cudaDeviceGetAttribute (CUDA 13 removed the fields)",
        (
            Replace(_HELPER_CUDA, _ATTR_ANCHOR, _ATTR_HELPER),
            Replace(
                _HELPER_CUDA,
                "  if (deviceProp.computeMode == cudaComputeModeProhibited) {",
                "  if (geometrydDeviceAttribute(cudaDevAttrComputeMode, devID) ==\n"
                "      cudaComputeModeProhibited) {",
            ),
            Replace(
                _HELPER_CUDA,
                "    if (deviceProp.computeMode != cudaComputeModeProhibited) {",
                "    if (geometrydDeviceAttribute(cudaDevAttrComputeMode, current_device) !=\n"
                "        cudaComputeModeProhibited) {",
            ),
            Replace(
                _HELPER_CUDA,
                "sm_per_multiproc * deviceProp.clockRate;",
                "sm_per_multiproc *\n"
                "      geometrydDeviceAttribute(cudaDevAttrClockRate, current_device);",
            ),
            Replace(
                _HELPER_CUDA,
                "        (deviceProp.computeMode != cudaComputeModeProhibited)) {",
                "        (geometrydDeviceAttribute(cudaDevAttrComputeMode, current_device) !=\n"
                "         cudaComputeModeProhibited)) {",
            ),
        ),
    ),
    Patch(
        "cxx17",
        "compiler.py: -std=c++17 for g++ and nvcc (CCCL 3 rejects C++14); keep it for nvcc >= 11.4",
        (
            Replace(
                "compiler.py",
                'cc_flags += " -Wall -Wno-unknown-pragmas -std=c++14 -fPIC "',
                'cc_flags += " -Wall -Wno-unknown-pragmas -std=c++17 -fPIC "  # geometryd jittor_patches',
            ),
            Replace(
                "compiler.py",
                '            nvcc_flags = nvcc_flags.replace("-std=c++17", '
                '"-std=c++14 -Xcompiler -std:c++14")',
                "            pass  # geometryd jittor_patches: keep nvcc's -std=c++17 (CCCL 3 rejects C++14)",
            ),
        ),
    ),
    Patch(
        "cudnn9_libs",
        "compile_extern.py: preload cuDNN 9's libcudnn_ops.so/libcudnn_cnn.so, not cuDNN 8's *_infer/*_train",
        (
            Replace(
                "compile_extern.py",
                'libs = ["libcudnn_ops_infer.so", "libcudnn_ops_train.so", '
                '"libcudnn_cnn_infer.so", "libcudnn_cnn_train.so"]',
                'libs = ["libcudnn_ops.so", "libcudnn_cnn.so"]  # geometryd jittor_patches: cuDNN 9 names',
            ),
        ),
    ),
    Patch(
        "drop_cudnn_rnn",
        "remove the cuDNN RNN ops (cuDNN 9 dropped the RNN descriptor API)",
        tuple(
            Remove(p)
            for p in (
                "extern/cuda/cudnn/ops/cudnn_rnn_backward_x_op.cc",
                "extern/cuda/cudnn/ops/cudnn_rnn_backward_x_op.h",
                "extern/cuda/cudnn/ops/cudnn_rnn_op.cc",
                "extern/cuda/cudnn/ops/cudnn_rnn_op.h",
                "extern/cuda/cudnn/src/cudnn_rnn_descriptor.cc",
                "extern/cuda/cudnn/inc/cudnn_rnn_descriptor.h",
            )
        ),
    ),
    Patch(
        "softmax_cccl3",
        "other/code_softmax.py: cub::Max() -> cuda::maximum<>() (CCCL 3 removed cub::Max)",
        (
            Replace(
                "other/code_softmax.py",
                "auto tmp = BlockReduce(temp_storage).Reduce(v1, cub::Max());",
                "auto tmp = BlockReduce(temp_storage).Reduce(v1, cuda::maximum<>());",
            ),
        ),
    ),
)


# --- locating and versioning --------------------------------------------------------------------------------


def installed_jittor_dir() -> Path:
    """The installed Jittor package directory, found without importing (and so without compiling) Jittor."""
    spec = importlib.util.find_spec("jittor")
    if spec is None or not spec.submodule_search_locations:
        raise PatchError("jittor is not installed in this interpreter")
    return Path(next(iter(spec.submodule_search_locations)))


def jittor_version(jittor_dir: Path) -> str:
    """``__version__`` read from ``jittor/__init__.py`` as text."""
    init = Path(jittor_dir) / "__init__.py"
    try:
        text = init.read_text(encoding="utf-8")
    except OSError as exc:
        raise PatchError(f"{jittor_dir} is not a Jittor package dir ({exc})") from exc
    m = re.search(r"""^__version__\s*=\s*['"]([^'"]+)['"]""", text, re.MULTILINE)
    if m is None:
        raise PatchError(f"no __version__ in {init}")
    return m.group(1)


def _check_version(jittor_dir: Path, force: bool) -> str:
    version = jittor_version(jittor_dir)
    supported = version == SUPPORTED_VERSION or version.startswith(SUPPORTED_VERSION + ".")
    if not supported:
        if not force:
            raise VersionError(
                f"Jittor {version} at {jittor_dir}: the CUDA 13 patches were written for Jittor "
                f"{SUPPORTED_VERSION}; refusing (force=True / doctor --fix --force overrides)"
            )
        log.warning("patching Jittor %s although the patches target %s (forced)", version, SUPPORTED_VERSION)
    return version


# --- state --------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_manifest(jittor_dir: Path) -> dict:
    path = Path(jittor_dir) / MANIFEST_NAME
    if not path.exists():
        return {"tool": _TOOL, "files": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PatchError(f"unreadable patch manifest {path}: {exc}") from exc
    if data.get("tool") != _TOOL or not isinstance(data.get("files"), dict):
        raise PatchError(f"{path} is not a {_TOOL} manifest")
    return data


def _step_state(jittor_dir: Path, step: Step, text: str | None, manifest: dict) -> StepStatus:
    if isinstance(step, Remove):
        if text is not None:
            return StepStatus(step.path, "remove", PENDING, "present")
        recorded = manifest["files"].get(step.path, {}).get("action") == "remove"
        detail = "removed" if recorded else "already absent (not removed by geometryd)"
        return StepStatus(step.path, "remove", APPLIED, detail)
    if text is None:
        return StepStatus(step.path, "replace", ANCHOR_MISSING, "file not found")
    n_old, n_new = text.count(step.old), text.count(step.new)
    if n_old == 1 and n_new == 0:
        return StepStatus(step.path, "replace", PENDING, "anchor found")
    if n_old == 0 and n_new == 1:
        return StepStatus(step.path, "replace", APPLIED, "patched text present")
    first_line = step.old.strip().splitlines()[0]
    return StepStatus(
        step.path,
        "replace",
        ANCHOR_MISSING,
        f"anchor {first_line!r} found {n_old}x, patched text found {n_new}x (expected one of them, once)",
    )


def _read_texts(jittor_dir: Path, patches: tuple[Patch, ...]) -> dict[str, str | None]:
    texts: dict[str, str | None] = {}
    for patch in patches:
        for step in patch.steps:
            if step.path not in texts:
                p = Path(jittor_dir) / step.path
                texts[step.path] = p.read_text(encoding="utf-8") if p.is_file() else None
    return texts


def _statuses(
    jittor_dir: Path, patches: tuple[Patch, ...], texts: dict[str, str | None], manifest: dict
) -> list[PatchStatus]:
    out = []
    for patch in patches:
        steps = tuple(_step_state(jittor_dir, s, texts[s.path], manifest) for s in patch.steps)
        states = {s.state for s in steps}
        if ANCHOR_MISSING in states:
            state = ANCHOR_MISSING
        elif PENDING in states:
            state = PENDING
        else:
            state = APPLIED
        out.append(PatchStatus(patch.name, patch.summary, state, steps))
    return out


def status(jittor_dir: Path | None = None, patches: tuple[Patch, ...] = PATCHES) -> list[PatchStatus]:
    """Each patch's state in ``jittor_dir`` (default: installed Jittor): pending/applied/anchor-missing."""
    jittor_dir = Path(jittor_dir) if jittor_dir is not None else installed_jittor_dir()
    return _statuses(jittor_dir, patches, _read_texts(jittor_dir, patches), _read_manifest(jittor_dir))


def plan(jittor_dir: Path | None = None, patches: tuple[Patch, ...] = PATCHES) -> list[PatchStatus]:
    """What :func:`apply` would do; raises like :func:`apply` on a wrong version or a missing anchor."""
    jittor_dir = Path(jittor_dir) if jittor_dir is not None else installed_jittor_dir()
    found = status(jittor_dir, patches)
    missing = [p for p in found if p.state == ANCHOR_MISSING]
    if missing:
        details = "; ".join(f"{p.name}: {p.detail}" for p in missing)
        raise AnchorMissingError(f"Jittor patch anchor not found in {jittor_dir}: {details}")
    return found


# --- apply / revert -----------------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".geometryd-tmp")
    tmp.write_bytes(data)
    shutil.copymode(path, tmp)  # not copystat: a new mtime invalidates stale .pyc files
    os.replace(tmp, path)


def _backup(jittor_dir: Path, rel: str, manifest: dict, action: str) -> None:
    """Keep the original of ``rel`` once (the first patch that touches a file records it)."""
    if rel in manifest["files"]:
        return
    src = jittor_dir / rel
    dst = jittor_dir / BACKUP_DIR / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)
    manifest["files"][rel] = {
        "action": action, "sha256_original": _sha256(src), "backup": f"{BACKUP_DIR}/{rel}"
    }


def apply(
    jittor_dir: Path | None = None, *, force: bool = False, patches: tuple[Patch, ...] = PATCHES
) -> list[PatchStatus]:
    """Apply every pending patch. Returns one status per patch: applied / already-applied.

    Nothing is written when the version is wrong (:class:`VersionError`, unless ``force``) or any anchor is
    missing (:class:`AnchorMissingError`). Applying twice changes no byte.
    """
    jittor_dir = Path(jittor_dir) if jittor_dir is not None else installed_jittor_dir()
    version = _check_version(jittor_dir, force)
    planned = plan(jittor_dir, patches)
    if all(p.state == APPLIED for p in planned):
        for p in planned:
            log.info("jittor patch %s: already applied", p.name)
        return [PatchStatus(p.name, p.summary, ALREADY_APPLIED, p.steps) for p in planned]

    manifest = _read_manifest(jittor_dir)
    texts = _read_texts(jittor_dir, patches)
    results = []
    for patch, before in zip(patches, planned):
        if before.state == APPLIED:
            log.info("jittor patch %s: already applied", patch.name)
            results.append(PatchStatus(patch.name, patch.summary, ALREADY_APPLIED, before.steps))
            continue
        for step, st in zip(patch.steps, before.steps):
            if st.state != PENDING:
                continue
            if isinstance(step, Remove):
                _backup(jittor_dir, step.path, manifest, "remove")
                (jittor_dir / step.path).unlink()
                texts[step.path] = None
            else:
                _backup(jittor_dir, step.path, manifest, "replace")
                text = texts[step.path]
                assert text is not None  # PENDING implies the file was read
                texts[step.path] = text.replace(step.old, step.new, 1)
        after = _statuses(jittor_dir, (patch,), texts, manifest)[0]
        results.append(PatchStatus(patch.name, patch.summary, APPLIED, after.steps))
        log.info("jittor patch %s: applied (%s)", patch.name, patch.summary)

    for rel, entry in manifest["files"].items():
        if entry["action"] == "replace":
            text = texts.get(rel)
            if text is not None:
                data = text.encode("utf-8")
                path = jittor_dir / rel
                if path.read_bytes() != data:
                    _write_atomic(path, data)
                entry["sha256_patched"] = hashlib.sha256(data).hexdigest()
    manifest.update(
        jittor_version=version,
        patches=sorted({p.name for p in results} | set(manifest.get("patches", []))),
        applied_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    )
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    (jittor_dir / MANIFEST_NAME).write_text(text, encoding="utf-8")
    return results


def revert(jittor_dir: Path | None = None, *, force: bool = False) -> list[str]:
    """Restore every file recorded in the manifest byte for byte, then drop the manifest and backups.

    Refuses (unless ``force``) when a patched file was changed after patching. Returns the restored paths.
    """
    jittor_dir = Path(jittor_dir) if jittor_dir is not None else installed_jittor_dir()
    if not (jittor_dir / MANIFEST_NAME).exists():
        log.info("no geometryd patch manifest in %s: nothing to revert", jittor_dir)
        return []
    manifest = _read_manifest(jittor_dir)
    files: dict[str, dict] = manifest["files"]
    for rel, entry in files.items():
        backup = jittor_dir / entry["backup"]
        if not backup.is_file() or _sha256(backup) != entry["sha256_original"]:
            raise PatchError(f"backup of {rel} is missing or corrupt ({backup}); cannot revert")
        current = jittor_dir / rel
        if entry["action"] == "replace" and not force:
            if current.is_file() and _sha256(current) != entry.get("sha256_patched"):
                raise PatchError(
                    f"{current} changed after patching; refusing to overwrite (force=True overrides)"
                )
    for rel, entry in sorted(files.items()):
        current = jittor_dir / rel
        current.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(jittor_dir / entry["backup"], current)
        log.info("jittor patch revert: restored %s", rel)
    shutil.rmtree(jittor_dir / BACKUP_DIR, ignore_errors=True)
    (jittor_dir / MANIFEST_NAME).unlink()
    return sorted(files)
