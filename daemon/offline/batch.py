"""`geometryd batch` library: input expansion, output names, the resumable manifest, the serial runner."""

from __future__ import annotations

import glob
import json
import time
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

from daemon.offline.process import UsageError
from daemon.offline.worker import BatchWorker, ProcessOptions, VideoResult

VIDEO_SUFFIXES = frozenset({".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".ts", ".mpg", ".mpeg", ".flv"})
MANIFEST = "manifest.jsonl"



# ---- inputs and outputs --------------------------------------------------------------------------------
def expand_inputs(items: Iterable[str]) -> list[Path]:
    """Files as given, folders -> their video files (sorted), globs -> their matches; order kept, no dups."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in VIDEO_SUFFIXES)
        elif p.exists():
            found = [p]
        elif glob.has_magic(item):
            found = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
        else:
            raise UsageError(f"input not found: {item}")
        if not found:
            raise UsageError(f"no video files in {item}")
        out += [f for f in found if f not in out]
    return out


def output_paths(inputs: list[Path], out_dir: Path) -> dict[Path, Path]:
    """``DIR/<stem>.npz`` per input; two inputs with the same stem are refused (one would overwrite)."""
    seen: dict[str, Path] = {}
    for p in inputs:
        if p.stem in seen:
            raise UsageError(f"inputs {seen[p.stem]} and {p} would both write {p.stem}.npz")
        seen[p.stem] = p
    return {p: out_dir / f"{p.stem}.npz" for p in inputs}


def is_complete(npz: Path) -> bool:
    """An existing npz with both arrays (written atomically by the worker)."""
    if not npz.is_file():
        return False

    try:
        with zipfile.ZipFile(npz) as z:
            return {"point_map.npy", "mask.npy"} <= set(z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


class Manifest:
    """``manifest.jsonl``: one JSON line per input and run, appended and flushed as results arrive."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, res: VideoResult) -> None:
        self._f.write(json.dumps({**res.to_json(), "time": round(time.time(), 3)}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def run_serial(opts: ProcessOptions, jobs: list[tuple[Path, Path]],
               on_result: Callable[[VideoResult], None]) -> None:
    worker = BatchWorker(opts)
    try:
        for video, out in jobs:
            on_result(worker.process(str(video), str(out)))
    finally:
        worker.close()
