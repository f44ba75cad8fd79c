"""The Train panel's curves: ``(step, value)`` points in a pyqtgraph plot.

pyqtgraph gives the axes, the grid, the legend, zoom and pan with the mouse
(the small "A" button in a corner, or a right click, brings back the whole
curve); :class:`CurvePlot` adds a read-out of the point nearest the mouse and
a line saying why a plot is empty.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyqtgraph as pg

__all__ = ["CurvePlot"]

#: Room left above a curve for the legend, as a share of the curve's height.
LEGEND_ROOM = 0.3


class CurvePlot(pg.PlotWidget):
    """A line plot of ``(step, value)`` points: labelled axes, legend, mouse zoom and pan, hover read-out.

    Parameters
    ----------
    title : str
        The curve's name (legend and left axis).
    color : str
        Line colour.
    """

    def __init__(self, title: str, color: str = "#f0a030") -> None:
        super().__init__()
        self.title = title
        self.color = color
        self.points: list[tuple[float, float]] = []
        self.empty_text = "no data yet"
        self.text_color = "#f0f1f2"
        item = self.getPlotItem()
        item.showGrid(x=True, y=True, alpha=0.25)
        item.setLabel("bottom", "step")
        item.getAxis("left").setWidth(44)
        for name in ("left", "bottom"):  # say 0.35, not 350 (x0.001)
            item.getAxis(name).enableAutoSIPrefix(False)
        item.setMouseEnabled(x=True, y=True)
        self.legend = item.addLegend(offset=(-6, 6), labelTextSize="8pt")
        self.curve = item.plot(
            [], [], pen=pg.mkPen(color, width=1.6), symbol="o", symbolSize=4,
            symbolPen=None, symbolBrush=color, name=title,
        )  # fmt: skip
        self.marker = pg.ScatterPlotItem(size=9, pen=pg.mkPen(color, width=1.5), brush=None)
        self.readout = pg.TextItem(anchor=(1, 1))
        self.empty_label = pg.TextItem(self.empty_text, anchor=(0.5, 0.5))
        for extra in (self.marker, self.readout):
            item.addItem(extra, ignoreBounds=True)
        item.addItem(self.empty_label, ignoreBounds=True)
        self.empty_label.setPos(0.5, 0.5)
        item.setRange(xRange=(0, 1), yRange=(0, 1), padding=0)
        self.scene().sigMouseMoved.connect(self._hover)
        self.setMinimumHeight(140)
        self.setMinimumWidth(140)
        self._show()

    def set_points(self, points: Sequence[tuple[float, float]], title: str | None = None) -> None:
        """Replace the curve (and its name) and redraw; non-finite values are left out."""
        self.points = [(float(x), float(y)) for x, y in points if math.isfinite(y)]
        if title is not None and title != self.title:
            self.title = title
            self.legend.removeItem(self.curve)
            self.legend.addItem(self.curve, title)
        self._show()

    def set_colors(self, text: str, background: str) -> None:
        """Text and background colours (from the viewer's theme)."""
        self.text_color = text
        self.setBackground(background)
        item = self.getPlotItem()
        for name in ("left", "bottom"):
            axis = item.getAxis(name)
            axis.setTextPen(text)
            axis.setPen(pg.mkPen(text))
        self.legend.setLabelTextColor(text)
        self.legend.setBrush(pg.mkBrush(background))
        self.empty_label.setColor(text)
        self.readout.setColor(text)
        self._show()

    def _show(self) -> None:
        item = self.getPlotItem()
        item.setLabel("left", self.title, color=self.text_color)
        item.getAxis("bottom").setLabel("step", color=self.text_color)
        self.marker.clear()
        self.readout.setText("")
        self.legend.setVisible(bool(self.points))
        if not self.points:
            self.curve.setData([], [])
            self.empty_label.setText(self.empty_text)
            self.empty_label.setVisible(True)
            item.setRange(xRange=(0, 1), yRange=(0, 1), padding=0)
            return
        self.empty_label.setVisible(False)
        xs, ys = np.array(self.points).T
        self.curve.setData(xs, ys, symbolSize=4 if len(xs) <= 60 else 0)
        # the whole curve, with room above it for the legend; the mouse may zoom in again
        x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
        dx, dy = (x1 - x0) or 1.0, (y1 - y0) or max(abs(y0) * 0.1, 1e-3)
        item.setRange(
            xRange=(x0 - 0.04 * dx, x1 + 0.04 * dx), yRange=(y0 - 0.08 * dy, y1 + LEGEND_ROOM * dy), padding=0
        )

    def _hover(self, position: Any) -> None:
        """Mark the point nearest the mouse (in screen distance) and say its step and value."""
        view = self.getPlotItem().getViewBox()
        if not self.points or not view.sceneBoundingRect().contains(position):
            self.marker.clear()
            self.readout.setText("")
            return
        xs, ys = np.array(self.points).T
        mouse = view.mapSceneToView(position)
        width, height = view.viewPixelSize()  # data units per screen pixel
        distance = ((xs - mouse.x()) / (width or 1)) ** 2 + ((ys - mouse.y()) / (height or 1)) ** 2
        nearest = int(np.argmin(distance))
        x, y = xs[nearest], ys[nearest]
        self.marker.setData([x], [y])
        self.readout.setText(f"step {x:g}: {y:.4g}")
        self.readout.setPos(x, y)
