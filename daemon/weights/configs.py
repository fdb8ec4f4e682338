"""Tiny configurations (and the official ones they shrink) that keep the official structure (all levels,
attention where the official model
has it, several frames) and shrink only widths. Used by `geometryd weights make-tiny`, the demo and tests.

Official values: ../shared/spec/geometrycrafter.md section 1.2. Constraint: every GroupNorm has 32 groups,
so every channel count is a multiple of 32; the point-map decoder heads use C/2 channels of the first
decoder level, so dec_block_out_channels[0] >= 64.
"""

from __future__ import annotations

from typing import Any

# diffusers UNetSpatioTemporalConditionModel kwargs (in_channels set per variant: 12 diff, 8 determ).
TINY_UNET: dict[str, Any] = {
    "sample_size": 16,
    "out_channels": 4,
    "down_block_types": (
        "CrossAttnDownBlockSpatioTemporal",
        "CrossAttnDownBlockSpatioTemporal",
        "CrossAttnDownBlockSpatioTemporal",
        "DownBlockSpatioTemporal",
    ),
    "up_block_types": (
        "UpBlockSpatioTemporal",
        "CrossAttnUpBlockSpatioTemporal",
        "CrossAttnUpBlockSpatioTemporal",
        "CrossAttnUpBlockSpatioTemporal",
    ),
    "block_out_channels": (32, 64, 64, 64),
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 24,
    "layers_per_block": 2,
    "cross_attention_dim": 32,
    "transformer_layers_per_block": 1,
    "num_attention_heads": (2, 4, 4, 4),
    "num_frames": 25,
}
UNET_IN_CHANNELS = {"diff": 12, "determ": 8}

# diffusers AutoencoderKLTemporalDecoder kwargs (SVD VAE; only encoder + quant_conv are used).
TINY_SVD_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "block_out_channels": (32, 32, 64, 64),
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 64,
    "scaling_factor": 0.18215,
    "force_upcast": True,
}

# Point-map VAE config.json keys (official: spec 1.2 / 2.2).
TINY_POINT_MAP_VAE: dict[str, Any] = {
    "in_channels": 4,
    "latent_channels": 4,
    "enc_down_block_types": ["DownEncoderBlock2D"] * 4,
    "enc_block_out_channels": [32, 32, 64, 64],
    "enc_layers_per_block": 2,
    "dec_block_out_channels": [64, 64, 64, 64],
    "dec_layers_per_block": 2,
    "mid_block_add_attention": True,
    "offset_scale_factor": 0.1,
}

# transformers CLIPVisionConfig kwargs; projection_dim must equal the UNet's cross_attention_dim.
TINY_CLIP_VISION: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 32,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}

# Official configs (spec 1.2), used by the manifest tests and the GPU benchmark.
OFFICIAL_UNET: dict[str, Any] = {
    "sample_size": 96,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",),
    "up_block_types": ("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3,
    "block_out_channels": (320, 640, 1280, 1280),
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 768,
    "layers_per_block": 2,
    "cross_attention_dim": 1024,
    "transformer_layers_per_block": 1,
    "num_attention_heads": (5, 10, 20, 20),
    "num_frames": 25,
}
OFFICIAL_SVD_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 768,
    "scaling_factor": 0.18215,
    "force_upcast": True,
}
OFFICIAL_CLIP_VISION: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 16,
    "num_hidden_layers": 32,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 1024,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}

OFFICIAL_POINT_MAP_VAE: dict[str, Any] = {
    "in_channels": 4,
    "latent_channels": 4,
    "enc_down_block_types": ["DownEncoderBlock2D"] * 4,
    "enc_block_out_channels": [128, 256, 512, 512],
    "enc_layers_per_block": 2,
    "dec_block_out_channels": [128, 256, 512, 512],
    "dec_layers_per_block": 2,
    "mid_block_add_attention": True,
    "offset_scale_factor": 0.1,
}
