"""The Train panel: train or fine-tune a model from drawn regions or a slide table, in the background.

Thin wiring over :mod:`napari_pathology.families` and
:mod:`napari_pathology.training`: the family list is every registered family
that trains from drawn regions or a slide table; the hyper-parameter rows
are generated with magicgui from that family's settings dataclass (fields,
defaults, help) and read back into it, the panel checks
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

Layout: this module wires the panel (Start, Stop, Resume, the job list,
closing); :mod:`~napari_pathology._widgets.train_form` is the Set-up tab (its generated
rows: :mod:`~napari_pathology._widgets.train_settings`),
:mod:`~napari_pathology._widgets.train_monitor` the Progress tab and
:mod:`~napari_pathology._widgets.train_curves` its pyqtgraph plots; the compute is in
:mod:`napari_pathology.training.panel_jobs` and :mod:`napari_pathology.training.regions`.
"""

from __future__ import annotations

import functools
import time
import weakref
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import QEvent, QTimer, Signal
from qtpy.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from napari_pathology._widgets._common import compact_panel
from napari_pathology._widgets.train_close import CloseWatcher, stop_jobs
from napari_pathology._widgets.train_curves import CurvePlot
from napari_pathology._widgets.train_form import (
    SOURCE_TABLE,
    SOURCE_VIEWER,
    TrainFormMixin,
    default_models_dir,
    shapes_to_polygons,
    trainable_families,
)
from napari_pathology._widgets.train_monitor import ANALYZE_DOCK, PLUGIN, TrainMonitorMixin

if TYPE_CHECKING:
    import napari

    from napari_pathology.training.events import TrainEvent
    from napari_pathology.training.panel_jobs import JobRecord
    from napari_pathology.training.queue import TrainingJob, TrainingQueue

__all__ = [
    "ANALYZE_DOCK",
    "PLUGIN",
    "SOURCE_TABLE",
    "SOURCE_VIEWER",
    "CurvePlot",
    "TrainPanel",
    "default_models_dir",
    "shapes_to_polygons",
    "trainable_families",
]

#: Redraw the curves at most this often (seconds).
REDRAW_INTERVAL = 0.25


# --------------------------------------------------------------------------- the panel
class TrainPanel(TrainFormMixin, TrainMonitorMixin, QWidget):
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
        self._records: list[JobRecord] = []
        self._jobs: list[TrainingJob] = []  # shared with the close hooks (no reference to the panel)
        self._history: list[dict[str, Any]] = []
        self._checkpoints: dict[str, dict[str, Any]] = {}
        self._dirty = False
        self._watched: Any = None

        self._make_form_fields(napari_viewer)

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
        self._make_monitor_fields()

        self._build_layout()
        compact_panel(self)  # long model names must not widen the dock; a short dock scrolls
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
        self.destroyed.connect(lambda *_: stop_jobs(jobs))

        self._family_changed()
        self._sync_shapes()
        self._update_buttons()
        self._watch_window()

    # ------------------------------------------------------------------ layout
    def _build_layout(self) -> None:
        self.tabs = QTabWidget()
        self.tabs.addTab(self._form_widget(), "Set-up")
        self.tabs.addTab(self._monitor_widget(), "Progress")
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.stop_button)
        buttons.addWidget(self.resume_button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.tabs, 1)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)

    # ------------------------------------------------------------------ public state
    @property
    def current_job(self) -> TrainingJob | None:
        """The job the panel shows (the latest started), or None."""
        return self._records[-1].job if self._records else None

    @property
    def jobs(self) -> list[TrainingJob]:
        """Every job started from this panel, oldest first."""
        return [record.job for record in self._records]

    # ------------------------------------------------------------------ building a job
    def job_settings(self) -> tuple[str, Any]:
        """The family and training settings the panel describes, checked and with their data written.

        Raises
        ------
        TrainingError
            With a message for the user when the set-up cannot train.
        """
        from napari_pathology.fileio import ensure_writable_dir
        from napari_pathology.training.events import TrainingError
        from napari_pathology.training.panel_jobs import assemble_settings, check_start

        family = self.family
        if family not in self._families:
            raise TrainingError("no trainable model family is registered")
        chosen = self._families[family]
        start = self.start_source
        check_start(family, start)
        values = self.settings_values()
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
        device = str(self.device_combo.currentData())
        return family, assemble_settings(chosen, table, out, start, device, values)

    def _job_name(self, family: str, folder: Path) -> str:
        """The name field (or ``family-data-time``), made unique in ``folder``: no model is replaced.

        When the name typed is taken (a model of that name exists, or a job of
        this panel writes it), the job gets ``<name>-2`` (``-3``...) and the log says so.
        """
        from napari_pathology.training.common import model_name_for
        from napari_pathology.training.panel_jobs import unique_name

        text = self.name_edit.text().strip()
        if text:
            name = model_name_for(text)
        else:
            name = model_name_for(f"{family}-{self._data_name()}-{time.strftime('%Y%m%d-%H%M%S')}")
        unique = unique_name(name, folder, (Path(r.settings.out).stem for r in self._records))
        if text and unique != name:
            message = f"{name}.pt exists in {folder}: this job writes {unique}.pt (the model is kept)"
            self._append_log(message)
            self.status.setText(message)
        return unique

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
        stop_jobs(self._jobs)

    def _refuse(self, message: str) -> None:
        from napari.utils.notifications import show_error

        self.status.setText(message)
        self._append_log(message)
        show_error(message)

    def _submit(self, family: str, settings: Any) -> TrainingJob:
        from napari_pathology.training.panel_jobs import JobRecord, run_job

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
            functools.partial(run_job, chosen, settings), settings.device, name=name,
            on_event=on_event, on_state=on_state,
        )  # fmt: skip
        self._records.append(JobRecord(job, family, settings))
        self._jobs.append(job)
        self._append_log(f"{job.name}: queued on {job.device}; output {settings.out}")
        self.status.setText(f"{job.name}: starting on {job.device}...")
        self.progress.setRange(0, 0)
        self.progress.setFormat("waiting...")
        self.tabs.setCurrentIndex(1)
        self._redraw_timer.start()
        self._update_buttons()
        return job

    def _on_job_state(self, job: TrainingJob) -> None:
        from napari.utils.notifications import show_error

        from napari_pathology.training.panel_jobs import state_message

        shown = job is self.current_job
        state = job.state.value
        message = state_message(job, [j for j in self.queue.active() if j.device == job.device])
        if state == "failed":
            show_error(message)
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
            and getattr(job.result, "step", 0) != self._records[-1].planned_steps()
        )
        self.resume_button.setEnabled(bool(resumable))
        self.use_button.setEnabled(bool(self._checkpoints))

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
        CloseWatcher(window, lambda: stop_jobs(jobs))
