"""`geometryd weights`: pull plan (pure), offline fail-fast, `check` on synthetic header-only files.

Full-size checkpoints cannot be written here, so the complete layout is made of header-only safetensors
files: a real header describing the official shapes, and a data section made sparse with ``truncate`` (no
disk blocks, no RAM). The header reader never reads the data section.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from daemon.commands import weights as weights_cli
from daemon.weights import manifest
from daemon.weights import pull as weights
from daemon.weights.manifest import COMPONENTS, check_model_dir, load_manifest, read_safetensors_header

REPO = Path(__file__).resolve().parents[2]
SHARED_KEYS = REPO.parent / "shared" / "spec" / "geometrycrafter_keys"
DTYPE_BYTES = {"F16": 2, "F32": 4}


def write_header_only(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """A valid safetensors file whose data section is a sparse hole (written with truncate)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, (dtype, shape) in tensors.items():
        n = DTYPE_BYTES[dtype] * int(np.prod(shape, dtype=np.int64))
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)


def manifest_tensors(name: str, dtype: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {k: (dtype, s) for k, s in load_manifest(name).items()}


# Official stored dtypes (spec 1.1).
COMPONENT_DTYPES = {
    "unet_diff": "F16", "unet_determ": "F16", "point_map_vae": "F32", "vae": "F16", "image_encoder": "F16",
}  # fmt: skip


CONFIGS = {  # the config.json values `weights check` compares (spec 1.2)
    "unet_diff/config.json": {"in_channels": 12, "out_channels": 4, "cross_attention_dim": 1024},
    "unet_determ/config.json": {"in_channels": 8, "out_channels": 4, "cross_attention_dim": 1024},
    "image_encoder/config.json": {"hidden_size": 1280, "num_hidden_layers": 32, "projection_dim": 1024},
}


def make_full_layout(root: Path, variant: str = "all") -> None:
    """Every file of `weights.pull_plan` at its destination, networks as header-only official-shape files."""
    for item in weights.pull_plan(variant):
        dest = root / item.dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        comp = COMPONENTS.get(dest.parent.name)
        if dest.suffix == ".safetensors":
            assert comp is not None and comp.manifest is not None
            write_header_only(dest, manifest_tensors(comp.manifest, COMPONENT_DTYPES[comp.name]))
        elif dest.suffix == ".json":
            dest.write_text(json.dumps(CONFIGS.get(str(item.dest), {})))
        else:  # moge/model.pt: sparse placeholder
            with dest.open("wb") as f:
                f.write(b"PK\x03\x04")
                f.truncate(1_257_000_000)


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`geometryd weights ARGS` in a subprocess (the real command line)."""
    return subprocess.run(
        [sys.executable, "-m", "daemon", "weights", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env,
    )  # fmt: skip


def run_main(*args: str) -> subprocess.CompletedProcess[str]:
    """The same command in-process (saves the ~0.5 s interpreter start-up per call)."""
    parser = argparse.ArgumentParser(prog="geometryd")
    weights_cli.register(parser.add_subparsers(dest="command"))  # only this module: others' files may be mid-edit
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        ns = parser.parse_args(["weights", *args])
        code = ns.func(ns)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def full_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("model")
    make_full_layout(root)
    return root


# ------------------------------------------------------------------------------------------------------
# manifests and the header reader


def test_packaged_manifests_equal_the_spec_copies() -> None:
    if not SHARED_KEYS.is_dir():
        pytest.skip("../shared/spec not present")
    for tsv in SHARED_KEYS.glob("*.tsv"):
        assert (manifest.MANIFEST_DIR / tsv.name).read_text() == tsv.read_text(), tsv.name


def test_manifest_counts_match_spec() -> None:
    # spec 2.1-2.4: tensor counts and parameter counts
    counts = {
        "unet_diff_in12": 1428, "unet_determ_in8": 1428, "point_map_vae": 441, "svd_vae": 374, "clip_vision": 520,
    }  # fmt: skip
    params = {"unet_diff_in12": 1_524_634_602, "unet_determ_in8": 1_524_623_082, "point_map_vae": 98_241_316,
              "svd_vae": 97_742_847, "clip_vision": 632_076_800}  # fmt: skip
    for name, n in counts.items():
        m = load_manifest(name)
        assert len(m) == n
        assert sum(int(np.prod(s)) for s in m.values()) == params[name]


def test_header_reader_agrees_with_safetensors(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.numpy import save_file

    arrays = {
        "a.weight": np.zeros((3, 4, 1, 1), np.float16),
        "b.bias": np.ones((7,), np.float32),
        "c": np.zeros((2, 0), np.float32),
    }
    path = tmp_path / "x.safetensors"
    save_file(arrays, str(path))
    got = read_safetensors_header(path)
    with safe_open(str(path), framework="np") as f:
        assert set(f.keys()) == set(got)
        for k in f.keys():
            assert tuple(f.get_slice(k).get_shape()) == got[k].shape
    assert {k: v.dtype for k, v in got.items()} == {"a.weight": "F16", "b.bias": "F32", "c": "F32"}


def test_header_reader_rejects_truncated_and_garbage(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    write_header_only(path, {"w": ("F16", (1024, 1024))})
    os.truncate(path, path.stat().st_size - 1)
    with pytest.raises(manifest.HeaderError, match="truncated"):
        read_safetensors_header(path)
    path.write_bytes(struct.pack("<Q", 5) + b"nope!")
    with pytest.raises(manifest.HeaderError, match="not JSON"):
        read_safetensors_header(path)
    path.write_bytes(struct.pack("<Q", 10**12))
    with pytest.raises(manifest.HeaderError, match="header length"):
        read_safetensors_header(path)


def test_header_reader_never_reads_the_data(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    write_header_only(path, {"w": ("F32", (40_000, 40_000))})  # a 6.4 GB sparse file
    assert path.stat().st_size > 6 * 10**9
    assert path.stat().st_blocks * 512 < 10**6  # sparse: no data blocks to read
    t0 = time.perf_counter()
    assert read_safetensors_header(path)["w"].shape == (40_000, 40_000)
    assert time.perf_counter() - t0 < 1.0


# ------------------------------------------------------------------------------------------------------
# weights check


def test_check_complete_official_layout_passes(full_layout: Path) -> None:
    reports = check_model_dir(full_layout)
    assert all(r.ok for r in reports), [p for r in reports for p in r.problems]
    by_name = {r.name: r for r in reports}
    assert by_name["unet_diff"].tensors == 1428 and by_name["unet_diff"].dtypes == {"F16": 1428}
    assert by_name["point_map_vae"].dtypes == {"F32": 441}
    out = run_cli("check", str(full_layout))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok (keys and shapes)" in out.stdout
    assert "F16 x1428" in out.stdout


def _copy_layout(src: Path, dst: Path) -> Path:
    """Cheap copy of the layout (json/pt small or sparse files re-created, safetensors re-written sparse)."""
    for path in src.rglob("*"):
        if path.is_file():
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".safetensors":
                tensors = {k: (v.dtype, v.shape) for k, v in read_safetensors_header(path).items()}
                write_header_only(target, tensors)
            elif path.suffix == ".pt":
                with target.open("wb") as f:
                    f.truncate(path.stat().st_size)
            else:
                target.write_bytes(path.read_bytes())
    return dst


def test_check_names_each_problem(full_layout: Path, tmp_path: Path) -> None:
    root = _copy_layout(full_layout, tmp_path / "m")
    # unet_diff: one key missing, one unexpected, one mis-shaped (the determ conv_in in the diff folder)
    unet = manifest_tensors("unet_diff_in12", "F16")
    del unet["mid_block.attentions.0.proj_in.weight"]
    unet["conv_in.weight"] = ("F16", (320, 8, 3, 3))
    unet["extra.lora_A.weight"] = ("F16", (4, 320))
    write_header_only(root / "unet_diff/diffusion_pytorch_model.safetensors", unet)
    # point_map_vae: truncated download
    pm = root / "point_map_vae/diffusion_pytorch_model.safetensors"
    os.truncate(pm, pm.stat().st_size // 2)
    # scheduler json and moge checkpoint missing
    (root / "scheduler/scheduler_config.json").unlink()
    (root / "moge/model.pt").unlink()
    (root / "image_encoder/config.json").unlink()
    (root / "unet_determ/config.json").write_text(json.dumps({"in_channels": 12, "out_channels": 4}))

    out = run_main("check", str(root))
    assert out.returncode == 1
    text = out.stdout
    unet_file = "unet_diff/diffusion_pytorch_model.safetensors"
    assert f"{unet_file}: missing key mid_block.attentions.0.proj_in.weight [1280, 1280]" in text
    assert "unexpected key extra.lora_A.weight [4, 320]" in text
    assert "mis-shaped key conv_in.weight: [320, 8, 3, 3], expected [320, 12, 3, 3]" in text
    assert "point_map_vae/diffusion_pytorch_model.safetensors: unreadable safetensors header" in text
    assert "truncated" in text
    assert "scheduler/scheduler_config.json: missing" in text
    assert "image_encoder/config.json: missing" in text
    assert "moge/model.pt: missing" in text
    assert "unet_determ/config.json: in_channels = 12, expected 8" in text
    for good in ("vae", "feature_extractor"):
        assert any(line.startswith(good) and " ok " in line for line in text.splitlines()), good
    assert "FAIL (keys and shapes): 6 of 8 parts have problems" in text


def test_check_accepts_legacy_attention_names_position_ids_no_decoder(
    full_layout: Path, tmp_path: Path
) -> None:
    root = _copy_layout(full_layout, tmp_path / "m")
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    vae = {}
    for k, v in manifest_tensors("svd_vae", "F16").items():
        if k.startswith("decoder."):
            continue  # spec 2.3: a file with only the parts used
        for new, old in legacy.items():
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        vae[k] = v
    assert "encoder.mid_block.attentions.0.query.weight" in vae
    write_header_only(root / "vae/diffusion_pytorch_model.fp16.safetensors", vae)
    clip = manifest_tensors("clip_vision", "F16")
    clip["vision_model.embeddings.position_ids"] = ("F16", (1, 257))
    write_header_only(root / "image_encoder/model.fp16.safetensors", clip)
    reports = {r.name: r for r in check_model_dir(root)}
    assert reports["vae"].ok, reports["vae"].problems
    assert reports["image_encoder"].ok, reports["image_encoder"].problems
    # a legacy key whose modern twin is also present is a duplicate
    vae["encoder.mid_block.attentions.0.to_q.weight"] = ("F16", (512, 512))
    write_header_only(root / "vae/diffusion_pytorch_model.fp16.safetensors", vae)
    assert any("duplicate key" in p for p in manifest.check_component(root, COMPONENTS["vae"]).problems)


CLIP_DEEP_LAYERS = tuple(f"vision_model.encoder.layers.{i}." for i in range(2, 32))
SHORTCUT = "down_blocks.2.resnets.0.spatial_res_block.conv_shortcut"  # 640->1280 officially, 64->64 tiny
EXTRA_SHORTCUT = "down_blocks.0.resnets.1.spatial_res_block.conv_shortcut.weight"


def test_structure_only_passes_tiny_shapes_but_full_check_fails(tmp_path: Path) -> None:
    root = tmp_path / "tiny"
    make_full_layout(root)
    # What daemon/weights/configs.py changes: every width (shapes), CLIP depth (2 layers, declared in its
    # config.json), and so the conv_shortcuts of resnets that no longer change width.
    for comp in (c for c in COMPONENTS.values() if c.manifest):
        for path in (root / comp.name).glob("*.safetensors"):
            official = load_manifest(comp.manifest)
            tensors = {k: ("F32", tuple(min(d, 2) for d in s)) for k, s in official.items()}
            if comp.name == "image_encoder":
                tensors = {k: v for k, v in tensors.items() if not k.startswith(CLIP_DEEP_LAYERS)}
                (root / comp.name / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
            if comp.name.startswith("unet_"):
                del tensors[f"{SHORTCUT}.weight"], tensors[f"{SHORTCUT}.bias"]
                tensors[EXTRA_SHORTCUT] = ("F32", (2, 2, 1, 1))
            write_header_only(path, tensors)
    out = run_main("check", str(root), "--structure-only")
    assert out.returncode == 0, out.stdout
    assert "ok (structure)" in out.stdout
    out = run_main("check", str(root))
    assert out.returncode == 1
    assert "mis-shaped key conv_in.weight: [2, 2, 2, 2], expected [320, 12, 3, 3]" in out.stdout
    assert "missing key vision_model.encoder.layers.2.self_attn.k_proj.weight" in out.stdout
    assert f"missing key {SHORTCUT}.weight [1280, 640, 1, 1]" in out.stdout
    assert f"unexpected key {EXTRA_SHORTCUT}" in out.stdout
    # structure-only still catches a missing key, and a shortcut on a resnet the manifest does not have
    tensors = {k: ("F32", (1,)) for k in load_manifest("point_map_vae") if k != "decoder.conv_in.bias"}
    tensors["decoder.up_blocks.9.resnets.0.conv_shortcut.weight"] = ("F32", (1,))
    write_header_only(root / "point_map_vae/diffusion_pytorch_model.safetensors", tensors)
    out = run_main("check", str(root), "--structure-only")
    assert out.returncode == 1 and "missing key decoder.conv_in.bias" in out.stdout
    assert "unexpected key decoder.up_blocks.9.resnets.0.conv_shortcut.weight" in out.stdout


def test_check_variant_and_missing_folder(tmp_path: Path) -> None:
    root = tmp_path / "m"
    make_full_layout(root, variant="diff")
    assert run_main("check", str(root), "--variant", "diff").returncode == 0
    out = run_main("check", str(root))
    assert out.returncode == 1 and "unet_determ/: folder missing" in out.stdout
    out = run_main("check", str(tmp_path / "nope"))
    assert out.returncode == 1 and "no such folder" in out.stderr


# ------------------------------------------------------------------------------------------------------
# weights pull


def test_pull_plan_is_the_spec_file_list() -> None:
    plan = weights.pull_plan()
    dests = {str(p.dest) for p in plan}
    assert dests == {
        "unet_diff/config.json", "unet_diff/diffusion_pytorch_model.safetensors",
        "unet_determ/config.json", "unet_determ/diffusion_pytorch_model.safetensors",
        "point_map_vae/config.json", "point_map_vae/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors",
        "image_encoder/config.json", "image_encoder/model.fp16.safetensors",
        "feature_extractor/preprocessor_config.json", "scheduler/scheduler_config.json",
        "moge/model.pt",
    }  # fmt: skip
    repos = {str(p.dest).split("/")[0]: p.repo_id for p in plan}
    assert repos["unet_diff"] == repos["point_map_vae"] == "TencentARC/GeometryCrafter"
    assert repos["vae"] == repos["image_encoder"] == repos["scheduler"] == weights.SVD_REPO
    assert weights.SVD_REPO == "stabilityai/stable-video-diffusion-img2vid-xt"
    assert repos["moge"] == "Ruicheng/moge-vitl"
    assert all(p.revision == weights.DEFAULT_REVISIONS[p.repo_id] for p in plan)
    # every weights file in the plan is one `weights check` accepts
    for p in plan:
        if p.dest.suffix == ".safetensors":
            assert p.dest.name in COMPONENTS[p.dest.parent.name].weight_files


def test_pull_plan_variant_and_revisions() -> None:
    plan = weights.pull_plan("determ", weights.parse_revisions(["Ruicheng/moge-vitl=abc123"]))
    assert not any(str(p.dest).startswith("unet_diff/") for p in plan)
    assert any(str(p.dest).startswith("unet_determ/") for p in plan)
    assert next(p for p in plan if p.repo_id == "Ruicheng/moge-vitl").revision == "abc123"
    with pytest.raises(ValueError, match="REPO=REVISION"):
        weights.parse_revisions(["someone/else=1"])
    out = run_main("pull", "--to", "/tmp/x", "--revision", "nonsense")
    assert out.returncode == 2 and "REPO=REVISION" in out.stderr


def test_pull_dry_run_prints_plan(tmp_path: Path) -> None:
    out = run_main("pull", "--to", str(tmp_path), "--dry-run")
    assert out.returncode == 0
    assert len(out.stdout.splitlines()) == len(weights.pull_plan())
    assert f"{tmp_path}/moge/model.pt" in out.stdout
    assert list(tmp_path.iterdir()) == []


def test_pull_offline_fails_fast_with_clear_message(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    out = run_cli("pull", "--to", str(tmp_path / "w"), env=env, timeout=60)
    assert out.returncode == 1
    assert out.stderr.splitlines() == [out.stderr.strip()]  # one line
    assert "HF_HUB_OFFLINE is set" in out.stderr
    assert time.perf_counter() - t0 < 15
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").rglob("*.safetensors"))


def test_hub_client_offline_error_is_explained(tmp_path: Path) -> None:
    """Past our own pre-check, the hub client itself fails fast offline; the error becomes one clear line."""
    code = (
        "import sys; from pathlib import Path; from daemon.weights import pull as weights\n"
        "weights.hub_offline = lambda: False\n"
        "try:\n"
        f"    weights.pull(Path({str(tmp_path / 'w')!r}), weights.pull_plan('diff')[:1])\n"
        "except weights.PullError as e:\n"
        "    print(e); sys.exit(3)\n"
    )
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert out.returncode == 3, out.stdout + out.stderr
    assert "TencentARC/GeometryCrafter/unet_diff/config.json" in out.stdout
    assert "cannot reach the hub" in out.stdout
    assert time.perf_counter() - t0 < 20


def test_gated_error_message_names_token_and_licence() -> None:
    from huggingface_hub import errors

    httpx = pytest.importorskip(errors.HfHubHTTPError.__mro__[1].__module__.split(".")[0])
    item = next(p for p in weights.pull_plan() if p.repo_id == weights.SVD_REPO)
    url = f"https://huggingface.co/{item.repo_id}/resolve/main/{item.filename}"

    def response(status: int):  # what the hub client attaches to its errors
        return httpx.Response(status, request=httpx.Request("GET", url))

    msg = weights._explain(errors.GatedRepoError("gated", response=response(403)), item)
    assert "HTTP 403" in msg and "HF_TOKEN" in msg and "licence" in msg
    assert "https://huggingface.co/" + weights.SVD_REPO in msg
    msg = weights._explain(errors.HfHubHTTPError("unauthorised", response=response(401)), item)
    assert "HTTP 401" in msg and "HF_TOKEN" in msg
    msg = weights._explain(errors.RevisionNotFoundError("nope", response=response(404)), item)
    assert f"--revision {weights.SVD_REPO}=" in msg


# ------------------------------------------------------------------------------------------------------
# weights make-tiny (delegates to daemon.weights.tiny; slow: builds tiny torch models)


@pytest.mark.slow
def test_make_tiny_folder_passes_structure_check(tmp_path: Path) -> None:
    tiny = pytest.importorskip("daemon.weights.tiny")
    try:
        import daemon.model as dm

        if not hasattr(dm, "init_point_map_vae"):
            pytest.skip("daemon.model.init_point_map_vae not available yet")
    except ImportError:
        pytest.skip("daemon.model not available yet")
    del tiny
    out = run_cli("make-tiny", str(tmp_path / "tiny"), "--seed", "1", timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    out = run_main("check", str(tmp_path / "tiny"), "--structure-only")
    assert out.returncode == 0, out.stdout
