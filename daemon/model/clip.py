"""CLIP vision tower + visual projection in Jittor (SVD's ``image_encoder``).

Reference: spec 2.4 and transformers ``CLIPVisionModelWithProjection`` (``models/clip/modeling_clip.py``):
stride-p patchify (no bias), class token, learned position embedding, ``pre_layrnorm`` (sic), pre-norm
encoder layers (x += attn(LN1 x); x += fc2(act(fc1(LN2 x)))), token 0 -> ``post_layernorm`` ->
``visual_projection`` (no bias). ``image_embeds`` is not L2-normalised. Activation from
``config.hidden_act`` ("gelu" = exact erf form for the official model, "quick_gelu" for OpenAI CLIP).
Precision: fp16 by default (spec 1.3); norms/softmax/activations accumulate in fp32 (blocks.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from daemon.jittor_env import import_jittor
from daemon.model.attention import multi_head_attention
from daemon.model.blocks import ACTIVATIONS, Conv2d, LayerNorm, Linear
from daemon.model.loader import CheckpointError, find_weights, load_into, read_config

jt: Any = import_jittor()  # a module; typed Any so that jt.nn.Module can be a base class
nn: Any = jt.nn
log = logging.getLogger(__name__)

Var = Any

DEFAULT_CLIP_VISION: dict[str, Any] = {
    "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16, "num_hidden_layers": 32,
    "patch_size": 14, "image_size": 224, "projection_dim": 1024, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
    "num_channels": 3,
}


def vision_config(config: dict) -> dict:
    """Flatten a CLIPVisionConfig / CLIPConfig json into the keys used here (defaults = official model)."""
    cfg = dict(DEFAULT_CLIP_VISION)
    src = config.get("vision_config", config)
    cfg.update({k: src[k] for k in DEFAULT_CLIP_VISION if k in src})
    if "projection_dim" in config:
        cfg["projection_dim"] = config["projection_dim"]
    if cfg["hidden_act"] not in ACTIVATIONS:
        act = cfg["hidden_act"]
        raise CheckpointError(f"clip config: hidden_act {act!r} not one of {sorted(ACTIVATIONS)}")
    return cfg


class Embedding(nn.Module):
    """torch.nn.Embedding; key ``weight`` [num, dim]."""

    def __init__(self, num: int, dim: int) -> None:
        self.weight = jt.init.gauss((num, dim), "float32", 0.0, 0.02)


class ClipVisionEmbeddings(nn.Module):
    def __init__(self, cfg: dict) -> None:
        d, p = cfg["hidden_size"], cfg["patch_size"]
        self.patch_size = p
        self.num_patches = (cfg["image_size"] // p) ** 2
        self.class_embedding = jt.init.gauss((d,), "float32", 0.0, 0.02)
        self.patch_embedding = Conv2d(cfg["num_channels"], d, p, stride=p, bias=False)
        self.position_embedding = Embedding(self.num_patches + 1, d)

    def execute(self, pixels: Var) -> Var:
        x = self.patch_embedding(pixels)  # [N,D,g,g]
        n, d = x.shape[0], x.shape[1]
        x = x.reshape(n, d, -1).transpose(0, 2, 1)  # [N,P,D]
        cls = self.class_embedding.cast(x.dtype).reshape(1, 1, d).broadcast((n, 1, d))
        x = jt.concat([cls, x], dim=1)
        return x + self.position_embedding.weight.cast(x.dtype).reshape(1, -1, d)


class ClipAttention(nn.Module):
    def __init__(self, cfg: dict) -> None:
        d = cfg["hidden_size"]
        self.heads = cfg["num_attention_heads"]
        self.k_proj = Linear(d, d)
        self.v_proj = Linear(d, d)
        self.q_proj = Linear(d, d)
        self.out_proj = Linear(d, d)

    def execute(self, x: Var) -> Var:
        return self.out_proj(multi_head_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class ClipMlp(nn.Module):
    def __init__(self, cfg: dict) -> None:
        self.act = ACTIVATIONS[cfg["hidden_act"]]
        self.fc1 = Linear(cfg["hidden_size"], cfg["intermediate_size"])
        self.fc2 = Linear(cfg["intermediate_size"], cfg["hidden_size"])

    def execute(self, x: Var) -> Var:
        return self.fc2(self.act(self.fc1(x)))


class ClipEncoderLayer(nn.Module):
    def __init__(self, cfg: dict) -> None:
        d, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.self_attn = ClipAttention(cfg)
        self.layer_norm1 = LayerNorm(d, eps)
        self.mlp = ClipMlp(cfg)
        self.layer_norm2 = LayerNorm(d, eps)

    def execute(self, x: Var) -> Var:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEncoder(nn.Module):
    def __init__(self, cfg: dict) -> None:
        self.layers = nn.ModuleList([ClipEncoderLayer(cfg) for _ in range(cfg["num_hidden_layers"])])

    def execute(self, x: Var) -> Var:
        for layer in self.layers:
            x = layer(x)
        return x


class ClipVisionTransformer(nn.Module):
    def __init__(self, cfg: dict) -> None:
        d, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.embeddings = ClipVisionEmbeddings(cfg)
        self.pre_layrnorm = LayerNorm(d, eps)
        self.encoder = ClipEncoder(cfg)
        self.post_layernorm = LayerNorm(d, eps)

    def execute(self, pixels: Var) -> Var:
        x = self.pre_layrnorm(self.embeddings(pixels))
        x = self.encoder(x)
        return self.post_layernorm(x[:, 0])  # pooled class token [N,D]


class ClipVision(nn.Module):
    """``CLIPVisionModelWithProjection``: ``image_embeds(pixels[N,3,S,S]) -> [N, projection_dim]``."""

    def __init__(self, config: dict) -> None:
        self.cfg = vision_config(config)
        self.vision_model = ClipVisionTransformer(self.cfg)
        self.visual_projection = Linear(self.cfg["hidden_size"], self.cfg["projection_dim"], bias=False)

    def execute(self, pixels: Any) -> Var:
        return self.image_embeds(pixels)

    def image_embeds(self, pixels: Any) -> Var:
        """pixels: CLIP-normalised [N,3,image_size,image_size] (numpy or Var) -> [N,projection_dim]."""
        dtype = str(self.visual_projection.weight.dtype)
        if isinstance(pixels, jt.Var):
            x = pixels.cast(dtype)
        else:
            x = jt.array(np.ascontiguousarray(np.asarray(pixels, dtype=np.float32))).cast(dtype)
        s = self.cfg["image_size"]
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.cfg["num_channels"], s, s):
            raise ValueError(f"clip: expected pixels [N,3,{s},{s}], got {list(x.shape)}")
        return self.visual_projection(self.vision_model(x))


def load_clip(folder: str | Path, dtype: str = "fp16") -> ClipVision:
    """Load an ``image_encoder`` folder (``model.fp16.safetensors`` preferred); ``position_ids`` ignored."""
    folder = Path(folder)
    module = ClipVision(read_config(folder))
    weights = find_weights(folder, ("model",), variant="fp16")
    load_into(module, weights, dtype=dtype, ignore=("*position_ids",))
    module.eval()
    return module
