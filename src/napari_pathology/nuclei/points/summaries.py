"""Counts and purities of the nuclei inside regions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from napari_pathology.geometry import Polygon, points_in_polygons, polygon_area

from .table import NucleusPoints, _purity


@dataclass(frozen=True)
class RegionSummary:
    """Counts and purity of the nuclei inside one region.

    Attributes
    ----------
    name : str
        Region name.
    n : int
        Nuclei inside.
    counts : dict
        Nuclei per label (all of :data:`LABELS`).
    purity : float or None
        Ground truth tumour / (tumour + normal); None without such labels.
    predicted_purity : float or None
        Mean tumour probability of the classified nuclei inside; None when none is.
    difference : float or None
        ``predicted_purity - purity``; None when either is missing.
    area_um2 : float
        Region area (outer ring minus holes).
    """

    name: str
    n: int
    counts: dict[str, int]
    purity: float | None
    predicted_purity: float | None
    difference: float | None
    area_um2: float = 0.0


def region_summaries(
    points: NucleusPoints, polygons_um: Sequence[Polygon], names: Sequence[str] | None = None
) -> list[RegionSummary]:
    """Counts and purities of the nuclei inside each region.

    Parameters
    ----------
    points : NucleusPoints
        The nuclei.
    polygons_um : sequence of polygon
        Regions ``[outer, hole, ...]`` in micrometres (see :mod:`napari_pathology.geometry`).
        Regions may overlap; a nucleus counts in every region that holds it.
    names : sequence of str, optional
        One name per region; ``"region 1"``, ``"region 2"``... by default.

    Returns
    -------
    list of RegionSummary
        One per polygon, in order.

    """
    if names is not None and len(names) != len(polygons_um):
        raise ValueError(f"got {len(names)} names for {len(polygons_um)} regions; give one name per region")
    xy = points.xy_um()
    out = []
    for i, polygon in enumerate(polygons_um):
        inside = points_in_polygons(xy, [polygon]) == 0
        sub = points.subset(inside)
        counts = {k: v for k, v in sub.counts().items() if k != "total"}
        truth, predicted = _purity(counts), sub.predicted_purity()
        out.append(
            RegionSummary(
                name=str(names[i]) if names is not None else f"region {i + 1}",
                n=len(sub),
                counts=counts,
                purity=truth,
                predicted_purity=predicted,
                difference=None if truth is None or predicted is None else predicted - truth,
                area_um2=polygon_area(polygon),
            )
        )
    return out
