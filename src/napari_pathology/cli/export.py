"""The ``export`` sub-command: a trained model written in another tool's checkpoint format."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from napari_pathology.cli.errors import CommandError, refuse_existing


def _cmd_export(args: argparse.Namespace) -> int:
    from napari_pathology.families import family_of
    from napari_pathology.models import resolve_model

    model = resolve_model(args.model, classes=args.classes)
    try:
        family = family_of(model.spec)
    except KeyError:
        raise CommandError(f"{model.spec.name}: its family {model.spec.family!r} is not installed") from None
    formats = family.export_formats()
    if args.format not in formats:
        known = ", ".join(formats) or "none"
        raise CommandError(
            f"{model.spec.name} ({family.name}) cannot be written as {args.format!r} (its formats: {known})"
        )
    refuse_existing([args.out], args.overwrite, "--out")
    path = formats[args.format](model, args.out)
    print(f"{model.spec.name} written as a {args.format} checkpoint: {path}")
    return 0


def add_parser(sub: Any) -> None:
    """Add ``export`` to the sub-command set ``sub``."""
    export = sub.add_parser(
        "export", help="write a trained model in another tool's format (e.g. CLAM's bare state dict)"
    )
    export.add_argument("model", help="registered model name or checkpoint path")
    export.add_argument("--format", required=True, help="the other tool's format, e.g. clam")
    export.add_argument("--out", type=Path, required=True, help="the file to write")
    export.add_argument("--classes", default=None, help="class names when MODEL is another tool's checkpoint")
    export.add_argument("--overwrite", action="store_true", help="replace an existing file")
    export.set_defaults(func=_cmd_export)
