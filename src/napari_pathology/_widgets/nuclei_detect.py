"""The Nuclei panel's detection: where to look (view, drawn regions, tissue), the detector, its worker.

Mixed into :class:`~napari_pathology._widgets.nuclei_panel.NucleiPanel`; the compute is
:func:`napari_pathology.nuclei.jobs.detection_job` and
:func:`napari_pathology.nuclei.points.merge_detections`.
"""

from __future__ import annotations

import threading
from collections.abc import Generator
from typing import Any

import numpy as np
from napari.layers import Shapes
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)
from superqt import QCollapsible

from napari_pathology._widgets._common import shape_rings_px
from napari_pathology._widgets._workers import start_worker
from napari_pathology._widgets.nuclei_layers import (
    PredictionOverlay,
    points_from_layer,
    replace_points,
    view_box_um,
)
from napari_pathology.nuclei.jobs import detection_job
from napari_pathology.nuclei.points import NucleusPoints, merge_detections
from napari_pathology.progress import Progress

#: Where the detector looks: combo text and key.
REGION_CHOICES = (("Current view", "view"), ("Drawn regions", "regions"), ("Whole tissue", "tissue"))
#: Nuclei per mm^2 assumed before a view or region detection (dense H&E: one per 250 um^2).
NUCLEI_PER_MM2 = 4000.0
#: Above this many expected nuclei a view or region detection asks first: editable points
#: beyond a few thousand make every pan slow; *Whole tissue* (predictions) is built for that scale.
EDITABLE_LIMIT = 5000


def expected_nuclei(area_um2: float, density_per_mm2: float = NUCLEI_PER_MM2) -> int:
    """About how many nuclei an area holds (``area_um2`` in um^2) at a dense H&E density."""
    return round(max(0.0, area_um2) / 1e6 * density_per_mm2)


def ask_large_detection(parent: QWidget, text: str) -> str:
    """Ask what to do with a large view or region: ``"tissue"``, ``"here"`` or ``"cancel"``."""
    from qtpy.QtWidgets import QMessageBox

    box = QMessageBox(parent)
    box.setIcon(QMessageBox.Icon.Question)
    box.setWindowTitle("Large detection")
    box.setText(text)
    tissue = box.addButton("Whole tissue (predictions)", QMessageBox.ButtonRole.AcceptRole)
    here = box.addButton("Detect here anyway", QMessageBox.ButtonRole.DestructiveRole)
    box.addButton(QMessageBox.StandardButton.Cancel)
    box.setDefaultButton(tissue)
    box.exec()
    clicked = box.clickedButton()
    return "tissue" if clicked is tissue else "here" if clicked is here else "cancel"


class DetectControls:
    """Detect box: slide, where, regions layer, detector settings, Detect / Cancel, progress and status."""

    def _build_detect_box(self) -> QGroupBox:
        from napari_pathology.nuclei.detect import NucleusParams

        defaults = NucleusParams()
        box = QGroupBox("Detect")
        self.where_combo = QComboBox()
        for text, key in REGION_CHOICES:
            self.where_combo.addItem(text, key)
        self.where_combo.setToolTip(
            "Current view and drawn regions add editable nuclei to label; whole tissue gives predictions."
        )
        self.regions_combo = QComboBox()
        self.regions_combo.setToolTip("Shapes layer whose areas are regions (detection and purity)")
        self.regions_combo.currentIndexChanged.connect(self._regions_layer_changed)
        self.new_regions_button = QPushButton("New")
        self.new_regions_button.setToolTip("Add a Shapes layer on the slide's micrometres to draw regions in")
        self.new_regions_button.clicked.connect(self.add_regions_layer)
        #: Asks before a large view or region detection (tests replace it): text -> choice.
        self.ask_large = lambda text: ask_large_detection(self, text)
        self.param_spins: dict[str, QDoubleSpinBox] = {}
        specs = {
            "sigma_um": ("Smoothing (um)", 0.0, 5.0, 0.1),
            "threshold_factor": ("Threshold x Otsu", 0.3, 2.0, 0.05),
            "min_area_um2": ("Min area (um^2)", 0.0, 200.0, 1.0),
            "min_distance_um": ("Min distance (um)", 0.5, 20.0, 0.5),
        }
        form = QFormLayout()
        form.addRow("Slide", self.slide_combo)
        form.addRow("Where", self.where_combo)
        regions_row = QHBoxLayout()
        regions_row.addWidget(self.regions_combo, 1)
        regions_row.addWidget(self.new_regions_button)
        form.addRow("Regions", regions_row)
        settings = QWidget()
        settings_form = QFormLayout(settings)
        settings_form.setContentsMargins(0, 0, 0, 0)
        for name, (label, low, high, step) in specs.items():
            spin = QDoubleSpinBox()
            spin.setRange(low, high)
            spin.setSingleStep(step)
            spin.setValue(getattr(defaults, name))
            self.param_spins[name] = spin
            settings_form.addRow(label, spin)
        self.settings_section = QCollapsible("Detector settings (um)")
        self.settings_section.addWidget(settings)
        self.detect_button = QPushButton("Detect")
        self.detect_button.clicked.connect(self.detect)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.progress = QProgressBar()
        self.status = QLabel("Open a slide, then Detect or add nuclei by hand.")
        self.status.setWordWrap(True)
        buttons = QHBoxLayout()
        buttons.addWidget(self.detect_button)
        buttons.addWidget(self.cancel_button)
        inner = QVBoxLayout(box)
        inner.addLayout(form)
        inner.addWidget(self.settings_section)
        inner.addLayout(buttons)
        inner.addWidget(self.progress)
        inner.addWidget(self.status)
        return box

    def _sync_regions(self, *_: Any) -> None:
        current = self.regions_combo.currentText()
        names = [layer.name for layer in self.viewer.layers if isinstance(layer, Shapes)]
        self.regions_combo.blockSignals(True)
        self.regions_combo.clear()
        self.regions_combo.addItem("(none)")
        self.regions_combo.addItems(names)
        if current in names:
            self.regions_combo.setCurrentText(current)
        elif names:
            self.regions_combo.setCurrentText(names[-1])
        self.regions_combo.blockSignals(False)
        self._regions_layer_changed()

    def _layers_removed(self, event: Any) -> None:
        if event.value is self._layer:
            self._layer = None
        self._sync_regions()

    def add_regions_layer(self) -> Any:
        """Add (and choose) an empty Shapes layer in the slide's units, in polygon mode."""
        slide = self.slide_layer()
        extent = {}
        if slide is not None:  # edges a few screen pixels wide when the whole slide is in view
            height, width = np.asarray(slide.extent.world[1] - slide.extent.world[0])[-2:]
            extent = {"units": slide.units, "edge_width": max(height, width) / 300}
        name = f"{slide.name} regions" if slide is not None else "regions"
        layer = self.viewer.add_shapes(name=name, face_color="transparent", edge_color="#30c0ff", **extent)
        layer.mode = "add_polygon"
        self._sync_regions()
        self.regions_combo.setCurrentText(layer.name)
        return layer

    def regions_layer(self) -> Any:
        """The chosen Shapes layer of regions, or None."""
        name = self.regions_combo.currentText()
        layer = self.viewer.layers[name] if name in self.viewer.layers else None
        return layer if isinstance(layer, Shapes) else None

    def _regions_layer_changed(self, *_: Any) -> None:
        layer = self.regions_layer()
        if layer is not None:
            layer.events.data.disconnect(self._schedule_recount)
            layer.events.data.connect(self._schedule_recount)
        self._schedule_recount()

    def regions(self) -> tuple[list[str], list[list[np.ndarray]]]:
        """Names and polygons (micrometres) of the areas in the regions layer."""
        shapes, slide = self.regions_layer(), self.slide_layer()
        if shapes is None or slide is None:
            return [], []
        mpp = np.asarray(self.mpp)
        features = getattr(shapes, "features", None)
        names, polygons = [], []
        for index, ring, _problem in shape_rings_px(shapes, slide):
            if ring is None:
                continue
            named = features is not None and "name" in features and str(features["name"][index]) != "nan"
            names.append(str(features["name"][index]) if named else f"region {index + 1}")
            polygons.append([ring * mpp])
        return names, polygons

    def detection_params(self) -> Any:
        """The detector parameters set in the panel."""
        from napari_pathology.nuclei.detect import NucleusParams

        return NucleusParams(**{name: spin.value() for name, spin in self.param_spins.items()})

    def view_box_um(self) -> tuple[float, float, float, float]:
        """The part of the slide on screen, ``(x, y, width, height)`` in micrometres."""
        meta = self.slide_layer().metadata
        mpp = self.mpp
        x0, y0, w, h = view_box_um(self.viewer, mpp)
        x1 = min(x0 + w, float(meta["width"]) * mpp[0])
        y1 = min(y0 + h, float(meta["height"]) * mpp[1])
        x0, y0 = max(x0, 0.0), max(y0, 0.0)
        return (x0, y0, max(0.0, x1 - x0), max(0.0, y1 - y0))

    def detect(self) -> None:
        """Start detection in a worker (Detect button)."""
        from napari.utils.notifications import show_error

        slide = self.slide_layer()
        if slide is None:
            show_error("Open a slide first (File > Open).")
            return
        if slide.metadata.get("mpp_missing"):
            show_error(f"{slide.name} has no um/px: set it in the Slide panel first.")
            return
        where = str(self.where_combo.currentData())
        box, polygons, tissue = None, None, None
        if where == "view":
            box = self.view_box_um()
            if box[2] <= 0 or box[3] <= 0:
                show_error("The view does not show the slide: pan to the tissue first.")
                return
        elif where == "regions":
            _names, polygons = self.regions()
            if not polygons:
                show_error("Draw a rectangle or polygon in a Shapes layer and pick it under Regions.")
                return
            rings = np.concatenate([p[0] for p in polygons])
            lo, hi = rings.min(0), rings.max(0)
            box = (float(lo[0]), float(lo[1]), float(hi[0] - lo[0]), float(hi[1] - lo[1]))
        else:
            from napari_pathology._widgets.tissue_panel import find_tissue_layer, tissue_mask_from_layer

            tissue_layer = find_tissue_layer(self.viewer, slide.metadata.get("path"))
            tissue = tissue_mask_from_layer(tissue_layer) if tissue_layer is not None else None
        if where != "tissue":
            area = box[2] * box[3] if polygons is None else _polygons_area(polygons)
            expected = expected_nuclei(area)
            if expected > EDITABLE_LIMIT:
                what = "view" if where == "view" else "region"
                choice = self.ask_large(
                    f"This {what} covers {area / 1e6:.2f} mm\N{SUPERSCRIPT TWO}: "
                    f"about {expected:,} nuclei, too many to edit as points (every pan slows down). "
                    "Detect over the whole tissue as predictions instead, or here anyway?"
                )
                if choice == "cancel":
                    self.status.setText("Detection not started: zoom in or draw a smaller region.")
                    return
                if choice == "tissue":
                    self.where_combo.setCurrentIndex(self.where_combo.findData("tissue"))
                    self.detect()
                    return
        try:
            params = self.detection_params()
        except ValueError as exc:
            show_error(str(exc))
            return
        self._cancel = threading.Event()
        job = detection_job(dict(slide.metadata), where, box, params, tissue, self._cancel)
        self._job_kind = "detect"
        self._start_worker(job, lambda points: self._on_detected(points, where, box, polygons))
        self.status.setText("detecting nuclei...")

    def _start_worker(self, job: Generator[Progress, None, Any], on_done: Any) -> None:
        """Run a detection or classification job wired to the panel (see :func:`start_worker`)."""
        self._running = start_worker(
            job, progress=self.progress, status=self.status,
            busy=(self.detect_button, self.classify_button), cancel_button=self.cancel_button,
            cancel_event=self._cancel, quit_on_cancel=self._job_kind == "classify", on_done=on_done,
        )  # fmt: skip
        self.worker = self._running.worker

    def cancel(self) -> None:
        """Stop the running job: a detection keeps the nuclei found so far, a classification stops.

        A classification has no cancel flag: it stops between batches.
        """
        if self._running is not None:
            self._running.cancel("cancelling...")

    def _on_detected(
        self,
        found: NucleusPoints,
        where: str,
        box: tuple[float, float, float, float] | None,
        polygons: list[list[np.ndarray]] | None,
    ) -> None:
        from napari_pathology.geometry import points_in_polygons

        partial = " (cancelled: the chunks done so far)" if self._cancel.is_set() else ""
        if where == "tissue":
            self.show_predictions(found)
            self.status.setText(
                f"{len(found)} nuclei over the tissue{partial} (predictions; Classify gives their purity)."
            )
            return
        if polygons:
            found = found.subset(points_in_polygons(found.xy_um(), polygons) >= 0)
        layer = self.nuclei_layer(create=True)
        merged, replaced = merge_detections(points_from_layer(layer, self.mpp), found, box, polygons)
        replace_points(layer, merged, self.mpp)
        self.viewer.layers.selection.active = layer
        self.status.setText(
            f"{len(found)} nuclei detected{partial} ({replaced} unlabeled detections replaced; labels kept). "
            "Select nuclei and press t / n / o / u."
        )
        self.recount()
        self._autosave_timer.start()

    def show_predictions(self, points: NucleusPoints) -> None:
        """Show whole-slide predictions (replacing earlier ones) as density plus in-view points."""
        slide = self.slide_layer()
        self._drop_overlay()
        self.predictions = points
        name = f"{slide.name} predicted nuclei"
        self._overlay = PredictionOverlay(self.viewer, slide, points, name, max_points=self.max_points_shown)
        self.recount()

    def _drop_overlay(self) -> None:
        if self._overlay is not None:
            self._overlay.remove()
            self._overlay = None


def _polygons_area(polygons: list[list[np.ndarray]]) -> float:
    """Area (um^2) of polygons given as ``[exterior, *holes]`` rings of ``(x, y)`` um (shoelace)."""

    def ring_area(ring: np.ndarray) -> float:
        x, y = np.asarray(ring, dtype=np.float64).T
        return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))

    return sum(ring_area(p[0]) - sum(ring_area(h) for h in p[1:]) for p in polygons)
