"""Full-size module trees vs the official key manifests (spec 2.2-2.4, shared/spec/geometrycrafter_keys).

Modules are built from the OFFICIAL configs without running their initialisers: Jittor creates
parameters lazily, so reading shapes of the 632 M-parameter CLIP costs milliseconds and no memory.
The SVD manifest also lists ``decoder.*`` (266 tensors): those are intentionally not built (spec 2.3;
``load_svd_vae`` ignores them in the file).
"""

from __future__ import annotations

import numpy as np
import pytest

from daemon.jittor_env import import_jittor

jt = import_jittor()

from daemon.model.clip import ClipVision  # noqa: E402
from daemon.model.loader import module_shapes  # noqa: E402
from daemon.model.vae import PointMapVae, SvdVaeEncoder  # noqa: E402
from daemon.weights.configs import OFFICIAL_CLIP_VISION as OFFICIAL_CLIP  # noqa: E402
from daemon.weights.configs import OFFICIAL_POINT_MAP_VAE, OFFICIAL_SVD_VAE  # noqa: E402
from helpers.model_testutil import read_tsv  # noqa: E402


def _n_params(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(int(np.prod(s)) for s in shapes.values())


def test_point_map_vae_manifest():
    shapes = module_shapes(PointMapVae(OFFICIAL_POINT_MAP_VAE))
    want = read_tsv("point_map_vae")
    assert shapes == want
    assert len(shapes) == 441 and _n_params(shapes) == 98_241_316


def test_svd_vae_encoder_manifest_subset():
    shapes = module_shapes(SvdVaeEncoder(OFFICIAL_SVD_VAE))
    full = read_tsv("svd_vae")
    skipped = {k for k in full if k.startswith("decoder.")}
    assert len(full) == 374 and len(skipped) == 266  # decoder intentionally not built
    assert shapes == {k: v for k, v in full.items() if k not in skipped}
    assert len(shapes) == 108


def test_clip_vision_manifest():
    shapes = module_shapes(ClipVision(OFFICIAL_CLIP))
    assert shapes == read_tsv("clip_vision")
    assert len(shapes) == 520 and _n_params(shapes) == 632_076_800


def test_torch_reference_point_map_vae_matches_manifest():
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from reference.point_map_vae import TorchPointMapVae

    with torch.device("meta"):
        ref = TorchPointMapVae(OFFICIAL_POINT_MAP_VAE)
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert list(shapes) == list(read_tsv("point_map_vae"))
    assert shapes == read_tsv("point_map_vae")
