"""Offline processing of whole files: `geometryd process` (one clip) and `geometryd batch` (many, serial or
on Ray)."""
