"""The ``napari-pathology`` command.

Sub-commands: ``demo``, ``info``, ``synth``, ``tissue``, ``nuclei``, ``models``, ``run``,
``train``, ``evaluate``, ``features``. Errors a user can fix (a broken
file, a missing um/px) end the command with one clear line on stderr and a
non-zero exit status, never a traceback.

Layout: :mod:`.errors` (one-line errors, exit statuses, SIGTERM), :mod:`.options`
(the argparse ``type=`` factories), :mod:`.progress_bars`, and one module per
group of sub-commands, each with its parsers: :mod:`.slides` (``demo``, ``info``,
``synth``, ``tissue``, ``nuclei``), :mod:`.analysis` (``models``, ``run``,
``evaluate``), :mod:`.train` (``train``, options generated from the families) and
:mod:`.features` (``features``: encoders, CLAM-layout h5 files).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from napari_pathology.cli import analysis, batch, export, features, slides, train
from napari_pathology.cli.errors import (
    EXIT_USER_ERROR,
    CommandError,
    OneLineParser,
    interrupted_status,
    one_line,
    refuse_existing,
    sigterm_as_interrupt,
    user_error_types,
)
from napari_pathology.cli.options import (
    device_option,
    finite_float,
    fraction,
    int_option,
    mpp_option,
    non_negative_int,
    positive_float,
    positive_int,
    seed_int,
)
from napari_pathology.cli.progress_bars import run_training, run_with_progress
from napari_pathology.cli.slides import format_info, parse_roi

__all__ = [
    "EXIT_USER_ERROR",
    "CommandError",
    "OneLineParser",
    "build_parser",
    "device_option",
    "finite_float",
    "format_info",
    "fraction",
    "int_option",
    "interrupted_status",
    "main",
    "mpp_option",
    "non_negative_int",
    "one_line",
    "parse_roi",
    "positive_float",
    "positive_int",
    "refuse_existing",
    "run_training",
    "run_with_progress",
    "seed_int",
    "sigterm_as_interrupt",
    "user_error_types",
]


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
    slides.add_parsers(sub)  # demo, info, synth, tissue, nuclei
    analysis.add_parsers(sub)  # models, run
    train.add_parser(sub, families=families)
    analysis.add_evaluate_parser(sub)
    features.add_parser(sub)
    export.add_parser(sub)
    batch.add_parser(sub)
    return parser


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
