"""`geometryd weights pull | check | make-tiny`: get, verify or fake the model folder.

``pull`` downloads exactly the files of spec 1.1 into ONE folder in the merged layout (``unet_diff/``,
``unet_determ/``, ``point_map_vae/`` from TencentARC/GeometryCrafter; ``vae/``, ``image_encoder/``,
``feature_extractor/``, ``scheduler/`` from the licence-gated stabilityai/stable-video-diffusion-img2vid-xt;
``moge/model.pt`` from Ruicheng/moge-vitl). The file plan is a pure function (`pull_plan`), the download is
``huggingface_hub.hf_hub_download`` per file (``HF_TOKEN`` is honoured by the hub client).
``check`` reads safetensors headers only (`daemon.weights.manifest`). ``make-tiny`` calls
`daemon.weights.tiny.make_tiny`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

GEOMETRYCRAFTER_REPO = "TencentARC/GeometryCrafter"
SVD_REPO = "stabilityai/stable-video-diffusion-img2vid-xt"
MOGE_REPO = "Ruicheng/moge-vitl"
MOGE2_REPO = "Ruicheng/moge-2-vitl-normal"  # MoGe-2 ViT-L with normal head: prior.model = "moge2"
PRIORS = ("moge1", "moge2", "both")
GATED_REPOS = frozenset({SVD_REPO})
# Revisions observed on the hub pages (spec 1.1); SVD-xt's pin is unverified there, so it follows main.
DEFAULT_REVISIONS: dict[str, str] = {
    GEOMETRYCRAFTER_REPO: "2e8eeeecd205018f0937e05f711011505ab61573",
    SVD_REPO: "main",
    MOGE_REPO: "979e84da9415762c30e6c0cf8dc0962896c793df",
    MOGE2_REPO: "main",  # not pinned: no revision of it was observed offline; pin with --revision
}
PROVENANCE_FILE = "weights.json"
VARIANTS = ("all", "diff", "determ")
_GB = 10**9


@dataclass(frozen=True)
class PlannedFile:
    """One file to fetch: ``repo_id``/``filename`` at ``revision`` -> ``<to>/<local_dir>/<filename>``."""

    repo_id: str
    filename: str  # path inside the repo (may contain a sub-folder)
    revision: str
    local_dir: str  # folder under the target that hf_hub_download(local_dir=...) writes into
    approx_bytes: int

    @property
    def dest(self) -> Path:
        return Path(self.local_dir) / self.filename


def pull_plan(variant: str = "all", revisions: dict[str, str] | None = None, prior: str = "moge1"
              ) -> list[PlannedFile]:
    """Every file of spec 1.1 the daemon needs, nothing else (no SVD UNet, fp16 variants of SVD parts).
    ``prior``: MoGe-1 (``moge/model.pt``), MoGe-2 (``moge2/model.pt``) or both."""
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {', '.join(PRIORS)}, got {prior!r}")
    rev = {**DEFAULT_REVISIONS, **(revisions or {})}
    gc, svd, moge = GEOMETRYCRAFTER_REPO, SVD_REPO, MOGE_REPO
    unets = {"diff": ["unet_diff"], "determ": ["unet_determ"], "all": ["unet_diff", "unet_determ"]}[variant]
    files: list[tuple[str, str, str, int]] = []
    for unet in unets:
        files += [
            (gc, f"{unet}/config.json", "", 0),
            (gc, f"{unet}/diffusion_pytorch_model.safetensors", "", 3_050_000_000),
        ]
    files += [
        (gc, "point_map_vae/config.json", "", 0),
        (gc, "point_map_vae/diffusion_pytorch_model.safetensors", "", 393_019_424),
        (svd, "vae/config.json", "", 0),
        (svd, "vae/diffusion_pytorch_model.fp16.safetensors", "", 196_000_000),
        (svd, "image_encoder/config.json", "", 0),
        (svd, "image_encoder/model.fp16.safetensors", "", 1_264_000_000),
        (svd, "feature_extractor/preprocessor_config.json", "", 0),
        (svd, "scheduler/scheduler_config.json", "", 0),
    ]
    if prior in ("moge1", "both"):
        files.append((moge, "model.pt", "moge", 1_257_000_000))
    if prior in ("moge2", "both"):
        files.append((MOGE2_REPO, "model.pt", "moge2", 1_330_000_000))
    return [PlannedFile(repo, name, rev[repo], local, size) for repo, name, local, size in files]


def parse_revisions(items: list[str]) -> dict[str, str]:
    """``["owner/repo=REV", ...]`` -> dict; raises ValueError naming a malformed item or an unknown repo."""
    out: dict[str, str] = {}
    for item in items:
        repo, sep, rev = item.partition("=")
        if not sep or not rev or repo not in DEFAULT_REVISIONS:
            raise ValueError(
                f"--revision {item!r}: expected REPO=REVISION with REPO one of {', '.join(DEFAULT_REVISIONS)}"
            )
        out[repo] = rev
    return out


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set to a truthy value (the hub client would refuse every download)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


class PullError(RuntimeError):
    """A download that cannot succeed; the message says what to do."""


def _explain(exc: Exception, item: PlannedFile) -> str:
    from huggingface_hub import errors

    where = f"{item.repo_id}/{item.filename}@{item.revision}"
    text = " ".join(str(exc).split())[:300]  # one line
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, errors.GatedRepoError) or status in (401, 403) or (
        isinstance(exc, errors.RepositoryNotFoundError) and item.repo_id in GATED_REPOS
    ):
        return (
            f"{where}: access denied (HTTP {status or 'gated'}). {item.repo_id} is licence-gated: accept "
            f"its licence at https://huggingface.co/{item.repo_id} and export HF_TOKEN=<a read token of that "
            "account>"
        )
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"{where}: revision not found; pass --revision {item.repo_id}=<commit or branch>"
    if isinstance(exc, errors.RepositoryNotFoundError):
        return f"{where}: repository not found (or private; set HF_TOKEN)"
    if isinstance(exc, (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError)):
        return f"{where}: cannot reach the hub (offline, or no network): {text}"
    if isinstance(exc, errors.EntryNotFoundError):
        return f"{where}: file not in the repository at that revision"
    return f"{where}: {type(exc).__name__}: {text}"


def pull(to: Path, plan: list[PlannedFile]) -> None:
    """Download ``plan`` into ``to``; raise PullError with an actionable one-line message on failure."""
    if hub_offline():
        raise PullError(
            "HF_HUB_OFFLINE is set: downloads are disabled. Unset it on a machine with network access, "
            "or copy a model folder here and run `geometryd weights check DIR`."
        )
    to.mkdir(parents=True, exist_ok=True)
    todo = [p for p in plan if not (to / p.dest).is_file()]
    need = sum(p.approx_bytes for p in todo)
    free = shutil.disk_usage(to).free
    if need > free:
        raise PullError(f"{to}: about {need / _GB:.1f} GB needed, {free / _GB:.1f} GB free")
    from huggingface_hub import hf_hub_download

    for i, item in enumerate(plan, 1):
        print(f"[{i}/{len(plan)}] {item.repo_id}/{item.filename} -> {to / item.dest}", flush=True)
        try:
            hf_hub_download(
                repo_id=item.repo_id,
                filename=item.filename,
                revision=item.revision,
                local_dir=to / item.local_dir,
            )
        except Exception as exc:  # noqa: BLE001 - every hub/network error becomes one actionable line
            raise PullError(_explain(exc, item)) from exc
    provenance = {
        "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": [
            {"repo": p.repo_id, "revision": p.revision, "file": p.filename, "dest": str(p.dest)} for p in plan
        ],
    }
    (to / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1) + "\n")
