"""Training data from drawn regions: their labels, checks and the files a job reads (no Qt).

The Train panel hands over rings already in level-0 pixels ``(x, y)`` of a
slide (see :func:`napari_pathology._widgets.train_panel.shapes_to_polygons`);
this module sorts them by label, refuses what cannot train, and writes them
as GeoJSON beside the checkpoint with a one-row slide table, so a job from
drawn regions is the same as one from the command line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathology.training.events import TrainingError
from napari_pathology.vocabulary import NORMAL, QUPATH_CLASSES, REGION_COLOURS, TUMOUR, slide_label

__all__ = [
    "REGION_LABELS",
    "check_regions",
    "check_slide_metadata",
    "group_regions",
    "region_label",
    "write_region_data",
]

#: The labels of drawn regions (slide-level spellings of them are accepted, see :func:`region_label`).
REGION_LABELS = (TUMOUR, NORMAL)


def region_label(value: Any) -> str | None:
    """``tumour`` / ``normal`` for a shape's label (tumour when empty), None when unknown."""
    text = "" if value is None else str(value).strip().lower()
    if text in ("", "nan", "none"):
        return TUMOUR
    return slide_label(text)


def group_regions(
    rings: Iterable[tuple[int, np.ndarray | None, str]], labels: Sequence[Any]
) -> tuple[dict[str, list[Any]], list[str]]:
    """Sort ``(index, ring or None, problem)`` by the shapes' labels: ``({label: [[ring]]}, problems)``."""
    out: dict[str, list[Any]] = {label: [] for label in REGION_LABELS}
    problems: list[str] = []
    for index, ring, problem in rings:
        if ring is None:
            problems.append(problem)
            continue
        label = region_label(labels[index])
        if label is None:
            problems.append(f"shape {index} has label {labels[index]!r}: use 'tumour' or 'normal'")
            continue
        out[label].append([ring])
    return out, problems


def check_slide_metadata(name: str, meta: Mapping[str, Any]) -> None:
    """Refuse a slide without a um/px (patches are read at the model's um/px)."""
    if meta.get("mpp_missing") or not meta.get("mpp_x"):
        raise TrainingError(
            f"{name} has no um/px: set it in the Slide panel before training "
            "(patches are read at the model's um/px)"
        )


def check_regions(layer_name: str, regions: Mapping[str, list[Any]], problems: Sequence[str]) -> None:
    """Refuse skipped shapes, an empty layer, or normal regions only."""
    if problems:
        raise TrainingError(f"{layer_name}: " + "; ".join(problems[:3]))
    if not regions["tumour"] and not regions["normal"]:
        raise TrainingError(f"no annotations: {layer_name} has no polygons, rectangles or ellipses")
    if not regions["tumour"]:
        raise TrainingError(
            f"{layer_name} has normal regions only: a detector needs both classes; "
            "draw at least one tumour region (label 'tumour')"
        )


def write_region_data(
    folder: Path, name: str, regions: Mapping[str, list[Any]], meta: Mapping[str, Any]
) -> Path:
    """Write ``<name>.<label>.geojson`` (level-0 px) and ``<name>.slides.csv`` in ``folder``; the table.

    ``meta`` is the slide layer's metadata (``path``, ``mpp_x``, ``mpp_source``):
    a um/px the user set travels in the table.
    """
    from napari_pathology.cohort import SlideEntry, write_slide_table
    from napari_pathology.fileio import atomic_write, ensure_writable_dir
    from napari_pathology.geometry import polygons_to_geojson

    ensure_writable_dir(folder)
    files = {}
    for label in REGION_LABELS:
        classification, color = QUPATH_CLASSES[label], REGION_COLOURS[label]
        if regions[label]:
            path = folder / f"{name}.{label}.geojson"
            atomic_write(path, json.dumps(polygons_to_geojson(regions[label], classification, color)))
            files[label] = path
    user_mpp = float(meta["mpp_x"]) if meta.get("mpp_source") == "user" else None
    entry = SlideEntry(
        Path(meta["path"]), TUMOUR, files[TUMOUR], user_mpp, normal_annotations=files.get(NORMAL)
    )
    return write_slide_table([entry], folder / f"{name}.slides.csv")
