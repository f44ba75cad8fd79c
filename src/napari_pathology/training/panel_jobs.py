"""Job bookkeeping behind the Train panel (no Qt): settings from the form's values, names, ETA, curves.

The panel reads its fields and calls these; what they compute (which settings
a family gets, which name a job writes, how long it has left, which metric
gets a curve) does not depend on the widgets.
"""

from __future__ import annotations

import dataclasses
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
    "PANEL_SETTINGS",
    "PANEL_THREADS",
    "JobRecord",
    "assemble_settings",
    "check_start",
    "checkpoint_entry",
    "checkpoint_text",
    "curve_metric",
    "default_models_dir",
    "form_fields",
    "format_eta",
    "paper_default",
    "parse_setting",
    "run_job",
    "setting_label",
    "setting_range",
    "setting_text",
    "state_message",
    "trainable_families",
    "unique_name",
]

#: Validation metrics worth a curve, in order of preference, after the one the job's family picks its
#: best checkpoint by (``Family.best_metric``).
CURVE_METRICS = ("val_loss", "slide_auc", "auc", "tile_accuracy", "accuracy")
#: torch CPU threads of a job the panel runs: the viewer needs the other cores (and more threads
#: than free cores make small networks slower, not faster).
PANEL_THREADS = 1
#: Settings the panel sets itself (its Start-from and Device rows, one thread, never replace or resume
#: from the form): the generated form leaves them out.
PANEL_SETTINGS = frozenset({"start", "device", "threads", "resume", "overwrite"})
#: Labels of settings whose names are abbreviations (any other label is made from the name).
_LABELS = {"lr": "Learning rate", "amp": "Mixed precision (CUDA)", "val_fraction": "Validation"}
#: Name endings that are units, shown in brackets.
_UNITS = {"_um": "um", "_mm2": "mm\N{SUPERSCRIPT TWO}", "_mpp": "um/px"}


def default_models_dir() -> Path:
    """Where trained checkpoints go unless the user picks a folder."""
    from napari_pathology.demo import cache_dir

    return cache_dir() / "models"


def trainable_families() -> dict[str, Any]:
    """Families the Train panel can train (from drawn regions or a slide table): name -> :class:`Family`."""
    from napari_pathology.families import list_families

    return {
        f.name: f for f in list_families(trainable=True) if {"regions", "slide_table"} & set(f.data_sources)
    }


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


def state_message(job: TrainingJob, on_device: Sequence[TrainingJob] = ()) -> str:
    """The log line for a job's new state ("" for a queued job with nothing ahead of it).

    ``on_device`` are the active jobs on its device (a queued job names those ahead of it).
    """
    state = job.state.value
    if state == "queued":
        busy = [j.name for j in on_device if j is not job]
        return f"{job.name}: queued behind {', '.join(busy)} on {job.device}" if busy else ""
    if state == "running":
        return f"{job.name}: running on {job.device}"
    if state == "failed":
        return f"{job.name} failed: {job.error}"
    step = getattr(job.result, "step", None)
    at = f" at step {step}" if step is not None else ""
    hint = "; Resume continues it" if state == "stopped" and step else ""
    return f"{job.name}: {state}{at}{hint}"


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


def form_fields(family: Any) -> list[Any]:
    """The settings the Train panel's generated form shows for ``family``, in dataclass order.

    Every :meth:`~napari_pathology.families.base.Family.setting_fields` entry but
    :data:`PANEL_SETTINGS` (the panel sets those itself).
    """
    return [f for f in family.setting_fields() if f.name not in PANEL_SETTINGS]


def _metadata(family: Any, name: str) -> Mapping[str, Any]:
    """The dataclass field metadata of setting ``name`` (empty when none)."""
    settings = getattr(family, "settings", None)
    if settings is None or not dataclasses.is_dataclass(settings):
        return {}
    return next((f.metadata for f in dataclasses.fields(settings) if f.name == name), {})


def setting_label(family: Any, field: Any) -> str:
    """A setting's form label: its field's ``metadata["label"]``, else made from its name.

    ``lr`` reads "Learning rate", ``context_um`` "Context (um)", ``batch_size`` "Batch size".
    """
    given = _metadata(family, field.name).get("label")
    if given:
        return str(given)
    if field.name in _LABELS:
        return _LABELS[field.name]
    name, unit = field.name, ""
    for ending, shown in _UNITS.items():
        if name.endswith(ending):
            name, unit = name[: -len(ending)], f" ({shown})"
    return name.replace("_", " ").strip().capitalize() + unit


def setting_range(family: Any, field: Any) -> tuple[float, float, float]:
    """``(minimum, maximum, step)`` of a number setting's spin box.

    A field's ``metadata`` ``min``, ``max`` and ``step`` win; otherwise counts
    run from 0 in steps of 1, shares (a name with ``fraction``) from 0 to 1 in
    steps of 0.05, and other reals from 0 in steps of the default's order of
    magnitude (at most 1). The settings dataclass checks the value chosen.
    """
    meta = _metadata(family, field.name)
    default = field.default if isinstance(field.default, int | float) else 0
    if field.kind == "int":
        low, high, step = 0, 1_000_000_000, 1
    elif "fraction" in field.name:
        low, high, step = 0.0, 1.0, 0.05
    else:
        magnitude = 10.0 ** math.floor(math.log10(abs(default))) if default else 0.1
        low, high, step = 0.0, 1e6, min(1.0, magnitude)
    low, high, step = meta.get("min", low), meta.get("max", high), meta.get("step", step)
    return float(min(low, default)), float(max(high, default)), float(step)


def setting_text(value: Any) -> str:
    """A setting's value as a text field shows it (None: empty; names: comma-separated)."""
    if value is None:
        return ""
    if isinstance(value, tuple | list):
        return ", ".join(str(v) for v in value)
    return str(value)


def parse_setting(family: Any, field: Any, text: str) -> Any:
    """The value typed into a setting's text field, as its kind; None (the default) when left empty.

    A number typed into an optional setting must be positive (empty means the
    family's default).

    Raises
    ------
    TrainingError
        Naming the setting: not a number, not positive, or empty where a value is needed.
    """
    label = setting_label(family, field)
    text = text.strip()
    if not text:
        if field.optional:
            return None
        if field.kind == "names":
            return ()
        raise TrainingError(f"{label} needs a value")
    if field.kind in ("int", "float"):
        try:
            value = int(text) if field.kind == "int" else float(text)
        except ValueError as error:
            kind = "a whole number" if field.kind == "int" else "a number"
            raise TrainingError(f"{label}: {text!r} is not {kind}") from error
        if field.optional and not value > 0:
            raise TrainingError(f"{label} must be positive (leave it empty for the default)")
        return value
    if field.kind == "path":
        return Path(text).expanduser()
    if field.kind == "names":
        return tuple(part.strip() for part in text.split(",") if part.strip())
    return text


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


def assemble_settings(
    family: Any, table: Path, out: Path, start: str, device: str, values: Mapping[str, Any]
) -> Any:
    """The family's settings for a job on ``table`` writing ``out``, from the panel's values.

    ``values`` are the generated form's settings by name (None: the default);
    the panel adds the starting model, the device and one CPU thread
    (:data:`PANEL_THREADS`). The table is read and checked (the family's
    needs, the validation split) first; what the table implies (e.g. the
    classes) wins over the form. A family whose settings take ``classes``
    reads the table with the classes of the form, else with the labels the
    table holds (a subtype table: ``normal``, ``tumour_a``, ``tumour_b``),
    and decides in ``check_table`` which classes it trains; the others read
    tumour/normal tables only.
    """
    from napari_pathology.cohort import CohortError, read_slide_table, table_labels
    from napari_pathology.training.common import split_by_slide

    defaults = family.defaults()
    try:
        classes = values.get("classes") if "classes" in defaults else None
        if "classes" in defaults and not classes:
            classes = table_labels(table)
        entries = read_slide_table(table, classes=classes)
    except CohortError as error:
        raise TrainingError(str(error)) from error
    implied = family.check_table(entries)  # e.g. annotations or classes the family needs
    if classes and not implied.get("classes"):
        implied["classes"] = tuple(classes)  # the family is silent: the form's classes, or the table's
    elif values.get("classes") and set(implied.get("classes") or ()) == set(values["classes"]):
        implied["classes"] = tuple(values["classes"])  # the same classes: in the form's order
    seed = values.get("seed", defaults.get("seed", 0))
    split_by_slide(entries, values.get("val_fraction") or 0.0, seed)  # too few slides for the split?
    chosen = {
        **{k: v for k, v in values.items() if v is not None},
        "start": start, "device": device, "threads": PANEL_THREADS, **implied,
    }  # fmt: skip
    return family.make_settings(table, out, **{k: v for k, v in chosen.items() if k in defaults})


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
