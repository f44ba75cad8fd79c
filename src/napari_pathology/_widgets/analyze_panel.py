"""The Analyze panel: pick a model and a device, click Run, watch the heatmap fill in."""

from __future__ import annotations

import threading
import time
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
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

from napari_pathology._layers import (
    PLACED_SCALE_KEY,
    follow_slide_scale,
    link_metadata,
    overlay_geometry,
    slide_from_metadata,
)
from napari_pathology._widgets._common import (
    SlideLayerCombo,
    choose_checkpoint,
    choose_folder_into,
    device_combo,
    passthrough,
    select_or_add,
    show_failure,
)
from napari_pathology.progress import Progress

if TYPE_CHECKING:
    import napari

    from napari_pathology.analysis import AnalysisResult

#: Repaint the growing heatmap at most this often (seconds).
REPAINT_INTERVAL = 0.15
HEATMAP_COLORMAP_NAME = "inferno"


def heatmap_colormap() -> Any:
    """Inferno fading in from transparent: low probabilities leave the tissue visible.

    Plain inferno paints probability 0 black, which at 0.5 opacity darkens
    all the tissue; here alpha rises from 0 at probability 0 to 1 at 0.4.
    """
    from napari.utils.colormaps import Colormap, ensure_colormap

    colors = np.array(ensure_colormap(HEATMAP_COLORMAP_NAME).colors, dtype=np.float32)
    colors[:, 3] = np.clip(np.linspace(0.0, 2.5, len(colors)), 0.0, 1.0)
    return Colormap(colors, name="inferno (transparent low)", display_name="inferno, transparent low")


def default_results_dir() -> Path:
    """Where results go unless the user picks a folder."""
    from napari_pathology.demo import cache_dir

    return cache_dir() / "results"


def analysis_job(
    metadata: dict[str, Any],
    model_source: str,
    settings: Any,
    tissue: Any,
    out_root: Path,
    cancel: threading.Event,
) -> Generator[Progress, None, AnalysisResult]:
    """Everything a Run does, off the Qt thread: load model, find tissue, run it as its family runs."""
    from napari_pathology.analysis import check_run, result_folder, run, tissue_or_detect
    from napari_pathology.models import resolve_model

    slide = slide_from_metadata(metadata)
    slide.require_mpp()
    yield Progress(0, 0, f"loading {Path(model_source).name}...")
    model = resolve_model(model_source)
    check_run(slide, model.spec, settings)  # the real cause (um/px, stride...) before "no tissue"
    tissue = yield from tissue_or_detect(slide, tissue)
    out_dir = result_folder(out_root, slide, model.spec.name)
    return (yield from run(slide, model, tissue=tissue, settings=settings, out_dir=out_dir, cancel=cancel))


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
            untrained = " - untrained, train it first" if is_untrained(spec) else ""
            self.model_combo.addItem(f"{spec.name} ({spec.family}){untrained}", spec.name)
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
        self.progress.setFormat("%v / %m tiles")
        self.status = QLabel("Pick a slide and a model, then Run.")
        self.status.setWordWrap(True)
        self.score_label = QLabel("")
        self.score_label.setWordWrap(True)
        self.score_label.setStyleSheet("font-weight: bold;")

        form = QFormLayout()
        form.addRow("Slide", self.slide_combo)
        model_row = QHBoxLayout()
        model_row.addWidget(self.model_combo, 1)
        model_row.addWidget(self.load_checkpoint_button)
        form.addRow("Model", model_row)
        form.addRow("", self.model_info)
        form.addRow("Device", self.device_combo)
        form.addRow("Batch size", self.batch_spin)
        form.addRow("Stride (px)", self.stride_spin)
        form.addRow("", self.tta_check)
        form.addRow("Min tissue", self.min_tissue_spin)
        out_row = QHBoxLayout()
        out_row.addWidget(self.out_edit, 1)
        out_row.addWidget(browse)
        form.addRow("Results", out_row)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.score_label)
        layout.addStretch(1)

        self.worker: Any = None
        self._slide_layer: Any = None
        self._run_scale: tuple[float, float] = (1.0, 1.0)
        self._cancel = threading.Event()
        self._heatmap_layer: Any = None
        self._nuclei_overlay: Any = None
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
        self.model_info.setText(
            f"{spec.task}: {spec.input_size} px at {spec.mpp:g} um/px, output {spec.output}, "
            f"slide score = {spec.aggregator}.<br><small>{spec.description}</small>{warning}"
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
        from napari.qt.threading import create_worker

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
        self._heatmap_layer = None
        job = analysis_job(
            dict(layer.metadata), self.model_source, self.settings(), tissue,
            Path(self.out_edit.text()), self._cancel,
        )  # fmt: skip
        # errors go to the panel only (an "errored" connection given here stops superqt re-raising them)
        self.worker = create_worker(
            passthrough, job, _start_thread=False, _connect={"errored": self._on_error}
        )
        self.worker.yielded.connect(self._on_progress)
        self.worker.returned.connect(self._on_result)
        self.worker.finished.connect(self._on_finished)
        # Closing the viewer aborts the worker between two yields, leaving the job suspended:
        # close it so the engine saves the finished tiles as a partial result.
        self.worker.aborted.connect(job.close)
        self._slide_layer = layer
        self._run_scale = tuple(link_metadata(layer.metadata)[PLACED_SCALE_KEY])
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.score_label.setText("")
        self.status.setText("starting...")
        self.progress.setRange(0, 0)
        self.worker.start()

    def _refuse(self, message: str) -> None:
        """Say why Run did not start, in the panel and as a notification; no stale score stays."""
        from napari.utils.notifications import show_error

        self.score_label.setText("")
        self.status.setText(f"not started: {message}")
        show_error(message)

    def _slide_changed(self) -> None:
        """A score shown belongs to the slide it was computed on: clear it when another is chosen."""
        running = self.worker is not None and not self.run_button.isEnabled()
        if not running and self.score_label.text():
            layer = self.slide_combo.current_layer()
            if layer is None or layer is not getattr(self, "_slide_layer", None):
                self.score_label.setText("")
                self.status.setText("Pick a slide and a model, then Run.")

    def cancel(self) -> None:
        """Stop after the current batch; finished tiles are kept and saved as partial."""
        self._cancel.set()
        self.status.setText("cancelling after this batch...")
        self.cancel_button.setEnabled(False)

    def _painted_tissue(self, layer: Any) -> Any:
        """The (possibly corrected) tissue mask layer of this slide, if the user made one."""
        from napari_pathology._widgets.tissue_panel import find_tissue_layer, tissue_mask_from_layer

        tissue_layer = find_tissue_layer(self.viewer, layer.metadata.get("path"))
        return tissue_mask_from_layer(tissue_layer) if tissue_layer is not None else None

    def _on_progress(self, event: Progress) -> None:
        from napari_pathology.analysis import HeatmapBlock
        from napari_pathology.tiles import TileGrid

        if event.total:
            self.progress.setRange(0, event.total)
            self.progress.setValue(event.done)
        if event.message:
            self.status.setText(event.message)
        if isinstance(event.payload, TileGrid):
            self._show_empty_heatmap(event.payload)
            self._last_paint = 0.0  # the next block (a resumed run's kept cells) is shown at once
        elif isinstance(event.payload, HeatmapBlock) and self._heatmap_layer is not None:
            rows, cols = event.payload.cells[:, 0], event.payload.cells[:, 1]
            self._heatmap_layer.data[rows, cols] = event.payload.values
            now = time.perf_counter()
            if now - self._last_paint > REPAINT_INTERVAL:
                self._heatmap_layer.refresh()
                self._last_paint = now

    def _layer_name(self, kind: str) -> str:
        return f"{self._slide_layer.name} {self._model_name()} {kind}"

    def _model_name(self) -> str:
        text = self.model_combo.currentText()
        return text.split(" (")[0]

    def _run_mpp(self) -> tuple[float, float]:
        """The slide's ``(mpp_x, mpp_y)`` the job computes with (Run needs a um/px)."""
        sy, sx = self._run_scale
        return (sx, sy)

    def _link(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Metadata tying a result layer to the run's slide, placed at the run's um/px."""
        return {**(extra or {}), **link_metadata(self._slide_layer.metadata, self._run_scale)}

    def _follow_slide(self, *layers: Any) -> None:
        """Move freshly made result layers if the slide's um/px changed while the job ran."""
        follow_slide_scale(layers, self._slide_layer)

    def _show_empty_heatmap(self, grid: Any) -> None:
        geometry = overlay_geometry(grid.cell_um, grid.first_centre_um, self._run_mpp())
        data = np.full(grid.shape, np.nan, np.float32)
        name = self._layer_name("heatmap")
        old = self.viewer.layers[name] if name in self.viewer.layers else None
        if (
            old is not None
            and old.data.shape == data.shape
            and np.allclose(old.scale, geometry["scale"])
            and np.allclose(old.translate, geometry["translate"])
        ):
            old.data = data  # a re-run on the same grid: reuse the layer (no removal, no gc pass)
            old.metadata = self._link()
            self._heatmap_layer = old
        else:
            self._heatmap_layer = self._upsert_image(name, data, geometry)
        self._follow_slide(self._heatmap_layer)

    def _upsert_image(self, name: str, data: np.ndarray, geometry: dict[str, Any]) -> Any:
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        return self.viewer.add_image(
            data, name=name, colormap=heatmap_colormap(), contrast_limits=(0.0, 1.0), opacity=0.5,
            blending="translucent", units=self._slide_layer.units, metadata=self._link(), **geometry,
        )  # fmt: skip

    def _on_result(self, result: AnalysisResult) -> None:
        from napari_pathology.analysis.nuclei import NucleusAnalysisResult

        if isinstance(result, NucleusAnalysisResult):
            self._show_nuclei(result)
            return
        geometry = overlay_geometry(result.cell_um, result.first_centre_um, self._run_mpp())
        layer = self._heatmap_layer
        if layer is not None and layer in self.viewer.layers and layer.data.shape == result.heatmap.shape:
            layer.data = result.heatmap  # in place: removing a layer costs napari a full gc pass (~0.4 s)
        else:
            layer = self._upsert_image(self._layer_name("heatmap"), result.heatmap, geometry)
        self._heatmap_layer = layer
        placed = layer.metadata.get(PLACED_SCALE_KEY)  # kept: the layer may have moved since
        metadata = self._link({"napari_pathology_result": str(result.out_dir), "spec": result.spec})
        layer.metadata = {**metadata, PLACED_SCALE_KEY: placed or metadata[PLACED_SCALE_KEY]}
        self._follow_slide(layer)
        self._show_detections(result)
        state = "partial (cancelled)" if result.partial else "complete"
        scores = ", ".join(f"{k} {v:.3f}" for k, v in result.scores.items())
        self.score_label.setText(f"Slide score ({result.spec['aggregator']}): {result.slide_score:.3f}")
        self.status.setText(
            f"{state}: {result.tiles_done}/{result.tiles_total} tiles, {len(result.detections)} "
            f"detections; class scores {scores}. Saved in {result.out_dir}"
        )
        self.progress.setRange(0, max(1, result.tiles_total))
        self.progress.setValue(result.tiles_done)

    def _show_nuclei(self, result: Any) -> None:
        """Predicted nuclei as a purity map plus in-view points; the slide score is the predicted purity."""
        from napari_pathology._widgets.nuclei_layers import PredictionOverlay

        if self._nuclei_overlay is not None:
            self._nuclei_overlay.remove()
        name = f"{self._slide_layer.name} {self._model_name()}"
        self._nuclei_overlay = PredictionOverlay(self.viewer, self._slide_layer, result.nuclei, name)
        self._link_overlay(self._nuclei_overlay)
        state = "partial (cancelled)" if result.partial else "complete"
        purity = "-" if result.predicted_purity is None else f"{result.predicted_purity:.3f}"
        self.score_label.setText(f"Predicted purity (mean tumour probability): {purity}")
        self.status.setText(f"{state}: {len(result.nuclei)} nuclei classified. Saved in {result.out_dir}")

    def _show_detections(self, result: AnalysisResult) -> None:
        name = self._layer_name("detections")
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        mpp = self._run_mpp()
        half_x, half_y = (mpp[0] / 2, mpp[1] / 2) if mpp else (0.5, 0.5)
        points = result.detections[:, [1, 0]] - np.array([half_y, half_x]) if len(result.detections) else []
        scores = result.detections[:, 2] if len(result.detections) else np.zeros(0)
        layer = self.viewer.add_points(
            points, name=name, features={"score": scores}, size=result.cell_um * 2,
            face_color="score", face_colormap="viridis", face_contrast_limits=(0.5, 1.0),
            border_color="white", border_width=0.1, opacity=0.9, units=self._slide_layer.units,
            metadata=self._link(),
        )  # fmt: skip
        layer.face_contrast_limits = (0.5, 1.0)
        self._follow_slide(layer)

    def _link_overlay(self, overlay: Any) -> None:
        """Move an overlay made while the um/px changed mid-run (later changes it follows itself)."""
        self._follow_slide(overlay.density_layer, overlay.points_layer)

    def _on_error(self, error: BaseException) -> None:
        self.score_label.setText("")  # no score from an earlier run beside a failure
        show_failure(self.status, error)

    def _on_finished(self) -> None:
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        if self.progress.maximum() == 0:
            self.progress.setRange(0, 1)


def _spec_of(info: dict[str, Any]) -> Any:
    from napari_pathology.models import ModelSpec

    spec = info.get("spec", info)
    return spec if isinstance(spec, ModelSpec) else ModelSpec.from_dict(spec)
