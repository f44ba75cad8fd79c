"""The Analyze panel: pick a model and a device, click Run, watch the heatmap fill in.

The panel gathers the settings and runs :func:`napari_pathology.analysis.analysis_job`
in a worker (:func:`napari_pathology._widgets._workers.start_worker`); what a
run returns, whatever its model's family, is one
:class:`~napari_pathology.analysis.AnalysisResult`, shown by
:class:`~napari_pathology._widgets.analyze_layers.ResultLayers`.
"""

from __future__ import annotations

import threading
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)
from superqt import QCollapsible

from napari_pathology._layers import PLACED_SCALE_KEY, link_metadata, slide_from_metadata
from napari_pathology._widgets._common import (
    SlideLayerCombo,
    choose_checkpoint,
    choose_folder_into,
    compact_panel,
    device_combo,
    select_or_add,
)
from napari_pathology._widgets._workers import show_failure, start_worker
from napari_pathology._widgets.analyze_gallery import PatchGallery
from napari_pathology._widgets.analyze_layers import ResultLayers, is_demo, result_text
from napari_pathology._widgets.analyze_view import HeatmapLegend
from napari_pathology.analysis.jobs import analysis_job, default_results_dir
from napari_pathology.progress import Progress

if TYPE_CHECKING:
    import napari

    from napari_pathology.analysis import AnalysisResult

#: Repaint the growing heatmap at most this often (seconds).
REPAINT_INTERVAL = 0.15


class AnalyzePanel(QWidget):
    """Dock widget: slide, model, device, batch, stride, TTA; Run, Cancel, progress, score."""

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        from napari_pathology.models import list_models
        from napari_pathology.models.pretrained import is_untrained, sorted_for_analysis

        self.viewer = napari_viewer
        self.slide_combo = SlideLayerCombo(napari_viewer)
        self.slide_combo.changed.connect(self._slide_changed)

        self.model_combo = QComboBox()
        for spec in sorted_for_analysis(list_models()):
            self.model_combo.addItem(model_label(spec, is_untrained(spec)), spec.name)
            self.model_combo.setItemData(
                self.model_combo.count() - 1,
                f"{spec.family}: {spec.description}",
                Qt.ItemDataRole.ToolTipRole,
            )
        self.model_combo.currentIndexChanged.connect(self._model_changed)
        self.load_checkpoint_button = QPushButton("Load checkpoint...")
        self.load_checkpoint_button.clicked.connect(self._choose_checkpoint)
        self.model_info = QLabel()
        self.model_info.setWordWrap(True)

        self.device_combo = device_combo()
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 1024)
        self.batch_spin.setValue(32)
        self.stride_spin = QSpinBox()
        self.stride_spin.setRange(0, 4096)
        self.stride_spin.setSpecialValueText("model default")
        self.tta_check = QCheckBox("8-orientation TTA")
        self.min_tissue_spin = QDoubleSpinBox()
        self.min_tissue_spin.setRange(0.0, 1.0)
        self.min_tissue_spin.setSingleStep(0.05)
        self.min_tissue_spin.setValue(0.25)
        self.out_edit = QLineEdit(str(default_results_dir()))
        browse = QPushButton("...")
        browse.setMaximumWidth(30)
        browse.clicked.connect(self._choose_out_dir)

        self.run_button = QPushButton("Run")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.progress = QProgressBar()
        self.progress.setFormat("%v / %m")
        self.status = QLabel("Pick a slide and a model, then Run.")
        self.status.setWordWrap(True)
        self.score_label = QLabel("")
        self.score_label.setWordWrap(True)
        self.score_label.setStyleSheet("font-weight: bold;")
        self.legend = HeatmapLegend()
        self.percentile_check = QCheckBox("Attention as percentiles (CLAM); off: raw scores")
        self.percentile_check.setChecked(True)
        self.percentile_check.setVisible(False)
        self.percentile_check.toggled.connect(self._percentile_toggled)
        self.gallery = PatchGallery(napari_viewer)

        form = QFormLayout()
        form.addRow("Slide", self.slide_combo)
        form.addRow("Model", self.model_combo)
        form.addRow("", self.load_checkpoint_button)
        form.addRow("", self.model_info)
        settings = QWidget()
        settings_form = QFormLayout(settings)
        settings_form.setContentsMargins(0, 0, 0, 0)
        settings_form.addRow("Device", self.device_combo)
        settings_form.addRow("Batch size", self.batch_spin)
        settings_form.addRow("Stride (px)", self.stride_spin)
        settings_form.addRow("", self.tta_check)
        settings_form.addRow("Min tissue", self.min_tissue_spin)
        out_row = QHBoxLayout()
        out_row.addWidget(self.out_edit, 1)
        out_row.addWidget(browse)
        settings_form.addRow("Results", out_row)
        self.settings_section = QCollapsible("Run settings")
        self.settings_section.addWidget(settings)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.settings_section)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.score_label)  # what the result says first, then how it came about
        layout.addWidget(self.legend)
        layout.addWidget(self.percentile_check)
        layout.addWidget(self.gallery)
        layout.addWidget(self.status)
        layout.addStretch(1)
        compact_panel(self)

        self.worker: Any = None
        self.running: Any = None
        self._slide_layer: Any = None
        self._layers: ResultLayers | None = None
        self._cancel = threading.Event()
        self._last_paint = 0.0
        self._model_changed()

    # ------------------------------------------------------------------ model choice
    @property
    def model_source(self) -> str:
        """Registry name or checkpoint path of the chosen model."""
        return str(self.model_combo.currentData())

    def select_model(self, source: str | Path, label: str | None = None) -> None:
        """Select a registry name or a checkpoint path (adding it to the list)."""
        source = str(source)
        select_or_add(self.model_combo, source, label or f"{Path(source).name} (checkpoint)")

    def _choose_checkpoint(self) -> None:
        path = choose_checkpoint(self, "Load checkpoint")
        if path:
            self.select_model(path)

    def _choose_out_dir(self) -> None:
        choose_folder_into(self, self.out_edit, "Results folder")

    def _model_changed(self, *_: Any) -> None:
        from napari.utils.notifications import show_error

        from napari_pathology.models import ModelError, checkpoint_info, get_spec

        source = self.model_source
        try:
            spec = get_spec(source) if not Path(source).suffix else _spec_of(checkpoint_info(source))
        except (ModelError, OSError, ValueError) as exc:
            self.model_info.setText("")
            show_error(str(exc))
            return
        from napari_pathology.models.pretrained import is_untrained

        warning = (
            "<br><b>Untrained starting point: its output is meaningless until it is trained.</b>"
            if not Path(source).suffix and is_untrained(spec)
            else ""
        )
        if is_demo(spec):
            warning += "<br><b style='color:#ffb000'>Synthetic demo model: not for diagnostic use.</b>"
        if spec.output == "slide":  # one network over the slide's tissue: its size is the slide's
            padded = f", padded to {spec.input_size} px" if (spec.config or {}).get("fixed_size") else ""
            summary = f"the tissue at {spec.mpp:g} um/px{padded}, one prediction for the slide"
        else:
            summary = f"{spec.input_size} px at {spec.mpp:g} um/px, output {spec.output}"
            summary += f", slide score = {spec.aggregator}"
        self.model_info.setText(
            f"{spec.name} ({spec.family}) - {spec.task}: {summary}."
            f"<br><small>{spec.description}</small>{warning}"
        )
        self.tta_check.setEnabled(spec.tta)
        self.tta_check.setChecked(spec.tta)  # the paper's default (Liu et al.: 8 orientations)

    # ------------------------------------------------------------------ running
    def settings(self) -> Any:
        """The run settings chosen in the panel."""
        from napari_pathology.analysis import RunSettings

        return RunSettings(
            stride=self.stride_spin.value() or None,
            batch_size=self.batch_spin.value(),
            device=str(self.device_combo.currentData()),
            tta=self.tta_check.isChecked() and self.tta_check.isEnabled(),
            min_tissue_fraction=self.min_tissue_spin.value(),
        )

    def run(self) -> None:
        """Start a run in a worker thread (Run button)."""
        layer = self.slide_combo.current_layer()
        self.score_label.setText("")  # never leave a previous slide's score beside a refusal
        if layer is None:
            self._refuse("Open a slide first (File > Open).")
            return
        if layer.metadata.get("mpp_missing"):
            self._refuse(f"{layer.name} has no um/px: set it in the Slide panel before running a model.")
            return
        try:
            tissue = self._painted_tissue(layer)
        except ValueError as exc:
            self._refuse(f"{layer.name}: {exc}")
            return
        self._cancel = threading.Event()
        self._slide_layer = layer
        run_scale = tuple(link_metadata(layer.metadata)[PLACED_SCALE_KEY])
        self._layers = ResultLayers(self.viewer, layer, self._model_name(), run_scale)
        job = analysis_job(
            partial(slide_from_metadata, dict(layer.metadata)), self.model_source, self.settings(), tissue,
            Path(self.out_edit.text()), self._cancel,
        )  # fmt: skip
        self.running = start_worker(
            job, progress=self.progress, status=self.status, busy=(self.run_button,),
            cancel_button=self.cancel_button, cancel_event=self._cancel,
            on_progress=self._on_progress, on_done=self._on_result,
            on_error=self._on_error,
        )  # fmt: skip
        self.worker = self.running.worker
        self.status.setText("starting...")
        self.gallery.clear()

    def _refuse(self, message: str) -> None:
        """Say why Run did not start, in the panel and as a notification; no stale score stays."""
        from napari.utils.notifications import show_error

        self.score_label.setText("")
        self.legend.setVisible(False)
        self.gallery.clear()
        self.status.setText(f"not started: {message}")
        show_error(message)

    def _slide_changed(self) -> None:
        """A score shown belongs to the slide it was computed on: clear it when another is chosen."""
        running = self.running is not None and self.running.running
        if not running and self.score_label.text():
            layer = self.slide_combo.current_layer()
            if layer is None or layer is not getattr(self, "_slide_layer", None):
                self.score_label.setText("")
                self.status.setText("Pick a slide and a model, then Run.")

    def cancel(self) -> None:
        """Stop after the current batch; what is finished is kept and saved as partial."""
        if self.running is not None:
            self.running.cancel("cancelling after this batch...")

    def _painted_tissue(self, layer: Any) -> Any:
        """The (possibly corrected) tissue mask layer of this slide, if the user made one."""
        from napari_pathology._widgets.tissue_panel import find_tissue_layer, tissue_mask_from_layer

        tissue_layer = find_tissue_layer(self.viewer, layer.metadata.get("path"))
        return tissue_mask_from_layer(tissue_layer) if tissue_layer is not None else None

    def _on_progress(self, event: Progress) -> None:
        """Lay out the heatmap on the run's grid, then paint the finished cells as blocks arrive."""
        from napari_pathology.analysis import HeatmapBlock
        from napari_pathology.tiles import TileGrid

        if isinstance(event.payload, TileGrid):
            self._layers.show_grid(event.payload)
            self.legend.show_layer(self._heatmap_layer, self._layers.heatmap_kind)
            self._last_paint = 0.0  # the next block (a resumed run's kept cells) is shown at once
        elif isinstance(event.payload, HeatmapBlock) and self._heatmap_layer is not None:
            self._layers.paint(event.payload)
            now = time.perf_counter()
            if now - self._last_paint > REPAINT_INTERVAL:
                self._layers.refresh()
                self._last_paint = now
                if not self.legend.isVisible() or event.payload.kind != self._layers.heatmap_kind:
                    self.legend.show_layer(self._heatmap_layer, self._layers.heatmap_kind)

    @property
    def _heatmap_layer(self) -> Any:
        """The heatmap layer of the current run (None before its grid is known)."""
        return None if self._layers is None else self._layers.heatmap_layer

    def _model_name(self) -> str:
        text = self.model_combo.currentText()
        return text.split(" (")[0]

    def _on_result(self, result: AnalysisResult) -> None:
        self.show_result(result)

    def show_result(self, result: AnalysisResult, slide_layer: Any = None) -> None:
        """Show whatever a result holds (heatmap, detections, points) and its slide score.

        Parameters
        ----------
        result : AnalysisResult
            From any runner (a run of this panel, the CLI, a saved folder).
        slide_layer : napari.layers.Image, optional
            Its slide (default: the slide of this panel's run, else the chosen slide).
        """
        layer = slide_layer
        if layer is None:
            layer = self._layers.slide_layer if self._layers else self.slide_combo.current_layer()
        if layer is None:
            raise ValueError("open the result's slide first: a result is shown on its slide")
        if self._layers is None or self._layers.slide_layer is not layer:
            run_scale = tuple(link_metadata(layer.metadata)[PLACED_SCALE_KEY])
            self._layers = ResultLayers(self.viewer, layer, result.model_name, run_scale)
            self._slide_layer = layer
        self._layers.percentile = self.percentile_check.isChecked()
        self._layers.show(result)
        score, status = result_text(result)
        self.score_label.setText(score)
        self.status.setText(status)
        self.progress.setRange(0, max(1, result.tiles_total))
        self.progress.setValue(result.tiles_done)
        attention = result.heatmap_kind == "attention"
        self.percentile_check.setVisible(attention)
        self.legend.show_layer(self._heatmap_layer, result.heatmap_kind, self._layers.showing_percentiles)
        try:
            slide = slide_from_metadata(layer.metadata) if attention else None
        except (ValueError, OSError) as exc:
            slide = None
            self.status.setText(f"{status} (no patch gallery: {exc})")
        placed = tuple(link_metadata(layer.metadata)[PLACED_SCALE_KEY])
        factor = (placed[0] / self._layers.run_scale[0], placed[1] / self._layers.run_scale[1])
        self.gallery.show_result(result, slide, factor)

    def _percentile_toggled(self, percentile: bool) -> None:
        """Attention heatmap as percentiles of the raw scores, or raw (the layer's data, in place)."""
        if self._layers is not None:
            self._layers.set_percentile(percentile)
            self.legend.show_layer(
                self._heatmap_layer, self._layers.heatmap_kind, self._layers.showing_percentiles
            )

    def _on_error(self, error: BaseException) -> None:
        self.score_label.setText("")  # no score from an earlier run beside a failure
        show_failure(self.status, error)


def model_label(spec: Any, untrained: bool = False) -> str:
    """A model's short name in the list: its name, marked ``(synthetic demo)`` or ``(untrained)``.

    The family and description go in the item's tooltip and the line under the list.
    """
    if untrained:
        return f"{spec.name} (untrained)"
    return f"{spec.name} (synthetic demo)" if is_demo(spec) else spec.name


def _spec_of(info: dict[str, Any]) -> Any:
    from napari_pathology.models import ModelSpec

    spec = info.get("spec", info)
    return spec if isinstance(spec, ModelSpec) else ModelSpec.from_dict(spec)
