"""The Train panel's curves: a small line plot of ``(step, value)`` points, painted with QPainter."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QWidget

__all__ = ["CurvePlot"]


class CurvePlot(QWidget):
    """A small line plot of ``(step, value)`` points, painted with QPainter (no plotting library).

    Parameters
    ----------
    title : str
        Shown top left.
    color : str
        Line colour.
    """

    def __init__(self, title: str, color: str = "#f0a030") -> None:
        super().__init__()
        self.title = title
        self.color = QColor(color)
        self.points: list[tuple[float, float]] = []
        self.empty_text = "no data yet"
        self.text_color = QColor("#f0f1f2")
        self.background = QColor("#2e333e")
        self.setMinimumHeight(140)
        self.setMinimumWidth(140)

    def set_points(self, points: Sequence[tuple[float, float]], title: str | None = None) -> None:
        """Replace the curve (and title) and repaint."""
        self.points = [(float(x), float(y)) for x, y in points if math.isfinite(y)]
        if title is not None:
            self.title = title
        self.update()

    def set_colors(self, text: str, background: str) -> None:
        """Text and background colours (from the viewer's theme)."""
        self.text_color, self.background = QColor(text), QColor(background)
        self.update()

    def paintEvent(self, event: Any) -> None:
        """Draw the frame, the axis extremes and the curve."""
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        painter.fillRect(self.rect(), self.background)
        font = painter.font()
        font.setPointSizeF(max(6.0, font.pointSizeF() * 0.85))
        painter.setFont(font)
        metrics = painter.fontMetrics()
        painter.setPen(self.text_color)
        painter.drawText(6, metrics.ascent() + 3, self.title)
        plot = QRectF(46, metrics.height() + 8, self.width() - 54, self.height() - 2 * metrics.height() - 14)
        if plot.width() < 10 or plot.height() < 10:
            return
        frame = QColor(self.text_color)
        frame.setAlpha(90)
        painter.setPen(QPen(frame, 1))
        painter.drawRect(plot)
        if not self.points:
            painter.setPen(self.text_color)
            painter.drawText(plot, int(Qt.AlignmentFlag.AlignCenter), self.empty_text)
            return
        xs = np.array([p[0] for p in self.points])
        ys = np.array([p[1] for p in self.points])
        x0, x1 = float(xs.min()), float(xs.max())
        y0, y1 = float(ys.min()), float(ys.max())
        if x1 == x0:
            x0, x1 = x0 - 1, x1 + 1
        pad = (y1 - y0) * 0.08 or max(abs(y0) * 0.05, 1e-3)
        y0, y1 = y0 - pad, y1 + pad

        def to_screen(x: float, y: float) -> QPointF:
            return QPointF(
                plot.left() + (x - x0) / (x1 - x0) * plot.width(),
                plot.bottom() - (y - y0) / (y1 - y0) * plot.height(),
            )

        painter.setPen(self.text_color)
        right = int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        for value, y in ((y1, plot.top()), (y0, plot.bottom())):
            painter.drawText(QRectF(0, y - 8, plot.left() - 4, 16), right, f"{value:.3g}")
        below = plot.bottom() + metrics.height()
        painter.drawText(QPointF(plot.left(), below), f"{x0:g}")
        label = f"{x1:g}"
        painter.drawText(QPointF(plot.right() - metrics.horizontalAdvance(label), below), label)
        painter.setPen(QPen(self.color, 1.6))
        screen = [to_screen(x, y) for x, y in self.points]
        if len(screen) > 1:
            painter.drawPolyline(QPolygonF(screen))
        if len(screen) <= 40:
            painter.setBrush(self.color)
            for point in screen:
                painter.drawEllipse(point, 2.2, 2.2)
        painter.end()
