"""The Nuclei panel's editable nuclei layer: the slide it belongs to, labelling keys, counts and purity.

Mixed into :class:`~napari_pathology._widgets.nuclei_panel.NucleiPanel` (it uses the panel's
viewer, slide combo, status label, timers, regions and predictions).
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
from napari.layers import Points
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
)

from napari_pathology._widgets._common import same_path
from napari_pathology._widgets.nuclei_layers import (
    NUCLEI_MARKER,
    add_nuclei_layer,
    points_from_layer,
    repaint,
    set_labels,
    slide_mpp_xy,
    um_from_world,
)
from napari_pathology.nuclei.points import (
    SUMMARY_COLUMNS,
    NucleusPoints,
    counts_text,
    region_summaries,
    summary_row,
)

#: Keys that label the selected nuclei.
LABEL_KEYS = {"t": "tumour", "n": "normal", "o": "other", "u": "unlabeled"}
#: Layer metadata key: a token naming one nuclei layer object (which layer an autosave file holds).
LAYER_TOKEN = "napari_pathology_nuclei_token"


class NucleiLayerControls:
    """The nuclei layer of the chosen slide, its label keys and buttons, the counts and the region table."""

    def _build_label_box(self) -> QGroupBox:
        box = QGroupBox("Label (keys t, n, o, u on the nuclei layer)")
        buttons = QHBoxLayout()
        self.label_buttons: dict[str, QPushButton] = {}
        for key, label in LABEL_KEYS.items():
            button = QPushButton(f"{label.capitalize()} ({key})")
            button.clicked.connect(lambda _=False, name=label: self.label_selected(name))
            buttons.addWidget(button)
            self.label_buttons[label] = button
        self.counts_label = QLabel("No nuclei yet.")
        self.counts_label.setWordWrap(True)
        self.counts_label.setStyleSheet("font-weight: bold;")
        self.region_table = QTableWidget(0, len(SUMMARY_COLUMNS))
        self.region_table.setHorizontalHeaderLabels(SUMMARY_COLUMNS)
        self.region_table.verticalHeader().setVisible(False)
        self.region_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.region_table.horizontalHeader().setMinimumSectionSize(30)
        self.region_table.setMaximumHeight(110)
        self.region_table.setToolTip(
            "Per region of the Regions layer: ground-truth purity = tumour / (tumour + normal); "
            "predicted = mean tumour probability of its nuclei; difference = predicted - truth."
        )
        inner = QVBoxLayout(box)
        inner.addLayout(buttons)
        inner.addWidget(self.counts_label)
        inner.addWidget(self.region_table)
        return box

    def slide_layer(self) -> Any:
        """The chosen slide layer, or None."""
        return self.slide_combo.current_layer()

    @property
    def mpp(self) -> tuple[float, float]:
        """The chosen slide's level-0 ``(mpp_x, mpp_y)``."""
        layer = self.slide_layer()
        return slide_mpp_xy(layer) if layer is not None else (1.0, 1.0)

    def extent_um(self) -> tuple[float, float]:
        """The chosen slide's size ``(width, height)`` in micrometres (in pixels when it has no um/px)."""
        meta = self.slide_layer().metadata
        mpp = self.mpp
        return (float(meta["width"]) * mpp[0], float(meta["height"]) * mpp[1])

    def nuclei_layer(self, create: bool = False) -> Any:
        """The editable nuclei layer of the chosen slide (made empty when ``create``), or None."""
        slide = self.slide_layer()
        if slide is None:
            return None
        path = slide.metadata.get("path")
        for layer in reversed(list(self.viewer.layers)):
            marker = layer.metadata.get(NUCLEI_MARKER)
            if isinstance(layer, Points) and marker is not None and same_path(marker, path):
                self._adopt(layer)
                return layer
        if not create:
            return None
        return self._adopt(
            add_nuclei_layer(self.viewer, slide, NucleusPoints.empty(), f"{slide.name} nuclei")
        )

    def _adopt(self, layer: Any) -> Any:
        """Wire a nuclei layer once: label keys, recount and autosave on every edit."""
        if self._layer is layer:
            return layer
        self._layer = layer
        layer.metadata.setdefault(LAYER_TOKEN, uuid.uuid4().hex)
        for key, label in LABEL_KEYS.items():
            layer.bind_key(key, lambda _layer, name=label: self.label_selected(name), overwrite=True)
        layer.events.data.connect(self._on_layer_edited)
        self._sync_colour_combo()
        self.recount()
        return layer

    def label_selected(self, label: str) -> int:
        """Give the selected nuclei ``label``; returns how many changed."""
        layer = self._layer if self._layer is not None else self.nuclei_layer()
        if layer is None or not layer.selected_data:
            self.status.setText("Select nuclei first (select tool, or click them).")
            return 0
        changed = set_labels(layer, layer.selected_data, label)
        self.recount()
        self._autosave_timer.start()
        return changed

    def _on_layer_edited(self, event: Any = None) -> None:
        action = getattr(event, "action", None)
        if (str(action).endswith("added") or str(action) == "added") and self._layer is not None:
            n = len(self._layer.data)  # napari gives the new points as negative indices (-k..-1)
            indices = [int(i) + n if int(i) < 0 else int(i) for i in getattr(event, "data_indices", ()) or ()]
            self._mark_manual(indices)
            QTimer.singleShot(0, lambda: self._drop_outside(indices))
        self._schedule_recount()
        self._autosave_timer.start()

    def _drop_outside(self, indices: Any) -> None:
        """Remove nuclei just added outside the slide (a click beside the image is no nucleus)."""
        layer = self._layer
        slide = self.slide_layer()
        candidates = [int(i) for i in indices] if indices is not None else []
        if layer is None or slide is None or not candidates:
            return
        index = np.array([i for i in candidates if 0 <= i < len(layer.data)], np.int64)
        if not len(index):
            return
        xy = um_from_world(np.asarray(layer.data, np.float64)[index, -2:], self.mpp)
        width, height = self.extent_um()
        with np.errstate(invalid="ignore"):
            inside = (xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy[:, 0] <= width) & (xy[:, 1] <= height)
        outside = index[~inside]
        if len(outside):
            layer.selected_data = set(outside.tolist())
            layer.remove_selected()
            self.status.setText(f"{len(outside)} nuclei added outside the slide were removed.")

    def _mark_manual(self, indices: Any) -> None:
        layer = self._layer
        index = [i for i in indices if 0 <= i < len(layer.features)] if indices else []
        if index and "source" in layer.features:
            column = layer.features["source"].to_numpy(dtype=object).copy()
            column[index] = "manual"
            layer.features["source"] = column

    def _schedule_recount(self, *_: Any) -> None:
        self._recount_timer.start()

    def current_points(self) -> NucleusPoints:
        """The editable nuclei as a table (empty when there is no layer)."""
        layer = self._layer if self._layer is not None else self.nuclei_layer()
        return points_from_layer(layer, self.mpp) if layer is not None else NucleusPoints.empty()

    def recount(self) -> None:
        """Refresh counts, ground-truth purity and the per-region table."""
        points = self.current_points()
        self.counts_label.setText(counts_text(points, self.predictions))
        names, polygons = self.regions()
        summaries = region_summaries(points, polygons, names) if polygons else []
        self.region_table.setRowCount(len(summaries))
        for row, summary in enumerate(summaries):
            for column, value in enumerate(summary_row(summary)):
                self.region_table.setItem(row, column, QTableWidgetItem(value))
        self.summaries = summaries

    def _sync_colour_combo(self) -> None:
        if self._layer is not None:
            index = self.colour_combo.findData(self._layer.metadata.get("colour_by", "label"))
            self.colour_combo.blockSignals(True)
            self.colour_combo.setCurrentIndex(max(index, 0))
            self.colour_combo.blockSignals(False)

    def _colour_changed(self, *_: Any) -> None:
        layer = self._layer if self._layer is not None else self.nuclei_layer()
        if layer is not None:
            layer.metadata["colour_by"] = str(self.colour_combo.currentData())
            repaint(layer, self.mpp)
