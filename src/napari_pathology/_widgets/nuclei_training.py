"""The Nuclei panel's *Train from my labels*: a purity classifier from the labelled nuclei.

Mixed into :class:`~napari_pathology._widgets.nuclei_panel.NucleiPanel`. Training runs
in the shared training queue; when it ends the new classifier is chosen, its last
validation metrics are shown (held-out regions), and the previous classifier stays
one click away (*Use previous*).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QPushButton

if TYPE_CHECKING:
    from napari_pathology._widgets.nuclei_panel import NucleiPanel


class LabelTraining:
    """Train from my labels: family, data, the job, its events, the new model and the previous one."""

    def _make_previous_button(self) -> QPushButton:
        self._previous_model: tuple[str, str] = ("", "")
        self._val_metrics: dict[str, Any] = {}
        self.previous_button = QPushButton("Use previous classifier")
        self.previous_button.setToolTip("Go back to the classifier chosen before this training")
        self.previous_button.setVisible(False)
        self.previous_button.clicked.connect(self.use_previous_model)
        return self.previous_button

    def use_previous_model(self) -> None:
        """Choose again the classifier that was chosen before the last training."""
        source, label = self._previous_model
        if source:
            self.select_model(source, label)
            self.train_status.setText(f"{label} is the classifier again.")
            self.previous_button.setVisible(False)

    def training_family(self) -> Any:
        """The family that trains from the labelled nuclei: the chosen model's, else the first one.

        Raises
        ------
        ValueError
            When no registered family trains from labelled nuclei.
        """
        from napari_pathology.models import ModelError, checkpoint_info, get_spec

        able = {n: f for n, f in self.nuclei_families.items() if f.trainable and "nuclei" in f.data_sources}
        if not able:
            raise ValueError("no registered model family trains from labelled nuclei")
        source = self.model_source
        try:
            if source and Path(source).suffix:
                name = checkpoint_info(source)["spec"]["family"]
            else:
                name = get_spec(source).family if source else ""
        except (ModelError, OSError, ValueError, KeyError):
            name = ""
        return able.get(name) or next(iter(able.values()))

    def training_data(self) -> Any:
        """The labelled tumour/normal nuclei as the training family's data (grouped by drawn region)."""
        slide = self.slide_layer()
        if slide is None:
            raise ValueError("Open a slide first (File > Open).")
        family = self.training_family()
        points = self.current_points()
        counts = points.counts()
        needed = int(family.defaults().get("min_per_class") or 1)
        if min(counts["tumour"], counts["normal"]) < needed:
            raise ValueError(
                f"Label at least {needed} tumour (t) and {needed} normal (n) nuclei first; "
                f"there are {counts['tumour']} tumour and {counts['normal']} normal."
            )
        meta = slide.metadata
        mpp = float(meta["mpp_x"]) if meta.get("mpp_source") == "user" else None
        _names, polygons = self.regions()
        return family.nuclei_data(points, meta["path"], mpp, polygons or None)

    def train_from_labels(self) -> Any:
        """Train a purity classifier from the labelled nuclei in the background; returns the job."""
        from napari.utils.notifications import show_error

        from napari_pathology.training import TrainingError
        from napari_pathology.training.common import model_name_for
        from napari_pathology.training.panel_jobs import default_models_dir
        from napari_pathology.training.queue import training_queue

        try:
            family = self.training_family()
            data = self.training_data()
            slide = Path(self.slide_layer().metadata["path"])
            name = model_name_for(f"{family.name}-{slide.stem}-{time.strftime('%Y%m%d-%H%M%S')}")
            out = default_models_dir() / f"{name}.pt"
            start = self.model_source if self.model_source and Path(self.model_source).suffix else None
            settings = family.make_settings(
                None, out, device=str(self.device_combo.currentData()), epochs=self.epochs_spin.value(),
                start=start,
            )  # fmt: skip
        except (TrainingError, ValueError) as exc:
            show_error(str(exc))
            return None
        relay = _TrainingRelay(self)
        self._previous_model = (self.model_source, self.model_combo.currentText())
        self._val_metrics = {}
        self.previous_button.setVisible(False)

        def factory(stop: threading.Event) -> Any:
            return family.train(settings, data, out, stop)

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
        if event.kind == "validation" and event.metrics:
            self._val_metrics = dict(event.metrics)
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
            previous = self._previous_model[1] or "none"
            self.train_status.setText(
                f"{job.state.value}: {best.name} is now the classifier; Classify to apply it.<br>"
                f"{validation_text(self._val_metrics)}<br>Previous classifier: {previous}."
            )
            self.previous_button.setVisible(bool(self._previous_model[0]))
        else:
            self.train_status.setText(f"{job.state.value}: {job.error or 'no checkpoint written'}")


def validation_text(metrics: dict[str, Any]) -> str:
    """The last validation of a training run in words (held-out regions), or why there is none."""
    if not metrics:
        return (
            "<b>No validation</b>: nothing was held out (label nuclei in more regions); "
            "compare it with the previous classifier before relying on it."
        )
    names = {"auc": "AUC", "accuracy": "accuracy", "purity_rmse": "purity RMSE", "val_loss": "loss"}
    parts = [f"{label} {metrics[key]:.3f}" for key, label in names.items() if _finite(metrics.get(key))]
    regions = metrics.get("purity_regions")
    where = f" ({int(regions)} regions for purity)" if _finite(regions) else ""
    return f"Validation on held-out nuclei{where}: {', '.join(parts) or 'no finite metric'}."


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and np.isfinite(value)


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
