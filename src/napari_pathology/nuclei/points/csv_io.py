"""Nuclei in CSV: this plugin's own table, the detector's, QuPath's and a synthetic slide's truth."""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Sequence
from typing import TextIO

import numpy as np

from napari_pathology.fileio import atomic_write, read_text_file

from .checks import NucleusFileError, _check_measurements, check_centroids
from .labels import NORMAL, SOURCES, TUMOUR, _codes, _parse_source, parse_label
from .table import NucleusPoints

#: CSV columns written by :func:`write_csv`.
CSV_COLUMNS = ("x_um", "y_um", "label", "probability", "area_um2", "source")

_X_ALIASES = ("x_um", "x (um)", "x_µm", "centroid x µm", "centroid x um", "centroid_x_um")
_Y_ALIASES = ("y_um", "y (um)", "y_µm", "centroid y µm", "centroid y um", "centroid_y_um")
_PX_X_ALIASES = ("x", "x_px", "centroid x px", "centroid_x")
_PX_Y_ALIASES = ("y", "y_px", "centroid y px", "centroid_y")


def _format(values: np.ndarray) -> list[str]:
    """Shortest round-trip text of each float (float32 columns stay short); NaN as empty."""
    text = values.astype(str)
    text[~np.isfinite(values)] = ""
    return text.tolist()


def write_csv(points: NucleusPoints, path: str | os.PathLike[str] | TextIO) -> None:
    """Write ``x_um,y_um,label,probability,area_um2,source`` (labels and sources as text, NaN empty).

    Numbers are written with the shortest text that reads back to the same value,
    so :func:`read_csv` gives the table back exactly.

    Parameters
    ----------
    points : NucleusPoints
        The nuclei.
    path : path-like or text file
        Destination file, replaced atomically (:func:`napari_pathology.fileio.atomic_write`:
        a full disk leaves the old file, never a torn one), or an open text stream.

    Raises
    ------
    OutputError
        When the file system refuses the write (one line naming the folder).

    """
    if hasattr(path, "write"):
        _write_rows(path, points)  # type: ignore[arg-type]
        return
    atomic_write(path, lambda fh: _write_rows(fh, points), text=True)


def _write_rows(fh: TextIO, points: NucleusPoints, comment: str | None = None) -> None:
    columns = [
        _format(points.x_um), _format(points.y_um), points.label_names().tolist(),
        _format(points.probability), _format(points.area_um2), points.source_names().tolist(),
    ]  # fmt: skip
    if comment is not None:
        fh.write(comment + "\n")
    writer = csv.writer(fh, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows(zip(*columns, strict=True))


def _column(header: list[str], aliases: Iterable[str]) -> int | None:
    for alias in aliases:
        if alias in header:
            return header.index(alias)
    return None


def _floats(columns: _Columns, col: int | None, n: int, name: str, lines: Sequence[int]) -> np.ndarray:
    if col is None:
        return np.full(n, np.nan)
    text = np.array(columns[col], dtype=object).reshape(n)
    text[text == ""] = "nan"
    try:
        return text.astype(np.float64)  # float() itself ignores surrounding spaces
    except ValueError:
        text = np.array([t.strip() or "nan" for t in text], dtype=object)  # blank cells with spaces
        bad = [i for i, t in enumerate(text) if not _is_float(t)]
        if not bad:
            return text.astype(np.float64)
        raise ValueError(f"row {lines[bad[0]]}: column {name!r} is {text[bad[0]]!r}, not a number") from None


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_csv(
    path: str | os.PathLike[str] | TextIO,
    mpp: float | None = None,
    extent_um: tuple[float, float] | None = None,
) -> NucleusPoints:
    """Read nuclei from a CSV file, tolerantly in form and strictly in content.

    Columns are matched by name (case-insensitive, any order, extra columns
    ignored). Only the centroid is required: ``x_um,y_um`` (also QuPath's
    ``Centroid X µm``), or pixel columns ``x,y`` (``x_px``, ``Centroid X px``)
    when ``mpp`` is given (QuPath's frame: level-0 pixels from the image's
    top-left corner, so ``x_um = x * mpp``). Understood as well:

    - this module's own CSV (:func:`write_csv`, :func:`save_atomic`): exact round trip;
    - the detector's CSV (``NucleusTable.to_csv``): unlabeled, source ``detected``, area kept;
    - a synthetic slide's ``*.nuclei.csv`` (``x_um,y_um,label,radius_um,kind``): its
      ``label`` column is used; without one, ``kind`` "tumour" is tumour and every
      other kind (epithelial, lymphocyte, fibroblast, histiocyte) is normal.

    Labels go through :func:`parse_label`; a missing ``source`` column means
    ``detected`` for a detector CSV and ``imported`` otherwise. Every centroid
    must be finite and on the slide (``extent_um``, when given), probabilities in
    [0, 1] and areas >= 0; the first bad row is named.

    Parameters
    ----------
    path : path-like or text file
        The CSV (a regular, UTF-8 file).
    mpp : float, optional
        Micrometres per level-0 pixel, needed only for pixel columns.
    extent_um : (width_um, height_um), optional
        The slide's size in micrometres; centroids outside it are refused.

    Returns
    -------
    NucleusPoints

    Raises
    ------
    NucleusFileError
        Naming the file and the row: no centroid columns, a cell that is not a
        number, a non-finite or out-of-slide centroid, an unknown label, or a
        file that is not UTF-8 text.

    """
    where = str(getattr(path, "name", None) or ("CSV text" if hasattr(path, "read") else path))
    try:
        return _points_from_rows(*_read_rows(path), mpp, extent_um)
    except NucleusFileError:
        raise
    except (ValueError, FileNotFoundError) as exc:
        raise NucleusFileError(f"{where}: {exc}") from exc


#: First line of an autosave: says what the numbers are and the slide they belong to.
AUTOSAVE_COMMENT = "# napari-pathology nuclei"


def _read_rows(path: str | os.PathLike[str] | TextIO) -> tuple[list[list[str]], list[int]]:
    """Non-blank CSV rows and the file line of each; leading autosave comment lines skipped."""
    if hasattr(path, "read"):
        text = path.read()  # type: ignore[union-attr]
    else:
        text = read_text_file(path, "nucleus CSV")
    rows: list[list[str]] = []
    lines: list[int] = []
    reader = csv.reader(io.StringIO(text))
    start = 1
    try:
        for row in reader:
            if (len(row) > 1 or (row and row[0].strip())) and not (
                not rows and row and row[0].startswith(AUTOSAVE_COMMENT)
            ):
                rows.append(row)
                lines.append(start)
            start = reader.line_num + 1
    except csv.Error as exc:
        raise ValueError(f"row {reader.line_num}: not a readable CSV file ({exc})") from exc
    return rows, lines


def _points_from_rows(
    rows: list[list[str]], lines: list[int], mpp: float | None, extent_um: tuple[float, float] | None = None
) -> NucleusPoints:
    """Parse CSV rows (header first); ValueError with the row and column at fault."""
    if not rows:
        raise ValueError("empty file; expected a header with x_um,y_um")
    header = [" ".join(cell.strip().lower().split()) for cell in rows[0]]
    body, body_lines = rows[1:], lines[1:]
    n = len(body)
    if body and min(map(len, body)) < len(header):
        short = next(i for i, row in enumerate(body) if len(row) < len(header))
        raise ValueError(
            f"row {body_lines[short]} has {len(body[short])} fields but the header has {len(header)} "
            "(a truncated or hand-edited file?)"
        )
    columns = _Columns(body)
    cx, cy = _column(header, _X_ALIASES), _column(header, _Y_ALIASES)
    scale = 1.0
    if cx is None or cy is None:
        cx, cy = _column(header, _PX_X_ALIASES), _column(header, _PX_Y_ALIASES)
        if cx is None or cy is None:
            raise ValueError(
                "no centroid columns; expected x_um,y_um (micrometres) or x,y (pixels, with um/px) "
                f"in the header, found {', '.join(rows[0])}"
            )
        if mpp is None or not (math.isfinite(mpp) and mpp > 0):
            raise ValueError("centroids are in pixels (x,y); give the slide's um/px (mpp) to convert them")
        scale = float(mpp)

    def where(i: int) -> str:
        return f"row {body_lines[i]}"

    x = _floats(columns, cx, n, header[cx], body_lines)
    y = _floats(columns, cy, n, header[cy], body_lines)
    empty = np.isnan(x) | np.isnan(y)
    if empty.any():
        i = int(np.flatnonzero(empty)[0])
        raise ValueError(
            f"{where(i)} has no centroid ({header[cx]}={columns[cx][i]!r}, {header[cy]}={columns[cy][i]!r}); "
            "every row needs a finite x and y"
        )
    with np.errstate(over="ignore"):
        x, y = x * scale, y * scale
    check_centroids(x, y, extent_um, where)
    label = np.zeros(n, np.int8)
    col_label, col_kind = _column(header, ("label", "class", "classification")), _column(header, ("kind",))
    if col_label is not None:
        label[:] = _codes(columns[col_label], parse_label, where)
    elif col_kind is not None:
        kinds = np.char.lower(np.char.strip(np.asarray(columns[col_kind], dtype=str)))
        label[:] = np.where(kinds == "tumour", TUMOUR, NORMAL)
    col_source = _column(header, ("source",))
    if col_source is not None:
        source = _codes(columns[col_source], _parse_source, where)
    else:
        default = "detected" if "hematoxylin" in header else "imported"
        source = np.full(n, SOURCES.index(default), np.int8)
    probability = _floats(columns, _column(header, ("probability",)), n, "probability", body_lines)
    area_col = _column(header, ("area_um2", "area µm^2", "area um^2"))
    area = _floats(columns, area_col, n, "area_um2", body_lines)
    _check_measurements(probability, area, where)
    return NucleusPoints(x, y, label=label, probability=probability, area_um2=area, source=source)


class _Columns:
    """Columns of CSV rows, each built on first use (only the few columns read are built)."""

    def __init__(self, rows: list[list[str]]) -> None:
        self.rows = rows
        self.cache: dict[int, list[str]] = {}

    def __getitem__(self, col: int) -> list[str]:
        if col not in self.cache:
            self.cache[col] = [row[col] for row in self.rows]
        return self.cache[col]
