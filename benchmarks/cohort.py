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
  ``LocalCluster`` of N single-threaded worker processes, cluster start-up
  and each worker's model load included.

The ratio column is slides per hour against the sequential loop; the
overhead column is (runner seconds - sequential seconds) / slides for one
worker: what the scheduling, the cluster and the done markers cost per slide.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from napari_pathology.analysis import load_result, result_folder, run, tissue_or_detect
from napari_pathology.batch import run_cohort
from napari_pathology.cohort import read_slide_table, write_synthetic_cohort
from napari_pathology.models import resolve_model
from napari_pathology.progress import run_to_completion
from napari_pathology.slide import open_slide

OUT = Path(__file__).parent / "out"


def sequential(entries: list, model_name: str, out: Path) -> float:
    """Seconds for the plain loop (model loaded once)."""
    start = time.perf_counter()
    model = resolve_model(model_name)
    for entry in entries:
        slide = open_slide(entry.path)
        tissue = run_to_completion(tissue_or_detect(slide))
        run_to_completion(run(slide, model, tissue=tissue, out_dir=result_folder(out, slide, model_name)))
        slide.close()
    return time.perf_counter() - start


def runner(entries: list, model_name: str, out: Path, workers: int) -> tuple[float, list]:
    """Seconds for the cohort runner on a fresh local cluster, and its reports."""
    start = time.perf_counter()
    cohort = run_to_completion(run_cohort(entries, model_name, out, workers=workers, evaluate=False))
    seconds = time.perf_counter() - start
    if not cohort.complete:
        raise RuntimeError(f"runner with {workers} workers: {[r.error for r in cohort.failed]}")
    return seconds, cohort.reports


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
    names = ["sequential loop"] + [f"runner, {n} worker{'s' if n > 1 else ''}" for n in args.workers]
    best = dict.fromkeys(names, float("inf"))
    for _ in range(args.rounds):
        work = Path(tempfile.mkdtemp(prefix="cohort-bench-"))
        try:
            best[names[0]] = min(best[names[0]], sequential(entries, args.model, work / "sequential"))
            expected = {
                e.path.name: load_result(result_folder(work / "sequential", open_slide(e.path), args.model))
                for e in entries
            }
            for name, n in zip(names[1:], args.workers, strict=True):
                seconds, reports = runner(entries, args.model, work / f"runner-{n}", n)
                for report in reports:  # the same numbers as the loop
                    want = expected[report.name].slide_score
                    assert abs(report.slide_score - want) < 1e-5, (report.name, report.slide_score, want)
                best[name] = min(best[name], seconds)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    base = best[names[0]]
    threads = torch.get_num_threads()
    print(f"{args.slides} slides of {args.size} px, model {args.model}, {os.cpu_count()} cores, "
          f"torch {threads} threads in the loop, 1 per worker, best of {args.rounds}")  # fmt: skip
    print(f"{'':<20}{'seconds':>9}{'slides/h':>10}{'ratio':>8}")
    for name, seconds in best.items():
        print(f"{name:<20}{seconds:>9.1f}{3600 * args.slides / seconds:>10.0f}{base / seconds:>8.2f}")
    one = best.get("runner, 1 worker")
    if one is not None:
        overhead = (one - base) / args.slides
        print(f"runner overhead per slide (1 worker, cluster start-up included): {overhead:.2f} s")


if __name__ == "__main__":
    main()
