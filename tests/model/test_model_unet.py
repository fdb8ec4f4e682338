"""Parity of the Jittor vid2vid UNet (daemon/model/unet.py) with diffusers' UNetSpatioTemporalConditionModel.

Spec ../shared/spec/geometrycrafter.md sections 2.1, 3.7-3.11 and 6: the same random weights (tiny config of
daemon.weights.configs, every constant-initialised parameter perturbed with seeded noise so nothing passes on
ones/zeros/0.5) are written with ``save_pretrained`` and read back through the production loader.
(a) identical per-frame embeddings == diffusers' own forward with a (B,1,D) context;
(b) distinct per-frame embeddings == a torch harness that runs the reference model's submodules in the
    order of spec 2.1 with the context flattened to (B*F,1,D) (B=2 also checks repeat-interleave order).
Tolerance fp32: max|a-b| / max|b| <= 6e-6 (measured 1.5e-6 - 2.1e-6; tests/model/test_model_perturbation.py shows a
GroupNorm eps swap moves the output by 4.4e-5, 7.6e-4 at small activations).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from daemon.jittor_env import import_jittor  # noqa: E402
from daemon.weights.configs import TINY_UNET  # noqa: E402

jt = import_jittor()

from daemon.model.loader import CheckpointError  # noqa: E402
from daemon.model.unet import UNetVid2Vid, load_unet  # noqa: E402

FRAMES = 5
LATENT = (16, 24)  # three downsamplings: multiples of 8
C_NOISE = 1.2260490  # spec 4.4, step 1
FP32_TOL = 6e-6
# Jittor's CPU fp16 matmul/conv accumulate in fp16: reached 1.2e-2 (torch CPU fp16 vs fp32: 2.4e-3, which
# this port also reaches when Linear/Conv2d accumulate in fp32; see the report of issue 3).
FP16_TOL = 1e-2  # reached 7.3e-3 (Jittor fp16, CPU, fp32 accumulation in blocks.Linear/Conv2d)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


def make_reference(in_channels: int, seed: int) -> torch.nn.Module:
    """Tiny diffusers UNet with every constant-initialised parameter (norm weights/biases, mix factors,
    zero biases) perturbed, so that each parameter influences the output."""
    import safetensors.torch  # noqa: F401  (diffusers' save_pretrained needs it imported)
    from diffusers import UNetSpatioTemporalConditionModel

    torch.manual_seed(seed)
    ref = UNetSpatioTemporalConditionModel(**TINY_UNET, in_channels=in_channels).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in ref.named_parameters():
            flat = p.flatten()
            if flat.numel() == 1 or bool(torch.all(flat == flat[0])):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return ref


_BUILT: dict[int, tuple] = {}


def built(in_channels: int, tmp_path_factory) -> tuple:
    """(reference, Jittor fp32 model loaded from its save_pretrained folder, folder), built once per module."""
    if in_channels not in _BUILT:
        ref = make_reference(in_channels, seed=in_channels)
        folder = tmp_path_factory.mktemp(f"unet_in{in_channels}")
        ref.save_pretrained(folder)
        _BUILT[in_channels] = (ref, load_unet(folder, dtype="fp32"), folder)
    return _BUILT[in_channels]


@pytest.fixture(scope="module", params=[12, 8], ids=["diff_in12", "determ_in8"])
def models(request, tmp_path_factory):
    return built(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def diff_models(tmp_path_factory):
    return built(12, tmp_path_factory)


def inputs(batch: int, in_channels: int, distinct: bool, seed: int = 0, frames: int = FRAMES,
           latent: tuple[int, int] = LATENT) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d = TINY_UNET["cross_attention_dim"]
    ctx = rng.standard_normal((batch, frames if distinct else 1, d)).astype(np.float32)
    ids = np.array([[7.0, 127.0, 0.02], [6.0, 40.0, 0.1]][:batch], dtype=np.float32)
    sample = rng.standard_normal((batch, frames, in_channels) + latent).astype(np.float32)
    return {"sample": sample, "context": ctx, "ids": ids}


def torch_vid2vid(ref, sample, timestep: float, context, added_time_ids) -> np.ndarray:
    """Spec 2.1 forward built from the reference model's own submodules, context (B,F,D) -> (B*F,1,D).

    Same order as diffusers' UNetSpatioTemporalConditionModel.forward; only the context handling differs
    (diffusers repeats one (B,1,D) embedding over the frames)."""
    sample = torch.from_numpy(sample)
    context = torch.from_numpy(context)
    added_time_ids = torch.from_numpy(added_time_ids)
    b, f = sample.shape[:2]
    with torch.no_grad():
        # 1. time + added time ids, repeat-interleaved over frames
        t_emb = ref.time_proj(torch.tensor([timestep], dtype=torch.float32).expand(b)).to(sample.dtype)
        emb = ref.time_embedding(t_emb)
        add = ref.add_time_proj(added_time_ids.flatten()).reshape(b, -1).to(emb.dtype)
        emb = (emb + ref.add_embedding(add)).repeat_interleave(f, dim=0)
        ehs = context.reshape(b * f, 1, context.shape[-1])
        indicator = torch.zeros(b, f, dtype=sample.dtype)
        # 2. conv_in, 3. down, 4. mid, 5. up, 6. out
        x = ref.conv_in(sample.flatten(0, 1))
        skips = (x,)
        for block in ref.down_blocks:
            if getattr(block, "has_cross_attention", False):
                x, res = block(hidden_states=x, temb=emb, encoder_hidden_states=ehs,
                               image_only_indicator=indicator)
            else:
                x, res = block(hidden_states=x, temb=emb, image_only_indicator=indicator)
            skips += res
        x = ref.mid_block(hidden_states=x, temb=emb, encoder_hidden_states=ehs,
                          image_only_indicator=indicator)
        for block in ref.up_blocks:
            res, skips = skips[-len(block.resnets):], skips[: -len(block.resnets)]
            if getattr(block, "has_cross_attention", False):
                x = block(hidden_states=x, res_hidden_states_tuple=res, temb=emb, encoder_hidden_states=ehs,
                          image_only_indicator=indicator)
            else:
                x = block(hidden_states=x, res_hidden_states_tuple=res, temb=emb,
                          image_only_indicator=indicator)
        x = ref.conv_out(ref.conv_act(ref.conv_norm_out(x)))
    return x.reshape(b, f, *x.shape[1:]).numpy()


def test_identical_embeddings_match_diffusers_forward(models):
    ref, model, _ = models
    inp = inputs(1, ref.config.in_channels, distinct=False)
    with torch.no_grad():
        want = ref(torch.from_numpy(inp["sample"]), C_NOISE, torch.from_numpy(inp["context"]),
                   torch.from_numpy(inp["ids"])).sample.numpy()
    per_frame = np.repeat(inp["context"], FRAMES, axis=1)  # (B,F,D): every frame the same embedding
    got = model(inp["sample"], C_NOISE, per_frame, inp["ids"]).numpy()
    assert got.shape == (1, FRAMES, 4) + LATENT
    assert rel_err(got, want) <= FP32_TOL
    # a (B,1,D) context is broadcast to every frame: the same computation
    shared = model(inp["sample"], C_NOISE, inp["context"], inp["ids"]).numpy()
    np.testing.assert_array_equal(shared, got)


def test_distinct_embeddings_match_torch_harness(models):
    ref, model, _ = models
    inp = inputs(2, ref.config.in_channels, distinct=True, seed=1)
    want = torch_vid2vid(ref, inp["sample"], C_NOISE, inp["context"], inp["ids"])
    got = model(jt.array(inp["sample"]), C_NOISE, jt.array(inp["context"]), jt.array(inp["ids"])).numpy()
    assert rel_err(got, want) <= FP32_TOL
    # the per-frame contexts matter (otherwise (b) would not test more than (a))
    same = inputs(2, ref.config.in_channels, distinct=False, seed=1)
    with torch.no_grad():
        shared = ref(torch.from_numpy(inp["sample"]), C_NOISE, torch.from_numpy(same["context"]),
                     torch.from_numpy(inp["ids"])).sample.numpy()
    assert rel_err(shared, want) > 100 * FP32_TOL


def test_fp16_close_to_torch_fp32(diff_models):
    ref, _, folder = diff_models
    model16 = load_unet(folder, dtype="fp16")
    assert model16.dtype == "float16"
    # smaller than the fp32 cases: Jittor's CPU fp16 kernels are slow (the GPU is the fp16 target)
    inp = inputs(1, 12, distinct=True, seed=2, frames=3, latent=(8, 8))
    want = torch_vid2vid(ref, inp["sample"], C_NOISE, inp["context"], inp["ids"])
    got = model16(inp["sample"], C_NOISE, inp["context"], inp["ids"])
    assert got.dtype == "float16"
    got = got.numpy().astype(np.float32)
    assert np.isfinite(got).all()
    err = rel_err(got, want)
    print(f"unet fp16 vs torch fp32 rel err {err:.3e}")
    assert err <= FP16_TOL


def test_config_and_file_disagree(models, tmp_path):
    ref, _, folder = models
    bad = tmp_path / "unet"
    shutil.copytree(folder, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["in_channels"] = 20 - cfg["in_channels"]  # 12 <-> 8
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="conv_in.weight"):
        load_unet(bad, dtype="fp32")
    cfg["in_channels"] = ref.config.in_channels
    cfg["out_channels"] = 8
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="out_channels"):
        load_unet(bad, dtype="fp32")


def test_input_validation(models):
    ref, model, _ = models
    inp = inputs(1, ref.config.in_channels, distinct=True)
    with pytest.raises(ValueError, match="multiple of 8"):
        model(inp["sample"][..., :12, :20], C_NOISE, inp["context"], inp["ids"])
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(inp["sample"], C_NOISE, inp["context"][:, :3], inp["ids"])


def test_single_token_cross_attention_shortcut_is_exact():
    """Spec 3.7: with one context token the softmax is exactly 1; the shortcut equals the full path."""
    from daemon.model.attention import attention, merge_heads, split_heads
    from daemon.model.transformer import Attention, add_broadcast

    rng = np.random.default_rng(3)
    attn = Attention(query_dim=64, heads=2, dim_head=32, cross_attention_dim=16)
    x = jt.array(rng.standard_normal((3, 10, 64)).astype(np.float32))
    ctx = jt.array(rng.standard_normal((3, 1, 16)).astype(np.float32))
    fast = add_broadcast(jt.zeros((3, 10, 64)), attn(x, ctx)).numpy()
    q, k, v = (split_heads(t, 2) for t in (attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)))
    full = attn.to_out[0](merge_heads(attention(q, k, v, attn.scale), 2)).numpy()
    np.testing.assert_allclose(fast, full, rtol=0, atol=1e-6 * np.abs(full).max())


def test_module_tree_mirrors_diffusers_keys():
    """The Jittor tree of the tiny config has exactly diffusers' state-dict keys and shapes."""
    from daemon.model.loader import module_shapes

    ref = make_reference(12, seed=0)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert module_shapes(UNetVid2Vid(**dict(ref.config))) == want


def test_loaded_model_has_file_weights(models):
    ref, model, folder = models
    from safetensors.numpy import load_file

    tensors = load_file(str(Path(folder) / "diffusion_pytorch_model.safetensors"))
    got = model.state_dict()
    for key in ("conv_in.weight", "down_blocks.0.attentions.0.time_mixer.mix_factor", "conv_out.bias"):
        np.testing.assert_array_equal(got[key].numpy(), tensors[key])


def test_transformer_multi_token_context_matches_diffusers():
    """The general (multi-token) cross-attention path through attention(), at transformer level."""
    from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel as Ref

    from daemon.model.transformer import TransformerSpatioTemporalModel

    torch.manual_seed(5)
    ref = Ref(num_attention_heads=2, attention_head_dim=32, in_channels=64, cross_attention_dim=16).eval()
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    model = TransformerSpatioTemporalModel(2, 32, 64, 16)
    params = model.state_dict()
    assert set(params) == set(ref.state_dict())
    for key, value in ref.state_dict().items():
        params[key].assign(jt.array(value.numpy()))
    b, f, lc = 2, 3, 3
    rng = np.random.default_rng(7)
    x = rng.standard_normal((b * f, 64, 4, 6)).astype(np.float32)
    ctx = rng.standard_normal((b * f, lc, 16)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.from_numpy(ctx), image_only_indicator=torch.zeros(b, f),
                   return_dict=False)[0].numpy()
    got = model(jt.array(x), jt.array(ctx), f).numpy()
    assert rel_err(got, want) <= FP32_TOL
