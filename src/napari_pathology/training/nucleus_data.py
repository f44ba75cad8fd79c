"""Labelled nuclei from files: what ``napari-pathology train nucleus-purity --data`` reads.

``--data`` is either one slide (its labels are the Nuclei panel's autosave
sidecar beside it) or a CSV table with a ``slide`` column and an optional
``nuclei`` column naming each slide's labels (CSV as the panel exports, or
GeoJSON from QuPath), plus an optional ``mpp`` column. Only nuclei labelled
tumour or normal are used. No Qt.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from napari_pathology.nuclei.points import LABELS, NucleusPoints, read_csv, read_geojson, sidecar_path
from napari_pathology.training.events import TrainingError
from napari_pathology.training.nucleus_purity import LabelledNuclei

__all__ = ["labelled_nuclei", "read_nucleus_training_data"]


def labelled_nuclei(points: NucleusPoints, slide_path: str | os.PathLike[str], mpp: float | None = None):
    """The tumour/normal nuclei of ``points`` as :class:`LabelledNuclei` (others dropped)."""
    keep = np.isin(points.label, [LABELS.index("tumour"), LABELS.index("normal")])
    chosen = points.subset(keep)
    return LabelledNuclei(
        slide_path=Path(slide_path),
        xy_um=chosen.xy_um(),
        is_tumour=chosen.label == LABELS.index("tumour"),
        mpp=mpp,
    )


def _read_points(path: Path, slide_path: Path, mpp: float | None) -> NucleusPoints:
    if not path.exists():
        raise TrainingError(f"no nucleus labels for {slide_path.name}: {path} does not exist")
    if path.suffix.lower() in (".geojson", ".json"):
        from napari_pathology.slide import open_slide

        with open_slide(slide_path, mpp=mpp) as slide:
            slide_mpp = slide.require_mpp()
        return read_geojson(path, slide_mpp)
    return read_csv(path, mpp=mpp)


def read_nucleus_training_data(data: str | os.PathLike[str]) -> list[LabelledNuclei]:
    """Labelled nuclei for every slide named by ``data`` (a slide, or a table of slides).

    Raises
    ------
    TrainingError
        When a table lacks a ``slide`` column or a slide has no labels file.
    """
    data = Path(data)
    if not data.exists():
        raise TrainingError(f"{data} does not exist")
    if data.suffix.lower() != ".csv":
        return [labelled_nuclei(_read_points(sidecar_path(data), data, None), data)]
    with open(data, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "slide" not in rows[0]:
        raise TrainingError(f"{data}: a table needs a 'slide' column (and optionally 'nuclei', 'mpp')")
    out = []
    for row in rows:
        slide = Path(row["slide"])
        slide = slide if slide.is_absolute() else data.parent / slide
        mpp = float(row["mpp"]) if row.get("mpp") else None
        labels = Path(row["nuclei"]) if row.get("nuclei") else sidecar_path(slide)
        labels = labels if labels.is_absolute() else data.parent / labels
        out.append(labelled_nuclei(_read_points(labels, slide, mpp), slide, mpp))
    return out
