"""Strict checkpoint loader (daemon/model/loader.py): errors, file selection, dtype policy, memory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from daemon.jittor_env import import_jittor

jt = import_jittor()

from daemon.model import blocks as B  # noqa: E402
from daemon.model.loader import (  # noqa: E402
    CheckpointError,
    find_weights,
    load_into,
    read_config,
    read_header,
    save_module,
)
from daemon.model.vae import legacy_attention_key  # noqa: E402


def _module():
    return B.ResnetBlock2D(32, 64, 16, 1e-6)


def _state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {k: tuple(v.shape) for k, v in _module().state_dict().items()}
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def test_roundtrip_exact_and_dtype_policy(tmp_path: Path):
    state = _state()
    save_file(state, str(tmp_path / "w.safetensors"))
    m = _module()
    counts = load_into(m, tmp_path / "w.safetensors", dtype="fp32")
    assert counts["tensors"] == len(state)
    for k, v in m.state_dict().items():
        assert v.dtype == "float32" and np.array_equal(v.numpy(), state[k])
    m16 = _module()
    load_into(m16, tmp_path / "w.safetensors", dtype="fp16", keep_fp32=("norm*",))
    sd = m16.state_dict()
    assert sd["conv1.weight"].dtype == "float16" and sd["norm1.weight"].dtype == "float32"
    assert np.array_equal(sd["conv1.weight"].numpy(), state["conv1.weight"].astype(np.float16))
    # fp16 file, fp32 run (SVD VAE policy): exact upcast of the stored values
    save_file({k: v.astype(np.float16) for k, v in state.items()}, str(tmp_path / "h.safetensors"))
    mu = _module()
    load_into(mu, tmp_path / "h.safetensors", dtype="fp32")
    got = mu.state_dict()["conv2.weight"]
    assert got.dtype == "float32"
    assert np.array_equal(got.numpy(), state["conv2.weight"].astype(np.float16).astype(np.float32))


def test_missing_unexpected_misshaped_all_listed(tmp_path: Path):
    state = _state()
    del state["conv1.weight"], state["norm2.bias"]
    state["extra.weight"] = np.zeros(3, np.float32)
    state["conv2.weight"] = np.zeros((64, 64, 1, 1), np.float32)
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_into(_module(), tmp_path / "w.safetensors")
    msg = str(e.value)
    assert "w.safetensors" in msg
    assert "2 missing" in msg and "conv1.weight" in msg and "norm2.bias" in msg
    assert "1 unexpected" in msg and "extra.weight" in msg
    assert "1 mis-shaped" in msg and "conv2.weight file [64, 64, 1, 1] vs model [64, 64, 3, 3]" in msg


def test_long_lists_are_truncated_with_counts(tmp_path: Path):
    state = _state()
    for i in range(30):
        state[f"junk.{i}"] = np.zeros(1, np.float32)
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError, match=r"30 unexpected: \[.*\.\.\. \(\+10 more\)\]"):
        load_into(_module(), tmp_path / "w.safetensors")


def test_ignore_patterns_and_key_map(tmp_path: Path):
    state = _state()
    state["decoder.whatever.weight"] = np.zeros(4, np.float32)
    save_file(state, str(tmp_path / "w.safetensors"))
    counts = load_into(_module(), tmp_path / "w.safetensors", ignore=("decoder.*",))
    assert counts["ignored"] == 1
    renamed = {("old_" + k if k.startswith("conv1") else k): v for k, v in state.items()}
    save_file(renamed, str(tmp_path / "r.safetensors"))
    m = _module()
    load_into(m, tmp_path / "r.safetensors", ignore=("decoder.*",), key_map=lambda k: k.removeprefix("old_"))
    assert np.array_equal(m.state_dict()["conv1.weight"].numpy(), state["conv1.weight"])
    pre = "encoder.mid_block.attentions.0."
    assert legacy_attention_key(pre + "query.weight") == pre + "to_q.weight"
    assert legacy_attention_key(pre + "proj_attn.bias") == pre + "to_out.0.bias"
    assert legacy_attention_key("encoder.conv_in.weight") == "encoder.conv_in.weight"


def test_integer_tensor_refused(tmp_path: Path):
    state = _state()
    state["conv1.bias"] = np.arange(64, dtype=np.int64)
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError, match=r"non-float tensors.*conv1\.bias \(I64\)"):
        load_into(_module(), tmp_path / "w.safetensors")


def test_corrupt_files(tmp_path: Path):
    save_file(_state(), str(tmp_path / "w.safetensors"))
    data = (tmp_path / "w.safetensors").read_bytes()
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"not json at all!" + data[24:])
    with pytest.raises(CheckpointError, match=r"garbage\.safetensors: corrupt safetensors header"):
        load_into(_module(), garbage)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes((10**12).to_bytes(8, "little") + data[8:])
    with pytest.raises(CheckpointError, match="huge.safetensors: corrupt safetensors header"):
        read_header(huge)
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"trunc\.safetensors: truncated safetensors file \('"):
        load_into(_module(), truncated)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="tiny.safetensors"):
        load_into(_module(), tiny)


def test_one_header_reader_with_absolute_offsets(tmp_path: Path):
    """The loader uses the weights checker's reader (one TensorInfo); bytes past the last tensor are a corrupt
    file for both, as for safetensors itself (the loader's own parser used to accept them)."""
    from daemon.model import loader
    from daemon.weights import manifest

    assert loader.TensorInfo is manifest.TensorInfo
    path = tmp_path / "w.safetensors"
    state = _state()
    save_file(state, str(path))
    header = read_header(path)
    with open(path, "rb") as f:
        for key, info in header.items():
            f.seek(info.start)
            assert np.array_equal(np.frombuffer(f.read(info.end - info.start), np.float32).reshape(info.shape),
                                  state[key])
    with open(path, "ab") as f:
        f.write(b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"w\.safetensors: .*longer than its header says"):
        load_into(_module(), path)


def test_find_weights_and_config(tmp_path: Path):
    with pytest.raises(CheckpointError, match="config.json not found"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{bad")
    with pytest.raises(CheckpointError, match="unreadable config"):
        read_config(tmp_path)
    with pytest.raises(CheckpointError, match="no weights file"):
        find_weights(tmp_path)
    (tmp_path / "model.fp16.safetensors").write_bytes(b"")
    assert find_weights(tmp_path).name == "model.fp16.safetensors"
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert find_weights(tmp_path).name == "model.safetensors"
    assert find_weights(tmp_path, variant="fp16").name == "model.fp16.safetensors"
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert find_weights(tmp_path).name == "diffusion_pytorch_model.safetensors"


def test_save_module_roundtrip(tmp_path: Path):
    m = _module()
    path = save_module(m, tmp_path / "out", {"a": 1}, "diffusion_pytorch_model.safetensors")
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {"a": 1}
    m2 = _module()
    load_into(m2, path)
    for k, v in m.state_dict().items():
        assert np.array_equal(v.numpy(), m2.state_dict()[k].numpy())


_PEAK_SCRIPT = """
import json, sys
from pathlib import Path
from daemon.jittor_env import import_jittor
jt = import_jittor()
import numpy as np
from safetensors.numpy import load_file
from daemon.model import blocks as B
from daemon.model.loader import load_into

def status_kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])

class Big(jt.nn.Module):
    def __init__(self):
        self.layers = jt.nn.ModuleList([B.Linear(1024, 1024, bias=False) for _ in range(16)])

path = sys.argv[1]
m = Big()  # lazily initialised: the random init is never executed, loading replaces it
try:
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
except OSError:
    print(json.dumps({"skip": True})); raise SystemExit(0)
base = status_kb("VmRSS")
load_into(m, path, dtype="fp32")
peak = status_kb("VmHWM") - base
same = bool(np.array_equal(m.layers[3].weight.numpy(), load_file(path)["layers.3.weight"]))
print(json.dumps({"peak_kb": peak, "same": same}))
"""


def test_peak_host_memory_is_bounded(tmp_path: Path):
    """Peak RSS growth while loading a 64 MiB fp32 file stays <= 1.2x the file size. Measured in a fresh
    process: in the test process, heap freed by earlier tests is reused and the growth reads too low."""
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    state = {f"layers.{i}.weight": rng.standard_normal((1024, 1024)).astype(np.float32) for i in range(16)}
    path = tmp_path / "big.safetensors"
    save_file(state, str(path))
    del state
    size_kb = path.stat().st_size / 1024
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(path)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res.get("skip"):
        pytest.skip("cannot reset VmHWM on this kernel")
    peak = res["peak_kb"]
    # measured 1.06x; the lower bound shows the parameters really became resident during the load
    msg = f"peak RSS growth {peak:.0f} kB for a {size_kb:.0f} kB file"
    assert 0.9 * size_kb <= peak <= 1.2 * size_kb, msg
    assert res["same"]
