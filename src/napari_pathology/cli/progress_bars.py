"""Progress bars on stderr for the commands' long jobs (tqdm, imported only when a bar is drawn)."""

from __future__ import annotations

import sys
from collections.abc import Generator
from typing import Any, TypeVar

from napari_pathology.progress import Progress, run_to_completion

T = TypeVar("T")


def run_with_progress(job: Generator[Progress, None, T], description: str, quiet: bool = False) -> T:
    """Drive a progress generator with a tqdm bar on stderr."""
    if quiet:
        return run_to_completion(job)
    from tqdm import tqdm

    with tqdm(desc=description, unit="step", file=sys.stderr, leave=False) as bar:

        def update(event: Progress) -> None:
            if event.total and bar.total != event.total:
                bar.total = event.total
            bar.n = event.done
            if event.message:
                bar.set_postfix_str(event.message, refresh=False)
            bar.refresh()

        return run_to_completion(job, update)


def run_training(job: Generator[Any, None, T], description: str, quiet: bool = False) -> T:
    """Drive a training generator (:class:`~napari_pathology.training.TrainEvent`) with a tqdm bar.

    Steps move the bar (loss and ETA in its postfix); validation, checkpoint
    and log events are printed above it. Ctrl-C closes the job, which saves
    its last checkpoint, and is re-raised.
    """
    from tqdm import tqdm

    with tqdm(desc=description, unit="step", file=sys.stderr, disable=quiet, leave=False) as bar:
        try:
            while True:
                try:
                    event = next(job)
                except StopIteration as stop:
                    return stop.value
                bar.total = event.total_steps or None
                bar.n = event.step
                if event.kind == "step" and event.loss is not None:
                    bar.set_postfix_str(f"loss {event.loss:.4f}", refresh=False)
                elif event.kind in ("validation", "checkpoint", "log", "done") and event.message:
                    (print if quiet else bar.write)(f"[{event.kind}] {event.message}", file=sys.stderr)
                bar.refresh()
        except KeyboardInterrupt:
            job.close()
            raise
