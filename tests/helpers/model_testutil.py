"""Helpers shared by the network parity tests (torch reference <-> Jittor module)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def keys_dir() -> Path:
    """The key manifests shipped in the package (tests/weights/test_weights.py checks they equal the spec's copies)."""
    from daemon.weights.manifest import MANIFEST_DIR

    return MANIFEST_DIR


def read_tsv(name: str) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for line in (keys_dir() / f"{name}.tsv").read_text().splitlines():
        key, shape = line.split("\t")
        out[key] = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
    return out


def perturb_(module: Any, seed: int, scale: float = 0.05) -> None:
    """Add seeded noise to every torch parameter so zero/constant-initialised ones (norms, biases,
    mix factors, zero-init convs) are exercised."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)


def copy_torch_to_jittor(tmodule: Any, jmodule: Any, dtype: str = "float32") -> None:
    """Copy a torch state dict into a Jittor module with identical keys (asserts the key sets agree)."""
    from daemon.jittor_env import import_jittor

    jt = import_jittor()

    src = {k: v.detach().float().numpy() for k, v in tmodule.state_dict().items()}
    dst = jmodule.state_dict()
    assert set(src) == set(dst), sorted(set(src) ^ set(dst))
    for k, v in src.items():
        dst[k].assign(jt.array(v.reshape(tuple(dst[k].shape)).astype(dtype)))


def rel_err(a: Any, b: Any) -> float:
    """max|a-b| / max|b| (b = reference)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
