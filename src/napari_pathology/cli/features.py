"""The ``features`` sub-command: per-tile features of slides through an encoder, as CLAM-layout h5 files."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from napari_pathology.cli.errors import (
    CommandError,
    interrupted_status,
    refuse_existing,
    sigterm_as_interrupt,
)
from napari_pathology.cli.options import BATCH_SIZE, device_option, fraction, int_option, mpp_option
from napari_pathology.cli.progress_bars import run_with_progress
from napari_pathology.fileio import ensure_writable_dir

#: Patch side in px at the extraction's um/px.
PATCH_SIZE = int_option(16, 4096)


def _print_encoders() -> int:
    from napari_pathology.features import list_encoders
    from napari_pathology.features.backbones import cached_torchvision

    for entry in list_encoders():
        found = entry.default_weights()
        weights = f"trained weights: {found}" if found is not None else "no trained weights found: untrained"
        dim = f"{entry.dim}-d" if entry.dim is not None else "width of its weights"
        geometry = (
            f"{entry.patch_size}px @ {entry.mpp:g} um/px"
            if entry.patch_size is not None and entry.mpp is not None
            else "patch and um/px of its weights"
        )
        print(f"{entry.name}\t{dim}\t{geometry}\t{weights}\t{entry.description}")
    for arch, path in cached_torchvision().items():
        geometry = "width of the model\t224px @ 0.5 um/px"
        print(f"torchvision:{arch}\t{geometry}\ttrained weights: {path}\ttorchvision {arch} backbone")
    print(
        "torchvision:<model>\twidth of the model\t224px @ 0.5 um/px\t"
        "weights from torch's cache or --weights\t"
        "any torchvision classification network without its classifier (e.g. torchvision:resnet18)"
    )
    return 0


def _outputs(slides: list[Path], out: Path) -> list[Path]:
    seen: dict[str, Path] = {}
    for slide in slides:
        stem = slide.stem
        if stem in seen:
            raise CommandError(
                f"{seen[stem]} and {slide} would both be written to {out / (stem + '.h5')}; "
                "run them with different --out folders"
            )
        seen[stem] = slide
    return [out / f"{slide.stem}.h5" for slide in slides]


def _open_slides(args: argparse.Namespace) -> list[Any]:
    """Every slide opened and checked (um/px) before any work: a bad last slide is said at once."""
    from napari_pathology.slide import open_slide

    slides = []
    for path in args.slides:
        slide = open_slide(path, mpp=args.slide_mpp)
        slide.validate()
        slide.require_mpp()
        slides.append(slide)
    return slides


def _extract_one(args: argparse.Namespace, encoder: Any, slide: Any, target: Path) -> None:
    from napari_pathology.cli.analysis import _load_tissue_for_run
    from napari_pathology.features import extract_features
    from napari_pathology.features.slide_files import write_features_h5

    tissue = _load_tissue_for_run(args, slide)
    job = extract_features(
        slide, encoder, tissue=tissue, min_tissue_fraction=args.min_tissue, patch_size=args.patch_size,
        mpp=args.mpp, cache_dir=args.cache or args.out / "cache", batch_size=args.batch_size,
    )  # fmt: skip
    feats = run_with_progress(job, f"{encoder.name} on {slide.name}", args.quiet)
    if len(feats) == 0:
        raise CommandError(
            f"{slide.name}: no tissue tiles at {feats.grid.target_mpp:g} um/px; nothing written"
        )
    write_features_h5(target, feats, encoder, slide.name)
    state = "" if encoder.trained else " (UNTRAINED encoder: random weights)"
    print(f"{target}: {len(feats)} x {feats.features.shape[1]} features{state}")


def _cmd_features(args: argparse.Namespace) -> int:
    if args.list:
        return _print_encoders()
    missing = [flag for flag, value in (("SLIDE", args.slides), ("--encoder", args.encoder),
                                       ("--out", args.out)) if not value]  # fmt: skip
    if missing:
        raise CommandError(f"features needs {', '.join(missing)} (or --list to show the encoders)")
    from napari_pathology.features import get_encoder

    targets = _outputs(args.slides, args.out)
    refuse_existing(targets, args.overwrite, "--out folder")
    ensure_writable_dir(args.out)
    slides = _open_slides(args)
    logging.disable(logging.WARNING)  # the builder's warning is said once, below, in the command's words
    try:
        encoder = get_encoder(args.encoder, weights=args.weights, device=args.device)
    finally:
        logging.disable(logging.NOTSET)
    if not encoder.trained:
        print(
            f"warning: {encoder.provenance.get('warning', encoder.name + ' is untrained')}", file=sys.stderr
        )
    with sigterm_as_interrupt() as received:
        for slide, target in zip(slides, targets, strict=True):
            try:
                _extract_one(args, encoder, slide, target)
            except KeyboardInterrupt:
                print(
                    f"interrupted: the finished batches of {slide.name} are kept in "
                    f"{args.cache or args.out / 'cache'}; run the same command again to resume",
                    file=sys.stderr,
                )
                return interrupted_status(received)
    return 0


def add_parser(sub: Any) -> None:
    """Add ``features`` to the sub-command set ``sub``."""
    features = sub.add_parser(
        "features",
        help="per-tile features of slides through an encoder, written as CLAM-layout DIR/<slide stem>.h5",
    )
    features.add_argument("slides", type=Path, nargs="*", metavar="SLIDE", help="whole-slide images")
    features.add_argument(
        "--encoder", default=None, help="registered encoder (see --list), e.g. resnet50-trunc"
    )
    features.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="weights file (default: trained weights found in torch's cache, else untrained)",
    )
    features.add_argument("--out", type=Path, default=None, help="output folder for <slide stem>.h5")
    features.add_argument(
        "--patch-size",
        type=PATCH_SIZE,
        default=None,
        help="patch side in px at --mpp (default: the encoder's, 256 for resnet50-trunc)",
    )
    features.add_argument(
        "--mpp",
        type=mpp_option,
        default=None,
        help="um/px of the patches (default: the encoder's, 0.5 for resnet50-trunc)",
    )
    features.add_argument("--slide-mpp", type=mpp_option, default=None, help="um/px for slides that lack it")
    features.add_argument("--tissue", default="auto", help="auto (detect), none (every tile) or a mask file")
    features.add_argument("--min-tissue", type=fraction, default=0.5, help="least tissue per patch (0.5)")
    features.add_argument("--batch-size", type=BATCH_SIZE, default=64)
    features.add_argument("--device", type=device_option, default="auto", help="auto, cpu, cuda or cuda:N")
    features.add_argument(
        "--cache", type=Path, default=None, help="feature cache (zarr, resumable; default DIR/cache)"
    )
    features.add_argument("--overwrite", action="store_true", help="replace h5 files that exist already")
    features.add_argument(
        "--list", action="store_true", help="list the encoders and whether weights were found"
    )
    features.add_argument("--quiet", action="store_true", help="no progress bar")
    features.set_defaults(func=_cmd_features)
