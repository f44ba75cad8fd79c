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


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def counts_text(points: NucleusPoints, predictions: NucleusPoints | None = None) -> str:
    """One line of counts and purities: the labelled nuclei, then the slide's predictions when given."""
    counts = points.counts()
    purity = points.purity()
    labelled = counts["tumour"] + counts["normal"]
    text = (
        f"{counts['total']} nuclei: {counts['tumour']} tumour, {counts['normal']} normal, "
        f"{counts['other']} other, {counts['unlabeled']} unlabeled. "
        f"Purity {_fmt(purity)}" + (f" ({counts['tumour']}/{labelled})" if labelled else "")
    )
    predicted = points.predicted_purity()
    if predicted is not None:
        text += f"; predicted {predicted:.2f}"
    if predictions is not None:
        slide_pred = predictions.predicted_purity()
        text += f". Slide: {len(predictions)} predicted nuclei" + (
            f", predicted purity {slide_pred:.2f}" if slide_pred is not None else ""
        )
    return text


#: Columns of :func:`summary_row`.
SUMMARY_COLUMNS = ("Region", "Nuclei", "Tumour", "Normal", "Purity", "Predicted", "Diff.")


def summary_row(summary: RegionSummary) -> tuple[str, ...]:
    """A region's summary as text, one cell per :data:`SUMMARY_COLUMNS` (``-`` when missing)."""
    return (
        summary.name, str(summary.n), str(summary.counts["tumour"]), str(summary.counts["normal"]),
        _fmt(summary.purity), _fmt(summary.predicted_purity), _fmt(summary.difference),
    )  # fmt: skip
