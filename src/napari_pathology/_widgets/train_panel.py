"""The Train panel: train or fine-tune a model from drawn regions or a slide table, in the background.

Thin wiring over :mod:`napari_pathology.families` and
:mod:`napari_pathology.training`: the family list is every registered family
that trains from drawn regions or a slide table; the panel turns its fields
into that family's settings dataclass (defaults, labels and which fields
show come from the dataclass's fields), checks
what can be checked at once (annotations, classes, validation split, um/px)
and hands the job to the shared :class:`~napari_pathology.training.queue.TrainingQueue`,
whose threads run it (one job at a time per device). Events come back through
a Qt signal; the panel draws a progress bar with ETA, the loss and validation
curves (at most four times a second), a log and the checkpoints as they land.

Drawn regions: a Shapes layer whose shapes carry a ``label`` feature
(``tumour`` or ``normal``; tumour when missing) over a slide layer. World
coordinates (micrometres) become level-0 pixels of that slide and are written
as GeoJSON beside the checkpoint with a one-row slide table, so the job is
the same as one from the command line.
"""

from __future__ import annotations

import functools
import math
import threading
import time
import weakref
from collections.abc import Callable, Generator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QEvent, QObject, QPointF, QRectF, Qt, QTimer, Signal
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from napari_pathology._widgets._common import (
    SlideLayerCombo,
    choose_checkpoint,
    choose_folder_into,
    device_combo,
    select_or_add,
    shape_rings_px,
)

if TYPE_CHECKING:
    import napari

    from napari_pathology.geometry import Polygon
    from napari_pathology.training.events import TrainEvent
    from napari_pathology.training.queue import TrainingJob, TrainingQueue

__all__ = [
    "ANALYZE_DOCK",
    "SOURCE_TABLE",
    "SOURCE_VIEWER",
    "CurvePlot",
    "TrainPanel",
    "default_models_dir",
    "shapes_to_polygons",
    "trainable_families",
]

PLUGIN = "napari-pathology"
#: Key of the docked Analyze panel in ``viewer.window.dock_widgets``.
ANALYZE_DOCK = "Analyze (napari-pathology)"
#: Data sources, as stored in the source combo.
SOURCE_VIEWER, SOURCE_TABLE = "viewer", "table"
#: Redraw the curves at most this often (seconds).
REDRAW_INTERVAL = 0.25
#: Validation metrics worth a curve, in order of preference, after the one the job's family picks its
#: best checkpoint by (``Family.best_metric``).
CURVE_METRICS = ("val_loss", "slide_auc", "auc", "tile_accuracy", "accuracy")
REGION_LABELS = ("tumour", "normal")
#: torch CPU threads of a job the panel runs: the viewer needs the other cores (and more threads
#: than free cores make small networks slower, not faster).
PANEL_THREADS = 1


def default_models_dir() -> Path:
    """Where trained checkpoints go unless the user picks a folder."""
    from napari_pathology.demo import cache_dir

    return cache_dir() / "models"


def trainable_families() -> dict[str, Any]:
    """Families the panel can train (from drawn regions or a slide table): name -> :class:`Family`."""
    from napari_pathology.families import list_families

    return {
        f.name: f for f in list_families(trainable=True) if {"regions", "slide_table"} & set(f.data_sources)
    }


def _defaults(family: Any) -> dict[str, Any]:
    return family.defaults()


def _paper_default(family: Any, name: str) -> str:
    """The default of a setting as its docstring says it (``(default 0.05, or ...)``) or its value."""
    import re

    field = next((f for f in family.setting_fields() if f.name == name), None)
    if field is None:
        return ""
    if field.default is None:
        found = re.search(r"\(default:? ([^)]*)\)", field.help)
        return found.group(1) if found else "the family's choice"
    return f"{field.default:g}" if isinstance(field.default, float) else str(field.default)


# --------------------------------------------------------------------------- drawn regions
def _region_label(value: Any) -> str | None:
    """``tumour`` / ``normal`` for a shape's label (tumour when empty), None when unknown."""
    from napari_pathology.cohort import NORMAL_LABELS, TUMOUR_LABELS

    text = "" if value is None else str(value).strip().lower()
    if text in ("", "nan", "none"):
        return "tumour"
    if text in TUMOUR_LABELS:
        return "tumour"
    if text in NORMAL_LABELS:
        return "normal"
    return None


def shapes_to_polygons(shapes_layer: Any, slide_layer: Any) -> tuple[dict[str, list[Polygon]], list[str]]:
    """Polygons of a Shapes layer in level-0 pixels ``(x, y)`` of a slide layer, by label.

    Polygons, rectangles and ellipses count; lines and paths are skipped.
    Each vertex goes from the shapes layer's data to world coordinates
    (micrometres), then to the slide layer's level-0 data coordinates, then
    half a pixel on: napari centres pixel ``i`` at ``i``, while GeoJSON (QuPath)
    pixel ``i`` covers ``[i, i + 1)``.

    Parameters
    ----------
    shapes_layer : napari.layers.Shapes
        Shapes with an optional ``label`` feature (``tumour``/``normal``; tumour when absent).
    slide_layer : napari.layers.Image
        The slide they were drawn on.

    Returns
    -------
    polygons : dict
        ``{"tumour": [...], "normal": [...]}``, each polygon ``[ring]`` with ring ``(n, 2)`` in px.
    problems : list of str
        Shapes skipped and why.
    """
    out: dict[str, list[Polygon]] = {label: [] for label in REGION_LABELS}
    problems: list[str] = []
    n = len(shapes_layer.data)
    features = getattr(shapes_layer, "features", None)
    labels = list(features["label"]) if features is not None and "label" in features else [None] * n
    for index, ring, problem in shape_rings_px(shapes_layer, slide_layer):
        if ring is None:
            problems.append(problem)
            continue
        label = _region_label(labels[index])
        if label is None:
            problems.append(f"shape {index} has label {labels[index]!r}: use 'tumour' or 'normal'")
            continue
        out[label].append([ring])
    return out, problems


# --------------------------------------------------------------------------- curves
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


# --------------------------------------------------------------------------- closing the viewer
class _CloseWatcher(QObject):
    """Stops a panel's jobs when the main window closes (the stop saves their last checkpoint)."""

    def __init__(self, window: QWidget, stop: Callable[[], None]) -> None:
        super().__init__(window)
        self._stop = stop
        self._closing = False
        window.installEventFilter(self)

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:
        """Watch Close (programmatic: stop now; by the user: once the window hides) and Show."""
        kind = event.type()
        if kind == QEvent.Type.Close:
            if event.spontaneous():
                self._closing = True  # a confirmation dialog may still cancel it
            else:
                self._stop()
        elif kind == QEvent.Type.Hide and self._closing and not event.spontaneous():
            self._stop()
        elif kind == QEvent.Type.Show:
            self._closing = False
        return False


def _stop_jobs(jobs: list[TrainingJob]) -> None:
    for job in list(jobs):
        job.stop()


def _run_job(family: Any, settings: Any, stop: threading.Event) -> Generator[Any, None, Any]:
    """Queue factory: the family's training generator (module level so it holds no panel)."""
    return family.train(settings, settings.data, settings.out, stop)


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class _Record:
    """What the panel keeps about one of its jobs."""

    def __init__(self, job: TrainingJob, family: str, settings: Any) -> None:
        self.job, self.family, self.settings = job, family, settings
        self.first_step: tuple[int, float] | None = None  # (step, elapsed) of the first step event


# --------------------------------------------------------------------------- the panel
class TrainPanel(QWidget):
    """Dock widget: family, starting point, data, hyper-parameters, device; Start, Stop, Resume; curves.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        The viewer it docks into.
    queue : TrainingQueue, optional
        Where jobs run (default: the process-wide :func:`~napari_pathology.training.queue.training_queue`).
    """

    #: (job, event) from a queue thread, delivered on the Qt thread.
    job_event = Signal(object, object)
    #: (job,) after a state change, delivered on the Qt thread.
    job_state = Signal(object)

    def __init__(self, napari_viewer: napari.Viewer, queue: TrainingQueue | None = None) -> None:
        super().__init__()
        from napari_pathology.training.queue import training_queue

        self.viewer = napari_viewer
        self.queue = queue or training_queue()
        self._families = trainable_families()
        self._records: list[_Record] = []
        self._jobs: list[TrainingJob] = []  # shared with the close hooks (no reference to the panel)
        self._history: list[dict[str, Any]] = []
        self._checkpoints: dict[str, dict[str, Any]] = {}
        self._dirty = False
        self._watched: Any = None

        # --- model
        self.family_combo = QComboBox()
        for name in self._families:
            self.family_combo.addItem(name, name)
        self.start_combo = QComboBox()
        self.start_combo.setToolTip("Registry model to train from scratch, or trained weights to fine-tune")
        self.load_checkpoint_button = QPushButton("Load checkpoint...")
        self.load_checkpoint_button.clicked.connect(self._choose_checkpoint)
        self.start_info = QLabel()
        self.start_info.setWordWrap(True)

        # --- data
        self.source_combo = QComboBox()
        self.source_combo.addItem("Viewer annotations", SOURCE_VIEWER)
        self.source_combo.addItem("Slide table (CSV)", SOURCE_TABLE)
        self.slide_combo = SlideLayerCombo(napari_viewer)
        self.shapes_combo = QComboBox()
        self.shapes_combo.setToolTip("Shapes layer with a 'label' feature: tumour (default) or normal")
        self.shapes_combo.setPlaceholderText("no Shapes layer: click New")
        self.new_layer_button = QPushButton("New")
        self.new_layer_button.setToolTip("Add a Shapes layer for tumour / normal regions")
        self.new_layer_button.clicked.connect(self.add_annotation_layer)
        self.draw_label_combo = QComboBox()
        self.draw_label_combo.addItems(list(REGION_LABELS))
        self.draw_label_combo.setToolTip("Label of the next shapes drawn in the annotation layer")
        self.draw_label_combo.currentTextChanged.connect(self._draw_label_changed)
        self.table_edit = QLineEdit()
        self.table_edit.setPlaceholderText("slides.csv: slide, label, annotations[, normal_annotations]")
        self.table_browse = QPushButton("...")
        self.table_browse.setMaximumWidth(30)
        self.table_browse.clicked.connect(self._choose_table)
        self.val_spin = QDoubleSpinBox()
        self.val_spin.setRange(0.0, 0.9)
        self.val_spin.setSingleStep(0.05)
        self.val_spin.setToolTip("Share of slides held out for validation (0: no validation)")

        # --- hyper-parameters
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 10_000_000)
        self.lr_edit = QLineEdit()
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 4096)
        self.hard_negative_spin = QDoubleSpinBox()
        self.hard_negative_spin.setRange(0.0, 1.0)
        self.hard_negative_spin.setSingleStep(0.1)
        self.hard_negative_spin.setToolTip("Share of normal patches drawn from mined hard negatives (0: off)")
        self.eval_spin = QSpinBox()
        self.eval_spin.setRange(1, 1_000_000)
        self.eval_spin.setToolTip("Steps between validations and checkpoint saves")
        self.device_combo = device_combo()
        self.amp_check = QCheckBox("Mixed precision (CUDA)")
        self.out_edit = QLineEdit(str(default_models_dir()))
        out_browse = QPushButton("...")
        out_browse.setMaximumWidth(30)
        out_browse.clicked.connect(self._choose_out_dir)
        self.name_edit = QLineEdit()
        self.name_edit.setPlaceholderText("automatic (family-data-time)")

        # --- run
        self.start_button = QPushButton("Start")
        self.start_button.clicked.connect(self.start)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("Finish the current step, save the last checkpoint and stop")
        self.stop_button.clicked.connect(self.stop)
        self.resume_button = QPushButton("Resume")
        self.resume_button.setToolTip("Continue the last job from its last checkpoint")
        self.resume_button.clicked.connect(self.resume)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("idle")
        self.status = QLabel("Draw tumour (and normal) regions or pick a slide table, then Start.")
        self.status.setWordWrap(True)
        self.loss_plot = CurvePlot("training loss", "#f0a030")
        self.metric_plot = CurvePlot("validation", "#40b0f0")
        self.checkpoint_list = QListWidget()
        self.checkpoint_list.setMaximumHeight(72)
        self.checkpoint_list.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.checkpoint_list.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        self.use_button = QPushButton("Use in Analyze")
        self.use_button.setToolTip("Select the chosen checkpoint (best by default) in the Analyze panel")
        self.use_button.clicked.connect(lambda: self.use_in_analyze())
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(2000)
        self.log.setMinimumHeight(80)

        self._build_layout(out_browse)
        for combo in self.findChildren(QComboBox):  # long model names must not widen the dock
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(12)
        self._apply_theme()

        self.family_combo.currentIndexChanged.connect(self._family_changed)
        self.start_combo.currentIndexChanged.connect(self._start_changed)
        self.source_combo.currentIndexChanged.connect(self._source_changed)
        napari_viewer.layers.events.inserted.connect(self._sync_shapes)
        napari_viewer.layers.events.removed.connect(self._sync_shapes)
        napari_viewer.layers.events.changed.connect(self._sync_shapes)

        self.job_event.connect(self._on_job_event)
        self.job_state.connect(self._on_job_state)
        self._redraw_timer = QTimer(self)
        self._redraw_timer.setInterval(int(REDRAW_INTERVAL * 1000))
        self._redraw_timer.timeout.connect(self._redraw)
        jobs = self._jobs
        self.destroyed.connect(lambda *_: _stop_jobs(jobs))

        self._family_changed()
        self._sync_shapes()
        self._update_buttons()
        self._watch_window()

    # ------------------------------------------------------------------ layout
    def _build_layout(self, out_browse: QPushButton) -> None:
        setup = QWidget()
        form = QFormLayout(setup)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        form.addRow("Family", self.family_combo)
        start_row = QHBoxLayout()
        start_row.addWidget(self.start_combo, 1)
        start_row.addWidget(self.load_checkpoint_button)
        form.addRow("Start from", start_row)
        form.addRow("", self.start_info)
        form.addRow("Data", self.source_combo)
        form.addRow("Slide", self.slide_combo)
        shapes_row = QHBoxLayout()
        shapes_row.addWidget(self.shapes_combo, 1)
        shapes_row.addWidget(self.new_layer_button)
        self._shapes_row = QWidget()
        self._shapes_row.setLayout(shapes_row)
        shapes_row.setContentsMargins(0, 0, 0, 0)
        form.addRow("Regions", self._shapes_row)
        form.addRow("Draw as", self.draw_label_combo)
        table_row = QHBoxLayout()
        table_row.setContentsMargins(0, 0, 0, 0)
        table_row.addWidget(self.table_edit, 1)
        table_row.addWidget(self.table_browse)
        self._table_row = QWidget()
        self._table_row.setLayout(table_row)
        form.addRow("Table", self._table_row)
        form.addRow("Validation", self.val_spin)
        form.addRow("Steps", self.steps_spin)
        form.addRow("Learning rate", self.lr_edit)
        form.addRow("Batch size", self.batch_spin)
        form.addRow("Hard negatives", self.hard_negative_spin)
        form.addRow("Validate every", self.eval_spin)
        form.addRow("Device", self.device_combo)
        form.addRow("", self.amp_check)
        out_row = QHBoxLayout()
        out_row.addWidget(self.out_edit, 1)
        out_row.addWidget(out_browse)
        form.addRow("Output", out_row)
        form.addRow("Name", self.name_edit)
        self._form = form

        monitor = QWidget()
        watch = QVBoxLayout(monitor)
        curves = QHBoxLayout()
        curves.addWidget(self.loss_plot, 1)
        curves.addWidget(self.metric_plot, 1)
        watch.addLayout(curves)
        watch.addWidget(QLabel("Checkpoints"))
        watch.addWidget(self.checkpoint_list)
        watch.addWidget(self.use_button)
        watch.addWidget(QLabel("Log"))
        watch.addWidget(self.log, 1)

        self.tabs = QTabWidget()
        self.tabs.addTab(setup, "Set-up")
        self.tabs.addTab(monitor, "Progress")
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.stop_button)
        buttons.addWidget(self.resume_button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.tabs, 1)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)

    def _set_row_visible(self, field: QWidget, visible: bool) -> None:
        label = self._form.labelForField(field)
        field.setVisible(visible)
        if label is not None:
            label.setVisible(visible)

    def _apply_theme(self) -> None:
        try:
            from napari.utils.theme import get_theme

            theme = get_theme(self.viewer.theme)
            text, background = theme.text.as_hex(), theme.foreground.as_hex()
        except Exception:  # an unknown theme: keep the defaults
            return
        for plot in (self.loss_plot, self.metric_plot):
            plot.set_colors(text, background)

    # ------------------------------------------------------------------ public state
    @property
    def family(self) -> str:
        """The chosen model family."""
        return str(self.family_combo.currentData() or "")

    @property
    def start_source(self) -> str:
        """Registry name or checkpoint path to start from."""
        return str(self.start_combo.currentData() or "")

    @property
    def source(self) -> str:
        """:data:`SOURCE_VIEWER` or :data:`SOURCE_TABLE`."""
        return str(self.source_combo.currentData())

    @property
    def current_job(self) -> TrainingJob | None:
        """The job the panel shows (the latest started), or None."""
        return self._records[-1].job if self._records else None

    @property
    def jobs(self) -> list[TrainingJob]:
        """Every job started from this panel, oldest first."""
        return [record.job for record in self._records]

    @property
    def history(self) -> list[dict[str, Any]]:
        """``{"step", "loss"}`` and ``{"step", **metrics}`` rows of the shown job (and those it resumed)."""
        return list(self._history)

    @property
    def checkpoints(self) -> list[dict[str, Any]]:
        """Checkpoints written so far: ``{"kind": "best"|"last", "path", "metrics"}``, best first."""
        return sorted(self._checkpoints.values(), key=lambda c: (c["kind"] != "best", c["path"]))

    @property
    def shapes_layer(self) -> Any:
        """The chosen Shapes layer, or None."""
        name = self.shapes_combo.currentText()
        for layer in self.viewer.layers:
            if layer.name == name and layer._type_string == "shapes":
                return layer
        return None

    def select_family(self, family: str) -> None:
        """Choose a trainable family by name (one of the panel's family list)."""
        index = self.family_combo.findData(family)
        if index < 0:
            raise ValueError(f"{family!r} is not a trainable family ({', '.join(self._families)})")
        self.family_combo.setCurrentIndex(index)

    def select_start(self, source: str | Path, label: str | None = None) -> None:
        """Start from a registry name or a checkpoint path (added to the list)."""
        source = str(source)
        select_or_add(self.start_combo, source, label or f"{Path(source).name} (checkpoint: fine-tune)")

    def set_source(self, source: str) -> None:
        """Train from :data:`SOURCE_VIEWER` (drawn regions) or :data:`SOURCE_TABLE` (a CSV)."""
        self.source_combo.setCurrentIndex(self.source_combo.findData(source))

    # ------------------------------------------------------------------ field reactions
    def _family_changed(self, *_: Any) -> None:
        from napari_pathology.models import list_models
        from napari_pathology.models.pretrained import is_untrained

        family = self.family
        if family not in self._families:
            return
        chosen = self._families[family]
        defaults = _defaults(chosen)
        self.start_combo.blockSignals(True)
        self.start_combo.clear()
        specs = [s for s in list_models() if s.family == family]
        for spec in sorted(specs, key=lambda s: (is_untrained(s), s.name)):
            what = "train from scratch" if is_untrained(spec) else "fine-tune"
            self.start_combo.addItem(f"{spec.name} ({what})", spec.name)
        self.start_combo.blockSignals(False)
        self.start_combo.setCurrentIndex(0)
        self._start_changed()
        length = "steps" if "steps" in defaults else "epochs"
        self._form.labelForField(self.steps_spin).setText(length.capitalize())
        self.steps_spin.setValue(int(defaults.get(length) or 1))
        self.batch_spin.setValue(int(defaults.get("batch_size") or 1))
        self.lr_edit.clear()
        self.lr_edit.setPlaceholderText(f"paper default ({_paper_default(chosen, 'lr')})")
        if "hard_negative_fraction" in defaults:
            self.hard_negative_spin.setValue(float(defaults["hard_negative_fraction"]))
        if defaults.get("eval_every") is not None:
            self.eval_spin.setValue(int(defaults["eval_every"]))
        self.amp_check.setChecked(bool(defaults.get("amp", True)))
        self._set_row_visible(self.hard_negative_spin, "hard_negative_fraction" in defaults)
        self._set_row_visible(self.eval_spin, defaults.get("eval_every") is not None and length == "steps")
        # A family that learns from slide labels needs a table of slides.
        regions = "regions" in chosen.data_sources
        item = self.source_combo.model().item(self.source_combo.findData(SOURCE_VIEWER))
        item.setEnabled(regions)
        if not regions:
            self.set_source(SOURCE_TABLE)
        self._source_changed()

    def _start_changed(self, *_: Any) -> None:
        from napari_pathology.models import ModelError, checkpoint_info, get_spec
        from napari_pathology.models.pretrained import is_untrained

        source = self.start_source
        if not source:
            self.start_info.setText("")
            return
        try:
            if Path(source).suffix:
                spec = checkpoint_info(source)["spec"]
                what = f"checkpoint {Path(source).name}"
            else:
                spec = get_spec(source).to_dict()
                what = "untrained: training from scratch" if is_untrained(get_spec(source)) else "fine-tune"
        except (ModelError, OSError, ValueError) as error:
            self.start_info.setText(f"<i>{error}</i>")
            return
        self.start_info.setText(
            f"<small>{what}; {spec['input_size']} px at {spec['mpp']:g} um/px, "
            f"classes {', '.join(spec['classes'])}</small>"
        )

    def _source_changed(self, *_: Any) -> None:
        viewer = self.source == SOURCE_VIEWER
        if self.family in self._families:  # one annotated slide cannot be split for validation
            default = _defaults(self._families[self.family]).get("val_fraction", 0.0)
            self.val_spin.setValue(0.0 if viewer else default)
        for widget in (self.slide_combo, self._shapes_row, self.draw_label_combo):
            self._set_row_visible(widget, viewer)
        self._set_row_visible(self._table_row, not viewer)

    def _sync_shapes(self, *_: Any) -> None:
        current = self.shapes_combo.currentText()
        names = [layer.name for layer in self.viewer.layers if layer._type_string == "shapes"]
        self.shapes_combo.blockSignals(True)
        self.shapes_combo.clear()
        self.shapes_combo.addItems(names)
        if current in names:
            self.shapes_combo.setCurrentText(current)
        self.shapes_combo.blockSignals(False)

    def _draw_label_changed(self, label: str) -> None:
        layer = self.shapes_layer
        if layer is None or "label" not in layer.features:
            return
        try:
            layer.feature_defaults = {"label": label}
        except (ValueError, TypeError):  # a non-categorical label column of another type
            pass

    def add_annotation_layer(self) -> Any:
        """Add (and choose) a Shapes layer for regions: a ``label`` feature, tumour red, normal green."""
        import pandas as pd

        slide = self.slide_combo.current_layer()
        name = f"{slide.name} training regions" if slide is not None else "training regions"
        features = pd.DataFrame({"label": pd.Categorical([], categories=list(REGION_LABELS))})
        extent = {}
        if slide is not None:  # edges a few screen pixels wide when the whole slide is in view
            height, width = np.asarray(slide.extent.world[1] - slide.extent.world[0])[-2:]
            extent = {"units": slide.units, "edge_width": max(height, width) / 200}
        layer = self.viewer.add_shapes(
            name=name, features=features, feature_defaults={"label": self.draw_label_combo.currentText()},
            edge_color="label", edge_color_cycle=["#ff3030", "#30ff60"], face_color="transparent",
            **{"edge_width": 4, **extent},
        )  # fmt: skip
        layer.mode = "add_polygon"
        self._sync_shapes()
        self.shapes_combo.setCurrentText(layer.name)
        return layer

    def _choose_checkpoint(self) -> None:
        path = choose_checkpoint(self, "Start from checkpoint")
        if path:
            self.select_start(path)

    def _choose_table(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Slide table", "", "CSV (*.csv);;All files (*)")
        if path:
            self.table_edit.setText(path)

    def _choose_out_dir(self) -> None:
        choose_folder_into(self, self.out_edit, "Output folder")

    # ------------------------------------------------------------------ building a job
    def job_settings(self) -> tuple[str, Any]:
        """The family and training settings the panel describes, checked and with their data written.

        Raises
        ------
        TrainingError
            With a message for the user when the set-up cannot train.
        """
        from napari_pathology.cohort import CohortError, read_slide_table
        from napari_pathology.fileio import ensure_writable_dir
        from napari_pathology.models import ModelError, checkpoint_info
        from napari_pathology.training.common import split_by_slide
        from napari_pathology.training.events import TrainingError

        family = self.family
        if family not in self._families:
            raise TrainingError("no trainable model family is registered")
        chosen = self._families[family]
        start = self.start_source
        if not start:
            raise TrainingError(f"no starting model of family {family!r}: load a checkpoint")
        if Path(start).suffix:
            try:
                start_family = checkpoint_info(start)["spec"]["family"]
            except (ModelError, OSError) as error:
                raise TrainingError(str(error)) from error
            if start_family != family:
                raise TrainingError(f"{Path(start).name} is a {start_family!r} model, not {family!r}")
        lr = self.lr_edit.text().strip()
        try:
            lr_value = float(lr) if lr else None
        except ValueError as error:
            raise TrainingError(f"learning rate {lr!r} is not a number") from error
        if lr_value is not None and not lr_value > 0:
            raise TrainingError("the learning rate must be positive")
        folder = Path(self.out_edit.text().strip() or default_models_dir()).expanduser()
        ensure_writable_dir(folder)  # OutputError (one line naming it) before anything is written
        name = self._job_name(family, folder)
        out = folder / f"{name}.pt"
        busy = [r.job.name for r in self._records if not r.job.done and Path(r.settings.out) == out]
        if busy:
            raise TrainingError(f"{busy[0]} is already writing {out.name}: choose another name")
        if self.source == SOURCE_VIEWER:
            if "regions" not in chosen.data_sources:
                raise TrainingError(
                    f"{family} models learn from slide labels, not drawn regions: choose a slide table "
                    "with tumour and normal slides"
                )
            table = self._write_viewer_data(folder, name)
        else:
            text = self.table_edit.text().strip()
            if not text:
                raise TrainingError("choose a slide table (CSV) or train from viewer annotations")
            table = Path(text).expanduser()
        try:
            entries = read_slide_table(table)
        except CohortError as error:
            raise TrainingError(str(error)) from error
        implied = chosen.check_table(entries)  # e.g. annotations or classes the family needs
        seed = _defaults(chosen).get("seed", 0)
        split_by_slide(entries, self.val_spin.value(), seed)  # too few slides for the split?
        values: dict[str, Any] = {
            "data": table, "out": out, "start": start, "batch_size": self.batch_spin.value(),
            "val_fraction": self.val_spin.value(), "device": str(self.device_combo.currentData()),
            "amp": self.amp_check.isChecked(), "threads": PANEL_THREADS,
        }  # fmt: skip
        if lr_value is not None:
            values["lr"] = lr_value
        defaults = _defaults(chosen)
        values["steps" if "steps" in defaults else "epochs"] = self.steps_spin.value()
        if "hard_negative_fraction" in defaults:
            values["hard_negative_fraction"] = self.hard_negative_spin.value()
        if "steps" in defaults and defaults.get("eval_every") is not None:
            values["eval_every"] = self.eval_spin.value()
        values.update(implied)
        values = {k: v for k, v in values.items() if k in defaults or k in ("data", "out")}
        return family, chosen.make_settings(values.pop("data"), values.pop("out"), **values)

    def _job_name(self, family: str, folder: Path) -> str:
        """The name field (or ``family-data-time``), made unique in ``folder``: no model is replaced.

        When the name typed is taken (a model of that name exists, or a job of
        this panel writes it), the job gets ``<name>-2`` (``-3``...) and the log says so.
        """
        from napari_pathology.training.common import model_name_for
        from napari_pathology.training.loop import checkpoint_paths

        text = self.name_edit.text().strip()
        if text:
            name = model_name_for(text)
        else:
            if self.source == SOURCE_VIEWER:
                layer = self.slide_combo.current_layer()
                data = layer.name if layer is not None else "slide"
            else:
                data = Path(self.table_edit.text().strip() or "table").stem
            name = model_name_for(f"{family}-{data}-{time.strftime('%Y%m%d-%H%M%S')}")
        taken = {Path(r.settings.out).stem for r in self._records}

        def free(candidate: str) -> bool:
            best, last, state = checkpoint_paths(folder / f"{candidate}.pt")
            return candidate not in taken and not any(p.exists() for p in (best, last, state))

        unique, k = name, 1
        while not free(unique):
            k += 1
            unique = f"{name}-{k}"
        if text and unique != name:
            message = f"{name}.pt exists in {folder}: this job writes {unique}.pt (the model is kept)"
            self._append_log(message)
            self.status.setText(message)
        return unique

    def _write_viewer_data(self, folder: Path, name: str) -> Path:
        """Check the drawn regions and write them (GeoJSON, level-0 px) with a one-row slide table."""
        import json

        from napari_pathology.cohort import SlideEntry, write_slide_table
        from napari_pathology.fileio import atomic_write, ensure_writable_dir
        from napari_pathology.geometry import polygons_to_geojson
        from napari_pathology.training.events import TrainingError

        slide = self.slide_combo.current_layer()
        if slide is None:
            raise TrainingError("open a slide first (File > Open), then draw tumour regions on it")
        meta = slide.metadata
        if meta.get("mpp_missing") or not meta.get("mpp_x"):
            raise TrainingError(
                f"{slide.name} has no um/px: set it in the Slide panel before training "
                "(patches are read at the model's um/px)"
            )
        shapes = self.shapes_layer
        if shapes is None:
            raise TrainingError(
                "no annotations: add a Shapes layer (New) and draw tumour regions (label 'tumour'), "
                "optionally normal ones (label 'normal')"
            )
        regions, problems = shapes_to_polygons(shapes, slide)
        if problems:
            raise TrainingError(f"{shapes.name}: " + "; ".join(problems[:3]))
        if not regions["tumour"] and not regions["normal"]:
            raise TrainingError(f"no annotations: {shapes.name} has no polygons, rectangles or ellipses")
        if not regions["tumour"]:
            raise TrainingError(
                f"{shapes.name} has normal regions only: a detector needs both classes; "
                "draw at least one tumour region (label 'tumour')"
            )
        ensure_writable_dir(folder)
        files = {}
        for label, classification, color in (
            ("tumour", "Tumor", (200, 0, 0)),
            ("normal", "Normal", (0, 160, 60)),
        ):
            if regions[label]:
                path = folder / f"{name}.{label}.geojson"
                atomic_write(path, json.dumps(polygons_to_geojson(regions[label], classification, color)))
                files[label] = path
        user_mpp = float(meta["mpp_x"]) if meta.get("mpp_source") == "user" else None
        entry = SlideEntry(
            Path(meta["path"]), "tumour", files["tumour"], user_mpp, normal_annotations=files.get("normal")
        )
        return write_slide_table([entry], folder / f"{name}.slides.csv")

    # ------------------------------------------------------------------ running
    def start(self) -> TrainingJob | None:
        """Check the set-up and queue a job (Start button); None (and a message) when it cannot train."""
        from napari_pathology.cohort import CohortError
        from napari_pathology.models import ModelError
        from napari_pathology.training.events import TrainingError

        try:
            family, settings = self.job_settings()
        except (TrainingError, CohortError, ModelError, OSError) as error:
            self._refuse(str(error))
            return None
        self._history.clear()
        self._checkpoints.clear()
        self.checkpoint_list.clear()
        self._dirty = True
        self._redraw()
        return self._submit(family, settings)

    def resume(self) -> TrainingJob | None:
        """Continue the last job from its last checkpoint (Resume button)."""
        from napari_pathology.training.loop import checkpoint_paths

        if not self._records:
            self._refuse("nothing to resume: start a job first")
            return None
        record = self._records[-1]
        if not record.job.done:
            self._refuse(f"{record.job.name} is still {record.job.state.value}")
            return None
        _best, last, state = checkpoint_paths(record.settings.out)
        if not last.is_file():
            self._refuse(f"nothing to resume: {last.name} was not written")
            return None
        if not state.is_file():
            self._refuse(f"cannot resume: the optimiser state {state.name} beside {last.name} is missing")
            return None
        return self._submit(record.family, replace(record.settings, resume=True))

    def stop(self) -> None:
        """Stop the shown job: it finishes its step, saves the last checkpoint and ends (Stop button)."""
        job = self.current_job
        if job is None or job.done:
            return
        job.stop()
        self.status.setText(
            f"stopping {job.name} after this step (saving its last checkpoint if it has begun)..."
        )
        self.stop_button.setEnabled(False)

    def stop_all(self) -> None:
        """Stop every job this panel started (closing the viewer does this)."""
        _stop_jobs(self._jobs)

    def _refuse(self, message: str) -> None:
        from napari.utils.notifications import show_error

        self.status.setText(message)
        self._append_log(message)
        show_error(message)

    def _submit(self, family: str, settings: Any) -> TrainingJob:
        chosen = self._families[family]
        ref = weakref.ref(self)

        def on_event(job: TrainingJob, event: TrainEvent) -> None:
            panel = ref()
            if panel is not None:
                try:
                    panel.job_event.emit(job, event)
                except RuntimeError:  # the panel's Qt object is gone
                    pass

        def on_state(job: TrainingJob) -> None:
            panel = ref()
            if panel is not None:
                try:
                    panel.job_state.emit(job)
                except RuntimeError:
                    pass

        name = Path(settings.out).stem + (" (resumed)" if settings.resume else "")
        job = self.queue.submit(
            functools.partial(_run_job, chosen, settings), settings.device, name=name,
            on_event=on_event, on_state=on_state,
        )  # fmt: skip
        self._records.append(_Record(job, family, settings))
        self._jobs.append(job)
        self._append_log(f"{job.name}: queued on {job.device}; output {settings.out}")
        self.status.setText(f"{job.name}: starting on {job.device}...")
        self.progress.setRange(0, 0)
        self.progress.setFormat("waiting...")
        self.tabs.setCurrentIndex(1)
        self._redraw_timer.start()
        self._update_buttons()
        return job

    # ------------------------------------------------------------------ events (Qt thread)
    def _record_of(self, job: TrainingJob) -> _Record | None:
        return next((r for r in self._records if r.job is job), None)

    def _on_job_event(self, job: TrainingJob, event: TrainEvent) -> None:
        shown = job is self.current_job
        if event.message:
            self._append_log(event.message if shown else f"[{job.name}] {event.message}")
        if not shown:
            return
        if event.kind == "step" and event.loss is not None:
            self._history.append({"step": event.step, "loss": float(event.loss)})
            self._dirty = True
        elif event.kind == "validation":
            self._history.append({"step": event.step, **event.metrics})
            self._dirty = True
        elif event.kind == "checkpoint" and event.path:
            self._add_checkpoint(job, event)
        self._show_progress(job, event)

    def _show_progress(self, job: TrainingJob, event: TrainEvent) -> None:
        record = self._record_of(job)
        if not event.total_steps:
            self.progress.setRange(0, 0)
            self.progress.setFormat(event.message[:60] or "preparing...")
            if event.message:
                self.status.setText(event.message)
            return
        self.progress.setRange(0, event.total_steps)
        self.progress.setValue(min(event.step, event.total_steps))
        if event.kind == "step" and record is not None and record.first_step is None:
            record.first_step = (event.step, event.elapsed)
        eta = math.inf
        if record is not None and record.first_step is not None and event.step > record.first_step[0]:
            step0, elapsed0 = record.first_step
            rate = (event.elapsed - elapsed0) / (event.step - step0)
            eta = rate * max(0, event.total_steps - event.step)
        elif record is not None and record.first_step is not None and not record.settings.resume:
            eta = event.eta
        self.progress.setFormat(f"step %v / %m - ETA {_format_eta(eta)}")
        if event.kind in ("step", "start", "done") and event.message:
            self.status.setText(event.message)

    def _add_checkpoint(self, job: TrainingJob, event: TrainEvent) -> None:
        from napari_pathology.training.loop import checkpoint_paths

        record = self._record_of(job)
        path = str(event.path)
        best = record is not None and Path(path) == checkpoint_paths(record.settings.out)[0]
        kind = "best" if best else "last"
        self._checkpoints[path] = {"kind": kind, "path": path, "metrics": dict(event.metrics)}
        self.checkpoint_list.clear()
        for entry in self.checkpoints:
            shown = [
                f"{k} {v:.3g}" for k, v in entry["metrics"].items()
                if k in ("step", *CURVE_METRICS) and isinstance(v, int | float)
            ]  # fmt: skip
            item = QListWidgetItem(f"{entry['kind']}: {', '.join(shown)} - {Path(entry['path']).name}")
            item.setData(Qt.ItemDataRole.UserRole, entry["path"])
            item.setToolTip(entry["path"])
            self.checkpoint_list.addItem(item)

    def _on_job_state(self, job: TrainingJob) -> None:
        from napari.utils.notifications import show_error

        shown = job is self.current_job
        state = job.state.value
        if job.state.value == "queued":
            busy = [j.name for j in self.queue.active() if j.device == job.device and j is not job]
            message = f"{job.name}: queued behind {', '.join(busy)} on {job.device}" if busy else ""
        elif job.state.value == "running":
            message = f"{job.name}: running on {job.device}"
        elif job.state.value == "failed":
            message = f"{job.name} failed: {job.error}"
            show_error(message)
        else:
            step = getattr(job.result, "step", None)
            at = f" at step {step}" if step is not None else ""
            hint = "; Resume continues it" if job.state.value == "stopped" and step else ""
            message = f"{job.name}: {state}{at}{hint}"
        if message:
            self._append_log(message)
            if shown:
                self.status.setText(message)
        if shown and job.done:
            self.progress.setFormat(f"{state} - step %v / %m" if self.progress.maximum() else state)
            if self.progress.maximum() == 0:
                self.progress.setRange(0, 1)
            self._redraw()
        if not any(not j.done for j in self._jobs):
            self._redraw_timer.stop()
            self._redraw()
        self._update_buttons()

    def _update_buttons(self) -> None:
        from napari_pathology.training.loop import checkpoint_paths

        job = self.current_job
        self.stop_button.setEnabled(job is not None and not job.done and not job.stop_event.is_set())
        resumable = (
            job is not None
            and job.done
            and checkpoint_paths(self._records[-1].settings.out)[1].is_file()
            and getattr(job.result, "step", 0) != self._planned_steps(self._records[-1])
        )
        self.resume_button.setEnabled(bool(resumable))
        self.use_button.setEnabled(bool(self._checkpoints))

    @staticmethod
    def _planned_steps(record: _Record) -> int | None:
        job = record.job
        for event in reversed(job.events):
            if event.total_steps:
                return event.total_steps
        return None

    def _append_log(self, message: str) -> None:
        self.log.appendPlainText(f"{time.strftime('%H:%M:%S')}  {message}")

    def _redraw(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        losses = [(row["step"], row["loss"]) for row in self._history if "loss" in row]
        self.loss_plot.set_points(losses)
        validations = [row for row in self._history if "loss" not in row]
        last = self._families.get(self._records[-1].family) if self._records else None
        preferred = (last.best_metric,) if last is not None and last.best_metric else ()
        metric = next((m for m in preferred + CURVE_METRICS if any(m in row for row in validations)), None)
        if metric is None:
            self.metric_plot.empty_text = "no validation slides" if validations else "no data yet"
            self.metric_plot.set_points([], "validation")
        else:
            points = [(row["step"], row[metric]) for row in validations if metric in row]
            self.metric_plot.set_points(points, f"validation {metric}")

    # ------------------------------------------------------------------ Analyze
    def use_in_analyze(self, path: str | Path | None = None) -> Any:
        """Select a checkpoint (the chosen one, else the best) in the Analyze panel, docking it if needed.

        Returns
        -------
        AnalyzePanel or None
            The panel, or None when there is no checkpoint yet.
        """
        if path is None:
            item = self.checkpoint_list.currentItem()
            chosen = item.data(Qt.ItemDataRole.UserRole) if item is not None else None
            path = chosen or next((c["path"] for c in self.checkpoints), None)
        if path is None:
            self._refuse("no checkpoint yet: train a model first")
            return None
        analyze = self.viewer.window.dock_widgets.get(ANALYZE_DOCK)
        if analyze is None:
            _dock, analyze = self.viewer.window.add_plugin_dock_widget(PLUGIN, "Analyze")
        analyze.select_model(str(path), label=f"{Path(path).stem} (trained checkpoint)")
        self.status.setText(f"{Path(path).name} is the Analyze panel's model")
        return analyze

    # ------------------------------------------------------------------ closing
    def event(self, event: QEvent) -> bool:
        """Watch the main window once docked (closing it stops the jobs, which saves them)."""
        if event.type() in (QEvent.Type.ParentChange, QEvent.Type.Show):
            self._watch_window()
        return super().event(event)

    def _watch_window(self) -> None:
        window = self.window()
        if window is self or window is self._watched:
            return
        self._watched = window
        jobs = self._jobs
        _CloseWatcher(window, lambda: _stop_jobs(jobs))
