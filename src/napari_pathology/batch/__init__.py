"""Cohorts: the same pipeline over many slides, resumable, in this process or on dask.distributed (no Qt).

:mod:`.tasks` is what a worker does with one slide (tasks carry paths and
settings only; models are loaded once per worker process; a done marker
after the result), :mod:`.runner` runs a slide table (skips done slides,
retries slides whose worker died, records failures, ``cohort.csv``, the
evaluation when labels are known), :mod:`.cluster` starts a local cluster or
connects to a scheduler, :mod:`.summary` writes ``cohort.csv``.
"""

from napari_pathology.batch.cluster import ClusterError, default_workers, open_client
from napari_pathology.batch.runner import CohortEvent, CohortRun, cohort_tasks, run_cohort
from napari_pathology.batch.summary import SUMMARY_NAME, CohortTable
from napari_pathology.batch.tasks import CRASH_ONCE_ENV, SlideReport, SlideTask, process_slide, read_marker

__all__ = [
    "CRASH_ONCE_ENV",
    "SUMMARY_NAME",
    "ClusterError",
    "CohortEvent",
    "CohortRun",
    "CohortTable",
    "SlideReport",
    "SlideTask",
    "cohort_tasks",
    "default_workers",
    "open_client",
    "process_slide",
    "read_marker",
    "run_cohort",
]
