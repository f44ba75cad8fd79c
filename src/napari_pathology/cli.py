"""The ``napari-pathology`` command.

Sub-commands: ``demo``, ``info``, ``synth``, ``tissue``, ``nuclei``, ``models``, ``run``,
``train``, ``evaluate``. Errors a user can fix (a broken
file, a missing um/px) end the command with one clear line on stderr and a
non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from napari_pathology.progress import Progress, run_to_completion

T = TypeVar("T")

#: Exit status for errors in the user's input (bad file, bad option).
EXIT_USER_ERROR = 2


class CommandError(Exception):
    """An error to report to the user as one line, without a traceback."""


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


# --------------------------------------------------------------------------- info


def format_info(info: dict[str, Any]) -> str:
    """Plain-text slide facts, one per line."""
    mpp = (
        f"{info['mpp_x']:.4g} x {info['mpp_y']:.4g} um/px ({info['mpp_source']})"
        if info["mpp_x"]
        else f"unknown ({info['mpp_note']})"
    )
    size_mm = (
        f"{info['width'] * info['mpp_x'] / 1000:.2f} x {info['height'] * info['mpp_y'] / 1000:.2f} mm"
        if info["mpp_x"]
        else "unknown"
    )
    power = f"{info['objective_power']:g}x" if info["objective_power"] else "unknown"
    levels = ", ".join(
        f"{w}x{h} (/{d:g})"
        for (w, h), d in zip(info["level_dimensions"], info["level_downsamples"], strict=True)
    )
    lines = [
        f"file:          {info['path']}",
        f"vendor:        {info['vendor']} (read by {info['backend']})",
        f"size:          {info['width']} x {info['height']} px, {size_mm}",
        f"um/px:         {mpp}",
        f"objective:     {power}",
        f"levels:        {info['levels']}: {levels}",
        f"associated:    {', '.join(info['associated_images']) or 'none'}",
    ]
    return "\n".join(lines)


def _cmd_info(args: argparse.Namespace) -> int:
    from napari_pathology.slide import open_slide

    slide = open_slide(args.slide, mpp=args.mpp)
    slide.validate()
    info = slide.info().as_dict()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


# --------------------------------------------------------------------------- synth


def _cmd_synth(args: argparse.Namespace) -> int:
    from napari_pathology.slide.synthetic import generate_synthetic_slide

    out = Path(args.out)
    if out.suffix.lower() not in {".tif", ".tiff"}:
        raise CommandError(f"output must end in .tif or .tiff, got {out.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    job = generate_synthetic_slide(
        out,
        size=args.size,
        seed=args.seed,
        negative=args.negative,
        tumour_size="micro" if args.micro else "macro",
        mpp=args.mpp,
        pen_mark=args.pen_mark,
        blurred_patch=args.blurred_patch,
    )
    truth = run_with_progress(job, f"writing {out.name}", quiet=args.quiet)
    print(
        f"{truth.slide_path}: {truth.width}x{truth.height} px at {truth.mpp} um/px, "
        f"label {truth.label}, tumour {truth.tumour_area_um2 / 1e6:.3f} mm^2, "
        f"{truth.n_nuclei} nuclei; ground truth in {truth.truth_json.name}"
    )
    return 0


# --------------------------------------------------------------------------- demo


def _cmd_demo(args: argparse.Namespace) -> int:
    from napari_pathology.demo import ensure_demo_slide
    from napari_pathology.slide import open_slide
    from napari_pathology.slide.synthetic import load_truth

    path = run_with_progress(
        ensure_demo_slide(args.size, args.seed, folder=args.cache_dir),
        "making the demo slide (once)",
    )
    if args.headless:
        slide = open_slide(path)
        slide.validate()
        truth = load_truth(path)
        print(format_info(slide.info().as_dict()))
        print(
            f"truth:         label {truth['label']}, tumour {truth['tumour_area_mm2']:.3f} mm^2, "
            f"tissue {truth['tissue_area_mm2']:.2f} mm^2, {truth['n_nuclei']} nuclei "
            f"({truth['n_tumour_nuclei']} tumour)"
        )
        _demo_models(slide, path, args)
        return 0
    from napari_pathology._viewer import open_demo_viewer

    open_demo_viewer(path)
    return 0


def _demo_models(slide, path: Path, args: argparse.Namespace) -> None:
    """Run the shipped models on the demo slide and say what they found against the truth."""
    from napari_pathology.analysis import RunSettings, result_folder, run_analysis
    from napari_pathology.cohort import SlideEntry
    from napari_pathology.demo import cache_dir
    from napari_pathology.geometry import rasterize_polygons
    from napari_pathology.models import ModelError, resolve_model
    from napari_pathology.slide.synthetic import truth_paths
    from napari_pathology.tissue import TissueParams, detect_tissue

    tissue = run_with_progress(detect_tissue(slide, TissueParams()), "tissue mask")
    print(f"tissue:        {tissue.area_mm2:.2f} mm^2 found (CLAM-style saturation threshold)")
    polygons = SlideEntry(path, None, truth_paths(path)["tumour_geojson"]).tumour_polygons_um(slide.mpp)
    for name in ("metastasis", "tumor-normal"):
        try:
            model = resolve_model(name)
        except ModelError as error:
            print(f"{name}:    not available ({error})")
            continue
        out = result_folder((args.cache_dir or cache_dir()) / "results", slide, name)
        result = run_with_progress(
            run_analysis(slide, model, tissue=tissue, settings=RunSettings(), out_dir=out), name
        )
        line = f"{name + ':':<15}{result.summary()}"
        if len(result.detections):
            hits = sum(
                bool(rasterize_polygons(polygons, (1, 1), offset=(x - 0.5, y - 0.5))[0, 0])
                for x, y, _ in result.detections
            )
            line += f"; {hits}/{len(result.detections)} detections inside the planted tumour"
        print(line)
    _demo_nuclei(slide, path, polygons)
    print(f"results:       {(args.cache_dir or cache_dir()) / 'results'}")


def _demo_nuclei(slide, path: Path, polygons: list, side_um: float = 300.0) -> None:
    """Detect and classify the nuclei of a box on the tumour's edge; compare purity with the truth."""
    import numpy as np

    from napari_pathology.models import ModelError, resolve_model
    from napari_pathology.nuclei import NucleusPoints, read_csv, region_summaries
    from napari_pathology.nuclei.classify import classify_nuclei
    from napari_pathology.nuclei.run import detect_in_slide
    from napari_pathology.slide.synthetic import truth_paths

    if not polygons:
        return
    try:
        model = resolve_model("nucleus-purity")
    except ModelError as error:
        print(f"nuclei:        purity model not available ({error})")
        return
    ring = np.asarray(polygons[0][0])
    x, y = ring[np.argmin(ring[:, 0])] - side_um / 2  # the tumour's leftmost point: tumour and normal
    width, height = (d * m for d, m in zip(slide.dimensions, slide.require_mpp(), strict=True))
    x, y = float(np.clip(x, 0, max(0.0, width - side_um))), float(np.clip(y, 0, max(0.0, height - side_um)))
    box = (x, y, min(side_um, width), min(side_um, height))
    table = run_with_progress(detect_in_slide(slide, region_um=box), "nuclei")
    found = NucleusPoints.from_table(table)
    probability = run_with_progress(classify_nuclei(slide, found.xy_um(), model), "purity")
    found = found.with_probabilities(probability)
    corners = np.array([[x, y], [x + box[2], y], [x + box[2], y + box[3]], [x, y + box[3]]])
    [truth] = region_summaries(read_csv(truth_paths(path)["nuclei_csv"]), [[corners]])
    print(
        f"nuclei:        {len(found)} found in a {box[2]:.0f} um box on the tumour's edge; predicted purity "
        f"{found.predicted_purity() or 0:.2f} (nucleus-purity), true {truth.purity or 0:.2f} "
        f"({truth.counts['tumour']}/{truth.n} rendered nuclei are tumour)"
    )


# --------------------------------------------------------------------------- tissue


def _tissue_params(args: argparse.Namespace):
    from napari_pathology.tissue import TissueParams

    return TissueParams(method=args.method, mask_mpp=args.mask_mpp, exclude_pen=args.exclude_pen)


def _cmd_tissue(args: argparse.Namespace) -> int:
    from napari_pathology.tissue import write_tissue_outputs

    paths = run_with_progress(
        write_tissue_outputs(args.slide, args.out, _tissue_params(args), mpp=args.mpp),
        "tissue mask",
        args.quiet,
    )
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


# --------------------------------------------------------------------------- nuclei


def parse_roi(text: str, mpp: tuple[float, float]) -> tuple[float, float, float, float]:
    """``--roi x,y,w,h`` in micrometres, or in level-0 pixels with a ``px`` suffix, as um."""
    raw = text.strip().lower()
    in_px = raw.endswith("px")
    raw = raw.removesuffix("px").removesuffix("um").strip()
    try:
        values = [float(v) for v in raw.split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise CommandError(f"--roi must be x,y,w,h in um (or in level-0 pixels ending in px), got {text!r}")
    if in_px:
        values = [values[0] * mpp[0], values[1] * mpp[1], values[2] * mpp[0], values[3] * mpp[1]]
    return values[0], values[1], values[2], values[3]


def _cmd_nuclei(args: argparse.Namespace) -> int:
    from napari_pathology.nuclei import NucleusPoints, write_geojson
    from napari_pathology.nuclei.run import detect_in_slide
    from napari_pathology.slide import open_slide
    from napari_pathology.tissue import TissueParams, detect_tissue

    slide = open_slide(args.slide, mpp=args.mpp)
    slide.validate()
    mpp = slide.require_mpp()
    roi = parse_roi(args.roi, mpp) if args.roi else None
    use_tissue = args.tissue if args.tissue is not None else (roi is None and slide.level_count > 1)
    tissue = None
    if use_tissue:
        tissue = run_with_progress(detect_tissue(slide, TissueParams()), "tissue mask", args.quiet)
        if tissue.is_empty:
            raise CommandError(f"no tissue found in {slide.name}; use --no-tissue to search everywhere")
    job = detect_in_slide(slide, region_um=roi, tissue=tissue, chunk_px=args.chunk_px)
    table = run_with_progress(job, f"nuclei in {slide.name}", args.quiet)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out)
    where = "x={:g} y={:g} w={:g} h={:g} um".format(*roi) if roi else "the whole slide"
    where += " (tissue only)" if tissue is not None else ""
    print(f"{len(table)} nuclei in {where} of {slide.name}")
    print(f"csv: {args.out}")
    if args.geojson:
        args.geojson.parent.mkdir(parents=True, exist_ok=True)
        # detections: QuPath stays fluid with 10^5+ of them (annotations are for hand-made labels)
        write_geojson(NucleusPoints.from_table(table), args.geojson, mpp, object_type="detection")
        print(f"geojson: {args.geojson}")
    return 0


# --------------------------------------------------------------------------- models and run


def _cmd_models(args: argparse.Namespace) -> int:
    from napari_pathology.models import list_models

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
            raise CommandError(f"no tissue found in {slide.name}; use --tissue none to analyse every tile")
        return mask
    return read_tissue_file(args.tissue, slide.dimensions, slide.require_mpp())


def _cmd_run(args: argparse.Namespace) -> int:
    from napari_pathology.analysis import RunSettings, result_folder, run_analysis
    from napari_pathology.models import resolve_model
    from napari_pathology.slide import open_slide

    slide = open_slide(args.slide, mpp=args.mpp)
    slide.validate()
    slide.require_mpp()
    model = resolve_model(args.model)
    tissue = _load_tissue_for_run(args, slide)
    settings = RunSettings(
        stride=args.stride, batch_size=args.batch_size, device=args.device, tta=args.tta,
        min_tissue_fraction=args.min_tissue, nms_threshold=args.nms_threshold,
        nms_radius=args.nms_radius,
    )  # fmt: skip
    out = result_folder(args.out, slide, model.spec.name)
    if model.spec.output == "nuclei":  # nucleus purity: detect every nucleus, classify each
        from napari_pathology.analysis.nuclei import run_nucleus_analysis

        job = run_nucleus_analysis(slide, model, tissue, settings, out)
    else:
        reuse = not args.recompute
        job = run_analysis(slide, model, tissue=tissue, settings=settings, out_dir=out, reuse=reuse)
    try:
        result = run_with_progress(job, f"{model.spec.name} on {slide.name}", args.quiet)
    except KeyboardInterrupt:
        job.close()  # saves the finished tiles, marked partial
        print(f"interrupted: partial result kept in {out}", file=sys.stderr)
        return 130
    print(result.summary())
    print(f"results: {out}")
    return 0


# --------------------------------------------------------------------------- train and evaluate


def _cmd_train(args: argparse.Namespace) -> int:
    from napari_pathology.cohort import CohortError
    from napari_pathology.training import TrainingError

    try:
        if args.family == "metastasis":
            from napari_pathology.training import MetastasisTraining, train_metastasis

            job = MetastasisTraining(
                data=args.data, out=args.out, start=args.start or "metastasis-small-10x",
                steps=args.steps or 2000, batch_size=args.batch_size or 32, lr=args.lr,
                val_fraction=args.val_fraction, eval_every=args.eval_every, device=args.device,
                seed=args.seed, resume=args.resume,
            )  # fmt: skip
            generator = train_metastasis(job)
        elif args.family == "nucleus-purity":
            from napari_pathology.training.nucleus_data import read_nucleus_training_data
            from napari_pathology.training.nucleus_purity import NucleusPurityTraining, train_nucleus_purity

            chosen = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr}
            settings = NucleusPurityTraining(
                validation_fraction=args.val_fraction, device=args.device, seed=args.seed, resume=args.resume,
                **{k: v for k, v in chosen.items() if v is not None},
            )  # fmt: skip
            data = read_nucleus_training_data(args.data)
            generator = train_nucleus_purity(data, args.out, settings, start=args.start)
        else:
            from napari_pathology.training.tumor_normal import TumorNormalTraining, train_tumor_normal

            job = TumorNormalTraining(
                data=args.data, out=args.out, start=args.start or "tumor-normal-inception-v3",
                trunk_from=args.trunk_from, epochs=args.epochs or 20, batch_size=args.batch_size or 512,
                lr=args.lr or 1e-4, val_fraction=args.val_fraction, device=args.device, seed=args.seed,
                resume=args.resume, normal_weight=args.normal_weight,
            )  # fmt: skip
            generator = train_tumor_normal(job)
        result = run_training(generator, f"train {args.family}", args.quiet)
    except (TrainingError, CohortError) as error:
        raise CommandError(str(error)) from error
    except KeyboardInterrupt:
        print(f"stopped: last checkpoint kept beside {args.out} (resume with --resume)", file=sys.stderr)
        return 130
    shown = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items() if isinstance(v, float))
    print(f"best checkpoint: {result.best} ({shown})")
    print(f"last checkpoint: {result.last} (step {result.step})")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from napari_pathology.analysis import RunSettings
    from napari_pathology.analysis.evaluate import evaluate_cohort
    from napari_pathology.cohort import CohortError, read_slide_table
    from napari_pathology.models import resolve_model

    try:
        entries = read_slide_table(args.data)
    except CohortError as error:
        raise CommandError(str(error)) from error
    model = resolve_model(args.model)
    settings = RunSettings(batch_size=args.batch_size, device=args.device, tta=args.tta)
    job = evaluate_cohort(model, entries, args.out, settings)
    evaluation = run_with_progress(job, f"evaluate {model.spec.name}", args.quiet)
    print(evaluation.summary())
    print(f"per-slide results: {args.out}")
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for ``napari-pathology``."""
    parser = argparse.ArgumentParser(
        prog="napari-pathology",
        description="Interactive digital pathology: slides, tissue, tumour models, annotation.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="open napari on a synthetic demo slide (made once, cached)")
    demo.add_argument("--headless", action="store_true", help="print a summary instead of a GUI")
    demo.add_argument("--size", type=int, default=None, help="slide side in pixels")
    demo.add_argument("--seed", type=int, default=None, help="random seed of the demo slide")
    demo.add_argument("--cache-dir", type=Path, default=None, help="where demo slides are kept")
    demo.set_defaults(func=_cmd_demo)

    info = sub.add_parser("info", help="print a slide's facts")
    info.add_argument("slide", type=Path)
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--mpp", type=float, default=None, help="um/px to use instead of the file's")
    info.set_defaults(func=_cmd_info)

    synth = sub.add_parser("synth", help="write a synthetic H&E slide with ground truth")
    synth.add_argument("out", type=Path, help="output .tif path")
    synth.add_argument("--size", type=int, default=20_000, help="side in pixels (default 20000)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--negative", action="store_true", help="no tumour (a normal slide)")
    synth.add_argument("--micro", action="store_true", help="one small lesion (micro-metastasis)")
    synth.add_argument("--mpp", type=float, default=0.5, help="um/px at level 0 (default 0.5)")
    synth.add_argument("--pen-mark", action="store_true", help="add a pen-ink stroke")
    synth.add_argument("--blurred-patch", action="store_true", help="add an out-of-focus patch")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(func=_cmd_synth)

    tissue = sub.add_parser("tissue", help="detect tissue; write mask PNG + JSON and GeoJSON polygons")
    tissue.add_argument("slide", type=Path)
    tissue.add_argument("--out", type=Path, required=True, help="output folder")
    tissue.add_argument("--method", choices=["saturation", "otsu", "gray"], default="saturation")
    tissue.add_argument("--mask-mpp", type=float, default=8.0, help="um/px of the mask (default 8)")
    tissue.add_argument("--exclude-pen", action="store_true", help="remove green/blue/red pen ink")
    tissue.add_argument("--mpp", type=float, default=None, help="um/px for slides that lack it")
    tissue.add_argument("--quiet", action="store_true", help="no progress bar")
    tissue.set_defaults(func=_cmd_tissue)

    nuclei = sub.add_parser("nuclei", help="detect nuclei at full resolution; CSV of centroids in um")
    nuclei.add_argument("slide", type=Path, help="whole-slide image or plain image (PNG, JPEG, TIFF)")
    nuclei.add_argument(
        "--out",
        type=Path,
        required=True,
        help="CSV: x_um,y_um,area_um2,hematoxylin,eccentricity (um from the top-left)",
    )
    nuclei.add_argument(
        "--roi",
        default=None,
        help="region x,y,w,h in um from the slide's top-left corner (level 0); "
        "end with px for level-0 pixels, e.g. 0,0,2048,2048px",
    )
    nuclei.add_argument("--mpp", type=float, default=None, help="um/px for images that lack it")
    nuclei.add_argument(
        "--geojson",
        type=Path,
        default=None,
        help="also write QuPath GeoJSON detections (points in level-0 px; File > Import objects)",
    )
    nuclei.add_argument(
        "--tissue",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="skip chunks without tissue (default: on for a whole multi-level slide, "
        "off with --roi or for a single-level image)",
    )
    nuclei.add_argument("--chunk-px", type=int, default=1024, help="chunk side in level-0 px")
    nuclei.add_argument("--quiet", action="store_true", help="no progress bar")
    nuclei.set_defaults(func=_cmd_nuclei)

    models = sub.add_parser("models", help="list registered models, one per line, name first")
    models.set_defaults(func=_cmd_models)

    run = sub.add_parser("run", help="run a model over a slide; heatmap, detections, slide score")
    run.add_argument("slide", type=Path)
    run.add_argument("--model", required=True, help="registered model name or checkpoint path")
    run.add_argument("--out", type=Path, required=True, help="results go to OUT/<slide>/<model>/")
    run.add_argument("--device", default="cpu", help="cpu, cuda:N or auto (default cpu)")
    run.add_argument("--batch-size", type=int, default=32)
    run.add_argument("--stride", type=int, default=None, help="px at the model's um/px")
    run.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                     help="average the 8 orientations (default: the model's choice)")  # fmt: skip
    run.add_argument("--tissue", default="auto", help="auto (detect), none, or a saved tissue mask")
    run.add_argument("--min-tissue", type=float, default=0.25, help="min tissue fraction per tile")
    run.add_argument("--nms-threshold", type=float, default=0.5)
    run.add_argument("--nms-radius", type=float, default=5.0, help="in heatmap cells")
    run.add_argument("--mpp", type=float, default=None, help="um/px for slides that lack it")
    run.add_argument("--recompute", action="store_true", help="ignore a saved result")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(func=_cmd_run)

    train = sub.add_parser("train", help="train or fine-tune a model; best and last checkpoints")
    train.add_argument("family", choices=["metastasis", "tumor-normal", "nucleus-purity"])
    train.add_argument("--data", type=Path, required=True,
                       help="slide table CSV (slide, label, annotations) or a folder of slides; "
                            "nucleus-purity: a slide (labels from its Nuclei-panel autosave) or a CSV "
                            "with columns slide[,nuclei][,mpp]")  # fmt: skip
    train.add_argument("--out", type=Path, required=True, help="best checkpoint (.pt)")
    train.add_argument("--start", default=None, help="registry name or checkpoint to start from")
    train.add_argument("--trunk-from", default=None, help="tumor-normal: take the frozen trunk of this model")
    train.add_argument("--steps", type=int, default=None, help="metastasis: optimiser steps (default 2000)")
    train.add_argument("--epochs", type=int, default=None,
                       help="tumor-normal (default 20) and nucleus-purity (default 30): epochs")  # fmt: skip
    train.add_argument("--normal-weight", type=float, default=1.0,
                       help="tumor-normal: normal tiles per tumour-slide tile (default 1)")  # fmt: skip
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument("--lr", type=float, default=None, help="learning rate (default: the paper's)")
    train.add_argument("--val-fraction", type=float, default=0.2, help="share of slides held out")
    train.add_argument("--eval-every", type=int, default=100, help="metastasis: steps between validations")
    train.add_argument("--device", default="cpu", help="cpu, cuda:N or auto (default cpu)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint of --out")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_cmd_train)

    evaluate = sub.add_parser("evaluate", help="score a model on slides with ground truth (AUC, FROC)")
    evaluate.add_argument("--model", required=True, help="registered model name or checkpoint path")
    evaluate.add_argument("--data", type=Path, required=True, help="slide table CSV or folder of slides")
    evaluate.add_argument("--out", type=Path, required=True, help="results and evaluation JSON/CSV")
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                          help="average the 8 orientations (default: the model's choice)")  # fmt: skip
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.set_defaults(func=_cmd_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``napari-pathology`` console script."""
    from napari_pathology.demo import DEMO_SEED, DEMO_SIZE
    from napari_pathology.slide import SlideOpenError

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) == "demo":
        args.size = args.size or DEMO_SIZE
        args.seed = DEMO_SEED if args.seed is None else args.seed
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return handler(args)
    except (SlideOpenError, CommandError, FileNotFoundError, ValueError, MemoryError) as exc:
        print(f"napari-pathology: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("napari-pathology: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
