"""Run a model (or a feature encoder) over a cohort: in this process, or on dask.distributed (no Qt).

:func:`run_cohort` makes one :class:`~napari_pathology.batch.tasks.SlideTask`
per slide of a slide table, skips the slides whose done marker and output
are valid (unless ``force``), runs the others through
:func:`~napari_pathology.batch.tasks.process_slide` (in this process one
after the other, or as one dask task per slide on a local cluster or a
running scheduler), rewrites ``cohort.csv`` as each slide finishes and, when
the table has labels, scores the results as ``evaluate`` does
(:func:`napari_pathology.analysis.evaluate.evaluate_reports`). It is a
generator of :class:`~napari_pathology.progress.Progress` whose payload is a
:class:`CohortEvent` (counts, and the slide that just finished), returning a
:class:`CohortRun`.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_pathology.analysis.settings import RunSettings
from napari_pathology.batch.summary import SUMMARY_NAME, CohortTable
from napari_pathology.batch.tasks import (
    SlideReport,
    SlideTask,
    cached_model,
    process_slide,
    process_slide_on_worker,
    read_marker,
)
from napari_pathology.fileio import ensure_writable_dir
from napari_pathology.progress import Progress

__all__ = ["CohortEvent", "CohortRun", "cohort_tasks", "run_cohort"]

#: Seconds between two looks at the finished slides.
_POLL_S = 0.2
#: Seconds a cancelled cohort waits for its running slides to save what they finished.
STOP_WAIT_S = 120.0


@dataclass(frozen=True)
class CohortEvent:
    """A cohort's state, the payload of every :class:`Progress` the runner yields.

    ``report`` is the slide that just finished (or was skipped), None otherwise.
    """

    total: int
    done: int
    failed: int
    running: int
    report: SlideReport | None = None
    dashboard: str = ""


@dataclass
class CohortRun:
    """What a cohort run did: a report per slide, the summary table and the evaluation (labels known)."""

    job: str
    out_dir: Path
    reports: list[SlideReport]
    table: Path
    evaluation: Any = None
    dashboard: str = ""
    classes: list[str] = field(default_factory=list)

    def count(self, *statuses: str) -> int:
        """Slides whose status is one of ``statuses``."""
        return sum(r.status in statuses for r in self.reports)

    @property
    def failed(self) -> list[SlideReport]:
        """Slides that failed for good."""
        return [r for r in self.reports if r.status == "failed"]

    @property
    def complete(self) -> bool:
        """Every slide done (now or by an earlier run)."""
        return self.count("done", "skipped") == len(self.reports)

    def summary(self) -> str:
        """One line: slides done, skipped, failed, cancelled."""
        parts = [f"{self.count('done')} done", f"{self.count('skipped')} skipped (done before)",
                 f"{self.count('failed')} failed"]  # fmt: skip
        if self.count("cancelled", "pending"):
            parts.append(f"{self.count('cancelled', 'pending')} not finished")
        return f"{self.job} on {len(self.reports)} slides: " + ", ".join(parts)


def cohort_tasks(
    entries: Sequence[Any],
    job: str,
    model: str,
    out_dir: str | os.PathLike[str],
    settings: RunSettings,
    *,
    classes: Sequence[str] | None = None,
    encoder: str | None = None,
    tissue_params: Any = None,
    force: bool = False,
) -> list[SlideTask]:
    """One task per slide table entry (:class:`~napari_pathology.cohort.SlideEntry`)."""
    out = os.path.abspath(os.fspath(out_dir))
    return [
        SlideTask(
            os.path.abspath(os.fspath(entry.path)),
            job,
            model,
            out,
            settings,
            label=entry.label,
            mpp=entry.mpp,
            classes=tuple(classes) if classes else None,
            encoder=encoder,
            tissue_params=tissue_params,
            force=force,
        )
        for entry in entries
    ]


def _refuse_shared_features(tasks: Sequence[SlideTask]) -> None:
    seen: dict[str, str] = {}
    for task in tasks:
        stem = Path(task.slide).stem
        if stem in seen:
            raise ValueError(
                f"{seen[stem]} and {task.slide} would both be written to {stem}.h5; "
                "extract their features into different --out folders"
            )
        seen[stem] = task.slide


def _finished_message(report: SlideReport) -> str:
    if report.status == "failed":
        return f"{report.name}: failed: {report.error}"
    if report.status in ("done", "skipped") and report.score_name:
        score = f"{report.slide_score:.3f}" if report.slide_score == report.slide_score else "-"
        earlier = " (done before)" if report.status == "skipped" else ""
        return f"{report.name}: {report.score_name} {score}{earlier}"
    return f"{report.name}: {report.status}"


def run_cohort(
    entries: Sequence[Any],
    model: Any,
    out_dir: str | os.PathLike[str],
    *,
    settings: RunSettings | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    in_process: bool = False,
    force: bool = False,
    encoder: str | None = None,
    classes: Sequence[str] | None = None,
    tissue_params: Any = None,
    retries: int = 2,
    cancel: threading.Event | None = None,
    evaluate: bool = True,
) -> Generator[Progress, None, CohortRun]:
    """Run ``model`` over every slide of ``entries``; yields progress, returns a :class:`CohortRun`.

    Parameters
    ----------
    entries : sequence of SlideEntry
        The slides (:func:`napari_pathology.cohort.read_slide_table`).
    model : str, path-like or PathologyModel
        Registry name or checkpoint (loaded here once to check it, and once in
        each worker process); a model built in code runs in-process only.
        Ignored with ``encoder``.
    out_dir : path-like
        Results per slide (``OUT/<slide>/<model>``), ``cohort.csv``, done markers (``OUT/.done``).
    settings : RunSettings, optional
        Run settings for every slide.
    workers : int, optional
        Local worker processes (default: sized to the machine).
    scheduler : str, optional
        Address of a running dask scheduler (its workers must see the slides and ``out_dir``).
    in_process : bool
        Run the slides here one after the other (no dask; a model built in code allowed).
    force : bool
        Recompute slides that are done.
    encoder : str, optional
        Features only: extract every slide's patch features with this encoder
        (``OUT/features-<encoder>/<slide stem>.h5``, cached for bag models).
    classes : sequence of str, optional
        Class names of another tool's checkpoint.
    tissue_params : TissueParams, optional
        Tissue detection (default: as ``run`` finds tissue).
    retries : int
        Times a slide runs again after its worker died (local clusters).
    cancel : threading.Event, optional
        Set it to stop: no new slide starts, the running ones stop after their
        batch and keep what they finished (marked partial, resumed by a rerun).
    evaluate : bool
        Score the results against the table's labels at the end (when it has any).

    Raises
    ------
    ClusterError
        The scheduler cannot be reached.
    ValueError
        A model built in code with dask, or two slides whose features would share a file.
    """
    settings = settings or RunSettings()
    out = ensure_writable_dir(out_dir)
    if encoder:
        job, source, spec, loaded = f"features-{encoder}", "", None, None
    elif isinstance(model, str | os.PathLike):
        source = os.fspath(model)
        # loaded here once: a bad model is said before any work
        loaded = cached_model(source, tuple(classes) if classes else None)
        job, spec = loaded.spec.name, loaded.spec
    else:
        if not in_process:
            raise ValueError(
                "a model built in code runs in this process only; "
                "save it as a checkpoint to run it on a cluster"
            )
        loaded, spec, source = model, model.spec, ""
        job = spec.name
    tasks = cohort_tasks(entries, job, source, out, settings, classes=classes, encoder=encoder,
                         tissue_params=tissue_params, force=force)  # fmt: skip
    if encoder:
        _refuse_shared_features(tasks)
    class_names = list(spec.classes) if spec is not None else []
    table = CohortTable(out / SUMMARY_NAME, tasks, class_names)
    counts = {"done": 0, "failed": 0, "running": 0}
    todo = []
    for task in tasks:
        # a model built in code has no name or file to check a marker against: its run's key decides
        earlier = None if force or not (source or encoder) else read_marker(task)
        if earlier is None:
            todo.append(task)
        else:
            table.update(earlier)
            counts["done"] += 1
    table.write()
    total = len(tasks)
    run = CohortRun(job, out, [], table.path, classes=class_names)

    def event(report: SlideReport | None, running: int | None, message: str) -> Progress:
        if running is not None:
            counts["running"] = running
        payload = CohortEvent(
            total, counts["done"], counts["failed"], counts["running"], report, run.dashboard
        )
        return Progress(counts["done"] + counts["failed"], total, message, payload)

    def finish(report: SlideReport) -> Progress:
        if report.status in ("done", "skipped"):
            counts["done"] += 1
        elif report.status == "failed":
            counts["failed"] += 1
        table.update(report)
        table.write()
        return event(report, None, _finished_message(report))

    for report in list(table.reports.values()):
        if report.status == "skipped":
            yield event(report, 0, _finished_message(report))
    if in_process:
        for task in todo:
            if cancel is not None and cancel.is_set():
                break
            yield event(None, 1, f"{task.name}: starting")
            report = yield from _in_process(task, loaded, cancel, lambda text: event(None, 1, text))
            counts["running"] = 0
            yield finish(report)
    else:
        yield from _on_dask(todo, run, finish, event, workers, scheduler, settings, retries, cancel)
        counts["running"] = 0
    for task in todo:  # a slide that finished while a cancel dropped its task: its marker says so
        if table.reports[task.slide].status == "pending" and (source or encoder):
            earlier = read_marker(task)
            if earlier is not None:
                yield finish(dataclasses.replace(earlier, status="done"))
    run.reports = list(table.reports.values())
    table.write()
    labelled = [e for e in entries if e.label]
    if evaluate and not encoder and labelled and not (cancel is not None and cancel.is_set()):
        from napari_pathology.analysis.evaluate import evaluate_reports

        run.evaluation = evaluate_reports(job, spec.output, entries, run.reports, out)
    return run


def _in_process(
    task: SlideTask, model: Any, cancel: Any, wrap: Any
) -> Generator[Progress, None, SlideReport]:
    """:func:`process_slide` here, relaying the run's progress (a thread, so steps arrive as they happen)."""
    import queue

    steps: queue.Queue[Any] = queue.Queue()
    done = object()
    holder: dict[str, Any] = {}
    stop = cancel if cancel is not None else threading.Event()

    def work() -> None:
        try:
            holder["report"] = process_slide(task, model, stop, steps.put)
        except BaseException as error:  # raised here, in the caller's thread
            holder["error"] = error
        finally:
            steps.put(done)

    thread = threading.Thread(target=work, name=f"slide {task.name}", daemon=True)
    thread.start()
    try:
        while True:
            step = steps.get()
            if step is done:
                break
            yield wrap(f"{task.name}: {step.message}")
    finally:  # closed or interrupted: the slide stops after its batch and saves what it finished
        if thread.is_alive():
            stop.set()
        thread.join()
    if "error" in holder:
        raise holder["error"]
    return holder["report"]


def _on_dask(
    todo: Sequence[SlideTask], run: CohortRun, finish: Any, event: Any, workers: int | None,
    scheduler: str | None, settings: RunSettings, retries: int, cancel: threading.Event | None,
) -> Generator[Progress, None, None]:  # fmt: skip
    from distributed import Event, as_completed
    from distributed.scheduler import KilledWorker

    from napari_pathology.batch.cluster import open_client
    from napari_pathology.fileio import safe_name

    if not todo:
        return
    gpu = str(settings.device).startswith("cuda")
    with open_client(workers, scheduler, settings.device, retries) as client:
        run.dashboard = str(client.dashboard_link or "")
        yield event(None, 0, f"dask dashboard: {run.dashboard}")
        stop_name = f"napari-pathology-stop-{uuid.uuid4().hex}"
        stop = Event(stop_name, client=client)
        futures = {}
        for task in todo:
            key = f"slide-{safe_name(Path(task.slide).stem)}-{uuid.uuid4().hex[:8]}"
            future = client.submit(process_slide_on_worker, task, stop_name, key=key, pure=False,
                                   resources={"GPU": 1} if gpu else None)  # fmt: skip
            futures[future] = task
        pending = as_completed(list(futures))
        left = set(futures)
        polled, running, stopping = 0.0, 0, 0.0
        while left:
            if cancel is not None and cancel.is_set() and not stopping:
                stopping = time.monotonic()  # running slides stop after their batch and keep it
                stop.set()
                busy = {key for keys in client.processing().values() for key in keys}
                queued = [future for future in left if future.key not in busy]
                client.cancel(queued)
                left.difference_update(queued)  # never started: they stay pending
                yield event(None, len(left), f"cancelling: waiting for {len(left)} running slides to stop")
            if stopping and time.monotonic() - stopping > STOP_WAIT_S:
                break
            finished = pending.next_batch(block=False)
            for future in finished:
                if future not in left:
                    continue
                left.discard(future)
                yield finish(_report_of(future, futures[future], retries, KilledWorker))
            now = time.monotonic()
            if now - polled > 1.0 and not stopping:
                polled = now
                threads = client.nthreads()  # a worker may hold queued tasks beyond its threads
                running = sum(min(len(keys), threads.get(w, 1)) for w, keys in client.processing().items())
                yield event(None, running, f"{running} running")
            if not finished:
                time.sleep(_POLL_S)


def _report_of(future: Any, task: SlideTask, retries: int, killed: type[BaseException]) -> SlideReport:
    """A finished future's report; a slide whose workers kept dying, or a task error, as a failure."""
    try:
        return future.result()
    except killed:
        error = (
            f"the worker running it died {retries + 1} times (out of memory, or a crash in a native "
            "library); see the workers' logs"
        )
    except Exception as failure:  # recorded, the rest go on
        text = " ".join(str(failure).split()) or type(failure).__name__
        error = f"{type(failure).__name__}: {text}"
    return SlideReport(task.slide, task.name, task.label, "failed", error=error)
