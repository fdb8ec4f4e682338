"""The Jittor UNet built from the OFFICIAL config has exactly the official state-dict keys and shapes.

Manifests: ../shared/spec/geometrycrafter_keys/unet_diff_in12.tsv and unet_determ_in8.tsv (spec 2.1: 1428
tensors, 1,524,634,602 / 1,524,623,082 parameters). The full-size trees are built in a child process so
that its peak RSS can be measured: Jittor parameters are lazy (jt.init.uniform builds an op, nothing is
allocated until a Var is executed), so reading keys and shapes never materialises the ~6 GB of fp32
weights. The child asserts nothing itself; it reports keys, shapes and ru_maxrss as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.weights.configs import OFFICIAL_UNET
from daemon.weights.manifest import (
    MANIFEST_DIR as KEYS_DIR,  # equal to the spec's copies (tests/weights/test_weights.py)
)

PARAMS = {12: 1_524_634_602, 8: 1_524_623_082}
MAX_RSS_MB = 1500  # measured ~300 MB (Jittor core + two lazy trees); materialising one tree is ~6 GB

CHILD = r"""
import json, resource, sys, time
from daemon.jittor_env import import_jittor
import_jittor()
from daemon.model.loader import module_shapes
from daemon.model.unet import UNetVid2Vid
config = json.loads(sys.argv[1])
out = {}
t0 = time.perf_counter()
for cin in (12, 8):
    out[str(cin)] = {k: list(v) for k, v in module_shapes(UNetVid2Vid(**config, in_channels=cin)).items()}
out["build_s"] = time.perf_counter() - t0
out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def read_manifest(name: str) -> dict[str, list[int]]:
    rows = (line.split("\t") for line in (KEYS_DIR / name).read_text().splitlines() if line.strip())
    return {key: json.loads(shape) for key, shape in rows}


@pytest.fixture(scope="module")
def official_trees() -> dict:
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(OFFICIAL_UNET)],
        cwd=root, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


MANIFESTS = [(12, "unet_diff_in12.tsv"), (8, "unet_determ_in8.tsv")]


@pytest.mark.parametrize(("in_channels", "manifest"), MANIFESTS)
def test_keys_and_shapes_equal_official_manifest(official_trees, in_channels, manifest):
    want = read_manifest(manifest)
    got = official_trees[str(in_channels)]
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    assert not missing and not unexpected, f"missing {missing[:10]}, unexpected {unexpected[:10]}"
    misshaped = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not misshaped
    assert len(got) == 1428
    assert got["conv_in.weight"] == [320, in_channels, 3, 3]
    assert got["conv_out.weight"] == [4, 320, 3, 3]
    total = 0
    for shape in got.values():
        n = 1
        for s in shape:
            n *= s
        total += n
    assert total == PARAMS[in_channels]


def test_full_size_build_allocates_no_weights(official_trees):
    # two full trees (2 x 1.52 G params, 12 GB in fp32) were built in the child
    assert official_trees["maxrss_mb"] < MAX_RSS_MB, official_trees["maxrss_mb"]
