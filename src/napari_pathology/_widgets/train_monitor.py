"""The Train panel's Progress tab: loss and validation curves, checkpoints, log, and the job events.

:class:`TrainMonitorMixin` builds the widgets on the panel itself and turns
the shown job's events (delivered on the Qt thread) into history rows,
checkpoint entries, the progress bar with ETA and redrawn curves (at most
four times a second). ETA, checkpoint kinds and which metric gets a curve
are computed in :mod:`napari_pathology.training.panel_jobs` (no Qt).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_pathology._widgets.train_curves import CurvePlot

if TYPE_CHECKING:
    from napari_pathology.training.events import TrainEvent
    from napari_pathology.training.panel_jobs import JobRecord
    from napari_pathology.training.queue import TrainingJob

__all__ = ["ANALYZE_DOCK", "PLUGIN", "TrainMonitorMixin"]

PLUGIN = "napari-pathology"
#: Key of the docked Analyze panel in ``viewer.window.dock_widgets``.
ANALYZE_DOCK = "Analyze (napari-pathology)"


class TrainMonitorMixin:
    """The Progress tab of :class:`~napari_pathology._widgets.train_panel.TrainPanel` (a QWidget).

    The panel provides ``viewer``, ``_families``, ``_records``, ``_history``,
    ``_checkpoints``, ``_dirty``, ``current_job``, ``progress`` and ``status``.
    """

    def _make_monitor_fields(self) -> None:
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

    def _monitor_widget(self) -> QWidget:
        """The Progress tab: curves side by side, checkpoints, Use in Analyze, log."""
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
        return monitor

    def _apply_theme(self) -> None:
        try:
            from napari.utils.theme import get_theme

            theme = get_theme(self.viewer.theme)
            text, background = theme.text.as_hex(), theme.foreground.as_hex()
        except Exception:  # an unknown theme: keep the defaults
            return
        for plot in (self.loss_plot, self.metric_plot):
            plot.set_colors(text, background)

    @property
    def history(self) -> list[dict[str, Any]]:
        """``{"step", "loss"}`` and ``{"step", **metrics}`` rows of the shown job (and those it resumed)."""
        return list(self._history)

    @property
    def checkpoints(self) -> list[dict[str, Any]]:
        """Checkpoints written so far: ``{"kind": "best"|"last", "path", "metrics"}``, best first."""
        return sorted(self._checkpoints.values(), key=lambda c: (c["kind"] != "best", c["path"]))

    # ------------------------------------------------------------------ events (Qt thread)
    def _record_of(self, job: TrainingJob) -> JobRecord | None:
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
        from napari_pathology.training.panel_jobs import format_eta

        record = self._record_of(job)
        if not event.total_steps:
            self.progress.setRange(0, 0)
            self.progress.setFormat(event.message[:60] or "preparing...")
            if event.message:
                self.status.setText(event.message)
            return
        self.progress.setRange(0, event.total_steps)
        self.progress.setValue(min(event.step, event.total_steps))
        eta = record.eta(event) if record is not None else math.inf
        self.progress.setFormat(f"step %v / %m - ETA {format_eta(eta)}")
        if event.kind in ("step", "start", "done") and event.message:
            self.status.setText(event.message)

    def _add_checkpoint(self, job: TrainingJob, event: TrainEvent) -> None:
        from napari_pathology.training.panel_jobs import checkpoint_entry, checkpoint_text

        entry = checkpoint_entry(self._record_of(job), event)
        self._checkpoints[entry["path"]] = entry
        self.checkpoint_list.clear()
        for entry in self.checkpoints:
            item = QListWidgetItem(checkpoint_text(entry))
            item.setData(Qt.ItemDataRole.UserRole, entry["path"])
            item.setToolTip(entry["path"])
            self.checkpoint_list.addItem(item)

    def _append_log(self, message: str) -> None:
        self.log.appendPlainText(f"{time.strftime('%H:%M:%S')}  {message}")

    def _redraw(self) -> None:
        if not self._dirty:
            return
        from napari_pathology.training.panel_jobs import curve_metric

        self._dirty = False
        losses = [(row["step"], row["loss"]) for row in self._history if "loss" in row]
        self.loss_plot.set_points(losses)
        validations = [row for row in self._history if "loss" not in row]
        last = self._families.get(self._records[-1].family) if self._records else None
        metric = curve_metric(last.best_metric if last is not None else None, validations)
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
