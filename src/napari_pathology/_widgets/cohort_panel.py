"""The Cohort panel: a model over a slide table on dask workers, its slides filling in live.

A slide table (CSV) or a folder, a model, an output folder and a cluster
(local with N worker processes, or a scheduler address); Start runs
:func:`napari_pathology.batch.run_cohort` in a worker thread, whose progress
carries each finished slide: its row of the sortable table gets its status,
score, seconds and worker, and the score plot grows. A double click opens
the slide in the viewer with its saved result's layers. The ROC is drawn
once the cohort is finished. Cancel starts no new slide, and the running
ones stop after their batch, keeping what they finished (Start resumes). No
compute here: see :mod:`napari_pathology.batch`.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_pathology._widgets._workers import PanelWorker, show_failure, start_worker
from napari_pathology._widgets.cohort_plots import CohortPlots
from napari_pathology.batch import CohortEvent, CohortRun, SlideReport
from napari_pathology.progress import Progress

if TYPE_CHECKING:
    import napari

__all__ = ["COLUMNS", "CohortPanel"]

#: The table's columns.
COLUMNS = ("slide", "label", "status", "score", "seconds", "worker")
#: Role of the slide's path in the first column's item.
PATH_ROLE = Qt.ItemDataRole.UserRole


class _Number(QTableWidgetItem):
    """A cell that sorts by its number (blank cells last)."""

    def __init__(self, value: float, text: str) -> None:
        super().__init__(text)
        self.value = value if math.isfinite(value) else math.inf

    def __lt__(self, other: QTableWidgetItem) -> bool:
        if isinstance(other, _Number):
            return self.value < other.value
        return super().__lt__(other)


class CohortPanel(QWidget):
    """Run a model over a cohort; see the module docstring."""

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.running: PanelWorker | None = None
        self.reports: dict[str, SlideReport] = {}
        self.result: CohortRun | None = None
        self._cancel = threading.Event()

        self.table_edit = QLineEdit()
        self.table_edit.setPlaceholderText("slide table (CSV) or folder of slides")
        table_button = QPushButton("Table...")
        table_button.clicked.connect(self._choose_table)
        folder_button = QPushButton("Folder...")
        folder_button.clicked.connect(self._choose_folder)
        source_row = QHBoxLayout()
        for widget in (self.table_edit, table_button, folder_button):
            source_row.addWidget(widget)
        self.model_combo = QComboBox()
        self.model_combo.setEditable(True)  # a registered name, or a checkpoint path typed in
        self.model_combo.addItems(_model_names())
        self.out_edit = QLineEdit(str(_default_out()))
        self.workers = QSpinBox()
        self.workers.setRange(1, max(1, os.cpu_count() or 1))
        self.workers.setValue(min(2, self.workers.maximum()))
        self.scheduler_edit = QLineEdit()
        self.scheduler_edit.setPlaceholderText("empty: a local cluster; or tcp://host:8786")
        form = QFormLayout()
        form.addRow("Slides", source_row)
        form.addRow("Model", self.model_combo)
        form.addRow("Output", self.out_edit)
        form.addRow("Local workers", self.workers)
        form.addRow("Scheduler", self.scheduler_edit)

        self.start_button = QPushButton("Start")
        self.start_button.clicked.connect(self.start)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.cancel_button)
        self.progress = QProgressBar()
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        self.table.setSortingEnabled(True)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.cellDoubleClicked.connect(self._open_row)
        self.table.setToolTip("double click: open the slide with its result")
        self.plots = CohortPlots()

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.table, 2)
        layout.addWidget(self.plots, 1)

    # ------------------------------------------------------------------ choosing

    def _choose_table(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Slide table", "", "Slide tables (*.csv);;All files (*)")
        if path:
            self.table_edit.setText(path)

    def _choose_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Folder of slides")
        if path:
            self.table_edit.setText(path)

    # ------------------------------------------------------------------ running

    def start(self) -> None:
        """Read the table and run the cohort in a worker thread (rows come in pending, then fill in)."""
        if self.running is not None and self.running.running:
            return
        source = self.table_edit.text().strip()
        model = self.model_combo.currentText().strip()
        out = self.out_edit.text().strip()
        missing = next((what for what, value in (("a slide table or a folder of slides", source),
                        ("a model", model), ("an output folder", out)) if not value), None)  # fmt: skip
        if missing:
            show_failure(self.status, ValueError(f"choose {missing} first"))
            return
        self.reports = {}
        self.table.setRowCount(0)
        self.plots.show_scores([])
        self.result = None
        self._cancel = threading.Event()
        scheduler = self.scheduler_edit.text().strip() or None
        workers = None if scheduler else self.workers.value()
        job = _cohort_job(source, model, out, workers, scheduler, self._cancel)
        self.running = start_worker(
            job, progress=self.progress, status=self.status, busy=(self.start_button,),
            cancel_button=self.cancel_button, cancel_event=self._cancel, on_progress=self._on_event,
            on_done=self._on_done,
        )  # fmt: skip

    def cancel(self) -> None:
        """No new slide starts; running slides stop after their batch and keep it (Start resumes)."""
        if self.running is not None:
            self.running.cancel("cancelling: running slides save what they finished...")

    def _on_event(self, event: Any) -> None:
        state = getattr(event, "payload", None)
        if isinstance(state, list):  # the table was read: every slide pending
            self.reports = {r.slide: r for r in state}
            self._fill_table()
            return
        if not isinstance(state, CohortEvent):
            return
        if state.report is not None:
            self.reports[state.report.slide] = state.report
            self._set_row(state.report)
            self.plots.show_scores(list(self.reports.values()))
        self.status.setText(
            f"{state.done}/{state.total} done, {state.failed} failed, {state.running} running"
            + (f" - dashboard {state.dashboard}" if state.dashboard else "")
        )

    def _on_done(self, result: CohortRun) -> None:
        self.result = result
        for report in result.reports:
            self.reports[report.slide] = report
            self._set_row(report)
        reports = list(self.reports.values())
        self.plots.show_scores(reports)
        auc = self.plots.show_roc(reports)
        text = result.summary() + (f"; slide AUC {auc:.3f}" if auc is not None else "")
        self.status.setText(f"{text}. Summary: {result.table}")

    # ------------------------------------------------------------------ table

    def _fill_table(self) -> None:
        self.table.setSortingEnabled(False)
        self.table.setRowCount(0)
        for report in self.reports.values():
            row = self.table.rowCount()
            self.table.insertRow(row)
            self._write_row(row, report)
        self.table.setSortingEnabled(True)

    def _row_of(self, slide: str) -> int | None:
        for row in range(self.table.rowCount()):
            item = self.table.item(row, 0)
            if item is not None and item.data(PATH_ROLE) == slide:
                return row
        return None

    def _set_row(self, report: SlideReport) -> None:
        row = self._row_of(report.slide)
        self.table.setSortingEnabled(False)  # a row does not move while it is written
        if row is None:
            row = self.table.rowCount()
            self.table.insertRow(row)
        self._write_row(row, report)
        self.table.setSortingEnabled(True)

    def _write_row(self, row: int, report: SlideReport) -> None:
        name = QTableWidgetItem(report.name)
        name.setData(PATH_ROLE, report.slide)
        status = QTableWidgetItem(report.status)
        if report.error:
            status.setToolTip(report.error)
        score = report.slide_score
        items = [
            name, QTableWidgetItem(report.label or ""), status,
            _Number(score, f"{score:.3f}" if math.isfinite(score) else ""),
            _Number(report.seconds, f"{report.seconds:.1f}" if report.seconds else ""),
            QTableWidgetItem(report.worker),
        ]  # fmt: skip
        for column, item in enumerate(items):
            self.table.setItem(row, column, item)

    def row_texts(self) -> list[list[str]]:
        """The table's cells as shown (in the current sort order)."""
        return [
            [self.table.item(r, c).text() if self.table.item(r, c) else "" for c in range(len(COLUMNS))]
            for r in range(self.table.rowCount())
        ]

    # ------------------------------------------------------------------ opening

    def _open_row(self, row: int, column: int = 0) -> None:
        item = self.table.item(row, 0)
        report = self.reports.get(item.data(PATH_ROLE)) if item is not None else None
        if report is None:
            return
        try:
            self.open_slide(report)
        except (ValueError, OSError) as error:
            show_failure(self.status, error)

    def open_slide(self, report: SlideReport) -> list[Any]:
        """Open the slide in the viewer and load its result's layers (heatmap, detections, nuclei...)."""
        from napari_pathology._layers import PLACED_SCALE_KEY, link_metadata
        from napari_pathology._viewer import show_slide
        from napari_pathology._widgets.analyze_layers import ResultLayers
        from napari_pathology.analysis import load_result

        layers = show_slide(self.viewer, report.slide)
        if not report.output or report.status not in ("done", "skipped", "cancelled"):
            self.status.setText(f"{report.name}: {report.status}, no result to show {report.error}".strip())
            return layers
        result = load_result(report.output)
        slide_layer = layers[0]
        run_scale = tuple(link_metadata(slide_layer.metadata)[PLACED_SCALE_KEY])
        ResultLayers(self.viewer, slide_layer, result.model_name, run_scale).show(result)
        self.status.setText(result.summary())
        return layers


def _cohort_job(
    source: str, model: str, out: str, workers: int | None, scheduler: str | None, cancel: threading.Event
) -> Generator[Progress, None, CohortRun]:
    """Read the slide table (its rows go out as pending reports), then run the cohort (in the worker)."""
    from napari_pathology.batch import run_cohort
    from napari_pathology.cohort import read_slide_table

    entries = read_slide_table(source)
    pending = [SlideReport(os.path.abspath(e.path), e.path.name, e.label, "pending") for e in entries]
    yield Progress(0, len(entries), f"{len(entries)} slides in {Path(source).name}", pending)
    return (yield from run_cohort(entries, model, out, workers=workers, scheduler=scheduler, cancel=cancel))


def _model_names() -> list[str]:
    from napari_pathology.models import list_models

    return [spec.name for spec in list_models()]


def _default_out() -> Path:
    from napari_pathology.analysis import default_results_dir

    return default_results_dir() / "cohorts"
