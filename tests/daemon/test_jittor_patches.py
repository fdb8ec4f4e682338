"""The CUDA 13 Jittor patcher (daemon/jittor_patches.py) on copies of the installed Jittor package.

Every patch is checked by content, idempotence and reversal by sha256 of every file, refusal on a missing
anchor or another version, and (where nvcc exists) that the patched CUDA sources compile with CUDA 13 while
the originals do not. No test imports Jittor.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from daemon import jittor_patches as jp

CHANGED = {
    "extern/cuda/inc/helper_cuda.h",
    "compiler.py",
    "compile_extern.py",
    "other/code_softmax.py",
}
REMOVED = {
    "extern/cuda/cudnn/ops/cudnn_rnn_backward_x_op.cc",
    "extern/cuda/cudnn/ops/cudnn_rnn_backward_x_op.h",
    "extern/cuda/cudnn/ops/cudnn_rnn_op.cc",
    "extern/cuda/cudnn/ops/cudnn_rnn_op.h",
    "extern/cuda/cudnn/src/cudnn_rnn_descriptor.cc",
    "extern/cuda/cudnn/inc/cudnn_rnn_descriptor.h",
}


def tree_hashes(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unpatched copy of the installed Jittor (reverted first if this machine's Jittor was patched)."""
    dst = tmp_path_factory.mktemp("pristine") / "jittor"
    shutil.copytree(jp.installed_jittor_dir(), dst, ignore=shutil.ignore_patterns("__pycache__"))
    jp.revert(dst)
    assert all(s.state == jp.PENDING for s in jp.status(dst)), "installed Jittor is partly patched by hand"
    return dst


@pytest.fixture
def tree(pristine: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "jittor"
    shutil.copytree(pristine, dst)
    return dst


def nvcc_std_flags(jittor_dir: Path, nvcc_version: list[int]) -> list[str]:
    """The -std flags the tree's compiler.py passes to nvcc: its Linux cc_flags line through its own
    convert_nvcc_flags(), both taken from the file's AST (no Jittor import)."""
    module = ast.parse((jittor_dir / "compiler.py").read_text())
    cc_line = next(
        n
        for n in module.body
        if isinstance(n, ast.AugAssign)
        and getattr(n.target, "id", "") == "cc_flags"
        and "-std=" in ast.unparse(n.value)
    )
    cc_flags = ast.literal_eval(cc_line.value)
    convert = next(
        n for n in ast.walk(module) if isinstance(n, ast.FunctionDef) and n.name == "convert_nvcc_flags"
    )
    ns = {"os": SimpleNamespace(name="posix", path=os.path, environ={}), "nvcc_version": nvcc_version,
          "cc_path": "g++", "jittor_path": str(jittor_dir)}
    exec(compile(ast.Module(body=[convert], type_ignores=[]), "compiler.py", "exec"), ns)
    flags = ns["convert_nvcc_flags"](cc_flags).split()
    return [f for f in flags if "std" in f]


def softmax_cu(jittor_dir: Path, length: int = 1000) -> str:
    """The CUDA source other/code_softmax.py generates for softmax over ``length`` (float32), wrapped the way
    jt.code wraps it (header, kernel inside ``namespace jittor``). The generator runs for real; only jt.code
    and jt.Function are stand-ins that capture the strings."""
    path = jittor_dir / "other/code_softmax.py"
    module = ast.parse(path.read_text())
    module.body = [n for n in module.body if not isinstance(n, (ast.Import, ast.ImportFrom))]
    captured: dict[str, str] = {}

    class Function:
        def __call__(self, *args):  # type: ignore[no-untyped-def]
            return self.execute(*args)

    def code(shape, dtype, inputs, cuda_header="", cuda_src=""):  # type: ignore[no-untyped-def]
        captured.setdefault("header", cuda_header)
        captured.setdefault("src", cuda_src)

    jt = SimpleNamespace(flags=SimpleNamespace(use_cuda=1), Function=Function, code=code,
                         compile_extern=SimpleNamespace(cub_home=""))
    ns: dict = {"jt": jt, "nn": None}
    exec(compile(module, str(path), "exec"), ns)
    ns["softmax_v1"](SimpleNamespace(shape=(4, length), dtype="float32"))
    # The host part after the kernel uses jt.code's op variables; the kernel is what CUDA 13 must accept.
    kernel = captured["src"].split("\nint len = in0->shape")[0]
    kernel = kernel.replace("@expand_op(log,@in0_type,vsum)", "logf(vsum)")
    return "#define in0_type float\n#define out0_type float\n" + captured["header"] + (
        "namespace jittor {\n" + kernel + "\n}\n"
    )


# --- apply / idempotence / revert ---------------------------------------------------------------------------


def test_apply_changes_exactly_the_five_patches(tree: Path, pristine: Path) -> None:
    before = tree_hashes(tree)
    assert [s.state for s in jp.status(tree)] == [jp.PENDING] * 5
    result = jp.apply(tree)
    assert [(s.name, s.state) for s in result] == [(p.name, jp.APPLIED) for p in jp.PATCHES]
    assert [s.state for s in jp.status(tree)] == [jp.APPLIED] * 5

    helper = (tree / "extern/cuda/inc/helper_cuda.h").read_text()
    assert "deviceProp.computeMode" not in helper and "deviceProp.clockRate" not in helper
    assert helper.count("geometrydDeviceAttribute(cudaDevAttrComputeMode,") == 3
    assert helper.count("geometrydDeviceAttribute(cudaDevAttrClockRate, current_device)") == 1
    assert "inline int geometrydDeviceAttribute(cudaDeviceAttr attr, int device)" in helper

    compiler = (tree / "compiler.py").read_text()
    assert re.search(r'^cc_flags \+= " -Wall -Wno-unknown-pragmas -std=c\+\+17 -fPIC "', compiler, re.M)
    assert not re.search(r"^[^#]*nvcc_flags\.replace\(\"-std=c\+\+17\", \"-std=c\+\+14", compiler, re.M)
    assert nvcc_std_flags(tree, [13, 0, 88]) == ["-std=c++17"]
    assert nvcc_std_flags(pristine, [13, 0, 88]) == ["-std=c++14"]

    extern = (tree / "compile_extern.py").read_text()
    assert 'libs = ["libcudnn_ops.so", "libcudnn_cnn.so"]' in extern
    assert "libcudnn_ops_infer.so" not in extern and "libcudnn_cnn_train.so\"" not in extern

    softmax = (tree / "other/code_softmax.py").read_text()
    assert "cub::Max()" not in softmax and "Reduce(v1, cuda::maximum<>())" in softmax

    for rel in REMOVED:
        assert not (tree / rel).exists()
    cudnn_sources = [p.read_text() for p in (tree / "extern/cuda/cudnn").rglob("*") if p.is_file()]
    assert not any("cudnn_rnn_descriptor" in s or "RnnDescriptor" in s for s in cudnn_sources)

    after = tree_hashes(tree)
    ours = {k for k in after if k == jp.MANIFEST_NAME or k.startswith(jp.BACKUP_DIR + "/")}
    changed = {k for k in before if k not in REMOVED and after.get(k) != before[k]}
    assert changed == CHANGED
    assert set(after) - ours == set(before) - REMOVED
    assert {k.removeprefix(jp.BACKUP_DIR + "/") for k in ours - {jp.MANIFEST_NAME}} == CHANGED | REMOVED

    manifest = json.loads((tree / jp.MANIFEST_NAME).read_text())
    assert manifest["jittor_version"].startswith("1.3.11")
    assert sorted(manifest["patches"]) == sorted(p.name for p in jp.PATCHES)
    for rel, entry in manifest["files"].items():
        assert entry["sha256_original"] == before[rel]
        assert entry["action"] == ("remove" if rel in REMOVED else "replace")
        if rel in CHANGED:
            assert entry["sha256_patched"] == after[rel]


def test_apply_twice_changes_no_byte(tree: Path) -> None:
    jp.apply(tree)
    once = tree_hashes(tree)
    again = jp.apply(tree)
    assert [s.state for s in again] == [jp.ALREADY_APPLIED] * 5
    assert tree_hashes(tree) == once


def test_revert_restores_the_original_tree(tree: Path) -> None:
    original = tree_hashes(tree)
    modes = {rel: (tree / rel).stat().st_mode for rel in CHANGED | REMOVED}
    jp.apply(tree)
    assert tree_hashes(tree) != original
    restored = jp.revert(tree)
    assert set(restored) == CHANGED | REMOVED
    assert tree_hashes(tree) == original
    assert {rel: (tree / rel).stat().st_mode for rel in modes} == modes
    assert [s.state for s in jp.status(tree)] == [jp.PENDING] * 5
    assert jp.revert(tree) == []  # nothing left to revert


def test_revert_refuses_a_file_changed_after_patching(tree: Path, pristine: Path) -> None:
    jp.apply(tree)
    with (tree / "compiler.py").open("a") as f:
        f.write("# local edit\n")
    with pytest.raises(jp.PatchError, match="compiler.py changed after patching"):
        jp.revert(tree)
    jp.revert(tree, force=True)
    assert tree_hashes(tree) == tree_hashes(pristine)


# --- refusals -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "expect"),
    [
        (lambda s: s.replace("cub::Max()", "cub::Maximum()"), "found 0x, patched text found 0x"),
        (lambda s: s + "\n# auto tmp = BlockReduce(temp_storage).Reduce(v1, cub::Max());\n", "found 2x"),
    ],
    ids=["anchor-gone", "anchor-twice"],
)
def test_missing_anchor_refuses_and_writes_nothing(
    tree: Path, edit: Callable[[str], str], expect: str
) -> None:
    target = tree / "other/code_softmax.py"
    target.write_text(edit(target.read_text()))
    before = tree_hashes(tree)
    states = {s.name: s.state for s in jp.status(tree)}
    assert states["softmax_cccl3"] == jp.ANCHOR_MISSING
    pending = {k for k, v in states.items() if v == jp.PENDING}
    assert pending == {p.name for p in jp.PATCHES} - {"softmax_cccl3"}
    for fn in (jp.plan, jp.apply):
        match = r"softmax_cccl3: other/code_softmax\.py: anchor"
        with pytest.raises(jp.AnchorMissingError, match=match) as err:
            fn(tree)
        assert expect in str(err.value) and "cub::Max()" in str(err.value)
    assert tree_hashes(tree) == before  # nothing written, no manifest


def test_missing_file_is_an_anchor_error(tree: Path) -> None:
    (tree / "compile_extern.py").unlink()
    with pytest.raises(jp.AnchorMissingError, match="cudnn9_libs: compile_extern.py: file not found"):
        jp.apply(tree)


def test_other_jittor_version_is_refused_unless_forced(tree: Path) -> None:
    init = tree / "__init__.py"
    init.write_text(init.read_text().replace("__version__ = '1.3.11.0'", "__version__ = '1.3.10.0'", 1))
    assert jp.jittor_version(tree) == "1.3.10.0"
    before = tree_hashes(tree)
    with pytest.raises(jp.VersionError, match=r"Jittor 1\.3\.10\.0 .*written for Jittor 1\.3\.11"):
        jp.apply(tree)
    assert tree_hashes(tree) == before
    assert [s.state for s in jp.apply(tree, force=True)] == [jp.APPLIED] * 5


def test_patch_definitions_are_unambiguous() -> None:
    with pytest.raises(ValueError, match="must not contain each other"):
        jp.Replace("x.py", "-std=c++14", "-std=c++14 -O2")


# --- the patched CUDA sources compile with CUDA 13 (compile only; no GPU needed) ----------------------------

NVCC = shutil.which("nvcc") or next((p for p in ["/usr/local/cuda/bin/nvcc"] if os.path.exists(p)), None)


def _nvcc_major() -> int:
    if NVCC is None:
        return 0
    out = subprocess.run([NVCC, "--version"], capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"release (\d+)\.", out)
    return int(m.group(1)) if m else 0


needs_nvcc = pytest.mark.skipif(_nvcc_major() < 13, reason="needs nvcc from CUDA >= 13 (compile-only checks)")


def nvcc_compile(
    src: str, jittor_dir: Path, work: Path, std: list[str], *defines: str
) -> subprocess.CompletedProcess:
    cu = work / "probe.cu"
    cu.write_text(src)
    cmd = [NVCC, *std, "-w", "-arch=sm_90", *defines, "-c", str(cu), "-o", str(work / "probe.o"),
           f"-I{jittor_dir / 'src'}", f"-I{jittor_dir / 'extern/cuda/inc'}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def patched(pristine: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("patched") / "jittor"
    shutil.copytree(pristine, dst)
    jp.apply(dst)
    return dst


HELPER_PROBE = """#include <cuda_runtime.h>
#include "helper_cuda.h"
int probe() { return gpuDeviceInit(0) + gpuGetMaxGflopsDeviceId() + findIntegratedGPU(); }
"""


@needs_nvcc
def test_helper_cuda_h_compiles_only_when_patched(pristine: Path, patched: Path, tmp_path: Path) -> None:
    bad = nvcc_compile(HELPER_PROBE, pristine, tmp_path, ["-std=c++17"], "-DIS_CUDA")
    assert bad.returncode != 0
    assert 'has no member "computeMode"' in bad.stdout + bad.stderr
    assert 'has no member "clockRate"' in bad.stdout + bad.stderr
    good = nvcc_compile(HELPER_PROBE, patched, tmp_path, ["-std=c++17"], "-DIS_CUDA")
    assert good.returncode == 0, good.stdout + good.stderr


@needs_nvcc
def test_softmax_kernel_compiles_only_when_patched(pristine: Path, patched: Path, tmp_path: Path) -> None:
    defines = ("-DJIT", "-DJIT_cuda", "-DCUDA_ARCH=90")
    original_src, patched_src = softmax_cu(pristine), softmax_cu(patched)
    assert "cub::Max()" in original_src and "cuda::maximum<>()" in patched_src
    cuda13 = [13, 0, 88]
    # Stock Jittor: its own flags (-std=c++14) and its own kernel; CCCL 3 refuses C++14 outright.
    stock = nvcc_compile(original_src, pristine, tmp_path, nvcc_std_flags(pristine, cuda13), *defines)
    assert stock.returncode != 0 and "CUB requires at least C++17" in stock.stdout + stock.stderr
    # Patch 2 alone is not enough: cub::Max is gone in CCCL 3.
    flags_only = nvcc_compile(original_src, patched, tmp_path, nvcc_std_flags(patched, cuda13), *defines)
    assert flags_only.returncode != 0
    assert 'namespace "cub" has no member "Max"' in flags_only.stdout + flags_only.stderr
    good = nvcc_compile(patched_src, patched, tmp_path, nvcc_std_flags(patched, cuda13), *defines)
    assert good.returncode == 0, good.stdout + good.stderr
    assert (tmp_path / "probe.o").stat().st_size > 0
