"""The Slide panel: facts of the active slide, its associated images, um/px override."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_pathology._layers import apply_mpp, follow_slide_scale, is_slide_metadata, slide_from_metadata
from napari_pathology._widgets._common import SlideLayerCombo, compact_panel
from napari_pathology._widgets._workers import run_in_thread
from napari_pathology.slide.settings import remember_mpp

if TYPE_CHECKING:
    import napari

PREVIEW_WIDTH = 260


def format_facts(meta: dict[str, Any]) -> dict[str, str]:
    """Human-readable facts of a slide layer's metadata, in display order."""
    mpp_x, mpp_y = meta.get("mpp_x"), meta.get("mpp_y")
    if mpp_x:
        source = {"file": "from the file", "user": "set by you"}.get(meta.get("mpp_source"), "")
        mpp_text = f"{mpp_x:.4g} x {mpp_y:.4g} um/px ({source})"
        size_mm = f"{meta['width'] * mpp_x / 1000:.2f} x {meta['height'] * mpp_y / 1000:.2f} mm"
    else:
        mpp_text = f"unknown: {meta.get('mpp_note', 'not in the file')}"
        size_mm = "unknown (no um/px)"
    downsamples = ", ".join(f"{d:g}" for d in meta.get("level_downsamples", []))
    power = meta.get("objective_power")
    return {
        "File": str(meta.get("name", "")),
        "Vendor": str(meta.get("vendor", "")),
        "Read by": str(meta.get("backend", "")),
        "Size": f"{meta['width']:,} x {meta['height']:,} px",
        "Physical size": size_mm,
        "Levels": f"{meta.get('levels', 1)} (downsamples {downsamples})",
        "um/px": mpp_text,
        "Objective": f"{power:g}x" if power else "unknown",
    }


class SlidePanel(QWidget):
    """Dock widget with the active slide's facts, associated images and um/px override."""

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.slide_combo = SlideLayerCombo(napari_viewer)
        self.slide_combo.changed.connect(self._refresh)

        self.fact_labels: dict[str, QLabel] = {}
        facts = QGroupBox("Facts")
        form = QFormLayout(facts)
        for key in ("File", "Vendor", "Read by", "Size", "Physical size", "Levels", "um/px",
                    "Objective"):  # fmt: skip
            label = QLabel("-")
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            label.setWordWrap(True)
            self.fact_labels[key] = label
            form.addRow(key, label)

        self.mpp_warning = QLabel()
        self.mpp_warning.setWordWrap(True)
        self.mpp_warning.setStyleSheet("color: #f0a030;")
        self.mpp_spin = QDoubleSpinBox()
        self.mpp_spin.setRange(0.01, 50.0)
        self.mpp_spin.setDecimals(4)
        self.mpp_spin.setSingleStep(0.01)
        self.mpp_spin.setValue(0.25)
        self.mpp_spin.setSuffix(" um/px")
        self.apply_mpp_button = QPushButton("Apply")
        self.apply_mpp_button.setToolTip("Use this um/px for the slide and everything computed on it")
        self.apply_mpp_button.clicked.connect(self._apply_mpp)
        self.reset_mpp_button = QPushButton("Use file's")
        self.reset_mpp_button.clicked.connect(self._reset_mpp)
        mpp_row = QHBoxLayout()
        mpp_row.addWidget(self.mpp_spin)
        mpp_row.addWidget(self.apply_mpp_button)
        mpp_row.addWidget(self.reset_mpp_button)
        mpp_box = QGroupBox("um/px override")
        mpp_layout = QVBoxLayout(mpp_box)
        mpp_layout.addWidget(self.mpp_warning)
        mpp_layout.addLayout(mpp_row)

        self.associated_combo = QComboBox()
        self.associated_combo.currentTextChanged.connect(self._show_associated)
        self.associated_preview = QLabel("no associated images")
        self.associated_preview.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.associated_preview.setMinimumHeight(80)
        self.add_associated_button = QPushButton("Add as layer")
        self.add_associated_button.clicked.connect(self._add_associated_layer)
        assoc_box = QGroupBox("Associated images")
        assoc_layout = QVBoxLayout(assoc_box)
        assoc_layout.addWidget(self.associated_combo)
        assoc_layout.addWidget(self.associated_preview)
        assoc_layout.addWidget(self.add_associated_button)

        layout = QVBoxLayout(self)
        layout.addWidget(self.slide_combo)
        layout.addWidget(facts)
        layout.addWidget(mpp_box)
        layout.addWidget(assoc_box)
        layout.addStretch(1)
        compact_panel(self)
        self._associated_cache: dict[tuple[str, str], np.ndarray] = {}
        self._refresh()

    # ------------------------------------------------------------------ state
    @property
    def layer(self) -> napari.layers.Image | None:
        """The slide layer shown in the panel."""
        return self.slide_combo.current_layer()

    def _refresh(self) -> None:
        layer = self.layer
        enabled = layer is not None
        for widget in (self.mpp_spin, self.apply_mpp_button, self.reset_mpp_button,
                       self.associated_combo, self.add_associated_button):  # fmt: skip
            widget.setEnabled(enabled)
        if layer is None:
            for label in self.fact_labels.values():
                label.setText("-")
            self.mpp_warning.setText("Open a slide (File > Open) to see its facts.")
            self.associated_combo.clear()
            return
        meta = layer.metadata
        for key, text in format_facts(meta).items():
            self.fact_labels[key].setText(text)
        if meta.get("mpp_missing"):
            self.mpp_warning.setText(
                "This slide has no um/px: sizes are in pixels. Enter the scanner's um/px and press Apply."
            )
            self.mpp_warning.show()
        else:
            self.mpp_warning.hide()
            self.mpp_spin.setValue(float(meta["mpp_x"]))
        self.reset_mpp_button.setEnabled(meta.get("mpp_source") == "user")
        names = list(meta.get("associated_images", []))
        self.associated_combo.blockSignals(True)
        self.associated_combo.clear()
        self.associated_combo.addItems(names)
        self.associated_combo.blockSignals(False)
        self.add_associated_button.setEnabled(bool(names))
        if names:
            self._show_associated(names[0])
        else:
            self.associated_preview.setPixmap(QPixmap())
            self.associated_preview.setText("no associated images")

    # ------------------------------------------------------------------ um/px
    def _apply_mpp(self) -> None:
        self._set_mpp(float(self.mpp_spin.value()))

    def _reset_mpp(self) -> None:
        self._set_mpp(None)

    def _set_mpp(self, mpp: float | None) -> None:
        """Set (None: clear) the slide's um/px, move every layer derived from it, remember it."""
        from napari.utils.notifications import show_error, show_warning

        layer = self.layer
        if layer is None:
            return
        try:
            slide = slide_from_metadata(layer.metadata)
            old_scale = tuple(float(v) for v in layer.scale[-2:])
            metadata = dict(layer.metadata)
            scale = apply_mpp(metadata, slide, mpp)
        except (OSError, ValueError) as exc:  # a vanished file, a bad value
            show_error(f"{layer.name}: um/px not changed: {exc}")
            return
        layer.metadata = metadata
        layer.units = ("micrometer", "micrometer") if slide.mpp else ("pixel", "pixel")
        layer.scale = scale
        follow_slide_scale(self.viewer.layers, layer, old_scale)
        if slide.path:
            try:  # beside the slide, so reopening it (and its annotations) uses the same um/px
                remember_mpp(slide.path, mpp)
            except (OSError, ValueError) as exc:
                show_warning(f"{layer.name}: the um/px is set for now but could not be kept: {exc}")
        self.viewer.reset_view()
        self._refresh()

    # ------------------------------------------------------------------ associated
    def _read_associated(self, metadata: dict[str, Any], name: str) -> np.ndarray:
        """Read (once) an associated image; runs in a worker thread."""
        key = (str(metadata.get("path")), name)
        if key not in self._associated_cache:
            slide = slide_from_metadata(metadata)
            self._associated_cache[key] = slide.read_associated_image(name)
        return self._associated_cache[key]

    def _show_associated(self, name: str) -> None:
        layer = self.layer
        if not name or layer is None:
            return
        self.associated_preview.setText(f"reading {name}...")
        run_in_thread(self._read_associated, dict(layer.metadata), name, on_done=self._set_preview)

    def _set_preview(self, image: np.ndarray) -> None:
        image = np.ascontiguousarray(image[..., :3])
        height, width = image.shape[:2]
        qimage = QImage(image.data, width, height, 3 * width, QImage.Format.Format_RGB888).copy()
        pixmap = QPixmap.fromImage(qimage).scaledToWidth(
            min(PREVIEW_WIDTH, width), Qt.TransformationMode.SmoothTransformation
        )
        self.associated_preview.setPixmap(pixmap)

    def _add_associated_layer(self) -> None:
        name = self.associated_combo.currentText()
        layer = self.layer
        if not name or layer is None:
            return

        def add(image: np.ndarray) -> None:
            self.viewer.add_image(image, rgb=True, name=f"{layer.name} {name}")

        run_in_thread(self._read_associated, dict(layer.metadata), name, on_done=add)


__all__ = ["SlidePanel", "format_facts", "is_slide_metadata"]
