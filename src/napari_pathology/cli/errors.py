"""How a command ends: one-line errors, exit statuses, refusing to overwrite, SIGTERM as Ctrl-C.

Errors a user can fix (a broken file, a missing um/px) end the command with
one clear line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from napari_pathology.fileio import OutputError

#: Exit status for errors in the user's input (bad file, bad option).
EXIT_USER_ERROR = 2


class CommandError(Exception):
    """An error to report to the user as one line, without a traceback."""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``prog: error: message`` in one line and exit with status 2."""
        text = " ".join(str(message).split())
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {text} (see {self.prog} --help)\n")


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
