"""Cohort benchmark: slides per hour, a sequential loop against the cohort runner with 1 and 2 workers.

Run (from the repository root, after the README's set-up)::

    python benchmarks/cohort.py                     # 6 synthetic 4096 px slides, tumor-normal
    python benchmarks/cohort.py --slides 12 --size 8192 --model nuclear-density

Rows, on the same slides in one run, each with a fresh output folder (no
result is reused):

- *sequential*: one process, the model loaded once, ``tissue_or_detect`` and
  ``run`` slide after slide (what a shell loop over ``napari-pathology run``
  does, without its per-slide start-up); torch uses every core.
- *runner, N workers*: :func:`napari_pathology.batch.run_cohort` on a fresh
  ``LocalCluster`` of N single-threaded worker processes. Its start-up (the
  cluster, one warm-up slide on each worker: imports, model load, first
  inference; and the runner's own check of the model, which loads it once
  in the calling process) is measured apart from the slides; slides/h and the ratio to
  the loop are for the slides, the last column includes the start-up.

The overhead per slide is (runner seconds - loop seconds) / slides with one
warm worker: what the scheduling, the done markers and ``cohort.csv`` cost.
The loop is warmed up the same way (one slide first, not timed).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from napari_pathology.analysis import load_result, result_folder, run, tissue_or_detect
from napari_pathology.batch import open_client, run_cohort
from napari_pathology.batch.tasks import cached_model
from napari_pathology.cohort import read_slide_table, write_synthetic_cohort
from napari_pathology.models import resolve_model
from napari_pathology.progress import run_to_completion
from napari_pathology.slide import open_slide

OUT = Path(__file__).parent / "out"


def sequential(entries: list, model_name: str, out: Path) -> float:
    """Seconds for the plain loop (model loaded and one slide run before timing)."""
    model = resolve_model(model_name)
    first = open_slide(entries[0].path)
    tissue = run_to_completion(tissue_or_detect(first))
    run_to_completion(run(first, model, tissue=tissue, out_dir=out / "warm-up", reuse=False))
    start = time.perf_counter()
    for entry in entries:
        slide = open_slide(entry.path)
        tissue = run_to_completion(tissue_or_detect(slide))
        run_to_completion(run(slide, model, tissue=tissue, out_dir=result_folder(out, slide, model_name)))
        slide.close()
    return time.perf_counter() - start


def _warm(model_name: str, slide: str, out: str) -> None:
    """In a worker: one slide, so the imports, model load and first inference are paid before timing."""
    from napari_pathology.batch.tasks import SlideTask, process_slide

    process_slide(SlideTask(slide, model_name, model_name, out, force=True))


def runner(entries: list, model_name: str, out: Path, workers: int) -> tuple[float, float, list]:
    """Seconds to start a local cluster (workers warmed up on one slide), seconds for the slides, reports."""
    start = time.perf_counter()
    with open_client(workers) as client:
        client.run(_warm, model_name, str(entries[0].path), str(out / "warm-up"))
        cached_model(model_name)  # the runner's check of the model, here (once per process)
        started = time.perf_counter()
        job = run_cohort(entries, model_name, out, scheduler=client.scheduler.address, evaluate=False)
        cohort = run_to_completion(job)
        seconds = time.perf_counter() - started
    if not cohort.complete:
        raise RuntimeError(f"runner with {workers} workers: {[r.error for r in cohort.failed]}")
    return started - start, seconds, cohort.reports


def main() -> None:
    """Measure (modes alternated, best of ``--rounds``) and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=6)
    parser.add_argument("--size", type=int, default=4096, help="slide side in px at 0.5 um/px")
    parser.add_argument("--model", default="tumor-normal")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2, help="best of this many, the modes alternated")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the loop (default all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cohort_dir = OUT / f"cohort-{args.slides}x{args.size}px"
    table = run_to_completion(write_synthetic_cohort(cohort_dir, args.slides, 11, size=args.size))
    entries = read_slide_table(table)
    names = [f"{n} worker{'s' if n > 1 else ''}" for n in args.workers]
    loop = math.inf
    best = {name: (math.inf, math.inf) for name in names}
    for _ in range(args.rounds):
        work = Path(tempfile.mkdtemp(prefix="cohort-bench-"))
        try:
            loop = min(loop, sequential(entries, args.model, work / "sequential"))
            expected = {
                e.path.name: load_result(result_folder(work / "sequential", open_slide(e.path), args.model))
                for e in entries
            }
            for name, n in zip(names, args.workers, strict=True):
                start_up, seconds, reports = runner(entries, args.model, work / f"runner-{n}", n)
                for report in reports:  # the same numbers as the loop
                    want = expected[report.name].slide_score
                    assert abs(report.slide_score - want) < 1e-5, (report.name, report.slide_score, want)
                best[name] = min(best[name], (start_up, seconds), key=sum)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    threads = torch.get_num_threads()
    print(f"{args.slides} slides of {args.size} px, model {args.model}, {os.cpu_count()} cores, "
          f"torch {threads} threads in the loop, 1 per worker, best of {args.rounds}")  # fmt: skip
    print(f"{'':<22}{'start-up s':>11}{'slides s':>10}{'slides/h':>10}{'ratio':>7}{'with start-up':>15}")
    per_hour = 3600 * args.slides
    rate = per_hour / loop
    print(f"{'sequential loop':<22}{'-':>11}{loop:>10.1f}{rate:>10.0f}{1.0:>7.2f}{rate:>15.0f}")
    for name, (start_up, seconds) in best.items():
        total = start_up + seconds
        print(f"{'runner, ' + name:<22}{start_up:>11.1f}{seconds:>10.1f}{per_hour / seconds:>10.0f}"
              f"{loop / seconds:>7.2f}{per_hour / total:>15.0f}")  # fmt: skip
    if names:
        start_up, seconds = best[names[0]]
        print(f"runner overhead per slide, {names[0]}, warm cluster: {(seconds - loop) / args.slides:+.2f} s")


if __name__ == "__main__":
    main()
