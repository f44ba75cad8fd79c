"""The cohort's summary table, ``cohort.csv``: a row per slide, rewritten whole as slides finish (no Qt)."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from napari_pathology.batch.tasks import SlideReport, SlideTask
from napari_pathology.fileio import atomic_write

__all__ = ["SUMMARY_NAME", "CohortTable", "cohort_roc", "scores_by_label"]

#: File name of the summary table in the output folder.
SUMMARY_NAME = "cohort.csv"


def _number(value: float, digits: int = 6) -> str:
    return f"{value:.{digits}g}" if isinstance(value, int | float) and math.isfinite(value) else ""


class CohortTable:
    """The rows of ``cohort.csv``, in the slide table's order; :meth:`write` replaces the file whole.

    Columns: ``slide, path, label, status, slide_score, score:<class>...,
    tiles, seconds, worker, error, output`` (a pending slide's row has its
    status only).

    Parameters
    ----------
    path : path-like
        The CSV file.
    tasks : sequence of SlideTask
        Every slide of the cohort.
    classes : sequence of str
        The model's classes (one score column each).
    """

    def __init__(
        self, path: str | os.PathLike[str], tasks: Sequence[SlideTask], classes: Sequence[str]
    ) -> None:
        self.path = Path(path)
        self.classes = list(classes)
        self.reports: dict[str, SlideReport] = {
            task.slide: SlideReport(task.slide, task.name, task.label, "pending") for task in tasks
        }

    def update(self, report: SlideReport) -> None:
        """Record a slide's report (it replaces the slide's earlier row)."""
        self.reports[report.slide] = report

    def header(self) -> list[str]:
        """The column names."""
        scores = [f"score:{name}" for name in self.classes]
        return ["slide", "path", "label", "status", "slide_score", *scores, "tiles", "seconds", "worker",
                "error", "output"]  # fmt: skip

    def rows(self) -> list[list[Any]]:
        """One row per slide, as written."""
        out = []
        for report in self.reports.values():
            scores = [_number(report.scores.get(name, math.nan)) for name in self.classes]
            out.append([
                report.name, report.slide, report.label or "", report.status, _number(report.slide_score),
                *scores, report.tiles if report.status in ("done", "skipped", "cancelled") else "",
                f"{report.seconds:.1f}" if report.seconds else "", report.worker, report.error, report.output,
            ])  # fmt: skip
        return out

    def write(self) -> Path:
        """Replace ``cohort.csv`` whole (a reader never sees half a table)."""

        def rows(handle: Any) -> None:
            writer = csv.writer(handle)
            writer.writerow(self.header())
            writer.writerows(self.rows())

        return atomic_write(self.path, rows, text=True)


def scores_by_label(reports: Sequence[SlideReport]) -> dict[str, list[float]]:
    """Finite slide scores of the slides done, grouped by label (``unlabelled`` for none)."""
    groups: dict[str, list[float]] = {}
    for report in reports:
        if report.status in ("done", "skipped") and math.isfinite(report.slide_score):
            groups.setdefault(report.label or "unlabelled", []).append(float(report.slide_score))
    return groups


def cohort_roc(reports: Sequence[SlideReport]) -> tuple[Any, Any, float] | None:
    """ROC (fpr, tpr, AUC) of the slide scores against tumour/normal labels; None without both classes."""
    import numpy as np

    from napari_pathology.analysis.metrics import roc_auc, roc_curve
    from napari_pathology.cohort import canonical_label

    pairs = [
        (canonical_label(r.label) == "tumour", r.slide_score)
        for r in reports
        if r.status in ("done", "skipped") and canonical_label(r.label) in ("tumour", "normal")
        and math.isfinite(r.slide_score)
    ]  # fmt: skip
    labels = np.array([p[0] for p in pairs], bool)
    if not 0 < labels.sum() < len(labels):
        return None
    scores = np.array([p[1] for p in pairs], float)
    fpr, tpr, _ = roc_curve(labels, scores)
    return fpr, tpr, float(roc_auc(labels, scores))
