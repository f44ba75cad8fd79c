"""The ``napari-pathology`` command.

Sub-commands: ``demo``, ``info``, ``synth``, ``tissue``, ``nuclei``, ``models``, ``run``,
``train``, ``evaluate``. Errors a user can fix (a broken
file, a missing um/px) end the command with one clear line on stderr and a
non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from napari_pathology.fileio import OutputError, ensure_writable_dir, require_finite
from napari_pathology.progress import Progress, run_to_completion

T = TypeVar("T")

#: Exit status for errors in the user's input (bad file, bad option).
EXIT_USER_ERROR = 2


class CommandError(Exception):
    """An error to report to the user as one line, without a traceback."""


# --------------------------------------------------------------------------- option types
# Every numeric option is parsed by one of these ``type=`` factories, so a bad
# value (0 where 1 is the least, NaN, 1e9 px, an implausible um/px) is refused
# in one line by the parser, before anything is read or computed.


def int_option(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse ``type`` for a whole number in ``[minimum, maximum]``."""

    def parse(text: str) -> int:
        try:
            value = int(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            high = "" if maximum is None else f" and at most {maximum}"
            raise argparse.ArgumentTypeError(f"must be at least {minimum}{high}, got {text!r}")
        return value

    parse.__name__ = "whole number"
    return parse


def finite_float(
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
    unit: str = "",
) -> Callable[[str], float]:
    """An argparse ``type`` for a finite number in a range (ends open when asked).

    Built on :func:`napari_pathology.fileio.require_finite`; NaN and
    infinities are refused.
    """
    low = "-inf" if minimum is None else f"{minimum:g}"
    high = "inf" if maximum is None else f"{maximum:g}"
    interval = f"{'(' if exclusive_minimum else '['}{low}, {high}{')' if exclusive_maximum else ']'}"
    suffix = f" {unit}" if unit else ""

    def parse(text: str) -> float:
        try:
            value = require_finite(text, "value", minimum=minimum, maximum=maximum)
        except ValueError as error:
            if "finite" in str(error) or "must be a number" in str(error):
                raise argparse.ArgumentTypeError(str(error).removeprefix("value ")) from None
            value = None
        if (
            value is None
            or (exclusive_minimum and minimum is not None and value <= minimum)
            or (exclusive_maximum and maximum is not None and value >= maximum)
        ):
            raise argparse.ArgumentTypeError(f"must be in {interval}{suffix}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


#: Whole number of at least 1 (counts, sizes, steps).
positive_int = int_option(1)
#: Whole number of at least 0.
non_negative_int = int_option(0)
#: Random seeds: what numpy and torch both accept.
seed_int = int_option(0, 2**32 - 1)
#: A share in [0, 1].
fraction = finite_float(0.0, 1.0)
#: A finite number above 0.
positive_float = finite_float(0.0, exclusive_minimum=True)


def mpp_option(text: str) -> float:
    """An argparse ``type`` for um/px: finite and plausible for a microscope slide.

    The range is the one slides' own metadata must fall in
    (:data:`napari_pathology.slide.backends.PLAUSIBLE_MPP`).
    """
    from napari_pathology.slide.backends import PLAUSIBLE_MPP

    low, high = PLAUSIBLE_MPP
    return finite_float(low, high, unit="um/px, the plausible range for a slide")(text)


def device_option(text: str) -> str:
    """An argparse ``type`` for ``--device``: refused at once when no such device is here.

    ``cpu`` and ``auto`` pass without importing torch; anything else is
    checked by :func:`napari_pathology.devices.resolve_device`.
    """
    if str(text).strip().lower() in ("cpu", "auto"):
        return str(text).strip().lower()
    from napari_pathology.devices import resolve_device

    try:
        resolve_device(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return str(text).strip().lower()


#: Option ranges, one per kind of option.
SLIDE_SIZE = int_option(256, 100_000)  # synthetic slide side, px
SYNTH_MPP = finite_float(0.05, 10.0, unit="um/px")  # what generate_synthetic_slide renders
MASK_MPP = finite_float(0.1, 1000.0, unit="um/px")
CHUNK_PX = int_option(64, 8192)
BATCH_SIZE = int_option(1, 4096)
STRIDE = int_option(1, 4096)  # px at the model's um/px; a tile is at most a few hundred
NMS_RADIUS = finite_float(0.0, 1000.0, exclusive_minimum=True, unit="heatmap cells")
TRAIN_STEPS = int_option(1, 10_000_000)
EPOCHS = int_option(1, 100_000)
TRAIN_BATCH_SIZE = int_option(1, 65_536)
LEARNING_RATE = finite_float(0.0, 10.0, exclusive_minimum=True)
VAL_FRACTION = finite_float(0.0, 1.0, exclusive_maximum=True)
NORMAL_WEIGHT = finite_float(0.0, 1000.0, exclusive_minimum=True)


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``prog: error: message`` in one line and exit with status 2."""
        text = " ".join(str(message).split())
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {text} (see {self.prog} --help)\n")


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


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[dict[str, int]]:
    """While the block runs, SIGTERM takes the path of Ctrl-C (save, then stop).

    Yields a dict that holds ``{"signal": SIGTERM}`` once one arrived; see
    :func:`interrupted_status`. Only the main thread can install handlers; elsewhere
    this does nothing.
    """
    received: dict[str, int] = {}

    def terminate(signum: int, frame: Any) -> None:
        received["signal"] = signum
        raise KeyboardInterrupt

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield received
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def interrupted_status(received: dict[str, int]) -> int:
    """Exit status of an interrupted command: 143 after SIGTERM, 130 after Ctrl-C."""
    return 128 + signal.SIGTERM if received.get("signal") == signal.SIGTERM else 130


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
    if info.get("brightfield") is False:
        lines.append("stain:         fluorescence (dark-field): the H&E models and tissue masks do not apply")
    lines += [f"warning:       {warning}" for warning in info.get("warnings", ())]
    return "\n".join(lines)


def _cmd_info(args: argparse.Namespace) -> int:
    from napari_pathology.slide import open_slide

    slide = open_slide(args.slide, mpp=args.mpp)
    slide.validate()
    info = slide.info().as_dict()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


# --------------------------------------------------------------------------- synth


def refuse_existing(paths: Sequence[Path], overwrite: bool, option: str) -> None:
    """Refuse to replace files that exist unless ``--overwrite`` was given (nothing is replaced silently).

    Raises
    ------
    CommandError
        Naming the first existing file and the two ways on.

    """
    existing = [Path(p) for p in paths if p is not None and Path(p).exists()]
    if existing and not overwrite:
        more = f", as do {len(existing) - 1} more of the files it would write" if len(existing) > 1 else ""
        raise CommandError(
            f"{existing[0]} already exists{more}; choose another {option}, or pass --overwrite to replace it"
        )


def _cmd_synth(args: argparse.Namespace) -> int:
    from napari_pathology.slide.synthetic import generate_synthetic_slide, truth_paths

    out = Path(args.out)
    if out.suffix.lower() not in {".tif", ".tiff"}:
        raise CommandError(f"output must end in .tif or .tiff, got {out.name}")
    if out.is_dir():
        raise CommandError(f"output {out} is a folder; give a .tif file name")
    refuse_existing(list(truth_paths(out).values()), args.overwrite, "output name")
    ensure_writable_dir(out.parent)  # before minutes of rendering
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
    from napari_pathology.demo import cache_dir, ensure_demo_slide
    from napari_pathology.slide import open_slide
    from napari_pathology.slide.synthetic import load_truth

    ensure_writable_dir(args.cache_dir or cache_dir())
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
    from napari_pathology.families import list_families

    for name in [n for f in list_families() if f.input_kind == "tile" for n in f.demo_weights]:
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
    from napari_pathology.families import list_families

    names = [n for f in list_families() if f.input_kind == "nucleus" for n in f.demo_weights]
    try:
        if not names:
            raise ModelError("no nucleus classifier ships with this installation")
        model = resolve_model(names[0])
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
        f"{found.predicted_purity() or 0:.2f} ({model.spec.name}), true {truth.purity or 0:.2f} "
        f"({truth.counts['tumour']}/{truth.n} rendered nuclei are tumour)"
    )


# --------------------------------------------------------------------------- tissue


def _tissue_params(args: argparse.Namespace):
    from napari_pathology.tissue import TissueParams

    return TissueParams(method=args.method, mask_mpp=args.mask_mpp, exclude_pen=args.exclude_pen)


def _cmd_tissue(args: argparse.Namespace) -> int:
    from napari_pathology.tissue import write_tissue_outputs

    refuse_existing([Path(args.out) / "tissue.json"], args.overwrite, "--out folder")
    ensure_writable_dir(args.out)  # before reading the slide
    paths = run_with_progress(
        write_tissue_outputs(args.slide, args.out, _tissue_params(args), mpp=args.mpp),
        "tissue mask",
        args.quiet,
    )
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


# --------------------------------------------------------------------------- nuclei


def parse_roi(
    text: str, mpp: tuple[float, float], extent_um: tuple[float, float] | None = None
) -> tuple[float, float, float, float]:
    """``--roi x,y,w,h`` in micrometres, or in level-0 pixels with a ``px`` suffix, as um.

    Parameters
    ----------
    text : str
        The option's value.
    mpp : tuple of float
        Level-0 um/px ``(x, y)``, for the ``px`` form.
    extent_um : tuple of float, optional
        The slide's ``(width, height)`` in um; a region entirely outside it is refused.

    Raises
    ------
    CommandError
        Not four finite numbers, a negative corner, an empty region, or off the slide.
    """
    raw = text.strip().lower()
    in_px = raw.endswith("px")
    raw = raw.removesuffix("px").removesuffix("um").strip()
    usage = "--roi must be x,y,w,h in um (or in level-0 pixels ending in px)"
    try:
        values = [require_finite(v, "--roi") for v in raw.split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise CommandError(f"{usage}, four finite numbers; got {text!r}")
    if values[0] < 0 or values[1] < 0 or values[2] <= 0 or values[3] <= 0:
        raise CommandError(f"{usage}, with x, y >= 0 and w, h > 0; got {text!r}")
    if in_px:
        values = [values[0] * mpp[0], values[1] * mpp[1], values[2] * mpp[0], values[3] * mpp[1]]
    if extent_um is not None and (values[0] >= extent_um[0] or values[1] >= extent_um[1]):
        raise CommandError(
            f"--roi {text!r} starts outside the slide ({extent_um[0]:g} x {extent_um[1]:g} um); "
            "give x,y inside it"
        )
    return values[0], values[1], values[2], values[3]


def _cmd_nuclei(args: argparse.Namespace) -> int:
    from napari_pathology.nuclei import NucleusPoints, write_geojson
    from napari_pathology.nuclei.run import detect_in_slide
    from napari_pathology.slide import open_slide
    from napari_pathology.tissue import TissueParams, detect_tissue

    for option, target in (("--out", args.out), ("--geojson", args.geojson)):
        if target is not None and Path(target).is_dir():
            raise CommandError(f"{option} {target} is a folder; give a file name")
        if target is not None:
            refuse_existing([Path(target)], args.overwrite, option)
            ensure_writable_dir(Path(target).parent)  # before reading the slide
    slide = open_slide(args.slide, mpp=args.mpp)
    slide.validate()
    mpp = slide.require_mpp()
    extent = (slide.dimensions[0] * mpp[0], slide.dimensions[1] * mpp[1])
    roi = parse_roi(args.roi, mpp, extent) if args.roi else None
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
                    "tiles); run the same command again to resume"
                )
        return f"interrupted: nothing was kept in {out} (no finished tiles were saved); a rerun starts over"

    with sigterm_as_interrupt() as received:
        slide = open_slide(args.slide, mpp=args.mpp)
        slide.validate()
        slide.require_mpp()
        model = resolve_model(args.model)
        check_run(slide, model.spec, settings)  # um/px, model um/px, stride: before "no tissue"
        out = result_folder(args.out, slide, model.spec.name)
        tissue = _load_tissue_for_run(args, slide)
        saved: list[Any] = []  # results of this run the engine says are on disk
        job = run(
            slide, model, tissue=tissue, settings=settings, out_dir=out, reuse=not args.recompute,
            on_saved=saved.append,
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


# --------------------------------------------------------------------------- train and evaluate


def _cmd_train(args: argparse.Namespace) -> int:
    import time

    from napari_pathology.cohort import CohortError
    from napari_pathology.training import TrainingError
    from napari_pathology.training.loop import checkpoint_paths

    started = time.time()
    try:
        with sigterm_as_interrupt() as received:
            result = _train_job(args)
    except (TrainingError, CohortError) as error:
        raise CommandError(str(error)) from error
    except KeyboardInterrupt:
        last = checkpoint_paths(args.out)[1]
        if last.is_file() and last.stat().st_mtime >= started:
            print(f"stopped: the last checkpoint {last} is saved (continue with --resume)", file=sys.stderr)
        elif last.is_file():
            print(f"stopped before a new checkpoint was saved; {last} is unchanged", file=sys.stderr)
        else:
            print("stopped before the first checkpoint was saved: nothing was kept", file=sys.stderr)
        return interrupted_status(received)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items() if isinstance(v, float))
    if result.best is not None:
        print(f"best checkpoint: {result.best} ({shown})" if shown else f"best checkpoint: {result.best}")
    else:
        print("best checkpoint: none yet (no validation ran before the job stopped)")
    print(f"last checkpoint: {result.last} (step {result.step})")
    return 0


def _train_job(args: argparse.Namespace) -> Any:
    """Build the family's settings from the options given (the rest: its defaults) and drive its trainer."""
    from napari_pathology.families import get_family
    from napari_pathology.training.loop import check_output

    family = get_family(args.family)
    offered = {f.name: f for f in family.setting_fields()}
    values: dict[str, Any] = {}
    for flag, dest in _TRAIN_FLAGS.items():
        value = getattr(args, dest, None)
        if value is None:  # not given: the family's default (0 is a value to check)
            continue
        field = next((f for f in offered.values() if f.flag == flag), None)
        if field is None:
            raise CommandError(f"{flag} is not a setting of {family.name} (see train {family.name} --help)")
        values[field.name] = value
    settings = family.make_settings(args.data, args.out, **values)
    check_output(args.out, resume=bool(values.get("resume")), overwrite=bool(values.get("overwrite")))
    data = family.read_data(args.data)
    return run_training(family.train(settings, data, args.out), f"train {family.name}", args.quiet)


#: Option ranges of training settings, by flag (every other setting is checked by its dataclass).
_SETTING_TYPES: dict[str, Callable[[str], Any]] = {
    "--steps": TRAIN_STEPS, "--epochs": EPOCHS, "--batch-size": TRAIN_BATCH_SIZE, "--lr": LEARNING_RATE,
    "--val-fraction": VAL_FRACTION, "--normal-weight": NORMAL_WEIGHT, "--seed": seed_int,
    "--eval-every": positive_int, "--threads": positive_int, "--device": device_option,
}  # fmt: skip
#: Flag -> argparse destination of the generated training options (filled by _add_training_flags).
_TRAIN_FLAGS: dict[str, str] = {}


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in str(text).split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"must be comma-separated names, got {text!r}")
    return names


def _setting_type(flag: str, kind: str) -> Callable[[str], Any] | None:
    if flag in _SETTING_TYPES:
        return _SETTING_TYPES[flag]
    return {
        "int": int_option(-(2**63)), "float": finite_float(), "str": str, "path": Path, "names": _names,
    }.get(kind)  # fmt: skip


def _add_training_flags(train: argparse.ArgumentParser) -> None:
    """One option per training setting of every registered family, generated from the settings dataclasses.

    Types come from the field annotations, help and defaults from the
    dataclass's docstring and defaults; an option left out means the chosen
    family's default.
    """
    from napari_pathology.families import list_families

    by_flag: dict[str, list[tuple[str, Any]]] = {}
    for family in list_families(trainable=True):
        for field in family.setting_fields():
            by_flag.setdefault(field.flag, []).append((family.name, field))
    _TRAIN_FLAGS.clear()
    for flag, owners in by_flag.items():
        kind = owners[0][1].kind
        helps = {f.help for _, f in owners}

        def default(f: Any) -> str:
            value = f.default
            return ",".join(value) if isinstance(value, tuple) else str(value)

        if len(helps) == 1:
            defaults = ", ".join(f"{name} {default(f)}" for name, f in owners)
            text = f"{owners[0][1].help} (default: {defaults})"
        else:
            text = "; ".join(f"{name}: {f.help} (default {default(f)})" for name, f in owners)
        text = text.replace("``", "").replace("%", "%%")
        dest = flag.removeprefix("--").replace("-", "_")
        _TRAIN_FLAGS[flag] = dest
        if kind == "bool":
            action = argparse.BooleanOptionalAction
            train.add_argument(flag, dest=dest, action=action, default=None, help=text)
        else:
            train.add_argument(flag, dest=dest, type=_setting_type(flag, kind), default=None, help=text)


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
    model = resolve_model(args.model)
    job = evaluate_cohort(model, entries, args.out, settings)
    evaluation = run_with_progress(job, f"evaluate {model.spec.name}", args.quiet)
    print(evaluation.summary())
    print(f"per-slide results: {args.out}")
    return 0


# --------------------------------------------------------------------------- parser


def build_parser(families: bool = True) -> argparse.ArgumentParser:
    """The argument parser for ``napari-pathology``.

    With ``families=False`` the ``train`` sub-command is a stub without the
    families' options: building those imports every family (and torch), which
    the other commands need not wait for.
    """
    parser = OneLineParser(
        prog="napari-pathology",
        description="Interactive digital pathology: slides, tissue, tumour models, annotation.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="open napari on a synthetic demo slide (made once, cached)")
    demo.add_argument("--headless", action="store_true", help="print a summary instead of a GUI")
    demo.add_argument("--size", type=SLIDE_SIZE, default=None, help="slide side in pixels")
    demo.add_argument("--seed", type=seed_int, default=None, help="random seed of the demo slide")
    demo.add_argument("--cache-dir", type=Path, default=None, help="where demo slides are kept")
    demo.set_defaults(func=_cmd_demo)

    info = sub.add_parser("info", help="print a slide's facts")
    info.add_argument("slide", type=Path)
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--mpp", type=mpp_option, default=None, help="um/px to use instead of the file's")
    info.set_defaults(func=_cmd_info)

    synth = sub.add_parser("synth", help="write a synthetic H&E slide with ground truth")
    synth.add_argument("out", type=Path, help="output .tif path")
    synth.add_argument("--size", type=SLIDE_SIZE, default=20_000, help="side in pixels (default 20000)")
    synth.add_argument("--seed", type=seed_int, default=0)
    synth.add_argument("--negative", action="store_true", help="no tumour (a normal slide)")
    synth.add_argument("--micro", action="store_true", help="one small lesion (micro-metastasis)")
    synth.add_argument("--mpp", type=SYNTH_MPP, default=0.5, help="um/px at level 0 (default 0.5)")
    synth.add_argument("--pen-mark", action="store_true", help="add a pen-ink stroke")
    synth.add_argument("--blurred-patch", action="store_true", help="add an out-of-focus patch")
    synth.add_argument("--overwrite", action="store_true", help="replace outputs that exist already")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(func=_cmd_synth)

    tissue = sub.add_parser("tissue", help="detect tissue; write mask PNG + JSON and GeoJSON polygons")
    tissue.add_argument("slide", type=Path)
    tissue.add_argument("--out", type=Path, required=True, help="output folder")
    tissue.add_argument("--method", choices=["saturation", "otsu", "gray"], default="saturation")
    tissue.add_argument("--mask-mpp", type=MASK_MPP, default=8.0, help="um/px of the mask (default 8)")
    tissue.add_argument("--exclude-pen", action="store_true", help="remove green/blue/red pen ink")
    tissue.add_argument("--mpp", type=mpp_option, default=None, help="um/px for slides that lack it")
    tissue.add_argument("--overwrite", action="store_true", help="replace outputs that exist already")
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
    nuclei.add_argument("--mpp", type=mpp_option, default=None, help="um/px for images that lack it")
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
    nuclei.add_argument("--chunk-px", type=CHUNK_PX, default=1024, help="chunk side in level-0 px")
    nuclei.add_argument("--overwrite", action="store_true", help="replace outputs that exist already")
    nuclei.add_argument("--quiet", action="store_true", help="no progress bar")
    nuclei.set_defaults(func=_cmd_nuclei)

    models = sub.add_parser("models", help="list registered models, one per line, name first")
    models.set_defaults(func=_cmd_models)

    run = sub.add_parser("run", help="run a model over a slide; heatmap, detections, slide score")
    run.add_argument("slide", type=Path)
    run.add_argument("--model", required=True, help="registered model name or checkpoint path")
    run.add_argument("--out", type=Path, required=True, help="results go to OUT/<slide>/<model>/")
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

    if not families:
        sub.add_parser("train", help="train or fine-tune a model; best and last checkpoints", add_help=False)
        _add_evaluate_parser(sub)
        return parser
    from napari_pathology.families import DATA_SOURCES, list_families

    trainable = list_families(trainable=True)
    train = sub.add_parser(
        "train", help="train or fine-tune a model; best and last checkpoints",
        description="Train a model family. Every option below is a field of a family's training "
        "settings; an option left out takes that family's default.",
    )  # fmt: skip
    train.add_argument(
        "family", choices=[f.name for f in trainable],
        help="; ".join(f"{f.name}: {f.title or f.name} (data: {', '.join(f.data_sources) or '-'})"
                       for f in trainable),
    )  # fmt: skip
    train.add_argument("--data", type=Path, required=True,
                       help=f"the training data ({', '.join(DATA_SOURCES)}): slide_table is a CSV (slide, "
                            "label, annotations) or a folder of slides; nuclei is a slide (labels from its "
                            "Nuclei-panel autosave) or a CSV with columns slide[,nuclei][,mpp]")  # fmt: skip
    train.add_argument("--out", type=Path, required=True, help="best checkpoint (.pt)")
    _add_training_flags(train)
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_cmd_train)
    _add_evaluate_parser(sub)
    return parser


def _add_evaluate_parser(sub: Any) -> None:
    evaluate = sub.add_parser("evaluate", help="score a model on slides with ground truth (AUC, FROC)")
    evaluate.add_argument("--model", required=True, help="registered model name or checkpoint path")
    evaluate.add_argument("--data", type=Path, required=True, help="slide table CSV or folder of slides")
    evaluate.add_argument("--out", type=Path, required=True, help="results and evaluation JSON/CSV")
    evaluate.add_argument("--device", type=device_option, default="cpu", help="cpu, cuda:N or auto")
    evaluate.add_argument("--batch-size", type=BATCH_SIZE, default=32)
    evaluate.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                          help="average the 8 orientations (default: the model's choice)")  # fmt: skip
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.set_defaults(func=_cmd_evaluate)


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exception classes that mean "fix your input or your disk": reported in one line, exit 2.

    Bad values and files (ValueError, which covers UnicodeDecodeError, JSON
    errors and every ``*Error`` of this package but SlideOpenError), slides
    that cannot be opened, file-system errors (missing, unreadable, full or
    read-only), too deeply nested input (RecursionError), malformed CSV,
    too little memory, and images past Pillow's size limit.
    """
    from napari_pathology.slide import SlideOpenError

    types: list[type[BaseException]] = [
        CommandError, SlideOpenError, ValueError, OSError, RecursionError, MemoryError, csv.Error,
    ]  # fmt: skip
    try:
        from PIL.Image import DecompressionBombError

        types.append(DecompressionBombError)
    except ImportError:  # pragma: no cover - Pillow is a dependency
        pass
    return tuple(types)


def one_line(error: BaseException) -> str:
    """The message of a user-fixable error as one line (file named where the error knows it)."""
    named = isinstance(error, OSError) and not isinstance(error, OutputError) and error.filename
    if named and error.strerror:
        text = f"{error.filename}: {error.strerror}"
    elif isinstance(error, RecursionError):
        text = "the input is nested too deeply to be read"
    elif isinstance(error, MemoryError):
        detail = f" ({error})" if str(error) else ""
        text = f"not enough memory{detail}; try a smaller region, batch size or a coarser resolution"
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


def _silence_stdout() -> None:
    """After a broken pipe: point stdout at devnull so the exit flush does not fail again.

    The way the Python documentation prescribes (``signal`` docs, "Note on SIGPIPE").
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (e.g. captured in tests)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``napari-pathology`` console script.

    Returns the exit status: 0 on success, 2 for an error in the user's input
    (one line on stderr: bad option, bad or unreadable file, output folder not
    writable), 130 when interrupted, 1 when stdout was closed early (``| head``).
    """
    from napari_pathology.demo import DEMO_SEED, DEMO_SIZE

    words = list(sys.argv[1:] if argv is None else argv)
    command = next((word for word in words if not word.startswith("-")), None)
    parser = build_parser(families=command == "train")  # torch only for the command that needs it
    try:
        args = parser.parse_args(words)
    except SystemExit as stop:  # --help, or an option refused in one line by OneLineParser
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else EXIT_USER_ERROR)
    if getattr(args, "command", None) == "demo":
        args.size = args.size or DEMO_SIZE
        args.seed = DEMO_SEED if args.seed is None else args.seed
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        status = handler(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return status
    except BrokenPipeError:
        _silence_stdout()
        return 1
    except KeyboardInterrupt:
        print("napari-pathology: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not isinstance(exc, user_error_types()):
            raise
        print(f"napari-pathology: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
