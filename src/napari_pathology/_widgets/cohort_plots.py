"""The Cohort panel's plots: slide scores by label, and the ROC once the cohort is finished (pyqtgraph)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyqtgraph as pg
from qtpy.QtCore import Qt

from napari_pathology.batch.summary import cohort_roc, scores_by_label

__all__ = ["CohortPlots"]

#: Colours of the label groups, in order.
COLORS = ("#4c9be8", "#f0a030", "#7ccf7c", "#e87070", "#b08ee8", "#cfcf6a")


class CohortPlots(pg.GraphicsLayoutWidget):
    """Two plots side by side: each slide's score over its label (jittered), and the ROC."""

    def __init__(self) -> None:
        super().__init__()
        self.scores = self.addPlot(title="slide score by label")
        self.roc = self.addPlot(title="ROC")
        self.scores.showGrid(y=True, alpha=0.25)
        self.roc.showGrid(x=True, y=True, alpha=0.25)
        self.roc.setLabel("bottom", "false positive rate")
        self.roc.setLabel("left", "true positive rate")
        self.roc.setXRange(0, 1)
        self.roc.setYRange(0, 1)
        self.labels: list[str] = []
        self.setMinimumHeight(170)

    def show_scores(self, reports: Sequence[Any]) -> None:
        """Redraw the scores of the slides done so far (one column of points per label)."""
        self.scores.clear()
        groups = scores_by_label(reports)
        self.labels = sorted(groups)
        rng = np.random.default_rng(0)
        for k, label in enumerate(self.labels):
            values = np.asarray(groups[label], float)
            x = k + rng.uniform(-0.15, 0.15, len(values))
            color = COLORS[k % len(COLORS)]
            self.scores.addItem(pg.ScatterPlotItem(x, values, size=7, pen=None, brush=color, name=label))
        self.scores.getAxis("bottom").setTicks([list(enumerate(self.labels))])

    def show_roc(self, reports: Sequence[Any]) -> float | None:
        """Draw the ROC of the tumour/normal slides; returns the AUC (None without both classes)."""
        self.roc.clear()
        self.roc.plot([0, 1], [0, 1], pen=pg.mkPen("#888888", style=Qt.PenStyle.DashLine))
        roc = cohort_roc(reports)
        if roc is None:
            self.roc.setTitle("ROC (needs tumour and normal slides)")
            return None
        fpr, tpr, auc = roc
        self.roc.plot(fpr, tpr, pen=pg.mkPen("#f0a030", width=2))
        self.roc.setTitle(f"ROC, AUC {auc:.3f}")
        return auc
