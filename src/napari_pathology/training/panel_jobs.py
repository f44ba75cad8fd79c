"""Job bookkeeping behind the Train panel (no Qt): settings from the form's values, names, ETA, curves.

The panel reads its fields and calls these; what they compute (which settings
a family gets, which name a job writes, how long it has left, which metric
gets a curve) does not depend on the widgets.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Generator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_pathology.training.events import TrainingError

if TYPE_CHECKING:
    from napari_pathology.training.events import TrainEvent
    from napari_pathology.training.queue import TrainingJob

__all__ = [
    "CURVE_METRICS",
    "PANEL_THREADS",
    "JobRecord",
    "assemble_settings",
    "check_start",
    "checkpoint_entry",
    "checkpoint_text",
    "curve_metric",
    "format_eta",
    "paper_default",
    "parse_lr",
    "run_job",
    "unique_name",
]

#: Validation metrics worth a curve, in order of preference, after the one the job's family picks its
#: best checkpoint by (``Family.best_metric``).
CURVE_METRICS = ("val_loss", "slide_auc", "auc", "tile_accuracy", "accuracy")
#: torch CPU threads of a job the panel runs: the viewer needs the other cores (and more threads
#: than free cores make small networks slower, not faster).
PANEL_THREADS = 1


def paper_default(family: Any, name: str) -> str:
    """The default of a setting as its docstring says it (``(default 0.05, or ...)``) or its value."""
    field = next((f for f in family.setting_fields() if f.name == name), None)
    if field is None:
        return ""
    if field.default is None:
        found = re.search(r"\(default:? ([^)]*)\)", field.help)
        return found.group(1) if found else "the family's choice"
    return f"{field.default:g}" if isinstance(field.default, float) else str(field.default)


def format_eta(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``; ``--:--`` when unknown."""
    if not math.isfinite(seconds):
        return "--:--"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class JobRecord:
    """What the panel keeps about one of its jobs, and the ETA from its step events."""

    def __init__(self, job: TrainingJob, family: str, settings: Any) -> None:
        self.job, self.family, self.settings = job, family, settings
        self.first_step: tuple[int, float] | None = None  # (step, elapsed) of the first step event

    def eta(self, event: TrainEvent) -> float:
        """Seconds left after ``event`` (inf when unknown), from the rate since this job's first step.

        A resumed job's own ETA counts the steps it skipped, so it has none until its second step.
        """
        if event.kind == "step" and self.first_step is None:
            self.first_step = (event.step, event.elapsed)
        if self.first_step is not None and event.step > self.first_step[0]:
            step0, elapsed0 = self.first_step
            rate = (event.elapsed - elapsed0) / (event.step - step0)
            return rate * max(0, event.total_steps - event.step)
        if self.first_step is not None and not self.settings.resume:
            return event.eta
        return math.inf

    def planned_steps(self) -> int | None:
        """The job's total steps, as its last event that knew them said."""
        for event in reversed(self.job.events):
            if event.total_steps:
                return event.total_steps
        return None


def run_job(family: Any, settings: Any, stop: threading.Event) -> Generator[Any, None, Any]:
    """Queue factory: the family's training generator (module level so it holds no panel)."""
    return family.train(settings, settings.data, settings.out, stop)


def check_start(family: str, start: str) -> None:
    """Refuse no starting model, or a checkpoint of another family."""
    from napari_pathology.models import ModelError, checkpoint_info

    if not start:
        raise TrainingError(f"no starting model of family {family!r}: load a checkpoint")
    if Path(start).suffix:
        try:
            start_family = checkpoint_info(start)["spec"]["family"]
        except (ModelError, OSError) as error:
            raise TrainingError(str(error)) from error
        if start_family != family:
            raise TrainingError(f"{Path(start).name} is a {start_family!r} model, not {family!r}")


def parse_lr(text: str) -> float | None:
    """The learning rate typed (None: the family's default)."""
    lr = text.strip()
    try:
        value = float(lr) if lr else None
    except ValueError as error:
        raise TrainingError(f"learning rate {lr!r} is not a number") from error
    if value is not None and not value > 0:
        raise TrainingError("the learning rate must be positive")
    return value


def unique_name(name: str, folder: Path, taken: Iterable[str]) -> str:
    """``name``, or ``<name>-2`` (``-3``...) when a model of that name is in ``folder`` or in ``taken``."""
    from napari_pathology.training.loop import checkpoint_paths

    taken = set(taken)

    def free(candidate: str) -> bool:
        best, last, state = checkpoint_paths(folder / f"{candidate}.pt")
        return candidate not in taken and not any(p.exists() for p in (best, last, state))

    unique, k = name, 1
    while not free(unique):
        k += 1
        unique = f"{name}-{k}"
    return unique


def assemble_settings(family: Any, table: Path, out: Path, form: Mapping[str, Any]) -> Any:
    """The family's settings for a job on ``table`` writing ``out``, from the form's values.

    ``form`` holds ``start``, ``batch_size``, ``val_fraction``, ``device``,
    ``amp``, ``lr`` (None: default), ``length`` (steps or epochs),
    ``hard_negative_fraction`` and ``eval_every``; the family keeps those its
    settings have. The table is read and checked (the family's needs, the
    validation split) first.
    """
    from napari_pathology.cohort import CohortError, read_slide_table
    from napari_pathology.training.common import split_by_slide

    try:
        entries = read_slide_table(table)
    except CohortError as error:
        raise TrainingError(str(error)) from error
    implied = family.check_table(entries)  # e.g. annotations or classes the family needs
    defaults = family.defaults()
    seed = defaults.get("seed", 0)
    split_by_slide(entries, form["val_fraction"], seed)  # too few slides for the split?
    values: dict[str, Any] = {
        "data": table, "out": out, "start": form["start"], "batch_size": form["batch_size"],
        "val_fraction": form["val_fraction"], "device": form["device"], "amp": form["amp"],
        "threads": PANEL_THREADS,
    }  # fmt: skip
    if form["lr"] is not None:
        values["lr"] = form["lr"]
    values["steps" if "steps" in defaults else "epochs"] = form["length"]
    if "hard_negative_fraction" in defaults:
        values["hard_negative_fraction"] = form["hard_negative_fraction"]
    if "steps" in defaults and defaults.get("eval_every") is not None:
        values["eval_every"] = form["eval_every"]
    values.update(implied)
    values = {k: v for k, v in values.items() if k in defaults or k in ("data", "out")}
    return family.make_settings(values.pop("data"), values.pop("out"), **values)


def checkpoint_entry(record: JobRecord | None, event: TrainEvent) -> dict[str, Any]:
    """``{"kind": "best"|"last", "path", "metrics"}`` for a checkpoint event of a job."""
    from napari_pathology.training.loop import checkpoint_paths

    path = str(event.path)
    best = record is not None and Path(path) == checkpoint_paths(record.settings.out)[0]
    return {"kind": "best" if best else "last", "path": path, "metrics": dict(event.metrics)}


def checkpoint_text(entry: Mapping[str, Any]) -> str:
    """One line for a checkpoint list: kind, step and curve metrics, file name."""
    shown = [
        f"{k} {v:.3g}" for k, v in entry["metrics"].items()
        if k in ("step", *CURVE_METRICS) and isinstance(v, int | float)
    ]  # fmt: skip
    return f"{entry['kind']}: {', '.join(shown)} - {Path(entry['path']).name}"


def curve_metric(best_metric: str | None, validations: Sequence[Mapping[str, Any]]) -> str | None:
    """The metric worth a curve: the family's best metric, else the first of :data:`CURVE_METRICS`."""
    preferred = (best_metric,) if best_metric else ()
    return next((m for m in preferred + CURVE_METRICS if any(m in row for row in validations)), None)
