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

__all__ = ["SUMMARY_NAME", "CohortTable"]

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
