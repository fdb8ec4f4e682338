"""Point clouds as binary little-endian PLY files (Stanford PLY 1.0), one file per frame.

Each file holds one ``vertex`` element with ``x, y, z`` float32 (the point map, camera coordinates: x right,
y down, z forward, the units of the point map) and ``red, green, blue`` uchar (the frame's colour at the
output size). Invalid points (mask false, or a non-finite coordinate) are left out, so the vertex count
differs per frame. Readable by plyfile, Open3D, MeshLab and CloudCompare.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

VERTEX_DTYPE = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                         ("red", "u1"), ("green", "u1"), ("blue", "u1")])


def ply_header(n_vertices: int, comment: str = "") -> bytes:
    lines = ["ply", "format binary_little_endian 1.0"]
    if comment:
        lines.append(f"comment {comment}")
    lines += [f"element vertex {n_vertices}", "property float x", "property float y", "property float z",
              "property uchar red", "property uchar green", "property uchar blue", "end_header"]
    return ("\n".join(lines) + "\n").encode("ascii")


def ply_vertices(points: np.ndarray, colours: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """points (H,W,3) float, colours (H,W,3) uint8, mask (H,W) bool -> structured vertices of the valid
    points in row-major pixel order."""
    if points.ndim != 3 or points.shape[-1] != 3:
        raise ValueError(f"points must be (H, W, 3), got shape {points.shape}")
    if colours.shape != points.shape or colours.dtype != np.uint8:
        raise ValueError(f"colours must be uint8 {points.shape}, got {colours.dtype} {colours.shape}")
    if mask.shape != points.shape[:2]:
        raise ValueError(f"mask must be {points.shape[:2]}, got shape {mask.shape}")
    valid = np.asarray(mask, bool) & np.isfinite(points).all(axis=-1)
    xyz = np.asarray(points, np.float32)[valid]  # (n, 3)
    rgb = colours[valid]
    out = np.empty(xyz.shape[0], VERTEX_DTYPE)
    for k, name in enumerate(("x", "y", "z")):
        out[name] = xyz[:, k]
    for k, name in enumerate(("red", "green", "blue")):
        out[name] = rgb[:, k]
    return out


def write_ply(path: Path, points: np.ndarray, colours: np.ndarray, mask: np.ndarray,
              comment: str = "") -> int:
    """Write one frame's valid points to ``path``; returns the vertex count."""
    vertices = ply_vertices(points, colours, mask)
    with open(path, "wb") as f:
        f.write(ply_header(vertices.shape[0], comment))
        f.write(vertices.tobytes())
    return int(vertices.shape[0])


def write_ply_sequence(folder: Path, points: np.ndarray, colours: np.ndarray, mask: np.ndarray,
                       prefix: str = "points") -> list[Path]:
    """One ``<prefix>_<i:06d>.ply`` per frame of points (T,H,W,3), colours (T,H,W,3) uint8, mask (T,H,W)."""
    if not points.shape[0] == colours.shape[0] == mask.shape[0]:
        raise ValueError(f"frame counts differ: points {points.shape[0]}, colours {colours.shape[0]}, "
                         f"mask {mask.shape[0]}")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(points.shape[0]):
        p = folder / f"{prefix}_{i:06d}.ply"
        write_ply(p, points[i], colours[i], mask[i], comment=f"geometryd frame {i}")
        paths.append(p)
    return paths
