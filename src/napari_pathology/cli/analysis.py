"""Sub-commands that apply models: ``models``, ``run`` and ``evaluate``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from napari_pathology.cli.errors import CommandError, interrupted_status, sigterm_as_interrupt
from napari_pathology.cli.options import (
    BATCH_SIZE,
    NMS_RADIUS,
    STRIDE,
    device_option,
    fraction,
    int_option,
    mpp_option,
)
from napari_pathology.cli.progress_bars import run_with_progress
from napari_pathology.fileio import ensure_writable_dir

#: ``--classes``: names for the classes of another tool's checkpoint (which does not carry them).
CLASSES_HELP = "class names of another tool's checkpoint (e.g. CLAM's s_0_checkpoint.pt): normal,tumour"

# --------------------------------------------------------------------------- models and run


def _cmd_models(args: argparse.Namespace) -> int:
    from napari_pathology.families import load_families
    from napari_pathology.models import list_models

    load_families()  # families installed since the registry was first imported
    for spec in list_models():
        print(
            f"{spec.name}\t{spec.family}\t{spec.input_size}px @ {spec.mpp:g} um/px\t"
            f"{spec.output}/{spec.aggregator}\t{spec.description}"
        )
    return 0


def _load_tissue_for_run(args: argparse.Namespace, slide):
    from napari_pathology.tissue import TissueParams, detect_tissue, read_tissue_file

    if args.tissue == "none":
        return None
    if args.tissue == "auto":
        mask = run_with_progress(detect_tissue(slide, TissueParams()), "tissue mask", args.quiet)
        if mask.is_empty:
            raise CommandError(
                f"no tissue found in {slide.name} (its um/px, the model and the stride were checked); "
                "use --tissue none to analyse every tile, or give a tissue mask"
            )
        return mask
    return read_tissue_file(args.tissue, slide.dimensions, slide.require_mpp())


def _cmd_run(args: argparse.Namespace) -> int:
    from napari_pathology.analysis import (
        RunSettings,
        RunSettingsError,
        check_run,
        load_result,
        result_folder,
        run,
    )
    from napari_pathology.models import resolve_model
    from napari_pathology.slide import open_slide

    options = {
        "stride": "--stride", "batch_size": "--batch-size", "device": "--device", "tta": "--tta",
        "min_tissue_fraction": "--min-tissue", "nms_threshold": "--nms-threshold",
        "nms_radius": "--nms-radius",
    }  # fmt: skip
    try:  # every setting refused in one line before any work
        settings = RunSettings(
            stride=args.stride, batch_size=args.batch_size, device=args.device, tta=args.tta,
            min_tissue_fraction=args.min_tissue, nms_threshold=args.nms_threshold,
            nms_radius=args.nms_radius,
        )  # fmt: skip
    except RunSettingsError as error:
        raise CommandError(f"{options.get(error.field, error.field)}: {error}") from None
    ensure_writable_dir(args.out)  # a read-only or full disk is said now, not after the run

    def kept_message(out: Path, saved: list[Any]) -> str:
        """What an interrupted run kept, said only after checking that it is on disk and loads."""
        if saved:
            try:
                on_disk = load_result(out)
            except ValueError:
                on_disk = None
            if on_disk is not None and on_disk.key == saved[-1].key:
                if not on_disk.partial:
                    return f"interrupted: the complete result is in {out}"
                return (
                    f"interrupted: partial result kept in {out} ({on_disk.tiles_done}/{on_disk.tiles_total} "
                    f"{on_disk.unit}); run the same command again to resume"
                )
        return f"interrupted: nothing was kept in {out} (nothing finished was saved); a rerun starts over"

    with sigterm_as_interrupt() as received:
        slide = open_slide(args.slide, mpp=args.mpp)
        slide.validate()
        slide.require_mpp()
        model = resolve_model(args.model, classes=args.classes)
        check_run(slide, model.spec, settings)  # um/px, model um/px, stride: before "no tissue"
        out = result_folder(args.out, slide, model.spec.name)
        tissue = None if args.features is not None else _load_tissue_for_run(args, slide)
        saved: list[Any] = []  # results of this run the engine says are on disk
        job = run(
            slide, model, tissue=tissue, settings=settings, out_dir=out, reuse=not args.recompute,
            on_saved=saved.append, features=args.features,
        )  # fmt: skip
        try:
            result = run_with_progress(job, f"{model.spec.name} on {slide.name}", args.quiet)
        except KeyboardInterrupt:
            problem = ""
            try:
                job.close()  # saves the finished tiles, marked partial (a no-op when already saved)
            except KeyboardInterrupt:
                problem = " (interrupted again while saving)"
            except OSError as error:
                problem = f" (saving failed: {error})"
            print(kept_message(out, saved) + problem, file=sys.stderr)
            return interrupted_status(received)
    print(result.summary())
    print(f"results: {out}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from napari_pathology.analysis import RunSettings, RunSettingsError
    from napari_pathology.analysis.evaluate import evaluate_cohort
    from napari_pathology.cohort import CohortError, read_slide_table
    from napari_pathology.models import resolve_model

    try:
        settings = RunSettings(batch_size=args.batch_size, device=args.device, tta=args.tta)
    except RunSettingsError as error:
        options = {"batch_size": "--batch-size", "device": "--device", "tta": "--tta"}
        option = options.get(error.field, error.field)
        raise CommandError(f"{option}: {error}") from None
    ensure_writable_dir(args.out)  # before hours of work
    try:
        entries = read_slide_table(args.data)
    except CohortError as error:
        raise CommandError(str(error)) from error
    model = resolve_model(args.model, classes=args.classes)  # a bad model is said here, in one line
    in_process = args.workers <= 1 and not args.scheduler  # dask workers load it from its name or file
    classes = tuple(args.classes.split(",")) if args.classes else None
    job = evaluate_cohort(model if in_process else str(args.model), entries, args.out, settings,
                          workers=args.workers, scheduler=args.scheduler, classes=classes)  # fmt: skip
    evaluation = run_with_progress(job, f"evaluate {model.spec.name}", args.quiet)
    print(evaluation.summary())
    print(f"per-slide results: {args.out}")
    return 1 if evaluation.failed else 0


# --------------------------------------------------------------------------- parsers


def add_parsers(sub: Any) -> None:
    """Add ``models`` and ``run`` to the sub-command set ``sub``."""
    models = sub.add_parser("models", help="list registered models, one per line, name first")
    models.set_defaults(func=_cmd_models)

    run = sub.add_parser("run", help="run a model over a slide; heatmap, detections, slide score")
    run.add_argument("slide", type=Path)
    run.add_argument("--model", required=True, help="registered model name or checkpoint path")
    run.add_argument("--out", type=Path, required=True, help="results go to OUT/<slide>/<model>/")
    run.add_argument("--classes", default=None, help=CLASSES_HELP)
    run.add_argument("--features", type=Path, default=None,
                     help="bag models: the slide's CLAM-layout .h5 features, as they are")  # fmt: skip
    run.add_argument("--device", type=device_option, default="cpu", help="cpu, cuda:N or auto (default cpu)")
    run.add_argument("--batch-size", type=BATCH_SIZE, default=32)
    run.add_argument("--stride", type=STRIDE, default=None, help="px at the model's um/px")
    run.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                     help="average the 8 orientations (default: the model's choice)")  # fmt: skip
    run.add_argument("--tissue", default="auto", help="auto (detect), none, or a saved tissue mask")
    run.add_argument("--min-tissue", type=fraction, default=0.25, help="min tissue fraction per tile")
    run.add_argument("--nms-threshold", type=fraction, default=0.5, help="min score of a detection (0-1)")
    run.add_argument("--nms-radius", type=NMS_RADIUS, default=5.0, help="in heatmap cells")
    run.add_argument("--mpp", type=mpp_option, default=None, help="um/px for slides that lack it")
    run.add_argument("--recompute", action="store_true", help="ignore a saved result")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(func=_cmd_run)


def add_evaluate_parser(sub: Any) -> None:
    """Add ``evaluate`` to the sub-command set ``sub``."""
    evaluate = sub.add_parser("evaluate", help="score a model on slides with ground truth (AUC, FROC)")
    evaluate.add_argument("--model", required=True, help="registered model name or checkpoint path")
    evaluate.add_argument("--data", type=Path, required=True, help="slide table CSV or folder of slides")
    evaluate.add_argument("--classes", default=None, help=CLASSES_HELP)
    evaluate.add_argument("--out", type=Path, required=True, help="results and evaluation JSON/CSV")
    evaluate.add_argument("--device", type=device_option, default="cpu", help="cpu, cuda:N or auto")
    evaluate.add_argument("--batch-size", type=BATCH_SIZE, default=32)
    evaluate.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                          help="average the 8 orientations (default: the model's choice)")  # fmt: skip
    evaluate.add_argument("--workers", type=int_option(1, 512), default=1,
                          help="1: in this process (default); more: a local dask cluster")  # fmt: skip
    evaluate.add_argument("--scheduler", default=None, metavar="ADDRESS", help="a running dask scheduler")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.set_defaults(func=_cmd_evaluate)
