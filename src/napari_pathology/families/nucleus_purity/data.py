"""Labelled nuclei from files: what ``napari-pathology train nucleus-purity --data`` reads.

``--data`` is either one slide (its labels are the Nuclei panel's autosave
sidecar beside it) or a CSV table with a ``slide`` column and an optional
``nuclei`` column naming each slide's labels (CSV as the panel exports, or
GeoJSON from QuPath), plus an optional ``mpp`` column. Only nuclei labelled
tumour or normal are used. Every file is checked where it comes in: the table
must be UTF-8 text with a positive finite ``mpp`` (the row is named), each
slide listed once, and every labelled nucleus a finite point on its slide. No Qt.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np

from napari_pathology.families.nucleus_purity.train import LabelledNuclei
from napari_pathology.fileio import read_text_file, require_finite
from napari_pathology.nuclei.points import LABELS, NucleusPoints, read_csv, read_geojson, sidecar_path
from napari_pathology.training.events import TrainingError

__all__ = ["labelled_nuclei", "read_nucleus_training_data"]


def labelled_nuclei(
    points: NucleusPoints, slide_path: str | os.PathLike[str], mpp: float | None = None
) -> LabelledNuclei:
    """The tumour/normal nuclei of ``points`` as :class:`LabelledNuclei` (others dropped)."""
    keep = np.isin(points.label, [LABELS.index("tumour"), LABELS.index("normal")])
    chosen = points.subset(keep)
    return LabelledNuclei(
        slide_path=Path(slide_path),
        xy_um=chosen.xy_um(),
        is_tumour=chosen.label == LABELS.index("tumour"),
        mpp=mpp,
    )


def _slide_geometry(slide_path: Path, mpp: float | None) -> tuple[tuple[float, float], tuple[float, float]]:
    """The slide's level-0 ``(mpp_x, mpp_y)`` and size ``(width, height)`` in um."""
    from napari_pathology.slide import open_slide

    if not slide_path.exists():
        raise TrainingError(f"slide {slide_path} does not exist")
    try:
        with open_slide(slide_path, mpp=mpp) as slide:
            slide_mpp = slide.require_mpp()
            width, height = slide.dimensions
    except (OSError, ValueError, RuntimeError) as error:
        raise TrainingError(f"{slide_path}: {error}") from error
    return slide_mpp, (width * slide_mpp[0], height * slide_mpp[1])


def _read_points(path: Path, slide_path: Path, mpp: float | None) -> NucleusPoints:
    if not path.exists():
        raise TrainingError(f"no nucleus labels for {slide_path.name}: {path} does not exist")
    slide_mpp, extent = _slide_geometry(slide_path, mpp)
    try:
        if path.suffix.lower() in (".geojson", ".json"):
            return read_geojson(path, slide_mpp, extent)
        pixel_mpp = slide_mpp[0] if slide_mpp[0] == slide_mpp[1] else None
        return read_csv(path, mpp=pixel_mpp, extent_um=extent)
    except (OSError, ValueError) as error:
        raise TrainingError(f"nucleus labels of {slide_path.name}: {error}") from error


def read_nucleus_training_data(data: str | os.PathLike[str]) -> list[LabelledNuclei]:
    """Labelled nuclei for every slide named by ``data`` (a slide, or a table of slides).

    Raises
    ------
    TrainingError
        Naming the file (and the table row): a table that is not UTF-8 text or
        lacks a ``slide`` column, an ``mpp`` that is not a positive number, a
        slide listed twice, a slide without labels, or labels with a
        non-finite or out-of-slide centroid.

    """
    data = Path(data)
    if not data.exists():
        raise TrainingError(f"{data} does not exist")
    if data.suffix.lower() != ".csv":
        return [labelled_nuclei(_read_points(sidecar_path(data), data, None), data)]
    try:
        text = read_text_file(data, "nucleus table")
    except ValueError as error:
        raise TrainingError(str(error)) from error
    reader = csv.DictReader(io.StringIO(text))
    try:
        rows = [
            ({str(k).strip().lower(): (v or "").strip() for k, v in row.items()}, reader.line_num)
            for row in reader
        ]
    except csv.Error as error:
        raise TrainingError(f"{data} row {reader.line_num}: not a readable CSV table ({error})") from error
    fields = [str(f).strip().lower() for f in reader.fieldnames or []]
    if "slide" not in fields:
        raise TrainingError(f"{data}: a table needs a 'slide' column (and optionally 'nuclei', 'mpp')")
    if not rows:
        raise TrainingError(f"{data}: the table lists no slides")
    out = []
    seen: dict[Path, int] = {}
    for row, line in rows:
        where = f"{data} row {line}"
        if not row.get("slide"):
            raise TrainingError(f"{where}: the 'slide' cell is empty")
        slide = Path(row["slide"]).expanduser()
        slide = slide if slide.is_absolute() else data.parent / slide
        key = slide.resolve()
        if key in seen:
            raise TrainingError(
                f"{where}: {slide.name} is already listed in row {seen[key]}; list each slide once "
                "(its nuclei would otherwise be on both sides of the train/validation split)"
            )
        seen[key] = line
        mpp = None
        if row.get("mpp"):
            try:
                mpp = require_finite(row["mpp"], "mpp", minimum=0.0, inclusive=False)
            except ValueError as error:
                raise TrainingError(f"{where}: {error} (um per pixel, e.g. 0.25)") from error
        labels = Path(row["nuclei"]).expanduser() if row.get("nuclei") else sidecar_path(slide)
        labels = labels if labels.is_absolute() else data.parent / labels
        try:
            out.append(labelled_nuclei(_read_points(labels, slide, mpp), slide, mpp))
        except TrainingError as error:
            raise TrainingError(f"{where}: {error}") from error
    return out
