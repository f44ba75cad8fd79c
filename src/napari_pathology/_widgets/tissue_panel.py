"""The Tissue panel: detect, correct, import and save the tissue mask of a slide.

Thin wiring over :mod:`napari_pathology.tissue`: detection runs as a worker
on the :func:`~napari_pathology.tissue.detect_tissue` generator, the result
is a labels layer laid over the slide (label > 0 is tissue), and the user
corrects it with napari's paint and erase tools. :func:`tissue_mask_from_layer`
turns that layer back into a :class:`~napari_pathology.tissue.TissueMask`, so
the corrected mask is what later steps (tiling, analysis) use.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_pathology._layers import follow_slide_scale, slide_from_metadata
from napari_pathology._widgets._common import SlideLayerCombo, compact_panel, same_path
from napari_pathology._widgets._workers import PanelWorker, run_in_thread, start_worker
from napari_pathology._widgets.tissue_form import METHOD_CHOICES, TissueFormMixin, style_tissue_layer
from napari_pathology.tissue import TissueMask, detect_tissue, read_tissue_file, save_tissue_mask
from napari_pathology.tissue.layer import (
    TISSUE_LAYER_COLORS,
    TISSUE_MARKER,
    format_area,
    is_tissue_metadata,
    labels_layer_args,
    mask_from_labels,
)

if TYPE_CHECKING:
    import napari

    from napari_pathology.slide import Slide

_IMPORT_FILTER = "Tissue masks (*.geojson *.json *.png *.tif *.tiff *.jpg *.jpeg);;All files (*)"

#: Delay before the area label follows a paint stroke (coalesces bursts of events).
AREA_UPDATE_MS = 150


# --------------------------------------------------------------------------- layer <-> mask


def is_tissue_layer(layer: Any) -> bool:
    """Whether a layer is a tissue labels layer made by this plugin."""
    return getattr(layer, "_type_string", None) == "labels" and is_tissue_metadata(
        getattr(layer, "metadata", {})
    )


def find_tissue_layer(viewer: napari.Viewer, slide_path: str | None) -> napari.layers.Labels | None:
    """The tissue labels layer of the slide at ``slide_path``, or None.

    When several exist, the most recently added (top-most) one wins.
    """
    for layer in reversed(list(viewer.layers)):
        if is_tissue_layer(layer) and same_path(layer.metadata.get("slide_path"), slide_path):
            return layer
    return None


def tissue_mask_from_layer(layer: napari.layers.Labels) -> TissueMask:
    """The (possibly user-painted) tissue labels layer as a :class:`TissueMask` (label > 0 is tissue).

    Raises
    ------
    ValueError
        When the layer is not a tissue layer made by the Tissue panel (see
        :func:`~napari_pathology.tissue.layer.mask_from_labels`).
    """
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    return mask_from_labels(data, getattr(layer, "metadata", None), getattr(layer, "name", str(layer)))


def tissue_layer_kwargs(mask: TissueMask, slide_layer: Any, slide_path: str | None) -> dict[str, Any]:
    """``add_labels`` keyword arguments that lay ``mask`` over ``slide_layer``."""
    from napari.utils.colormaps import DirectLabelColormap

    kwargs = labels_layer_args(mask, slide_layer.name, slide_layer.units, slide_path)
    return {**kwargs, "colormap": DirectLabelColormap(color_dict=dict(TISSUE_LAYER_COLORS))}


# --------------------------------------------------------------------------- panel


class TissuePanel(TissueFormMixin, QWidget):
    """Dock widget: detect the tissue of the chosen slide, correct, import and save it."""

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._worker: Any = None  # napari's worker while a detection runs
        self._running: PanelWorker | None = None
        self._watched: Any = None
        self.last_mask: TissueMask | None = None

        self.slide_combo = SlideLayerCombo(napari_viewer)
        self.slide_combo.changed.connect(self._on_slide_changed)

        params_box = self._make_params_box()

        # ---- actions and feedback
        self.detect_button = QPushButton("Detect")
        self.detect_button.setToolTip("Find the tissue of the chosen slide (runs in the background)")
        self.detect_button.clicked.connect(self.detect)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        self.cancel_button.setEnabled(False)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.area_label = QLabel("-")
        self.area_label.setStyleSheet("font-weight: bold;")
        self.status_label = QLabel()
        self.status_label.setWordWrap(True)
        self.import_button = QPushButton("Import...")
        self.import_button.setToolTip("Load a tissue mask: GeoJSON (QuPath), a saved mask or a mask image")
        self.import_button.clicked.connect(self._import_dialog)
        self.save_button = QPushButton("Save...")
        self.save_button.setToolTip("Save the (corrected) mask as PNG + JSON + GeoJSON")
        self.save_button.clicked.connect(self._save_dialog)

        run_row = QHBoxLayout()
        run_row.addWidget(self.detect_button)
        run_row.addWidget(self.cancel_button)
        file_row = QHBoxLayout()
        file_row.addWidget(self.import_button)
        file_row.addWidget(self.save_button)
        self._make_fill_check()
        hint = QLabel("Correct the mask with the layer's paint / erase tools; the area follows.")
        hint.setWordWrap(True)

        layout = QVBoxLayout(self)
        layout.addWidget(self.slide_combo)
        layout.addWidget(params_box)
        layout.addLayout(run_row)
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.area_label)
        layout.addWidget(self.status_label)
        layout.addWidget(self.fill_check)
        layout.addWidget(hint)
        layout.addLayout(file_row)
        layout.addStretch(1)
        compact_panel(self)

        self._area_timer = QTimer(self)
        self._area_timer.setSingleShot(True)
        self._area_timer.setInterval(AREA_UPDATE_MS)
        self._area_timer.timeout.connect(self.update_area)
        napari_viewer.layers.events.inserted.connect(self._on_layers_changed)
        napari_viewer.layers.events.removed.connect(self._on_layers_changed)
        self._update_method_rows()
        self._on_slide_changed()

    # ------------------------------------------------------------------ state
    @property
    def slide_layer(self) -> napari.layers.Image | None:
        """The slide layer chosen in the panel."""
        return self.slide_combo.current_layer()

    @property
    def tissue_layer(self) -> napari.layers.Labels | None:
        """The tissue layer of the chosen slide, if any."""
        layer = self.slide_layer
        return None if layer is None else find_tissue_layer(self.viewer, layer.metadata.get("path"))

    def _set_status(self, text: str, warning: bool = False) -> None:
        self.status_label.setText(text)
        self.status_label.setStyleSheet("color: #f0a030;" if warning else "")

    def _on_slide_changed(self) -> None:
        has_slide = self.slide_layer is not None
        running = self._worker is not None
        self.detect_button.setEnabled(has_slide and not running)
        self.import_button.setEnabled(has_slide)
        if not has_slide:
            self._set_status("Open a slide (File > Open) to find its tissue.")
        elif not running:
            meta = self.slide_layer.metadata
            if meta.get("mpp_missing"):
                self._set_status(
                    "This slide has no um/px: set it in the Slide panel before detecting tissue.", True
                )
            else:
                self._set_status("")
        self._follow_slide_mpp()
        self._watch(self.tissue_layer)

    def _follow_slide_mpp(self) -> None:
        """Keep the tissue layer on its slide when the slide's um/px is changed (Slide panel).

        The mask stays attached to the same level-0 pixels; its um/px scales with the slide's.
        :func:`~napari_pathology._layers.follow_slide_scale` does it (a no-op when the Slide
        panel already did).
        """
        slide_layer, tissue = self.slide_layer, self.tissue_layer
        if slide_layer is None or tissue is None:
            return
        follow_slide_scale([tissue], slide_layer)

    def _on_layers_changed(self, event: Any = None) -> None:
        self._watch(self.tissue_layer)

    # ------------------------------------------------------------------ area
    def _watch(self, layer: Any) -> None:
        """Follow edits of ``layer`` (paint strokes, undo, new data) to keep the area current."""
        if layer is self._watched:
            self._schedule_area()
            return
        if self._watched is not None:
            for emitter in self._area_emitters(self._watched):
                emitter.disconnect(self._schedule_area)
        self._watched = layer
        if layer is not None:
            for emitter in self._area_emitters(layer):
                emitter.connect(self._schedule_area)
        self.save_button.setEnabled(layer is not None)
        self.update_area()

    @staticmethod
    def _area_emitters(layer: Any) -> list[Any]:
        events = layer.events
        return [getattr(events, name) for name in ("paint", "data", "set_data") if hasattr(events, name)]

    def _schedule_area(self, event: Any = None) -> None:
        self._area_timer.start()

    def update_area(self) -> None:
        """Recompute the area label from the tissue layer (painted corrections included)."""
        layer = self._watched
        if layer is None or layer not in self.viewer.layers:
            self.area_label.setText("-")
            return
        try:
            mask = tissue_mask_from_layer(layer)
        except ValueError as exc:
            self.area_label.setText(str(exc))
            return
        self.area_label.setText(format_area(mask))

    # ------------------------------------------------------------------ detect
    def detect(self) -> None:
        """Run tissue detection on the chosen slide in a background worker."""
        from napari.utils.notifications import show_error

        layer = self.slide_layer
        if layer is None or self._worker is not None:
            return
        try:
            slide = slide_from_metadata(layer.metadata)
            slide.require_mpp()
            params = self.params()
        except Exception as exc:  # a missing um/px, a vanished file: say so, keep the panel usable
            self._set_status(str(exc), warning=True)
            show_error(str(exc))
            return
        self._set_status(f"Finding tissue on {layer.name}...")
        self._running = start_worker(
            detect_tissue, slide, params, progress=self.progress_bar, status=self._set_status,
            busy=(self.detect_button,), cancel_button=self.cancel_button,
            on_done=lambda mask: self._on_detected(mask, layer, slide),
            on_error=self._on_error, on_finished=self._on_finished,
        )  # fmt: skip
        self._worker = self._running.worker

    def cancel(self) -> None:
        """Stop a running detection (the previous mask, if any, is kept)."""
        if self._running is not None and self._running.cancel("Cancelled."):
            self.detect_button.setEnabled(False)  # until the worker has stopped

    def _on_detected(self, mask: TissueMask, slide_layer: Any, slide: Slide) -> None:
        from napari.utils.notifications import show_warning

        self.show_mask(mask, slide_layer, slide.path)
        if mask.is_empty:
            text = (
                f"No tissue found on {slide_layer.name}. Try another method or a lower threshold, "
                "or paint the tissue on the layer."
            )
            self._set_status(text, warning=True)
            show_warning(text)
        else:
            self._set_status(f"Tissue found on {slide_layer.name} ({mask.method}).")

    def _on_error(self, exc: BaseException) -> None:
        from napari.utils.notifications import show_error

        self._set_status(f"Tissue detection failed: {exc}", warning=True)
        show_error(f"Tissue detection failed: {exc}")

    def _on_finished(self) -> None:
        self._worker = self._running = None
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(1)
        self.detect_button.setEnabled(self.slide_layer is not None)

    # ------------------------------------------------------------------ layer
    def show_mask(self, mask: TissueMask, slide_layer: Any, slide_path: str | None) -> napari.layers.Labels:
        """Add (or update) the ``"<slide> tissue"`` labels layer for ``mask``."""
        self.last_mask = mask
        kwargs = tissue_layer_kwargs(mask, slide_layer, slide_path)
        data = mask.mask.astype(np.uint8)
        layer = find_tissue_layer(self.viewer, slide_path)
        if layer is None:
            layer = self.viewer.add_labels(data, **kwargs)
        else:
            layer.metadata = kwargs["metadata"]
            layer.scale = kwargs["scale"]
            layer.translate = kwargs["translate"]
            layer.units = kwargs["units"]
            layer.data = data
        follow_slide_scale([layer], slide_layer)  # the um/px changed while it was computed
        style_tissue_layer(layer, self.fill_check.isChecked())
        self._watch(layer)
        self.update_area()
        return layer

    # ------------------------------------------------------------------ import / save
    def _import_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Import tissue mask", "", _IMPORT_FILTER)
        if path:
            self.import_file(path)

    def import_file(self, path: str | Path) -> Any:
        """Load a tissue mask file for the chosen slide (in a worker) and show it."""
        layer = self.slide_layer
        if layer is None:
            return None
        try:
            slide = slide_from_metadata(layer.metadata)
            mpp = slide.require_mpp()
        except Exception as exc:
            self._set_status(str(exc), warning=True)
            return None
        mask_mpp = float(self.mask_mpp_spin.value())
        self._set_status(f"Importing {Path(path).name}...")

        def done(mask: TissueMask) -> None:
            self.show_mask(mask, layer, slide.path)
            self._set_status(f"Imported {Path(path).name}.")

        return run_in_thread(
            read_tissue_file, path, slide.dimensions, mpp, mask_mpp, on_done=done, on_error=self._on_io_error
        )

    def _save_dialog(self) -> None:
        layer = self.tissue_layer
        if layer is None:
            return
        slide_path = layer.metadata.get("slide_path")
        stem = Path(slide_path).stem if slide_path else "slide"
        default = (
            str(Path(slide_path).with_name(f"{stem}.tissue.png")) if slide_path else f"{stem}.tissue.png"
        )
        path, _ = QFileDialog.getSaveFileName(
            self, "Save tissue mask", default, "PNG mask + JSON + GeoJSON (*.png)"
        )
        if path:
            self.save_to(path)

    def save_to(self, path: str | Path) -> Any:
        """Save the tissue layer as ``STEM.png``, ``STEM.json`` and ``STEM.geojson`` (in a worker)."""
        layer = self.tissue_layer
        if layer is None:
            return None
        path = Path(path)
        stem = path.name[: -len(path.suffix)] if path.suffix.lower() == ".png" else path.name
        mask = tissue_mask_from_layer(layer)  # a copy: painting may go on while the worker writes

        def done(paths: dict[str, Path]) -> None:
            self._set_status("Saved " + ", ".join(p.name for p in paths.values()))

        return run_in_thread(
            save_tissue_mask, mask, path.parent, stem, on_done=done, on_error=self._on_io_error
        )

    def _on_io_error(self, exc: BaseException) -> None:
        from napari.utils.notifications import show_error

        self._set_status(str(exc), warning=True)
        show_error(str(exc))


__all__ = [
    "METHOD_CHOICES",
    "TISSUE_MARKER",
    "TissuePanel",
    "find_tissue_layer",
    "format_area",
    "is_tissue_layer",
    "tissue_layer_kwargs",
    "tissue_mask_from_layer",
]
