"""The ``batch`` sub-command: a model (or a feature encoder) over a cohort, on dask.distributed, resumable.

Exit status 0 when every slide is done, 1 when any failed (the others still
complete; ``cohort.csv`` names each failure), 2 for a usage error (no such
table, an unknown model, a scheduler that cannot be reached: one line), 130
(143 after SIGTERM) when interrupted: the running slides keep what they
finished and the same command resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

from napari_pathology.cli.errors import CommandError, interrupted_status
from napari_pathology.cli.options import BATCH_SIZE, fraction, int_option, mpp_option
from napari_pathology.progress import Progress

#: ``--workers`` and ``--retries`` ranges.
WORKERS = int_option(1, 512)
RETRIES = int_option(0, 20)


@contextlib.contextmanager
def _first_signal_stops(cancel: threading.Event) -> Iterator[dict[str, int]]:
    """While the block runs, the first Ctrl-C or SIGTERM sets ``cancel``; a second one interrupts at once.

    Yields a dict that holds ``{"signal": number}`` once one arrived (see
    :func:`~napari_pathology.cli.errors.interrupted_status`). Only the main thread installs handlers.
    """
    received: dict[str, int] = {}

    def stop(signum: int, frame: Any) -> None:
        received["signal"] = signum
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        print(
            "\nstopping: running slides keep what they finished (Ctrl-C again to quit now)", file=sys.stderr
        )

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {number: signal.signal(number, stop) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _drive(job: Generator[Progress, None, Any], quiet: bool) -> Any:
    """Run the cohort with a tqdm bar (slides done / failed / running, ETA); failures printed above it."""
    from tqdm import tqdm

    with tqdm(desc="slides", unit="slide", file=sys.stderr, disable=quiet, leave=False) as bar:
        say = print if quiet else bar.write
        while True:
            try:
                step = next(job)
            except StopIteration as stop:
                return stop.value
            state = step.payload
            if state is None:
                continue
            bar.total = state.total
            bar.n = state.done + state.failed
            bar.set_postfix_str(f"done {state.done}, failed {state.failed}, running {state.running}", False)
            report = state.report
            if step.message.startswith("dask dashboard:"):
                say(step.message, file=sys.stderr)
            elif report is not None and report.status == "failed":
                say(f"{report.name}: failed: {report.error}", file=sys.stderr)
            bar.refresh()


def _cmd_batch(args: argparse.Namespace) -> int:
    from napari_pathology.analysis import RunSettings, RunSettingsError
    from napari_pathology.batch import run_cohort
    from napari_pathology.cohort import read_slide_table

    if args.features_only and not args.encoder:
        raise CommandError("--features-only needs --encoder NAME (see napari-pathology features --list)")
    if not args.features_only and not args.model:
        raise CommandError("batch needs --model NAME_OR_CKPT (or --features-only --encoder NAME)")
    if args.workers and args.scheduler:
        raise CommandError("--workers sizes a local cluster; a --scheduler's cluster has its own workers")
    try:
        settings = RunSettings(batch_size=args.batch_size, device=args.device, tta=args.tta,
                               min_tissue_fraction=args.min_tissue)  # fmt: skip
    except RunSettingsError as error:
        raise CommandError(f"--{error.field.replace('_', '-')}: {error}") from None
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    if not args.data.exists():
        raise CommandError(f"{args.data}: no such slide table or folder")
    entries = read_slide_table(args.data, classes=classes)
    cancel = threading.Event()
    if args.mpp is not None:
        from dataclasses import replace

        entries = [e if e.mpp is not None else replace(e, mpp=args.mpp) for e in entries]
    job = run_cohort(
        entries, args.model, args.out, settings=settings, workers=args.workers, scheduler=args.scheduler,
        force=args.force, encoder=args.encoder if args.features_only else None, classes=classes,
        retries=args.retries, cancel=cancel,
    )  # fmt: skip
    with _first_signal_stops(cancel) as received:
        cohort = _drive(job, args.quiet)
    print(cohort.summary())
    for report in cohort.failed:
        print(f"failed: {report.name}: {report.error}")
    if cohort.evaluation is not None:
        print(cohort.evaluation.summary())
    if cohort.dashboard:
        print(f"dask dashboard was: {cohort.dashboard}")
    print(f"summary: {cohort.table}")
    if cancel.is_set() and not cohort.complete:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return interrupted_status(received)
    return 0 if cohort.complete else 1


def add_parser(sub: Any) -> None:
    """Add ``batch`` to the sub-command set ``sub``."""
    batch = sub.add_parser(
        "batch", help="run a model (or extract features) over a cohort on dask workers; resumable"
    )
    batch.add_argument(
        "data", type=Path, metavar="TABLE_OR_FOLDER", help="slide table CSV or folder of slides"
    )
    batch.add_argument("--model", default=None, help="registered model name or checkpoint path")
    batch.add_argument("--out", type=Path, required=True, help="OUT/<slide>/<model>/, OUT/cohort.csv")
    batch.add_argument("--workers", type=WORKERS, default=None,
                       help="local worker processes (default: one per core, or one per GPU)")  # fmt: skip
    batch.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="running dask scheduler: tcp://host:8786 (workers see the files)")  # fmt: skip
    batch.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                       help="cpu, or cuda: one worker per GPU (resource GPU=1)")  # fmt: skip
    batch.add_argument("--force", action="store_true", help="recompute slides that are done")
    batch.add_argument("--features-only", action="store_true",
                       help="only patch features (--encoder): OUT/features-<encoder>/")  # fmt: skip
    batch.add_argument("--encoder", default=None, help="feature encoder for --features-only")
    batch.add_argument("--classes", default=None,
                       help="class names: the labels, and a foreign checkpoint's classes")  # fmt: skip
    batch.add_argument("--batch-size", type=BATCH_SIZE, default=32)
    batch.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                       help="average the 8 orientations (default: the model's choice)")  # fmt: skip
    batch.add_argument("--min-tissue", type=fraction, default=0.25, help="min tissue fraction per tile")
    batch.add_argument("--mpp", type=mpp_option, default=None, help="um/px for slides that lack it")
    batch.add_argument("--retries", type=RETRIES, default=2, help="runs again after a worker died (2)")
    batch.add_argument("--quiet", action="store_true", help="no progress bar")
    batch.set_defaults(func=_cmd_batch)
