"""How the Analyze panel explains a heatmap: a colour bar with its ends and meaning, attention views.

:class:`HeatmapLegend` paints the heatmap layer's colormap as a small
gradient between its contrast limits and says what a cell's value is (the
kind's ``meaning`` from :data:`~napari_pathology.analysis.result.HEATMAP_KINDS`).
:func:`attention_percentiles` is CLAM's heatmap scale: each patch's raw
attention as the percentile of the slide's raw scores.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import QHBoxLayout, QLabel, QVBoxLayout, QWidget

from napari_pathology.analysis.result import HEATMAP_KINDS

#: Size of the colour bar (px).
BAR_SIZE = (180, 12)
#: What a percentile attention cell holds.
PERCENTILE_MEANING = "percentile of the tile's raw attention among the slide's tiles (CLAM's heatmap scale)"


def attention_percentiles(raw: np.ndarray) -> np.ndarray:
    """Each finite cell's percentile (0-100] among the finite cells, as CLAM's heatmaps show it.

    CLAM scores a patch by ``percentileofscore(scores, score)``; ties share their
    mean rank. NaN cells (no tissue, not computed) stay NaN.
    """
    from scipy.stats import rankdata

    raw = np.asarray(raw, dtype=np.float64)
    out = np.full(raw.shape, np.nan, dtype=np.float32)
    finite = np.isfinite(raw)
    if finite.any():
        out[finite] = (rankdata(raw[finite], method="average") / finite.sum() * 100.0).astype(np.float32)
    return out


def gradient_pixmap(colormap: Any, size: tuple[int, int] = BAR_SIZE) -> QPixmap:
    """A horizontal bar of ``colormap`` (a napari colormap or its name), low on the left."""
    from napari.utils.colormaps import ensure_colormap

    width, height = size
    rgba = np.asarray(ensure_colormap(colormap).map(np.linspace(0.0, 1.0, width)), dtype=np.float64)
    alpha = rgba[:, 3:4]
    over_grey = rgba[:, :3] * alpha + 0.5 * (1.0 - alpha)  # transparent ends shown over mid grey
    row = (np.clip(over_grey, 0, 1) * 255).astype(np.uint8)
    image = np.ascontiguousarray(np.repeat(row[None], height, axis=0))
    qimage = QImage(image.data, width, height, 3 * width, QImage.Format.Format_RGB888).copy()
    return QPixmap.fromImage(qimage)


class HeatmapLegend(QWidget):
    """Colour bar of the shown heatmap: low end, gradient, high end, and what a value means."""

    def __init__(self) -> None:
        super().__init__()
        self.low = QLabel()
        self.bar = QLabel()
        self.high = QLabel()
        self.meaning = QLabel()
        self.meaning.setWordWrap(True)
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.low)
        row.addWidget(self.bar, 1, Qt.AlignmentFlag.AlignVCenter)
        row.addWidget(self.high)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.meaning)
        self.setVisible(False)

    def show_layer(self, layer: Any, kind: str, percentile: bool = False) -> None:
        """Show ``layer``'s colormap and contrast limits, and the meaning of a ``kind`` cell."""
        if layer is None:
            self.setVisible(False)
            return
        low, high = (float(v) for v in layer.contrast_limits)
        self.low.setText(f"{low:.3g}")
        self.high.setText(f"{high:.3g}")
        self.bar.setPixmap(gradient_pixmap(layer.colormap))
        meaning = PERCENTILE_MEANING if percentile else HEATMAP_KINDS[kind].meaning
        self.meaning.setText(
            f"<small>Colour: {meaning}; uncoloured: not computed (no tissue or not reached).</small>"
        )
        self.setVisible(True)

    def text(self) -> str:
        """The legend as one line (for tests and logs): ``low .. high: meaning``."""
        return f"{self.low.text()} .. {self.high.text()}: {self.meaning.text()}"
