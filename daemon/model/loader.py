"""Checkpoint loading: official diffusers/transformers folders (config.json + safetensors) -> Jittor modules.

Reference: spec section 1 (file names, stored dtypes, precision policy 1.3) and the key manifests in
``shared/spec/geometrycrafter_keys``. Unlike Jittor's ``Module.load_parameters`` (which only logs a missing
key) :func:`load_into` refuses any mismatch: missing, unexpected or mis-shaped keys, non-float tensors
for float parameters, corrupt or truncated files all raise :class:`CheckpointError` naming the file.

Memory: the safetensors header is parsed by ``daemon.weights.manifest`` (the one reader) and tensors are read
one at a time with plain file reads into a numpy buffer, converted to the target dtype, handed to the
parameter and freed. ``safe_open`` is not used for the data because it mmaps the whole file and the
touched pages count in the process RSS until it is closed (peak ~2x the checkpoint); with reads the
peak stays near the size of the loaded parameters plus one tensor.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from daemon.jittor_env import import_jittor
from daemon.weights.manifest import HeaderError, TensorInfo, read_safetensors_header

log = logging.getLogger(__name__)

WEIGHT_NAMES: tuple[str, ...] = ("diffusion_pytorch_model", "model")
_MAX_LISTED = 20

# safetensors dtype tag -> numpy dtype (BF16 is widened by hand)
_ST_DTYPES: dict[str, Any] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": "bf16",
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_FLOAT_TAGS = {"F64", "F32", "F16", "BF16"}
_NP_TO_TAG = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}
_DTYPES = {"fp32": np.float32, "float32": np.float32, "fp16": np.float16, "float16": np.float16}


class CheckpointError(RuntimeError):
    """A checkpoint folder or file cannot be loaded into the requested module."""


def read_config(folder: str | Path) -> dict:
    """Parse ``<folder>/config.json``."""
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: config.json not found") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable config ({e})") from None


def find_weights(folder: str | Path, names: Iterable[str] = WEIGHT_NAMES, variant: str | None = None) -> Path:
    """First existing ``<name>[.<variant>].safetensors`` in ``folder``; the variant file is preferred
    when ``variant`` is given, the plain one otherwise (the other is the fallback)."""
    folder = Path(folder)
    tried = []
    for name in names:
        plain = f"{name}.safetensors"
        other = f"{name}.{variant or 'fp16'}.safetensors"
        for candidate in ((other, plain) if variant else (plain, other)):
            tried.append(candidate)
            if (folder / candidate).is_file():
                return folder / candidate
    raise CheckpointError(f"{folder}: no weights file (tried {', '.join(tried)})")


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """The safetensors header (``daemon.weights.manifest.read_safetensors_header``, offsets absolute) of a
    file this loader can read; every problem is a ``CheckpointError`` naming the file."""
    path = Path(path)
    try:
        header = read_safetensors_header(path)
    except HeaderError as e:
        raise CheckpointError(str(e)) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    for key, info in header.items():
        if info.dtype not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {info.dtype}")
    return header


def read_tensor(f: Any, info: TensorInfo, path: Path | str = "?") -> np.ndarray:
    """Read one tensor's bytes with a plain read into a fresh numpy array (BF16 widened to fp32)."""
    f.seek(info.start)
    buf = bytearray(info.end - info.start)
    got = f.readinto(buf)
    if got != len(buf):
        raise CheckpointError(f"{path}: truncated safetensors file (short read at offset {info.start})")
    if info.dtype == "BF16":
        u16 = np.frombuffer(buf, dtype="<u2")
        return (u16.astype(np.uint32) << 16).view(np.float32).reshape(info.shape)
    return np.frombuffer(buf, dtype=np.dtype(_ST_DTYPES[info.dtype]).newbyteorder("<")).reshape(info.shape)


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _listing(label: str, items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f", ... (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"{len(items)} {label}: [{shown}{more}]"


def _map_key(key: str, key_map: Callable[[str], str] | Mapping[str, str] | None) -> str:
    if key_map is None:
        return key
    if callable(key_map):
        return key_map(key)
    return key_map.get(key, key)


def load_into(
    module: Any,
    weights_path: str | Path,
    *,
    dtype: str = "fp32",
    key_map: Callable[[str], str] | Mapping[str, str] | None = None,
    ignore: Iterable[str] = (),
    keep_fp32: Iterable[str] = (),
) -> dict[str, int]:
    """Load a safetensors file into a Jittor module, strictly.

    key_map: file key -> module key (callable or dict; unmapped keys keep their name).
    ignore: fnmatch patterns of FILE keys that are skipped (e.g. ``decoder.*``).
    keep_fp32: fnmatch patterns of MODULE keys kept in fp32 whatever ``dtype`` is.
    Returns counts: ``{"tensors": loaded, "ignored": skipped, "params": total elements}``.
    """
    jt = import_jittor()
    path = Path(weights_path)
    if dtype not in _DTYPES:
        raise CheckpointError(f"dtype must be one of fp32, fp16; got {dtype!r}")
    target = np.dtype(_DTYPES[dtype])
    ignore = tuple(ignore)
    keep_fp32 = tuple(keep_fp32)
    header = read_header(path)
    params = module.state_dict()

    file_to_module: dict[str, str] = {}
    ignored = 0
    unexpected: list[str] = []
    for fkey in header:
        if _matches(fkey, ignore):
            ignored += 1
            continue
        mkey = _map_key(fkey, key_map)
        if mkey in params:
            file_to_module[fkey] = mkey
        else:
            unexpected.append(fkey)
    loaded_module_keys = set(file_to_module.values())
    missing = [k for k in params if k not in loaded_module_keys]
    misshaped = []
    bad_dtype = []
    for fkey, mkey in file_to_module.items():
        info = header[fkey]
        mshape = tuple(int(s) for s in params[mkey].shape)
        if info.shape != mshape and not (info.shape == () and mshape == (1,)):
            misshaped.append(f"{fkey} file {list(info.shape)} vs model {list(mshape)}")
        if info.dtype not in _FLOAT_TAGS:
            bad_dtype.append(f"{fkey} ({info.dtype})")
    problems = []
    if missing:
        problems.append(_listing("missing", missing))
    if unexpected:
        problems.append(_listing("unexpected", unexpected))
    if misshaped:
        problems.append(_listing("mis-shaped", misshaped))
    if bad_dtype:
        problems.append(_listing("non-float tensors for float parameters", bad_dtype))
    if problems:
        raise CheckpointError(
            f"{path}: checkpoint does not match {type(module).__name__}: " + "; ".join(problems)
        )

    total = 0
    try:
        with open(path, "rb") as f:
            for fkey, mkey in file_to_module.items():
                info = header[fkey]
                arr = read_tensor(f, info, path)
                want = np.dtype(np.float32) if _matches(mkey, keep_fp32) else target
                arr = np.ascontiguousarray(arr.astype(want, copy=False)).reshape(tuple(params[mkey].shape))
                params[mkey].assign(jt.array(arr))
                total += arr.size
                del arr
    except OSError as e:
        raise CheckpointError(f"{path}: read failed ({e})") from None
    jt.sync_all()
    log.debug("loaded %d tensors (%d params) from %s as %s", len(file_to_module), total, path, dtype)
    return {"tensors": len(file_to_module), "ignored": ignored, "params": total}


def module_shapes(module: Any) -> dict[str, tuple[int, ...]]:
    """state-dict key -> shape, without executing lazily initialised parameters."""
    return {k: tuple(int(s) for s in v.shape) for k, v in module.state_dict().items()}


def cast_module(module: Any, dtype: str, keep_fp32: Iterable[str] = ()) -> None:
    """Cast every float parameter to ``dtype`` (fp16/fp32) except those matching ``keep_fp32``."""
    target = "float16" if np.dtype(_DTYPES[dtype]) == np.float16 else "float32"
    keep = tuple(keep_fp32)
    for key, var in module.state_dict().items():
        want = "float32" if _matches(key, keep) else target
        if str(var.dtype) != want:
            var.assign(var.cast(want))


def save_module(module: Any, folder: str | Path, config: dict,
                weights_name: str = "diffusion_pytorch_model.safetensors") -> Path:
    """Write ``config.json`` + a safetensors file of ``module.state_dict()`` (official layout)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, var in module.state_dict().items():
        arr = np.ascontiguousarray(var.numpy())
        if arr.dtype not in _NP_TO_TAG:
            arr = arr.astype(np.float32)
        tensors[key] = arr
    weights = folder / weights_name
    tmp = weights.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, weights)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return weights
