"""Jittor networks of GeometryCrafter and their checkpoint loader (spec sections 2-3).

Exports are resolved lazily so that importing ``daemon.model`` (e.g. for ``--help``) does not import
Jittor; the first access of a network name imports the module that defines it.
"""

from __future__ import annotations

import importlib
from typing import Any

from daemon.model.loader import CheckpointError

_EXPORTS = {
    "load_unet": "daemon.model.unet",
    "load_svd_vae": "daemon.model.vae",
    "load_point_map_vae": "daemon.model.vae",
    "init_point_map_vae": "daemon.model.vae",
    "save_point_map_vae": "daemon.model.vae",
    "SvdVaeEncoder": "daemon.model.vae",
    "PointMapVae": "daemon.model.vae",
    "load_clip": "daemon.model.clip",
    "ClipVision": "daemon.model.clip",
}

__all__ = ["CheckpointError", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'daemon.model' has no attribute {name!r}")
