"""The Nuclei panel: detect nuclei, label them tumour/normal, watch purity, classify, train.

Thin wiring over :mod:`napari_pathology.nuclei`: the Detect box is
:mod:`.nuclei_detect`, the labelling controls and counts :mod:`.nuclei_labelling`,
the import/export/autosave box :mod:`.nuclei_files`; the classifier and training
are here. Nuclei found in the view or in
drawn regions go to an editable points layer (the ground truth a pathologist
labels with ``t``/``n``/``o``/``u``); nuclei found over the whole tissue are
predictions, kept apart and drawn by :class:`PredictionOverlay` so that
10^5-10^6 of them do not slow panning. Every change is autosaved beside the slide.
"""

from __future__ import annotations

import threading
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_pathology._layers import slide_from_metadata
from napari_pathology._widgets._common import (
    SlideLayerCombo,
    choose_checkpoint,
    compact_panel,
    device_combo,
    select_or_add,
)
from napari_pathology._widgets.nuclei_detect import DetectControls
from napari_pathology._widgets.nuclei_files import AnnotationFiles
from napari_pathology._widgets.nuclei_labelling import NucleiLayerControls
from napari_pathology._widgets.nuclei_layers import PredictionOverlay, repaint
from napari_pathology._widgets.nuclei_training import LabelTraining
from napari_pathology.nuclei.points import AutosaveWriter, NucleusPoints
from napari_pathology.progress import Progress

if TYPE_CHECKING:
    import napari

#: Coalesce bursts of edits before recounting (ms) and before autosaving (ms).
RECOUNT_MS = 120
AUTOSAVE_MS = 1000


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


class NucleiPanel(NucleiLayerControls, DetectControls, AnnotationFiles, LabelTraining, QWidget):
    """Dock widget: detect, label (t/n/o/u), purity per region, classify, train, import/export."""

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        from napari_pathology.families import list_families

        self.viewer = napari_viewer
        #: Families that classify nuclei (input kind ``nucleus`` or trained from labelled nuclei), by name.
        self.nuclei_families = {
            f.name: f for f in list_families() if f.input_kind == "nucleus" or "nuclei" in f.data_sources
        }
        self.slide_combo = SlideLayerCombo(napari_viewer)
        self.slide_combo.changed.connect(self._slide_changed)
        self.worker: Any = None  # napari's worker of the running detection or classification
        self._running: Any = None  # its PanelWorker (see _workers.start_worker)
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
        compact_panel(self, scroll=False)
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

    def _build_classify_box(self) -> QGroupBox:
        from napari_pathology._widgets.analyze_panel import model_label
        from napari_pathology.models import list_models
        from napari_pathology.models.pretrained import is_untrained

        box = QGroupBox("Purity classifier")
        self.model_combo = QComboBox()
        for spec in list_models():
            if spec.family in self.nuclei_families:
                self.model_combo.addItem(model_label(spec, is_untrained(spec)), spec.name)
                tip = f"{spec.family}: {spec.description}"
                self.model_combo.setItemData(self.model_combo.count() - 1, tip, Qt.ItemDataRole.ToolTipRole)
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
        trainable = [f for f in self.nuclei_families.values() if f.trainable]
        self.epochs_spin.setValue(int(trainable[0].defaults().get("epochs") or 1) if trainable else 1)
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
        inner.addWidget(self._make_previous_button())
        return box

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

    # ------------------------------------------------------------------ classifier
    @property
    def model_source(self) -> str:
        """Registry name or checkpoint path of the chosen purity classifier."""
        return str(self.model_combo.currentData() or "")

    def select_model(self, source: str | Path, label: str | None = None) -> None:
        """Choose a purity classifier by registry name or checkpoint path."""
        select_or_add(self.model_combo, str(source), label or f"{Path(source).name} (checkpoint)")

    def _choose_checkpoint(self) -> None:
        path = choose_checkpoint(self, "Load a purity classifier checkpoint")
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
            show_error("Choose a purity classifier (or Load... a checkpoint).")
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
        demo = self.model_combo.currentText().endswith("(synthetic demo)")
        mark = " Synthetic demo model: not for diagnostic use." if demo else ""
        self.status.setText(
            f"classified: points coloured by tumour probability (blue normal, red tumour).{mark}"
        )
