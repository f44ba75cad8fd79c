"""One slide of a cohort, start to end, where a worker runs it: open, check, tissue, run, done marker (no Qt).

A :class:`SlideTask` carries only paths and settings (it pickles: OpenSlide
handles and networks never travel through a scheduler); :func:`process_slide`
opens the slide itself, takes the model from this process's cache
(:func:`cached_model`: loaded once per worker process), runs it with the same
code as ``napari-pathology run`` (:func:`napari_pathology.analysis.run`: one
result folder per slide, saved atomically) or, for features only, extracts
the slide's patch features as ``napari-pathology features`` does
(:func:`napari_pathology.features.slide_files.extract_to_h5`), and only
then writes the slide's done marker (:func:`marker_path`). A slide that
fails returns a :class:`SlideReport` with its message instead of raising, so
the others go on; a worker that dies leaves no marker, and the slide runs
again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_pathology.analysis.settings import RunSettings
from napari_pathology.fileio import atomic_write, read_json_file, safe_name
from napari_pathology.progress import Progress

__all__ = [
    "CRASH_ONCE_ENV",
    "SlideReport",
    "SlideTask",
    "cached_model",
    "marker_path",
    "process_slide",
    "process_slide_on_worker",
    "read_marker",
]

#: Test-only hook: ``"<slide stem>|<flag file>"`` makes a dask worker ``os._exit`` in the middle of that
#: slide the first time (while the flag file does not exist), to test that the slide is retried.
CRASH_ONCE_ENV = "NAPARI_PATHOLOGY_BATCH_CRASH_ONCE"

#: Models loaded in this process, by (source, classes, file stamp): one load per worker process.
_MODELS: dict[tuple[Any, ...], Any] = {}
_MODELS_LOCK = threading.Lock()


@dataclass(frozen=True)
class SlideTask:
    """What a worker needs to process one slide: paths and settings only.

    Attributes
    ----------
    slide : str
        The slide's path.
    job : str
        The model's name, or ``features-<encoder>`` (names the done markers' folder).
    model : str
        Registry name or checkpoint path ("" for features only).
    out_dir : str
        The cohort's output folder (results go to ``OUT/<slide>/<model>``).
    settings : RunSettings
        Run settings (device, batch size, TTA, minimum tissue...).
    label : str or None
        The slide's label from the table.
    mpp : float or None
        um/px for a slide that lacks it.
    classes : tuple of str or None
        Class names of another tool's checkpoint.
    encoder : str or None
        Features only: the encoder.
    tissue_params : TissueParams or None
        Tissue detection (None: the defaults, as ``run`` uses).
    force : bool
        Recompute even when a saved result is valid.
    """

    slide: str
    job: str
    model: str
    out_dir: str
    settings: RunSettings = field(default_factory=RunSettings)
    label: str | None = None
    mpp: float | None = None
    classes: tuple[str, ...] | None = None
    encoder: str | None = None
    tissue_params: Any = None
    force: bool = False

    @property
    def name(self) -> str:
        """The slide's file name."""
        return Path(self.slide).name

    def fingerprint(self) -> str:
        """A digest of everything that decides the slide's output (slide file, model file, settings)."""

        def stamp(path: str) -> list[Any]:
            with contextlib.suppress(OSError):
                stat = Path(path).stat()
                return [os.path.realpath(path), stat.st_size, stat.st_mtime_ns]
            return [path]

        payload = {
            "slide": stamp(self.slide), "job": self.job, "model": stamp(self.model) if self.model else "",
            "classes": self.classes, "encoder": self.encoder, "mpp": self.mpp,
            "settings": dataclasses.asdict(self.settings),
            "tissue": dataclasses.asdict(self.tissue_params) if self.tissue_params is not None else None,
        }  # fmt: skip
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass
class SlideReport:
    """How one slide went: its status, scores and where its output is.

    ``status`` is ``done`` (computed now), ``skipped`` (done by an earlier
    run: its marker and output are valid), ``failed`` (``error`` says why) or
    ``cancelled`` (stopped; what was finished is kept, marked partial).
    """

    slide: str
    name: str
    label: str | None
    status: str
    slide_score: float = float("nan")
    score_name: str = ""
    scores: dict[str, float] = field(default_factory=dict)
    tiles: int = 0
    unit: str = "tiles"
    seconds: float = 0.0
    worker: str = ""
    error: str = ""
    output: str = ""
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the done marker's content): NaN scores as null."""
        data = dataclasses.asdict(self)
        data["slide_score"] = _finite_or_none(self.slide_score)
        data["scores"] = {k: _finite_or_none(v) for k, v in self.scores.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SlideReport:
        """The report a done marker holds (null scores as NaN)."""
        names = {f.name for f in dataclasses.fields(cls)}
        report = cls(**{k: v for k, v in data.items() if k in names})
        report.slide_score = math.nan if report.slide_score is None else float(report.slide_score)
        report.scores = {k: math.nan if v is None else float(v) for k, v in report.scores.items()}
        return report


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def marker_path(task: SlideTask) -> Path:
    """``OUT/.done/<job>/<slide stem>-<8 hex of its path>.json``: the slide's done marker."""
    from napari_pathology.analysis.folders import path_tag

    stem = safe_name(Path(task.slide).stem, fallback="slide")
    return (
        Path(task.out_dir)
        / ".done"
        / safe_name(task.job, fallback="job")
        / f"{stem}-{path_tag(task.slide)}.json"
    )


def read_marker(task: SlideTask) -> SlideReport | None:
    """The report of an earlier run when its marker matches ``task`` and its output is still there."""
    try:
        data = read_json_file(marker_path(task), "done marker")
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("fingerprint") != task.fingerprint():
        return None
    report = SlideReport.from_dict(data.get("report", {}))
    output = Path(report.output) if report.output else None
    if output is None or not (output / "result.json" if output.is_dir() else output).is_file():
        return None
    report.status = "skipped"
    return report


def _write_marker(task: SlideTask, report: SlideReport) -> None:
    content = {"fingerprint": task.fingerprint(), "report": report.to_dict(), "finished": time.time()}
    atomic_write(marker_path(task), json.dumps(content, indent=1, default=str))


def cached_model(source: str, classes: tuple[str, ...] | None = None) -> Any:
    """The model ``source`` (registry name or checkpoint), loaded once per process."""
    from napari_pathology.models import resolve_model

    stamp: Any = None
    with contextlib.suppress(OSError):
        stat = Path(source).stat()
        stamp = (stat.st_size, stat.st_mtime_ns)
    key = (source, classes, stamp)
    with _MODELS_LOCK:
        model = _MODELS.get(key)
    if model is None:
        model = resolve_model(source, classes=",".join(classes) if classes else None)
        with _MODELS_LOCK:
            _MODELS[key] = model
    return model


def _worker_name() -> str:
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return f"local-{os.getpid()}"
    return str(worker.name)


def _in_dask_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return False
    return True


def _crash_hook(task: SlideTask) -> None:
    """The test-only hook of :data:`CRASH_ONCE_ENV` (a dask worker only, never the calling process)."""
    spec = os.environ.get(CRASH_ONCE_ENV, "")
    if "|" not in spec or not _in_dask_worker():
        return
    stem, flag = spec.split("|", 1)
    if Path(task.slide).stem == stem and not Path(flag).exists():
        Path(flag).write_text(str(os.getpid()))
        os._exit(3)


def _limit_threads() -> None:
    """One torch thread per single-threaded dask worker (N workers on N cores, not N x N threads)."""
    if _in_dask_worker():
        import torch

        torch.set_num_threads(1)


def _tissue(slide: Any, params: Any) -> Any:
    from napari_pathology.analysis.jobs import tissue_or_detect
    from napari_pathology.analysis.settings import NoTissueError
    from napari_pathology.progress import run_to_completion
    from napari_pathology.tissue import detect_tissue

    if params is None:
        return run_to_completion(tissue_or_detect(slide))
    mask = run_to_completion(detect_tissue(slide, params))
    if mask.is_empty:
        raise NoTissueError(f"No tissue found in {slide.name}; draw or import a tissue mask.")
    return mask


def _drive(job: Any, task: SlideTask, on_progress: Callable[[Progress], None] | None) -> Any:
    first = True
    while True:
        try:
            step = next(job)
        except StopIteration as stop:
            return stop.value
        if first:
            _crash_hook(task)  # mid-slide: after the run has started, before anything is saved
            first = False
        if on_progress is not None and isinstance(step, Progress):
            on_progress(step)


def _run_model(task: SlideTask, slide: Any, model: Any, cancel: Any, on_progress: Any) -> SlideReport:
    from napari_pathology.analysis import check_run, result_folder, run

    check_run(slide, model.spec, task.settings)
    tissue = _tissue(slide, task.tissue_params)
    target = result_folder(task.out_dir, slide, model.spec.name)
    job = run(slide, model, tissue=tissue, settings=task.settings, out_dir=target, cancel=cancel,
              reuse=not task.force)  # fmt: skip
    result = _drive(job, task, on_progress)
    return SlideReport(
        task.slide, slide.name, task.label, "cancelled" if result.partial else "done",
        float(result.slide_score), result.score_title, {k: float(v) for k, v in result.scores.items()},
        int(result.tiles_done), result.unit, output=str(target),
    )  # fmt: skip


def _run_features(task: SlideTask, slide: Any, cancel: Any, on_progress: Any) -> SlideReport:
    from napari_pathology.demo import cache_dir
    from napari_pathology.features import get_encoder
    from napari_pathology.features.slide_files import extract_to_h5

    encoder = cached_encoder(str(task.encoder), task.settings.device, get_encoder)
    target = Path(task.out_dir) / safe_name(task.job, fallback="features") / f"{Path(task.slide).stem}.h5"
    job = extract_to_h5(
        slide, encoder, target, cache_dir=cache_dir() / "features", tissue=_tissue(slide, task.tissue_params),
        min_tissue_fraction=task.settings.min_tissue_fraction, batch_size=task.settings.batch_size,
        stop=cancel,
    )  # fmt: skip
    try:
        feats = _drive(job, task, on_progress)
    except InterruptedError:
        return SlideReport(task.slide, slide.name, task.label, "cancelled", unit="patches")
    return SlideReport(task.slide, slide.name, task.label, "done", tiles=len(feats), unit="patches",
                       output=str(target))  # fmt: skip


def cached_encoder(name: str, device: str, build: Callable[..., Any]) -> Any:
    """The feature encoder ``name`` on ``device``, built once per process."""
    key = ("encoder", name, device)
    with _MODELS_LOCK:
        encoder = _MODELS.get(key)
    if encoder is None:
        encoder = build(name, device=device)
        with _MODELS_LOCK:
            _MODELS[key] = encoder
    return encoder


def process_slide(
    task: SlideTask,
    model: Any = None,
    cancel: threading.Event | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> SlideReport:
    """Process one slide: the result (or features) saved atomically, then its done marker.

    Parameters
    ----------
    task : SlideTask
        The slide and the settings.
    model : PathologyModel, optional
        A model built in code (in-process runs only); default: :func:`cached_model` of ``task.model``.
    cancel : threading.Event, optional
        Set it to stop after the current batch (the finished part is kept, marked partial).
    on_progress : callable, optional
        Called with the run's progress events.

    Returns
    -------
    SlideReport
        Never raises for a slide's error: ``status`` ``failed`` and ``error`` say why.
    """
    from napari_pathology.cli.errors import one_line, user_error_types
    from napari_pathology.slide import open_slide

    started = time.perf_counter()
    worker = _worker_name()
    _limit_threads()
    try:
        slide = open_slide(task.slide, mpp=task.mpp)
        try:
            slide.validate()
            slide.require_mpp()
            if task.encoder:
                report = _run_features(task, slide, cancel, on_progress)
            else:
                model = model if model is not None else cached_model(task.model, task.classes)
                report = _run_model(task, slide, model, cancel, on_progress)
        finally:
            slide.close()
    except Exception as error:  # a slide's failure is recorded and the cohort goes on
        known = isinstance(error, user_error_types())
        message = one_line(error) if known else f"{type(error).__name__}: {one_line(error)}"
        detail = "" if known else traceback.format_exc(limit=-3)
        report = SlideReport(task.slide, task.name, task.label, "failed", error=message, detail=detail)
    report.seconds = time.perf_counter() - started
    report.worker = worker
    if report.status == "done":
        _write_marker(task, report)  # only after the result is on disk, whole
    return report


def process_slide_on_worker(task: SlideTask, stop_event: str | None = None) -> SlideReport:
    """:func:`process_slide` in a dask worker; setting the dask Event ``stop_event`` stops it after its batch.

    A stopped slide keeps what it finished (marked partial, no done marker):
    the next run resumes it as ``run`` does.
    """
    cancel = threading.Event()
    if stop_event:
        from distributed import Event, get_client

        remote = Event(stop_event, client=get_client())
        if remote.is_set():  # cancelled before it started: nothing is computed, nothing kept
            return SlideReport(task.slide, task.name, task.label, "cancelled", worker=_worker_name())

        def watch() -> None:
            while not cancel.is_set():
                try:
                    if remote.wait(timeout=1.0):
                        cancel.set()
                except Exception:  # the scheduler went away: the task goes with it
                    return

        threading.Thread(target=watch, name=f"stop {task.name}", daemon=True).start()
    try:
        return process_slide(task, cancel=cancel)
    finally:
        cancel.set()  # ends the watcher
