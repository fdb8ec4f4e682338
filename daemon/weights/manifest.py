"""Check a model folder against the official key manifests without loading a single tensor.

The manifests (``daemon/weights/manifests/*.tsv``, one ``key<TAB>[shape]`` per line) are copies of
``../shared/spec/geometrycrafter_keys`` (spec sections 2.1-2.4), shipped inside the package so an installed
daemon can check its weights. A safetensors file is read only up to the end of its header: 8-byte
little-endian header length, then a JSON object ``{key: {dtype, shape, data_offsets}, "__metadata__": ...}``;
the data section is never read (its expected size is compared with the file size to catch truncated
downloads).

Layout of a model folder (spec 1.1): ``unet_diff/``, ``unet_determ/``, ``point_map_vae/``, ``vae/``,
``image_encoder/``, ``feature_extractor/``, ``scheduler/``, ``moge/model.pt``.
"""

from __future__ import annotations

import json
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST_DIR = Path(__file__).with_name("manifests")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
# Spec 2.3: the SVD VAE file may use the legacy attention names; they map 1:1 onto the modern ones.
LEGACY_ATTENTION_RE = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
CLIP_LAYER_RE = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.")
# A resnet has a 1x1 conv_shortcut only where it changes the channel count: a width (shape) matter, so the
# structure-only check neither requires nor rejects these keys on a resnet the manifest has.
SHORTCUT_RE = re.compile(r"^(?P<resnet>.*)\.conv_shortcut\.(weight|bias)$")

Shape = tuple[int, ...]


class HeaderError(ValueError):
    """A file that is not a well-formed safetensors file."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors tag, e.g. "F16"
    shape: Shape
    start: int  # absolute byte offset of the tensor's data in the file
    end: int


def load_manifest(name: str) -> dict[str, Shape]:
    """``{key: shape}`` from ``daemon/weights/manifests/<name>.tsv`` (file order kept)."""
    out: dict[str, Shape] = {}
    for line in (MANIFEST_DIR / f"{name}.tsv").read_text().splitlines():
        if line.strip():
            key, shape = line.split("\t")
            out[key] = tuple(json.loads(shape))
    return out


def read_safetensors_header(path: str | Path) -> dict[str, TensorInfo]:
    """Tensor names, dtypes, shapes and absolute data offsets of a safetensors file, reading only its header.

    The one header reader of the project (the checker here and the loader in ``daemon/model/loader.py``).
    Raises ``HeaderError`` (text ``corrupt safetensors header (...)`` or ``truncated safetensors file
    (...)``) for a malformed header, offsets that do not match the shapes, or a file shorter (truncated
    download) or longer than its header says (safetensors itself rejects both). ``OSError`` passes through.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise HeaderError(f"{path}: corrupt safetensors header ({size} bytes, too short for a header)")
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise HeaderError(f"{path}: corrupt safetensors header (header length {n} does not fit a "
                              f"{size}-byte file)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeaderError(f"{path}: corrupt safetensors header (header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise HeaderError(f"{path}: corrupt safetensors header (header is not a JSON object)")
    base = 8 + n
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, (start, end) = entry["dtype"], (int(o) for o in entry["data_offsets"])
            shape = tuple(int(d) for d in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise HeaderError(f"{path}: corrupt safetensors header (malformed entry for {key!r})") from None
        numel = 1
        for d in shape:
            numel *= d
        if dtype not in DTYPE_BYTES or end - start != numel * DTYPE_BYTES[dtype] or start < 0:
            raise HeaderError(f"{path}: corrupt safetensors header ({key!r}: {dtype} {list(shape)} does not "
                              f"match offsets {start}..{end})")
        if base + end > size:
            raise HeaderError(f"{path}: truncated safetensors file ({key!r} needs bytes up to {base + end}, "
                              f"the file has {size})")
        tensors[key] = TensorInfo(dtype, shape, base + start, base + end)
        data_end = max(data_end, end)
    if size != base + data_end:
        raise HeaderError(f"{path}: {size} bytes, expected {base + data_end} (longer than its header says)")
    return tensors


@dataclass(frozen=True)
class Component:
    """One sub-folder of the model folder and what it must contain."""

    name: str  # sub-folder
    manifest: str | None  # daemon/weights/manifests/<manifest>.tsv, None for json-only parts
    weight_files: tuple[str, ...] = ()  # accepted file names, in loader preference order
    json_files: tuple[str, ...] = ("config.json",)
    optional_prefixes: tuple[str, ...] = ()  # manifest keys that may be absent (unused parts)
    ignored_keys: tuple[str, ...] = ()  # file keys that are neither checked nor unexpected


UNET_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component("unet_diff", "unet_diff_in12", UNET_FILES),
        Component("unet_determ", "unet_determ_in8", UNET_FILES),
        Component("point_map_vae", "point_map_vae", ("diffusion_pytorch_model.safetensors",)),
        # Spec 2.3: only encoder.* and quant_conv.* are used; a stripped file without the decoder is fine.
        Component("vae", "svd_vae", tuple(reversed(UNET_FILES)), optional_prefixes=("decoder.",)),
        Component(
            "image_encoder",
            "clip_vision",
            ("model.fp16.safetensors", "model.safetensors"),
            ignored_keys=("vision_model.embeddings.position_ids",),
        ),
        Component("feature_extractor", None, json_files=("preprocessor_config.json",)),
        Component("scheduler", None, json_files=("scheduler_config.json",)),
    )
}
# config.json values the official shapes imply (spec 1.2); checked when present, in the full (shape) check.
CONFIG_EXPECTATIONS: dict[str, dict[str, object]] = {
    "unet_diff": {"in_channels": 12, "out_channels": 4, "cross_attention_dim": 1024},
    "unet_determ": {"in_channels": 8, "out_channels": 4, "cross_attention_dim": 1024},
    "point_map_vae": {"in_channels": 4, "latent_channels": 4},
    "vae": {"latent_channels": 4},
    "image_encoder": {"hidden_size": 1280, "num_hidden_layers": 32, "projection_dim": 1024},
}
MOGE_CHECKPOINT = Path("moge") / "model.pt"
MOGE2_CHECKPOINT = Path("moge2") / "model.pt"  # Ruicheng/moge-2-vitl-normal (prior.model = "moge2")
MOGE_CHECKPOINTS = {"moge1": (MOGE_CHECKPOINT,), "moge2": (MOGE2_CHECKPOINT,),
                    "both": (MOGE_CHECKPOINT, MOGE2_CHECKPOINT)}
VARIANT_COMPONENTS = {"diff": ("unet_diff",), "determ": ("unet_determ",), "all": ("unet_diff", "unet_determ")}


@dataclass
class Report:
    """Result of checking one component; ``problems`` empty means good."""

    name: str
    problems: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    tensors: int = 0
    dtypes: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        dtypes = ", ".join(f"{d} x{n}" for d, n in sorted(self.dtypes.items()))
        detail = f"{self.tensors} tensors ({dtypes})" if self.tensors else ""
        fields = (f"{self.name:<18}", "ok  " if self.ok else "FAIL", detail, " ".join(self.files))
        return "  ".join(s for s in fields if s)


def normalise_key(key: str) -> str:
    """Map legacy attention names (query/key/value/proj_attn) onto to_q/to_k/to_v/to_out.0 (spec 2.3)."""
    m = LEGACY_ATTENTION_RE.search(key)
    if not m:
        return key
    return key[: m.start()] + f"{m[1]}{LEGACY_ATTENTION_NAMES[m[2]]}.{m[3]}"


def expected_keys(comp: Component, config: dict | None, structure_only: bool) -> dict[str, Shape]:
    """The manifest of ``comp``; structure-only: CLIP keeps only the layers its config.json declares."""
    assert comp.manifest is not None
    expected = load_manifest(comp.manifest)
    if structure_only and comp.name == "image_encoder" and config and "num_hidden_layers" in config:
        n = int(config["num_hidden_layers"])
        expected = {
            k: s for k, s in expected.items() if not ((m := CLIP_LAYER_RE.match(k)) and int(m[1]) >= n)
        }
    return expected


def compare_keys(
    found: dict[str, TensorInfo], expected: dict[str, Shape], comp: Component, check_shapes: bool, label: str
) -> list[str]:
    """Missing, unexpected and (when ``check_shapes``) mis-shaped keys, one message each.

    Without ``check_shapes`` (structure-only) a resnet's ``conv_shortcut`` may be absent or present.
    """
    problems: list[str] = []
    seen: dict[str, TensorInfo] = {}
    for key, info in found.items():
        if key in comp.ignored_keys:
            continue
        norm = normalise_key(key)
        if norm in seen:
            problems.append(f"{label}: duplicate key {key} (same as {norm})")
        seen[norm] = info
    missing = [k for k in expected if k not in seen and not k.startswith(comp.optional_prefixes)]
    unexpected = [k for k in seen if k not in expected]
    if not check_shapes:
        resnets = {k.rsplit(".", 2)[0] for k in expected}
        missing = [k for k in missing if not SHORTCUT_RE.match(k)]
        unexpected = [k for k in unexpected if not ((m := SHORTCUT_RE.match(k)) and m["resnet"] in resnets)]
    problems += _capped([f"{label}: missing key {k} {list(expected[k])}" for k in missing])
    problems += _capped([f"{label}: unexpected key {k} {list(seen[k].shape)}" for k in unexpected])
    if check_shapes:
        bad = [k for k in seen if k in expected and seen[k].shape != expected[k]]
        problems += _capped(
            [f"{label}: mis-shaped key {k}: {list(seen[k].shape)}, expected {list(expected[k])}" for k in bad]
        )
    return problems


def _capped(lines: list[str], limit: int = 25) -> list[str]:
    if len(lines) <= limit:
        return lines
    return [*lines[:limit], f"... and {len(lines) - limit} more like the above"]


def check_component(root: Path, comp: Component, structure_only: bool = False) -> Report:
    """Check one component folder: its json files; for networks every safetensors header vs the manifest."""
    report = Report(comp.name)
    folder = root / comp.name
    if not folder.is_dir():
        report.problems.append(f"{comp.name}/: folder missing")
        return report
    config: dict | None = None
    for name in comp.json_files:
        path = folder / name
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            report.problems.append(f"{comp.name}/{name}: missing")
            continue
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            report.problems.append(f"{comp.name}/{name}: not valid JSON ({exc})")
            continue
        if name == "config.json":
            config = data
    if config is not None and not structure_only:
        for key, want in CONFIG_EXPECTATIONS.get(comp.name, {}).items():
            if key in config and config[key] != want:
                report.problems.append(f"{comp.name}/config.json: {key} = {config[key]!r}, expected {want!r}")
    if comp.manifest is None:
        return report
    present = [name for name in comp.weight_files if (folder / name).is_file()]
    if not present:
        names = ", ".join(comp.weight_files)
        report.problems.append(f"{comp.name}/: no weights file (expected one of {names})")
        return report
    expected = expected_keys(comp, config, structure_only)
    for name in present:
        label = f"{comp.name}/{name}"
        report.files.append(label)
        try:
            found = read_safetensors_header(folder / name)
        except (HeaderError, OSError) as exc:
            report.problems.append(f"{label}: unreadable safetensors header: {exc}")
            continue
        report.tensors += len(found)
        report.dtypes.update(t.dtype for t in found.values())
        report.problems += compare_keys(found, expected, comp, not structure_only, label)
    return report


def check_moge(root: Path, checkpoint: Path = MOGE_CHECKPOINT) -> Report:
    """The MoGe checkpoint only has to exist and be non-empty (it is a torch pickle; not opened here)."""
    report = Report(checkpoint.parent.name)
    path = root / checkpoint
    if not path.is_file():
        report.problems.append(f"{checkpoint}: missing")
    elif path.stat().st_size == 0:
        report.problems.append(f"{checkpoint}: empty file")
    else:
        report.files.append(f"{checkpoint} ({path.stat().st_size} bytes)")
    return report


def check_model_dir(root: Path, structure_only: bool = False, variant: str = "all", prior: str = "moge1"
                    ) -> list[Report]:
    """Reports for every component of a model folder (``variant`` picks which UNets are required, ``prior``
    which MoGe checkpoints)."""
    unets = VARIANT_COMPONENTS[variant]
    names = [n for n in COMPONENTS if not n.startswith("unet_") or n in unets]
    return ([check_component(root, COMPONENTS[n], structure_only) for n in names]
            + [check_moge(root, c) for c in MOGE_CHECKPOINTS[prior]])
