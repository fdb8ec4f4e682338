"""Backbones of our own that MoGe's model constructor can resolve by name.

MoGe looks ``encoder`` names up in ``moge.model.dinov2.hub.backbones``; :func:`register_tiny_backbone` adds
`TINY_ENCODER`, the 4-block, 64-wide ViT/14 of the random-weight checkpoints (moge_sidecar/tiny.py). The
loader (moge_sidecar/infer.py) registers it before building any model, so a tiny checkpoint loads like an
official one.
"""

from __future__ import annotations

from functools import partial
from typing import Any

TINY_ENCODER = "geometryd_tiny_vit14"


def _tiny_vit14(*, pretrained: bool = False, **kwargs: Any) -> Any:
    """A DINOv2 ViT with patch 14, width 64, 4 blocks (same code path as the stock backbones)."""
    from moge.model.dinov2.layers import MemEffAttention
    from moge.model.dinov2.models.vision_transformer import Block, DinoVisionTransformer

    if pretrained:
        raise ValueError("the tiny MoGe backbone has no pretrained weights")
    return DinoVisionTransformer(
        img_size=518, patch_size=14, embed_dim=64, depth=4, num_heads=2, mlp_ratio=2,
        block_fn=partial(Block, attn_class=MemEffAttention), init_values=1.0, ffn_layer="mlp",
        block_chunks=0, num_register_tokens=0, interpolate_antialias=False, interpolate_offset=0.1, **kwargs,
    )


def register_tiny_backbone() -> None:
    """Make `TINY_ENCODER` resolvable by `MoGeModel(encoder=...)` (it looks names up in this module)."""
    from moge.model.dinov2.hub import backbones

    # PATCH(dlr-moge==2.0.0): an entry added to its backbone table, which MoGeModel(encoder=...) reads
    if getattr(backbones, TINY_ENCODER, None) is not _tiny_vit14:
        setattr(backbones, TINY_ENCODER, _tiny_vit14)
