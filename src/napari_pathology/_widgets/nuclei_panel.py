"""The Nuclei panel: detect nuclei, label them tumour/normal, watch purity, classify, train.

Thin wiring over :mod:`napari_pathology.nuclei`. Nuclei found in the view or in
drawn regions go to an editable points layer (the ground truth a pathologist
labels with ``t``/``n``/``o``/``u``); nuclei found over the whole tissue are
predictions, kept apart and drawn by :class:`PredictionOverlay` so that
10^5-10^6 of them do not slow panning. Every change is autosaved beside the slide.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Generator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from napari.layers import Points, Shapes
from qtpy.QtCore import QObject, QTimer, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)
from superqt import QCollapsible

from napari_pathology._layers import slide_from_metadata
from napari_pathology._widgets._common import (
    SlideLayerCombo,
    choose_checkpoint,
    device_combo,
    passthrough,
    run_in_thread,
    same_path,
    select_or_add,
    shape_rings_px,
    show_failure,
)
from napari_pathology._widgets.nuclei_layers import (
    NUCLEI_MARKER,
    PredictionOverlay,
    add_nuclei_layer,
    points_from_layer,
    repaint,
    replace_points,
    set_labels,
    slide_mpp_xy,
    um_from_world,
    view_box_um,
)
from napari_pathology.nuclei.points import LABELS, NucleusPoints
from napari_pathology.progress import Progress

if TYPE_CHECKING:
    import napari

#: Where the detector looks: combo text and key.
REGION_CHOICES = (("Current view", "view"), ("Drawn regions", "regions"), ("Whole tissue", "tissue"))
#: Keys that label the selected nuclei.
LABEL_KEYS = {"t": "tumour", "n": "normal", "o": "other", "u": "unlabeled"}
#: Coalesce bursts of edits before recounting (ms) and before autosaving (ms).
RECOUNT_MS = 120
AUTOSAVE_MS = 1000
_ANNOTATION_FILTER = "Nuclei (*.geojson *.json *.csv);;All files (*)"
_REGION_COLUMNS = ("Region", "Nuclei", "Tumour", "Normal", "Purity", "Predicted", "Diff.")
#: Layer metadata key: a token naming one nuclei layer object (which layer an autosave file holds).
_LAYER_TOKEN = "napari_pathology_nuclei_token"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def detection_job(
    metadata: dict[str, Any],
    region: str,
    box_um: tuple[float, float, float, float] | None,
    params: Any,
    tissue: Any,
    cancel: threading.Event | None = None,
) -> Generator[Progress, None, NucleusPoints]:
    """Detect nuclei in a box (or over the tissue), off the Qt thread."""
    from napari_pathology.analysis import tissue_or_detect
    from napari_pathology.nuclei.run import detect_in_slide

    slide = slide_from_metadata(metadata)
    slide.require_mpp()
    if region == "tissue":
        tissue = yield from tissue_or_detect(slide, tissue)
    table = yield from detect_in_slide(slide, region_um=box_um, tissue=tissue, params=params, cancel=cancel)
    return NucleusPoints.from_table(table, source="detected")


def classification_job(
    metadata: dict[str, Any], model_source: str, device: str, sets: list[np.ndarray]
) -> Generator[Progress, None, list[np.ndarray]]:
    """Tumour probabilities for each array of nucleus centroids, off the Qt thread."""
    from napari_pathology.models import resolve_model
    from napari_pathology.nuclei.classify import classify_nuclei, require_purity_model

    slide = slide_from_metadata(metadata)
    yield Progress(0, 0, f"loading {Path(model_source).name}...")
    model = resolve_model(model_source)
    require_purity_model(model)
    out = []
    for xy in sets:
        out.append((yield from classify_nuclei(slide, xy, model, device=device)) if len(xy) else np.zeros(0))
    return out


class AutosaveWriter:
    """Write a slide's autosave off the Qt thread: in order, never over a file it does not hold.

    Saves are serialised under one lock and a save superseded by a newer one is
    skipped, so a slow write can never land after a newer one. A file already
    at the path that this writer did not write or restore for the same layer
    (an autosave from before the layer was deleted, or a slide reopened) is
    first kept aside with a timestamped name (``fileio.keep_aside``).
    """

    #: Shared by every panel of the process: which layer (token) each autosave file holds,
    #: so that closing and reopening the dock does not set the autosave aside again.
    _lock = threading.Lock()
    _owners: ClassVar[dict[str, str]] = {}

    def __init__(self) -> None:
        self._latest = 0

    def claim(self, path: Path, token: str) -> None:
        """Record that the file at ``path`` holds the nuclei of the layer named ``token`` (restored)."""
        with self._lock:
            self._owners[str(path)] = token

    def ticket(self) -> int:
        """A number for the next save; only the newest ticket's save is written."""
        self._latest += 1
        return self._latest

    def save(
        self,
        ticket: int,
        points: NucleusPoints,
        path: Path,
        token: str,
        mpp: tuple[float, float],
        extent_um: tuple[float, float],
    ) -> tuple[int, Path | None] | None:
        """Write ``points`` to ``path``; (nuclei written, file kept aside or None), None when superseded."""
        from napari_pathology.fileio import keep_aside
        from napari_pathology.nuclei.points import save_atomic

        with self._lock:
            if ticket != self._latest:
                return None
            kept = None
            if (path.exists() or path.is_symlink()) and self._owners.get(str(path)) != token:
                kept = keep_aside(path, "earlier")
            save_atomic(points, path, mpp, extent_um)
            self._owners[str(path)] = token
            return len(points), kept


class NucleiPanel(QWidget):
    """Dock widget: detect, label (t/n/o/u), purity per region, classify, train, import/export."""

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.slide_combo = SlideLayerCombo(napari_viewer)
        self.slide_combo.changed.connect(self._slide_changed)
        self.worker: Any = None
        self._cancel = threading.Event()
        self._job_kind = ""
        self._seen_slides: set[str] = set()
        self._layer: Any = None
        self._overlay: PredictionOverlay | None = None
        self.predictions: NucleusPoints | None = None
        self._train_job: Any = None
        self.autosave_path: Path | None = None
        self._autosave_writer = AutosaveWriter()
        #: Most predicted nuclei drawn as points at once (more: the density image only).
        self.max_points_shown = 8000
        self._recount_timer = self._timer(RECOUNT_MS, self.recount)
        self._autosave_timer = self._timer(AUTOSAVE_MS, self.autosave)
        content = QWidget()
        layout = QVBoxLayout(content)
        layout.addWidget(self._build_detect_box())
        layout.addWidget(self._build_label_box())
        layout.addWidget(self._build_classify_box())
        layout.addWidget(self._build_files_box())
        layout.addStretch(1)
        scroll = QScrollArea()  # a short dock scrolls instead of squashing the rows
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setWidget(content)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll)
        napari_viewer.layers.events.inserted.connect(self._sync_regions)
        napari_viewer.layers.events.removed.connect(self._layers_removed)
        self._sync_regions()
        self._slide_changed()

    @staticmethod
    def _timer(ms: int, slot: Any) -> QTimer:
        timer = QTimer()
        timer.setSingleShot(True)
        timer.setInterval(ms)
        timer.timeout.connect(slot)
        return timer

    # ------------------------------------------------------------------ building
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
        form.addRow("Regions", self.regions_combo)
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
        self.region_table = QTableWidget(0, len(_REGION_COLUMNS))
        self.region_table.setHorizontalHeaderLabels(_REGION_COLUMNS)
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

    def _build_classify_box(self) -> QGroupBox:
        from napari_pathology.models import list_models
        from napari_pathology.models.nucleus_purity import FAMILY as PURITY_FAMILY
        from napari_pathology.training.nucleus_purity import NucleusPurityTraining

        box = QGroupBox("Purity classifier")
        self.model_combo = QComboBox()
        for spec in list_models():
            if spec.family == PURITY_FAMILY:
                self.model_combo.addItem(f"{spec.name} ({spec.description.split('.')[0]})", spec.name)
        load = QPushButton("Load...")
        load.clicked.connect(self._choose_checkpoint)
        self.device_combo = device_combo()
        self.colour_combo = QComboBox()
        self.colour_combo.addItem("label", "label")
        self.colour_combo.addItem("tumour probability", "probability")
        self.colour_combo.currentIndexChanged.connect(self._colour_changed)
        self.classify_button = QPushButton("Classify")
        self.classify_button.clicked.connect(self.classify)
        self.epochs_spin = QSpinBox()
        self.epochs_spin.setRange(1, 500)
        self.epochs_spin.setValue(NucleusPurityTraining().epochs)
        self.epochs_spin.setToolTip("Passes over the labelled nuclei when training from your labels")
        self.train_button = QPushButton("Train from my labels")
        self.train_button.clicked.connect(self.train_from_labels)
        self.train_stop_button = QPushButton("Stop training")
        self.train_stop_button.setEnabled(False)
        self.train_stop_button.clicked.connect(self.stop_training)
        self.train_status = QLabel("")
        self.train_status.setWordWrap(True)
        form = QFormLayout()
        model_row = QHBoxLayout()
        model_row.addWidget(self.model_combo, 1)
        model_row.addWidget(load)
        form.addRow("Model", model_row)
        form.addRow("Device", self.device_combo)
        form.addRow("Colour by", self.colour_combo)
        form.addRow("Training epochs", self.epochs_spin)
        buttons = QHBoxLayout()
        buttons.addWidget(self.classify_button)
        buttons.addWidget(self.train_button)
        buttons.addWidget(self.train_stop_button)
        inner = QVBoxLayout(box)
        inner.addLayout(form)
        inner.addLayout(buttons)
        inner.addWidget(self.train_status)
        return box

    def _build_files_box(self) -> QGroupBox:
        box = QGroupBox("Annotations")
        import_button = QPushButton("Import...")
        import_button.clicked.connect(self._choose_import)
        geojson_button = QPushButton("Export GeoJSON...")
        geojson_button.clicked.connect(lambda: self._choose_export("GeoJSON (*.geojson)", ".geojson"))
        csv_button = QPushButton("Export CSV...")
        csv_button.clicked.connect(lambda: self._choose_export("CSV (*.csv)", ".csv"))
        self.autosave_label = QLabel("")
        self.autosave_label.setWordWrap(True)
        buttons = QHBoxLayout()
        for button in (import_button, geojson_button, csv_button):
            buttons.addWidget(button)
        inner = QVBoxLayout(box)
        inner.addLayout(buttons)
        inner.addWidget(self.autosave_label)
        return box

    # ------------------------------------------------------------------ slide and layers
    def slide_layer(self) -> Any:
        """The chosen slide layer, or None."""
        return self.slide_combo.current_layer()

    @property
    def mpp(self) -> tuple[float, float]:
        """The chosen slide's level-0 ``(mpp_x, mpp_y)``."""
        layer = self.slide_layer()
        return slide_mpp_xy(layer) if layer is not None else (1.0, 1.0)

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
        layer.metadata.setdefault(_LAYER_TOKEN, uuid.uuid4().hex)
        for key, label in LABEL_KEYS.items():
            layer.bind_key(key, lambda _layer, name=label: self.label_selected(name), overwrite=True)
        layer.events.data.connect(self._on_layer_edited)
        self._sync_colour_combo()
        self.recount()
        return layer

    def _slide_changed(self) -> None:
        slide = self.slide_layer()
        self._layer = None
        if slide is None:
            self.autosave_path = None
            return
        self.autosave_path = self._sidecar_for(slide)
        layer = self.nuclei_layer()
        path = str(slide.metadata.get("path"))
        # Restore once per slide: a layer the user deleted (or a viewer closing) must not come back.
        if path not in self._seen_slides:
            self._seen_slides.add(path)
            if layer is None and self.autosave_path is not None and self.autosave_path.exists():
                self._restore(slide)
        self.recount()

    def _sidecar_for(self, slide: Any) -> Path | None:
        """Beside the slide, or in the user data folder when the slide's folder is read-only."""
        from napari_pathology.nuclei.points import sidecar_path

        path = slide.metadata.get("path")
        if not path:
            return None
        try:
            return sidecar_path(path)
        except OSError as exc:
            self.autosave_label.setText(f"Autosave is off for {slide.name}: {exc}")
            return None

    def extent_um(self) -> tuple[float, float]:
        """The chosen slide's size ``(width, height)`` in micrometres (in pixels when it has no um/px)."""
        meta = self.slide_layer().metadata
        mpp = self.mpp
        return (float(meta["width"]) * mpp[0], float(meta["height"]) * mpp[1])

    def _restore(self, slide: Any) -> None:
        from napari.utils.notifications import show_error, show_warning

        from napari_pathology.nuclei.points import AutosaveRefused, restore_sidecar

        path = self.autosave_path
        try:
            restored = restore_sidecar(path, self.extent_um(), self.mpp)
        except AutosaveRefused as exc:
            if exc.kept_as is None:  # still there and unreadable: never write over it
                self.autosave_path = None
                self.autosave_label.setText(f"Autosave is off for {slide.name}: {exc}")
            else:
                self.autosave_label.setText(f"The refused autosave was kept as {exc.kept_as}.")
            show_error(f"Could not restore autosaved nuclei: {exc}")
            return
        points = restored.points
        if points is None or not len(points):
            return
        layer = self._adopt(add_nuclei_layer(self.viewer, slide, points, f"{slide.name} nuclei"))
        self._autosave_writer.claim(path, layer.metadata[_LAYER_TOKEN])
        self.status.setText(f"Restored {len(points)} nuclei from {path}.")
        if restored.note:
            self.status.setText(f"Restored {len(points)} nuclei from {path}; {restored.note}.")
            show_warning(restored.note)

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

    # ------------------------------------------------------------------ detection
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
        from napari.qt.threading import create_worker

        # errors go to the panel only (an "errored" connection given here stops superqt re-raising them)
        self.worker = create_worker(
            passthrough, job, _start_thread=False, _connect={"errored": self._on_error}
        )
        self.worker.yielded.connect(self._on_progress)
        self.worker.returned.connect(on_done)
        self.worker.finished.connect(self._on_finished)
        self.worker.aborted.connect(job.close)
        self.detect_button.setEnabled(False)
        self.classify_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress.setRange(0, 0)
        self.worker.start()

    def cancel(self) -> None:
        """Stop the running job: a detection keeps the nuclei found so far, a classification stops."""
        if self._cancel.is_set() or self.worker is None:
            return
        self._cancel.set()
        if self._job_kind == "classify":  # classification has no cancel flag: stop between batches
            self.worker.quit()
        self.status.setText("cancelling...")
        self.cancel_button.setEnabled(False)

    def _on_progress(self, event: Progress) -> None:
        if event.total:
            self.progress.setRange(0, event.total)
            self.progress.setValue(event.done)
        if event.message:
            self.status.setText(event.message)

    def _on_error(self, error: BaseException) -> None:
        show_failure(self.status, error)

    def _on_finished(self) -> None:
        self.detect_button.setEnabled(True)
        self.classify_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        if self.progress.maximum() == 0:
            self.progress.setRange(0, 1)

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

    # ------------------------------------------------------------------ labelling and counts
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
        from napari_pathology.nuclei.points import region_summaries

        points = self.current_points()
        counts = points.counts()
        purity = points.purity()
        labelled = counts["tumour"] + counts["normal"]
        text = (
            f"{counts['total']} nuclei: {counts['tumour']} tumour, {counts['normal']} normal, "
            f"{counts['other']} other, {counts['unlabeled']} unlabeled. "
            f"Purity {_fmt(purity)}" + (f" ({counts['tumour']}/{labelled})" if labelled else "")
        )
        predicted = points.predicted_purity()
        if predicted is not None:
            text += f"; predicted {predicted:.2f}"
        if self.predictions is not None:
            slide_pred = self.predictions.predicted_purity()
            text += f". Slide: {len(self.predictions)} predicted nuclei" + (
                f", predicted purity {slide_pred:.2f}" if slide_pred is not None else ""
            )
        self.counts_label.setText(text)
        names, polygons = self.regions()
        summaries = region_summaries(points, polygons, names) if polygons else []
        self.region_table.setRowCount(len(summaries))
        for row, summary in enumerate(summaries):
            values = (
                summary.name, str(summary.n), str(summary.counts["tumour"]), str(summary.counts["normal"]),
                _fmt(summary.purity), _fmt(summary.predicted_purity), _fmt(summary.difference),
            )  # fmt: skip
            for column, value in enumerate(values):
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

    # ------------------------------------------------------------------ autosave, import, export
    def autosave(self) -> Any:
        """Write the nuclei to the sidecar file in a background thread; returns the worker or None.

        Atomic, in order, and never over a file this panel does not hold (that one is kept
        aside first); nuclei outside the slide are left out so that the file reads back.
        """
        if self.autosave_path is None or (self._layer is None and self.nuclei_layer() is None):
            return None
        layer = self._layer
        path, points = self.autosave_path, self.current_points()
        xy = points.xy_um()
        width, height = self.extent_um()
        outside = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] > width) | (xy[:, 1] > height)
        if outside.any():  # the file must read back: never write what the reader refuses
            points = points.subset(~outside)
        writer = self._autosave_writer
        job = (writer.ticket(), points, path, layer.metadata[_LAYER_TOKEN], self.mpp, (width, height))

        def done(result: tuple[int, Path | None] | None) -> None:
            if result is None:
                return
            text = f"Autosaved {result[0]} nuclei to {path} at {time.strftime('%H:%M:%S')}"
            if result[1] is not None:
                text += f"; the earlier autosave there was kept as {result[1].name}"
            if outside.any():
                text += f"; {int(outside.sum())} nuclei outside the slide are not saved"
            self.autosave_label.setText(text + ".")

        def failed(error: BaseException) -> None:
            from napari.utils.notifications import show_error

            self.autosave_label.setText(f"Autosave FAILED: {error}")
            show_error(f"Autosave of the nuclei failed: {error}")

        return run_in_thread(writer.save, *job, on_done=done, on_error=failed)

    def export_annotations(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the nuclei as GeoJSON (QuPath; level-0 pixels) or CSV, by the file's suffix.

        Never over the slide, its autosave or a synthetic slide's truth files (refused), and
        over another existing file only with ``overwrite`` (else the first free numbered
        name is used); returns the path written.
        """
        from napari_pathology.nuclei.points import free_path, refused_export_reason, write_csv, write_geojson

        path = Path(path)
        if not path.suffix:
            path = path.with_suffix(".csv")
        slide = self.slide_layer()
        reason = refused_export_reason(path, slide.metadata.get("path") if slide is not None else None)
        if reason is not None:
            raise ValueError(f"{path} is {reason}; export the nuclei under another name")
        chosen = path if overwrite else free_path(path)
        points = self.current_points()
        if chosen.suffix.lower() in (".geojson", ".json"):
            write_geojson(points, chosen, self.mpp)
        else:
            write_csv(points, chosen)
        note = f" ({path.name} exists, so a new name was used)" if chosen != path else ""
        self.status.setText(f"Saved {len(points)} nuclei to {chosen}{note}")
        return chosen

    def import_annotations(self, path: str | Path) -> int:
        """Merge nuclei from a GeoJSON (QuPath) or CSV file into the nuclei layer; returns how many are new.

        Coordinates are checked against the slide (finite, inside it; the row or feature
        is named). A nucleus within 1 um of one already there with the same label, or
        where either is unlabeled, is that nucleus (the imported label replaces
        ``unlabeled``): importing a file twice adds nothing the second time.
        """
        from napari_pathology.nuclei.points import merge_points, read_csv, read_geojson

        path = Path(path)
        if self.slide_layer() is None:
            raise ValueError("Open the slide the annotations belong to first.")
        extent = self.extent_um()
        if path.suffix.lower() in (".geojson", ".json"):
            found = read_geojson(path, self.mpp, extent)
        else:
            found = read_csv(path, mpp=self.mpp[0] if self.mpp[0] == self.mpp[1] else None, extent_um=extent)
        layer = self.nuclei_layer(create=True)
        result = merge_points(points_from_layer(layer, self.mpp), found)
        replace_points(layer, result.points, self.mpp)
        self.recount()
        self._autosave_timer.start()
        self.status.setText(f"Imported {len(found)} nuclei from {path.name}: {result.summary()}.")
        return result.added

    def _choose_import(self) -> None:
        from napari.utils.notifications import show_error

        path, _ = QFileDialog.getOpenFileName(self, "Import nuclei", "", _ANNOTATION_FILTER)
        if path:
            try:
                self.import_annotations(path)
            except (OSError, ValueError) as exc:
                show_error(str(exc))

    def _choose_export(self, file_filter: str, suffix: str) -> None:
        from napari.utils.notifications import show_error

        from napari_pathology.nuclei.points import export_path

        slide = self.slide_layer()
        start = str(export_path(slide.metadata.get("path") if slide else None, suffix)) if slide else ""
        path, _ = QFileDialog.getSaveFileName(self, "Export nuclei", start, file_filter)
        if path:
            # the dialog asked before replacing the name it returned; a suffix added here was not asked about
            confirmed = bool(Path(path).suffix)
            try:
                self.export_annotations(path if confirmed else path + suffix, overwrite=confirmed)
            except (OSError, ValueError) as exc:
                show_error(str(exc))

    # ------------------------------------------------------------------ classifier
    @property
    def model_source(self) -> str:
        """Registry name or checkpoint path of the chosen purity classifier."""
        return str(self.model_combo.currentData() or "")

    def select_model(self, source: str | Path, label: str | None = None) -> None:
        """Choose a purity classifier by registry name or checkpoint path."""
        select_or_add(self.model_combo, str(source), label or f"{Path(source).name} (checkpoint)")

    def _choose_checkpoint(self) -> None:
        path = choose_checkpoint(self, "Load a nucleus purity checkpoint")
        if path:
            self.select_model(path)

    def classify(self) -> None:
        """Tumour probability for every nucleus (labelled layer and predictions), in a worker."""
        from napari.utils.notifications import show_error

        slide = self.slide_layer()
        if slide is None:
            show_error("Open a slide first (File > Open).")
            return
        points = self.current_points()
        if not len(points) and self.predictions is None:
            show_error("No nuclei to classify: Detect first.")
            return
        if not self.model_source:
            show_error("Choose a nucleus purity model (or Load... a checkpoint).")
            return
        sets = [points.xy_um()] + ([self.predictions.xy_um()] if self.predictions is not None else [])
        job = classification_job(
            dict(slide.metadata), self.model_source, str(self.device_combo.currentData()), sets
        )
        self._cancel = threading.Event()
        self._job_kind = "classify"
        self._start_worker(job, self._on_classified)
        self.status.setText("classifying nuclei...")

    def _on_classified(self, probabilities: list[np.ndarray]) -> None:
        layer = self._layer if self._layer is not None else self.nuclei_layer()
        if layer is not None and len(probabilities[0]) == len(layer.data):
            layer.features["probability"] = np.asarray(probabilities[0], np.float64)
            layer.metadata["colour_by"] = "probability"
            self._sync_colour_combo()
            repaint(layer, self.mpp)
        if len(probabilities) > 1 and self.predictions is not None:
            self.show_predictions(self.predictions.with_probabilities(probabilities[1]))
        self.recount()
        self._autosave_timer.start()
        self.status.setText("classified: points coloured by tumour probability (blue normal, red tumour).")

    # ------------------------------------------------------------------ training
    def training_data(self) -> Any:
        """The labelled tumour/normal nuclei as training data (regions from the regions layer)."""
        from napari_pathology.geometry import points_in_polygons
        from napari_pathology.training.nucleus_data import labelled_nuclei
        from napari_pathology.training.nucleus_purity import NucleusPurityTraining

        slide = self.slide_layer()
        if slide is None:
            raise ValueError("Open a slide first (File > Open).")
        points = self.current_points()
        counts = points.counts()
        needed = NucleusPurityTraining().min_per_class
        if min(counts["tumour"], counts["normal"]) < needed:
            raise ValueError(
                f"Label at least {needed} tumour (t) and {needed} normal (n) nuclei first; "
                f"there are {counts['tumour']} tumour and {counts['normal']} normal."
            )
        meta = slide.metadata
        mpp = float(meta["mpp_x"]) if meta.get("mpp_source") == "user" else None
        data = labelled_nuclei(points, meta["path"], mpp)
        _names, polygons = self.regions()
        if polygons:
            data = replace(data, region_ids=points_in_polygons(data.xy_um, polygons))
        return data

    def train_from_labels(self) -> Any:
        """Train a purity classifier from the labelled nuclei in the background; returns the job."""
        from napari.utils.notifications import show_error

        from napari_pathology._widgets.train_panel import default_models_dir
        from napari_pathology.training import TrainingError
        from napari_pathology.training.common import model_name_for
        from napari_pathology.training.nucleus_purity import NucleusPurityTraining, train_nucleus_purity
        from napari_pathology.training.queue import training_queue

        try:
            data = self.training_data()
        except (TrainingError, ValueError) as exc:
            show_error(str(exc))
            return None
        name = model_name_for(f"nucleus-purity-{Path(data.slide_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
        out = default_models_dir() / f"{name}.pt"
        settings = NucleusPurityTraining(
            device=str(self.device_combo.currentData()), epochs=self.epochs_spin.value()
        )
        start = self.model_source if self.model_source and Path(self.model_source).suffix else None
        relay = _TrainingRelay(self)

        def factory(stop: threading.Event) -> Any:
            return train_nucleus_purity([data], out, settings, start=start, stop=stop)

        self._train_job = training_queue().submit(
            factory, settings.device, name=name, on_event=relay.event, on_state=relay.state
        )
        self._train_out = out
        self.train_button.setEnabled(False)
        self.train_stop_button.setEnabled(True)
        self.train_status.setText(f"training {name} on {settings.device}...")
        return self._train_job

    def stop_training(self) -> None:
        """Stop the running training job after its current step (it saves a checkpoint)."""
        if self._train_job is not None:
            self._train_job.stop()
            self.train_status.setText("stopping after this step...")

    def _on_train_event(self, event: Any) -> None:
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in event.metrics.items() if isinstance(v, float))
        step = f"step {event.step}/{event.total_steps}" if event.total_steps else ""
        self.train_status.setText(" - ".join(x for x in (step, event.message, metrics) if x))

    def _on_train_state(self, job: Any) -> None:
        if not job.done:
            return
        self.train_button.setEnabled(True)
        self.train_stop_button.setEnabled(False)
        best = Path(self._train_out)
        if job.error is None and best.exists():
            self.select_model(str(best), f"{best.stem} (trained here)")
            self.train_status.setText(
                f"{job.state.value}: {best.name} is now the classifier; Classify to apply it."
            )
        else:
            self.train_status.setText(f"{job.state.value}: {job.error or 'no checkpoint written'}")


class _TrainingRelay(QObject):
    """Carry training callbacks from the queue's thread to the panel on the Qt thread."""

    event_signal = Signal(object)
    state_signal = Signal(object)

    def __init__(self, panel: NucleiPanel) -> None:
        super().__init__()
        self.event_signal.connect(panel._on_train_event)
        self.state_signal.connect(panel._on_train_state)

    def event(self, job: Any, event: Any) -> None:
        """Queue callback: one training event."""
        self._emit(self.event_signal, event)

    def state(self, job: Any) -> None:
        """Queue callback: the job's state changed."""
        self._emit(self.state_signal, job)

    @staticmethod
    def _emit(signal: Any, value: Any) -> None:
        try:
            signal.emit(value)
        except RuntimeError:  # the panel is gone
            pass


def merge_detections(
    existing: NucleusPoints,
    found: NucleusPoints,
    box: tuple[float, float, float, float] | None,
    polygons: list[list[np.ndarray]] | None,
    duplicate_um: float = 3.0,
) -> tuple[NucleusPoints, int]:
    """Put fresh detections into a layer's nuclei without losing any labelling work.

    Unlabeled detected nuclei inside the searched area are replaced; labelled,
    manual and imported nuclei are kept, and a fresh detection within
    ``duplicate_um`` of a kept nucleus is dropped.

    Returns
    -------
    merged : NucleusPoints
    replaced : int
        How many old unlabeled detections were replaced.
    """
    from scipy.spatial import cKDTree

    from napari_pathology.geometry import points_in_polygons
    from napari_pathology.nuclei.points import SOURCES

    xy = existing.xy_um()
    if polygons:
        inside = points_in_polygons(xy, polygons) >= 0
    elif box is not None:
        x, y, w, h = box
        inside = (xy[:, 0] >= x) & (xy[:, 0] < x + w) & (xy[:, 1] >= y) & (xy[:, 1] < y + h)
    else:
        inside = np.ones(len(existing), bool)
    stale = (
        inside
        & (existing.label == LABELS.index("unlabeled"))
        & (existing.source == SOURCES.index("detected"))
    )
    kept = existing.subset(~stale)
    if len(kept) and len(found):
        distance, _ = cKDTree(kept.xy_um()).query(found.xy_um(), k=1)
        found = found.subset(distance > duplicate_um)
    return NucleusPoints.concat(kept, found), int(stale.sum())
