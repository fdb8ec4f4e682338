"""The CPU backend of the Jittor networks (daemon/model/conv_cpu.py, daemon/model/norm_cpu.py) vs torch.

Shapes cover what the VAEs and the UNet use: 3x3 stride 1/2 with and without padding, 1x1, the temporal
(3,1) kernel with time-only padding, odd sizes. Measured here (fp32, max error / max value): convolutions
<= 1e-7 vs torch (mostly bit-equal: torch's CPU convolution is oneDNN too); GroupNorm(+SiLU) <= 1.1e-7 vs a
float64 torch reference, also at a large mean (1e3), where torch fp32 itself is off by 9e-6 and the former
graph GroupNorm by 6e-6. Bounds are a few times those.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from daemon.jittor_env import import_jittor
from daemon.model import conv_cpu, norm_cpu
from daemon.model.blocks import Conv2d, GroupNorm, LayerNorm, TemporalConv, matmul

jt = import_jittor()
ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(bool(jt.flags.use_cuda), reason="CPU backend only")


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_onednn_is_chosen_when_libdnnl_is_installed() -> None:
    if conv_cpu.dnnl_paths() is None:
        pytest.skip("libdnnl-dev not installed (scripts/setup.sh installs it)")
    name, reason = conv_cpu.backend()
    assert name == conv_cpu.ONEDNN, reason


@pytest.mark.parametrize("ci,co,k,stride,padding,h,w", [
    (8, 16, 3, 1, 1, 9, 11), (16, 8, 3, 2, 1, 10, 13), (8, 8, 3, 2, 0, 11, 11), (8, 24, 1, 1, 0, 7, 5),
    (4, 32, 3, 1, 1, 16, 32),
])
def test_conv2d_matches_torch(ci: int, co: int, k: int, stride: int, padding: int, h: int, w: int) -> None:
    rng = np.random.default_rng(ci * co + k)
    x = rng.standard_normal((3, ci, h, w)).astype(np.float32)
    conv = Conv2d(ci, co, k, stride=stride, padding=padding)
    want = F.conv2d(torch.from_numpy(x), torch.from_numpy(conv.weight.numpy()), torch.from_numpy(conv.bias.numpy()),
                    stride, padding).numpy()
    got = conv(jt.array(x)).numpy()
    assert got.shape == want.shape
    assert _rel(got, want) <= 5e-7


def _conv_residual_pad_case() -> tuple[float, float, float]:
    """Relative errors vs torch of: conv + residual (one primitive), conv with (top, left, bottom, right)
    padding (the VAE downsampler's right/bottom pad), and the temporal conv + residual."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 8, 9, 11)).astype(np.float32)
    r = rng.standard_normal((2, 16, 9, 11)).astype(np.float32)
    conv = Conv2d(8, 16, 3, padding=1)
    tw, tb = torch.from_numpy(conv.weight.numpy()), torch.from_numpy(conv.bias.numpy())
    want_r = (torch.from_numpy(r) + F.conv2d(torch.from_numpy(x), tw, tb, 1, 1)).numpy()
    err_r = _rel(conv(jt.array(x), residual=jt.array(r)).numpy(), want_r)
    down = Conv2d(8, 16, 3, stride=2, padding=0)
    dw, db = torch.from_numpy(down.weight.numpy()), torch.from_numpy(down.bias.numpy())
    want_p = F.conv2d(F.pad(torch.from_numpy(x), (0, 1, 0, 1)), dw, db, 2).numpy()
    got_p = down(jt.array(x), padding=(0, 0, 1, 1)).numpy()
    assert got_p.shape == want_p.shape
    err_p = _rel(got_p, want_p)
    x5 = rng.standard_normal((2, 16, 5, 3, 4)).astype(np.float32)
    tc = TemporalConv(16, 16, 3)
    want_t = (torch.from_numpy(x5) + F.conv3d(torch.from_numpy(x5), torch.from_numpy(tc.weight.numpy()),
                                              torch.from_numpy(tc.bias.numpy()), padding=(1, 0, 0))).numpy()
    err_t = _rel(tc(jt.array(x5), residual=jt.array(x5)).numpy(), want_t)
    return err_r, err_p, err_t


def test_conv_with_residual_and_explicit_padding_matches_torch() -> None:
    assert conv_cpu.backend()[0] == conv_cpu.ONEDNN
    assert max(_conv_residual_pad_case()) <= 5e-7


def test_fp16_conv_computes_in_fp32_and_rounds_once() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 16, 8, 8)).astype(np.float16)
    conv = Conv2d(16, 16, 3, padding=1)
    conv.weight = conv.weight.float16()
    conv.bias = conv.bias.float16()
    want = F.conv2d(torch.from_numpy(x).float(), torch.from_numpy(conv.weight.numpy()).float(),
                    torch.from_numpy(conv.bias.numpy()).float(), 1, 1).numpy()
    got = conv(jt.array(x))
    assert got.dtype == "float16"
    assert _rel(got.numpy().astype(np.float32), want) <= 1e-3  # one fp16 rounding (2^-11), not k*k of them


def test_temporal_conv_matches_torch_conv3d() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 16, 5, 6, 7)).astype(np.float32)
    tc = TemporalConv(16, 16, 3)
    want = F.conv3d(torch.from_numpy(x), torch.from_numpy(tc.weight.numpy()), torch.from_numpy(tc.bias.numpy()),
                    padding=(1, 0, 0)).numpy()
    got = tc(jt.array(x)).numpy()
    assert _rel(got, want) <= 5e-7


def test_matmul_matches_torch() -> None:
    rng = np.random.default_rng(5)
    a = rng.standard_normal((37, 64)).astype(np.float32)
    b = rng.standard_normal((64, 29)).astype(np.float32)
    got = matmul(jt.array(a), jt.array(b)).numpy()
    assert _rel(got, (torch.from_numpy(a) @ torch.from_numpy(b)).numpy()) <= 1e-6


@pytest.mark.parametrize(
    "n,lq,lk,heads,d,dv",
    [(3, 150, 150, 2, 16, 16), (4, 9, 9, 3, 8, 8), (2, 37, 200, 1, 64, 32), (1, 1, 5, 4, 2, 2)],
)  # spatial (several 64-row blocks and a remainder), temporal (L=9), cross-shaped, a single query row
def test_fused_attention_matches_torch_sdpa_per_head(n: int, lq: int, lk: int, heads: int, d: int,
                                                       dv: int) -> None:
    """cpu_attention on token-major [N,L,H*d] against torch SDPA on the same heads split out."""
    from daemon.model.attention import multi_head_attention

    rng = np.random.default_rng(lq + lk)
    q = (rng.standard_normal((n, lq, heads * d)) * 2).astype(np.float32)
    k = (rng.standard_normal((n, lk, heads * d)) * 2).astype(np.float32)
    v = rng.standard_normal((n, lk, heads * dv)).astype(np.float32)

    def split(x: np.ndarray, width: int) -> torch.Tensor:
        return torch.from_numpy(x).reshape(n, x.shape[1], heads, width).transpose(1, 2)

    ref = F.scaled_dot_product_attention(split(q, d), split(k, d), split(v, dv))
    ref_np = ref.transpose(1, 2).reshape(n, lq, heads * dv).numpy()
    fused = conv_cpu.attention_heads(jt.array(q), jt.array(k), jt.array(v), heads, d**-0.5)
    assert fused is not None  # oneDNN is installed here (test_onednn_is_chosen...)
    got = fused.numpy()
    assert got.shape == ref_np.shape
    assert _rel(got, ref_np) <= 1e-6, _rel(got, ref_np)
    routed = multi_head_attention(jt.array(q), jt.array(k), jt.array(v), heads).numpy()
    np.testing.assert_array_equal(routed, got)  # the networks' entry point takes the fused op


def test_op_module_is_named_by_source_content_not_by_checkout(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Two checkouts with the same op sources share one module; changed sources get another module.
    (Named after the op names only, a second checkout rebuilt the loaded .so of the first: a segfault.)"""
    cache = tmp_path / "cache"
    files, module = conv_cpu._staged_sources(cache)
    assert all(Path(f).is_file() and Path(f).parent.parent == cache / "geometryd_cpu_ops" for f in files)
    other = tmp_path / "checkout2" / "cpu_ops"
    other.mkdir(parents=True)
    for src in conv_cpu._OWN_OPS_DIR.iterdir():
        (other / src.name).write_bytes(src.read_bytes())
    monkeypatch.setattr(conv_cpu, "_OWN_OPS_DIR", other)
    assert conv_cpu._staged_sources(cache) == (files, module)  # same content elsewhere: same module
    name = f"{conv_cpu._OWN_OPS[0]}_op.cc"
    (other / name).write_text((other / name).read_text() + "\n// changed\n")
    files2, module2 = conv_cpu._staged_sources(cache)
    assert module2 != module and files2 != files
    assert Path(files[0]).parent.is_dir()  # the first module's sources are left alone


@pytest.mark.parametrize("shape,mean", [((2, 64, 6, 10), 0.0), ((1, 32, 3, 4, 5), 0.0), ((2, 64, 5, 7), 1e3)])
@pytest.mark.parametrize("act", ["", "silu"])
def test_group_norm_matches_torch(shape: tuple[int, ...], mean: float, act: str) -> None:
    rng = np.random.default_rng(6)
    x = (rng.standard_normal(shape) * 2 + mean).astype(np.float32)
    c = shape[1]
    gn = GroupNorm(32, c, 1e-6)
    gn.weight = jt.array(rng.standard_normal(c).astype(np.float32))
    gn.bias = jt.array(rng.standard_normal(c).astype(np.float32))
    want = F.group_norm(torch.from_numpy(x).double(), 32, torch.from_numpy(gn.weight.numpy()).double(),
                        torch.from_numpy(gn.bias.numpy()).double(), 1e-6)
    if act == "silu":
        want = F.silu(want)
    got = gn(jt.array(x), act=act).numpy()
    assert _rel(got, want.numpy()) <= 4e-7


@pytest.mark.parametrize("shape,mean", [((3, 10, 64), 0.0), ((7, 32), 0.0), ((2, 5, 96), 1e3)])
def test_layer_norm_matches_torch(shape: tuple[int, ...], mean: float) -> None:
    """LayerNorm on the CPU (one OpenMP kernel, norm_cpu.layer_norm) vs a float64 torch reference."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(shape) * 2 + mean).astype(np.float32)
    c = shape[-1]
    ln = LayerNorm(c)
    ln.weight = jt.array(rng.standard_normal(c).astype(np.float32))
    ln.bias = jt.array(rng.standard_normal(c).astype(np.float32))
    want = F.layer_norm(torch.from_numpy(x).double(), (c,), torch.from_numpy(ln.weight.numpy()).double(),
                        torch.from_numpy(ln.bias.numpy()).double(), 1e-5).numpy()
    got = ln(jt.array(x)).numpy()
    assert got.shape == want.shape and got.dtype == np.float32
    assert _rel(got, want) <= 4e-7


def test_group_norm_rejects_an_unknown_activation() -> None:
    with pytest.raises(ValueError, match="unknown activation"):
        norm_cpu.group_norm(jt.ones((1, 32, 2)), jt.ones((32,)), jt.zeros((32,)), 32, 1e-5, "relu")


def test_im2col_fallback_is_selectable_and_agrees() -> None:
    """GEOMETRYD_CPU_CONV=im2col (the path without libdnnl) gives the same convolution; a bad value is refused."""
    code = ("import numpy as np, torch, torch.nn.functional as F\n"
            "from daemon.jittor_env import import_jittor\njt = import_jittor()\n"
            "from daemon.model import conv_cpu\nfrom daemon.model.blocks import Conv2d\n"
            "assert conv_cpu.backend()[0] == 'im2col', conv_cpu.backend()\n"
            "x = np.random.default_rng(0).standard_normal((2, 8, 9, 9)).astype(np.float32)\n"
            "c = Conv2d(8, 16, 3, stride=2, padding=1)\n"
            "w = F.conv2d(torch.from_numpy(x), torch.from_numpy(c.weight.numpy()), torch.from_numpy(c.bias.numpy()),"
            " 2, 1).numpy()\n"
            "g = c(jt.array(x)).numpy()\nassert np.abs(g - w).max() / np.abs(w).max() <= 1.5e-6\n"
            "from test_conv_cpu import _conv_residual_pad_case\n"
            "assert max(_conv_residual_pad_case()) <= 1.5e-6, _conv_residual_pad_case()\nprint('OK')\n")
    env = {**os.environ, "GEOMETRYD_CPU_CONV": "im2col",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(Path(__file__).parent), str(ROOT / "tests")])}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    env["GEOMETRYD_CPU_CONV"] = "cudnn"
    bad = subprocess.run([sys.executable, "-c", "from daemon.model import conv_cpu; conv_cpu.backend()"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "GEOMETRYD_CPU_CONV must be one of" in bad.stderr
