"""The autosave beside a slide: where it goes, atomic writes, reading it back, setting a bad one aside."""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from napari_pathology.fileio import atomic_write, keep_aside, output_error

from .checks import NucleusFileError
from .csv_io import AUTOSAVE_COMMENT, _points_from_rows, _read_rows, _write_rows
from .table import NucleusPoints

#: Suffix of the autosave file beside a slide (``slide.svs`` -> ``slide.svs.nuclei.csv``).
SIDECAR_SUFFIX = ".nuclei.csv"


def sidecar_path(slide_path: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the nucleus annotations of a slide are autosaved.

    ``<slide file name>.nuclei.csv`` (e.g. ``case1.svs.nuclei.csv``; the full
    file name keeps it apart from a synthetic slide's ``case1.nuclei.csv``
    ground truth) beside the slide, or inside ``out_dir`` when it is given or
    when the slide's folder is not writable. Without ``out_dir`` the fallback is
    ``nuclei/`` in the user data folder, under a name that carries a digest of the
    slide's full path, so two read-only slides with the same name never share an
    autosave (an autosave from before that change, named after the slide alone, is
    still used when it is the only one).

    Parameters
    ----------
    slide_path : path-like
        The slide file.
    out_dir : path-like, optional
        Folder for the autosave file (created when needed).

    Returns
    -------
    Path

    Raises
    ------
    OutputError
        When the fallback folder cannot be created (one line naming it).

    """
    slide_path = Path(slide_path)
    name = slide_path.name + SIDECAR_SUFFIX
    if out_dir is None:
        folder = slide_path.parent
        if os.access(folder, os.W_OK):
            return folder / name
        from napari_pathology.slide.settings import user_data_folder, user_file_for

        out_dir = user_data_folder() / "nuclei"
        legacy, unique = out_dir / name, user_file_for(slide_path, out_dir, SIDECAR_SUFFIX)
        return legacy if legacy.is_file() and not unique.exists() else _made(unique)
    return _made(Path(out_dir) / name)


def _made(path: Path) -> Path:
    """``path`` once its folder exists (OutputError naming the folder otherwise)."""
    out_dir = path.parent
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise output_error(error, out_dir) from error
    return path


def save_atomic(
    points: NucleusPoints,
    path: str | os.PathLike[str],
    mpp: tuple[float, float] | None = None,
    extent_um: tuple[float, float] | None = None,
) -> Path:
    """Write the autosave CSV so that a crash or a full disk mid-write leaves the previous file intact.

    Goes through :func:`napari_pathology.fileio.atomic_write`. With ``mpp`` or
    ``extent_um``, a first comment line records the slide's um/px and size at
    the time of writing (coordinates stay in micrometres), so that a reader can
    tell when the slide's um/px changed since (:func:`sidecar_context`).

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    OutputError
        When the file system refuses the write (one line naming the folder).

    """
    comment = None
    if mpp is not None or extent_um is not None:
        parts = [f"{AUTOSAVE_COMMENT} autosave", "x_um y_um in micrometres from the top-left corner"]
        if mpp is not None:
            parts.append("mpp=" + " ".join(repr(float(v)) for v in mpp))
        if extent_um is not None:
            parts.append("extent_um=" + " ".join(repr(float(v)) for v in extent_um))
        comment = "; ".join(parts)
    return atomic_write(path, lambda fh: _write_rows(fh, points, comment), text=True)


def sidecar_context(path: str | os.PathLike[str]) -> dict[str, tuple[float, float]]:
    """The slide's ``mpp`` and ``extent_um`` recorded in an autosave's first line (empty when none).

    Reads only the first line; a missing, unreadable or foreign file gives ``{}``.
    """
    from napari_pathology.fileio import require_regular_file

    try:
        with open(require_regular_file(path, "nucleus autosave"), encoding="utf-8-sig") as fh:
            first = fh.readline(4096)
    except (OSError, ValueError):
        return {}
    if not first.startswith(AUTOSAVE_COMMENT):
        return {}
    out: dict[str, tuple[float, float]] = {}
    for part in first.strip().split(";"):
        key, _, value = part.strip().partition("=")
        if key in ("mpp", "extent_um"):
            try:
                pair = tuple(float(v) for v in value.split())
            except ValueError:
                continue
            if len(pair) == 2 and all(math.isfinite(v) and v > 0 for v in pair):
                out[key] = pair  # type: ignore[assignment]
    return out


def load_sidecar(
    path: str | os.PathLike[str], extent_um: tuple[float, float] | None = None
) -> NucleusPoints | None:
    """Read an autosave file; None when there is none.

    Parameters
    ----------
    path : path-like
        The autosave (:func:`sidecar_path`).
    extent_um : (width_um, height_um), optional
        The slide's size; an autosave with nuclei outside it is refused.

    Raises
    ------
    NucleusFileError
        For a corrupt file (torn row, bad header, non-finite or out-of-slide
        centroid, not UTF-8, not a regular file), naming it and the row; the file
        is left untouched (:func:`restore_sidecar` moves it aside).

    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    try:
        return _points_from_rows(*_read_rows(path), None, extent_um)
    except (OSError, ValueError) as exc:
        raise NucleusFileError(
            f"the nucleus autosave {path} is corrupt or unreadable ({exc}); it was left untouched"
        ) from exc


class AutosaveRefused(NucleusFileError):
    """An autosave that was refused on open; ``kept_as`` is where it now is (None: could not move it)."""

    def __init__(self, message: str, kept_as: Path | None) -> None:
        super().__init__(message)
        self.kept_as = kept_as


@dataclass(frozen=True)
class Restored:
    """What :func:`restore_sidecar` found: the nuclei and a note for the user (empty when none)."""

    points: NucleusPoints | None
    note: str = ""


def restore_sidecar(
    path: str | os.PathLike[str],
    extent_um: tuple[float, float] | None = None,
    mpp: tuple[float, float] | None = None,
) -> Restored:
    """Read an autosave to restore it; a refused one is moved aside, so no later save can overwrite it.

    Parameters
    ----------
    path : path-like
        The autosave.
    extent_um : (width_um, height_um), optional
        The slide's size now.
    mpp : (float, float), optional
        The slide's um/px now. When the autosave recorded another um/px, its
        nuclei are checked against the size it recorded and the note says that
        they will be misplaced until the um/px is set back.

    Returns
    -------
    Restored
        ``points`` is None when there is no autosave.

    Raises
    ------
    AutosaveRefused
        When the file cannot be read. It has been renamed to
        ``<name>.refused-<time>.csv`` beside itself (``kept_as``); when even
        that failed, ``kept_as`` is None and the caller must not autosave there.

    """
    path = Path(path)
    context = sidecar_context(path)
    note = ""
    saved_mpp = context.get("mpp")
    if mpp is not None and saved_mpp is not None and not np.allclose(saved_mpp, mpp, rtol=1e-3, atol=0):
        note = (
            f"the autosaved nuclei were placed with {saved_mpp[0]:g} um/px, the slide now has {mpp[0]:g} "
            f"um/px: set {saved_mpp[0]:g} um/px in the Slide panel or they land in the wrong place"
        )
        extent_um = context.get("extent_um")
    try:
        return Restored(load_sidecar(path, extent_um), note)
    except NucleusFileError as exc:
        problem = f"the nucleus autosave {path} is corrupt or unreadable ({exc.__cause__ or exc})"
        try:
            kept = keep_aside(path, "refused")
        except OSError as error:
            raise AutosaveRefused(
                f"{problem}; it could not be moved aside ({error}), so autosave is off for this slide", None
            ) from exc
        raise AutosaveRefused(
            f"{problem}. Nothing was lost: it was kept as {kept} and a new autosave starts", kept
        ) from exc


class AutosaveWriter:
    """Write a slide's autosave off the Qt thread: in order, never over a file it does not hold.

    Saves are serialised under one lock and a save superseded by a newer one is
    skipped, so a slow write can never land after a newer one. A file already
    at the path that this writer did not write or restore for the same layer
    (an autosave from before the layer was deleted, or a slide reopened) is
    first kept aside with a timestamped name (``fileio.keep_aside``).
    """

    #: Shared by every panel of the process: which layer (token) each autosave file holds,
    #: so that closing and reopening the dock does not set the autosave aside again.
    _lock = threading.Lock()
    _owners: ClassVar[dict[str, str]] = {}

    def __init__(self) -> None:
        self._latest = 0

    def claim(self, path: Path, token: str) -> None:
        """Record that the file at ``path`` holds the nuclei of the layer named ``token`` (restored)."""
        with self._lock:
            self._owners[str(path)] = token

    def ticket(self) -> int:
        """A number for the next save; only the newest ticket's save is written."""
        self._latest += 1
        return self._latest

    def save(
        self,
        ticket: int,
        points: NucleusPoints,
        path: Path,
        token: str,
        mpp: tuple[float, float],
        extent_um: tuple[float, float],
    ) -> tuple[int, Path | None] | None:
        """Write ``points`` to ``path``; (nuclei written, file kept aside or None), None when superseded."""
        with self._lock:
            if ticket != self._latest:
                return None
            kept = None
            if (path.exists() or path.is_symlink()) and self._owners.get(str(path)) != token:
                kept = keep_aside(path, "earlier")
            save_atomic(points, path, mpp, extent_um)
            self._owners[str(path)] = token
            return len(points), kept
