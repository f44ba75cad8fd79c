"""The ``napari-pathology`` command.

Sub-commands: ``demo``, ``info``, ``synth``. Errors a user can fix (a broken
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
        return 0
    from napari_pathology._viewer import open_demo_viewer

    open_demo_viewer(path)
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
    except (SlideOpenError, CommandError, FileNotFoundError, ValueError) as exc:
        print(f"napari-pathology: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("napari-pathology: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
