"""Import and export of a slide's nuclei, by file suffix: GeoJSON (QuPath, level-0 pixels) or CSV."""

from __future__ import annotations

import os
from pathlib import Path

from .csv_io import read_csv, write_csv
from .export_names import free_path, refused_export_reason
from .geojson_io import read_geojson, write_geojson
from .table import NucleusPoints

#: Suffixes read and written as GeoJSON (anything else is CSV).
GEOJSON_SUFFIXES = (".geojson", ".json")


def read_annotations(
    path: str | os.PathLike[str], mpp: tuple[float, float], extent_um: tuple[float, float]
) -> NucleusPoints:
    """Nuclei from a GeoJSON or CSV file, checked against the slide (pixel CSV columns need square pixels)."""
    path = Path(path)
    if path.suffix.lower() in GEOJSON_SUFFIXES:
        return read_geojson(path, mpp, extent_um)
    return read_csv(path, mpp=mpp[0] if mpp[0] == mpp[1] else None, extent_um=extent_um)


def write_annotations(
    points: NucleusPoints,
    path: str | os.PathLike[str],
    slide_path: str | os.PathLike[str] | None,
    mpp: tuple[float, float],
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write nuclei as GeoJSON or CSV by the file's suffix (``.csv`` added when none).

    Never over the slide, its autosave or a synthetic slide's truth files (ValueError), and over
    another existing file only with ``overwrite`` (else the first free numbered name is used).

    Returns
    -------
    (asked, chosen) : (Path, Path)
        The path asked for (suffix added) and the path written.
    """
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".csv")
    reason = refused_export_reason(path, slide_path)
    if reason is not None:
        raise ValueError(f"{path} is {reason}; export the nuclei under another name")
    chosen = path if overwrite else free_path(path)
    if chosen.suffix.lower() in GEOJSON_SUFFIXES:
        write_geojson(points, chosen, mpp)
    else:
        write_csv(points, chosen)
    return path, chosen
