"""Adding nuclei to nuclei without doubling any: imports and fresh detections."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .labels import LABELS, SOURCES, UNLABELED
from .table import NucleusPoints


@dataclass(frozen=True)
class MergeResult:
    """Nuclei after an import: all of them, and how many were added or merged into existing ones."""

    points: NucleusPoints
    added: int
    merged: int
    relabelled: int

    def summary(self) -> str:
        """``"12 added, 30 already there (5 given the imported label)"``."""
        text = f"{self.added} added, {self.merged} already there"
        return text + (f" ({self.relabelled} given the imported label)" if self.relabelled else "")


def merge_points(existing: NucleusPoints, incoming: NucleusPoints, radius_um: float = 1.0) -> MergeResult:
    """Add imported nuclei without doubling the ones already there.

    An incoming nucleus within ``radius_um`` of an existing one whose label is
    the same, or where either is ``unlabeled``, is that nucleus: it is not
    added; an imported label replaces ``unlabeled``, and a missing probability
    or area is filled in. Each existing nucleus absorbs at most one incoming
    one. Nuclei with conflicting labels (tumour vs normal) stay apart.

    Parameters
    ----------
    existing, incoming : NucleusPoints
        Nuclei now, and nuclei read from a file.
    radius_um : float
        Largest distance between two copies of one nucleus.

    Returns
    -------
    MergeResult

    """
    if not (math.isfinite(radius_um) and radius_um >= 0):
        raise ValueError(f"radius_um must be a finite number >= 0, got {radius_um!r}")
    if not len(existing) or not len(incoming):
        return MergeResult(NucleusPoints.concat(existing, incoming), len(incoming), 0, 0)
    from scipy.spatial import cKDTree

    k = min(8, len(existing))
    distance, nearest = cKDTree(existing.xy_um()).query(
        incoming.xy_um(), k=k, distance_upper_bound=radius_um * (1 + 1e-12) + 1e-12
    )
    distance, nearest = distance.reshape(len(incoming), k), nearest.reshape(len(incoming), k)
    label, probability, area = existing.label.copy(), existing.probability.copy(), existing.area_um2.copy()
    taken = np.zeros(len(existing), bool)
    new = np.ones(len(incoming), bool)
    relabelled = 0
    for i in np.flatnonzero(np.isfinite(distance[:, 0])):
        code = incoming.label[i]
        for d, j in zip(distance[i], nearest[i], strict=True):
            if not math.isfinite(d):
                break
            if taken[j] or not (label[j] == code or label[j] == UNLABELED or code == UNLABELED):
                continue
            taken[j], new[i] = True, False
            if label[j] == UNLABELED and code != UNLABELED:
                label[j] = code
                relabelled += 1
            if np.isnan(probability[j]):
                probability[j] = incoming.probability[i]
            if np.isnan(area[j]):
                area[j] = incoming.area_um2[i]
            break
    kept = existing._replace(label=label, probability=probability, area_um2=area)
    added = incoming.subset(new)
    return MergeResult(NucleusPoints.concat(kept, added), len(added), int((~new).sum()), relabelled)


def merge_detections(
    existing: NucleusPoints,
    found: NucleusPoints,
    box: tuple[float, float, float, float] | None,
    polygons: list[list[np.ndarray]] | None,
    duplicate_um: float = 3.0,
) -> tuple[NucleusPoints, int]:
    """Put fresh detections into a layer's nuclei without losing any labelling work.

    Unlabeled detected nuclei inside the searched area are replaced; labelled,
    manual and imported nuclei are kept, and a fresh detection within
    ``duplicate_um`` of a kept nucleus is dropped.

    Returns
    -------
    merged : NucleusPoints
    replaced : int
        How many old unlabeled detections were replaced.
    """
    from scipy.spatial import cKDTree

    from napari_pathology.geometry import points_in_polygons

    xy = existing.xy_um()
    if polygons:
        inside = points_in_polygons(xy, polygons) >= 0
    elif box is not None:
        x, y, w, h = box
        inside = (xy[:, 0] >= x) & (xy[:, 0] < x + w) & (xy[:, 1] >= y) & (xy[:, 1] < y + h)
    else:
        inside = np.ones(len(existing), bool)
    stale = (
        inside
        & (existing.label == LABELS.index("unlabeled"))
        & (existing.source == SOURCES.index("detected"))
    )
    kept = existing.subset(~stale)
    if len(kept) and len(found):
        distance, _ = cKDTree(kept.xy_um()).query(found.xy_um(), k=1)
        found = found.subset(distance > duplicate_um)
    return NucleusPoints.concat(kept, found), int(stale.sum())
