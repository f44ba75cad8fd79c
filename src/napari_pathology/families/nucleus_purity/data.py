"""Labelled nuclei: :class:`LabelledNuclei`, and what ``napari-pathology train nucleus-purity --data`` reads.

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
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathology.fileio import read_text_file, require_finite
from napari_pathology.nuclei.points import LABELS, NucleusPoints, read_csv, read_geojson, sidecar_path
from napari_pathology.training.events import TrainingError

__all__ = ["LabelledNuclei", "labelled_nuclei", "read_nucleus_training_data", "synthetic_labelled_nuclei"]


@dataclass(frozen=True, eq=False)
class LabelledNuclei:
    """Nuclei of one slide labelled tumour or normal.

    Parameters
    ----------
    slide_path : Path
        The slide (or plain image) the points are on.
    xy_um : ndarray
        ``(N, 2)`` centroids ``x_um, y_um`` from the slide's top-left corner.
    is_tumour : ndarray
        ``(N,)`` bool: tumour (True) or normal (False).
    region_ids : ndarray, optional
        ``(N,)`` int: the drawn region each nucleus lies in (-1: none). Nuclei
        of one region stay on one side of the train/validation split, and
        purity is measured per region.
    mpp : float, optional
        um/px to use instead of the file's (required for files without it).

    Raises
    ------
    TrainingError
        For arrays of the wrong shape or length, or non-finite points.

    """

    slide_path: Path
    xy_um: np.ndarray
    is_tumour: np.ndarray
    region_ids: np.ndarray | None = None
    mpp: float | None = None

    def __post_init__(self) -> None:
        def fix(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        fix("slide_path", Path(self.slide_path))
        xy = np.asarray(self.xy_um, dtype=np.float64)
        xy = xy.reshape(0, 2) if xy.size == 0 else xy
        if xy.ndim != 2 or xy.shape[1] != 2 or not np.isfinite(xy).all():
            raise TrainingError(
                f"{self.slide_path.name}: xy_um must be a finite (N, 2) array, got {xy.shape}"
            )
        labels = np.asarray(self.is_tumour)
        if labels.shape != (len(xy),):
            raise TrainingError(
                f"{self.slide_path.name}: is_tumour must have one value per nucleus "
                f"({len(xy)}), got shape {labels.shape}"
            )
        if labels.dtype != bool:
            if labels.size and not np.isin(labels, (0, 1)).all():
                raise TrainingError(f"{self.slide_path.name}: is_tumour must be bool or 0/1")
            labels = labels.astype(bool)
        fix("xy_um", xy)
        fix("is_tumour", labels)
        if self.region_ids is not None:
            regions = np.asarray(self.region_ids)
            if regions.shape != (len(xy),) or (regions.size and not np.issubdtype(regions.dtype, np.integer)):
                raise TrainingError(
                    f"{self.slide_path.name}: region_ids must be (N,) integers (-1 = no region), "
                    f"got {regions.shape} {regions.dtype}"
                )
            fix("region_ids", regions.astype(np.int64))
        if self.mpp is not None and not (math.isfinite(float(self.mpp)) and float(self.mpp) > 0):
            raise TrainingError(f"{self.slide_path.name}: mpp must be a positive number, got {self.mpp!r}")

    def __len__(self) -> int:
        return len(self.xy_um)


def synthetic_labelled_nuclei(slide_path: str | os.PathLike[str]) -> LabelledNuclei:
    """Every rendered nucleus of a synthetic slide, from its ``*.nuclei.csv``.

    Kind ``tumour`` is tumour; every other kind (epithelial, lymphocyte,
    fibroblast, histiocyte) is normal. No regions (the trainer makes blocks).

    Raises
    ------
    TrainingError
        When the CSV is missing or lacks the ``x_um``, ``y_um`` and ``kind`` columns.

    """
    from napari_pathology.slide.synthetic import truth_paths

    path = truth_paths(slide_path)["nuclei_csv"]
    if not path.is_file():
        raise TrainingError(f"no nucleus table beside {Path(slide_path).name} ({path.name} is missing)")
    try:
        rows = list(csv.DictReader(io.StringIO(read_text_file(path, "nucleus table"), newline="")))
    except (ValueError, csv.Error) as error:
        raise TrainingError(f"{path.name}: {error}") from None
    if rows and not {"x_um", "y_um", "kind"} <= set(rows[0]):
        raise TrainingError(f"{path.name} needs x_um, y_um and kind columns")
    xy = np.zeros((len(rows), 2), np.float64)
    for k, row in enumerate(rows):
        try:
            xy[k] = [require_finite(row["x_um"], "x_um"), require_finite(row["y_um"], "y_um")]
        except ValueError as error:
            raise TrainingError(f"{path.name}, line {k + 2}: {error}") from None
    tumour = np.array([r["kind"] == "tumour" for r in rows], bool)
    return LabelledNuclei(Path(slide_path), xy, tumour)


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
