"""Nucleus annotations: labelled points, purity, CSV / GeoJSON in and out, autosave.

A :class:`NucleusPoints` table holds one row per nucleus: its centroid in slide
micrometres, a label (``unlabeled``, ``tumour``, ``normal``, ``other``), a
tumour probability from a classifier (NaN when not classified), an area (NaN
when unknown, e.g. a nucleus clicked by hand) and where it came from
(``detected``, ``manual``, ``imported``).

Purity follows Noorbakhsh et al. (``METHODS.md`` section 3): ground-truth purity
is tumour / (tumour + normal) labelled nuclei (``other`` and ``unlabeled`` are
left out), predicted purity is the mean tumour probability over the classified
nuclei. Stroma, lymphocytes and other non-tumour cells count as ``normal``
(they are the "normal" cells of tumour purity); ``other`` is for nuclei to
leave out of purity (ambiguous cells, necrosis, artefacts).

No Qt, no napari: numpy and the standard library only.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from napari_pathology.fileio import atomic_write, keep_aside, output_error, read_json_file, read_text_file
from napari_pathology.geometry import Polygon, points_in_polygons, polygon_area

if TYPE_CHECKING:
    from napari_pathology.nuclei.detect import NucleusTable

#: Nucleus labels; the index is the integer code stored in :attr:`NucleusPoints.label`.
LABELS = ("unlabeled", "tumour", "normal", "other")
#: Where a nucleus came from; the index is the code stored in :attr:`NucleusPoints.source`.
SOURCES = ("detected", "manual", "imported")
#: Display colour of each label (RGB 0-255): tumour red and normal sky blue stay apart for
#: red-green colour-blind eyes (Okabe-Ito blue and yellow) and stand out on pink-purple H&E.
LABEL_COLOURS: dict[str, tuple[int, int, int]] = {
    "unlabeled": (170, 170, 170),
    "tumour": (230, 25, 30),
    "normal": (86, 180, 233),
    "other": (240, 228, 66),
}
#: QuPath classification name of each label (``unlabeled`` is written unclassified).
QUPATH_CLASSES: dict[str, str] = {"tumour": "Tumor", "normal": "Normal", "other": "Other"}
#: CSV columns written by :func:`write_csv`.
CSV_COLUMNS = ("x_um", "y_um", "label", "probability", "area_um2", "source")

UNLABELED, TUMOUR, NORMAL, OTHER = range(4)

_SYNONYMS: dict[str, int] = {
    name: code
    for code, names in (
        (UNLABELED, "unlabeled|unlabelled|none|unknown|unclassified|u|"),
        (TUMOUR, "tumour|tumor|t|cancer|malignant|neoplastic|tumour cell|tumor cell"),
        (
            NORMAL,
            "normal|n|benign|non-tumour|non-tumor|nontumour|nontumor|stroma|stromal|immune|immune cells|"
            "lymphocyte|lymphocytes|fibroblast|epithelial|histiocyte|macrophage",
        ),
        (OTHER, "other|o|necrosis|ignore|ignore*|exclude|artefact|artifact"),
    )
    for name in names.split("|")
}


#: Largest coordinate accepted anywhere, in micrometres (10 m: far beyond any slide; catches 1e12).
MAX_COORDINATE_UM = 1e7


class NucleusFileError(ValueError):
    """A nucleus annotation file that cannot be read (the message names the file and the fix)."""


def check_centroids(
    x_um: np.ndarray,
    y_um: np.ndarray,
    extent_um: tuple[float, float] | None = None,
    where: Callable[[int], str] = lambda i: f"row {i + 1}",
) -> None:
    """Refuse non-finite, negative, absurd or (given the slide's extent) out-of-slide centroids.

    Parameters
    ----------
    x_um, y_um : ndarray
        Centroids in slide micrometres (origin at the slide's top-left corner).
    extent_um : (width_um, height_um), optional
        The slide's size; centroids beyond it are refused.
    where : callable
        Names entry ``i`` in the message (``"row 7"``, ``"feature 3"``).

    Raises
    ------
    ValueError
        Naming the first bad entry, its values and the likely cause.

    """
    x = np.asarray(x_um, np.float64).reshape(-1)
    y = np.asarray(y_um, np.float64).reshape(-1)
    finite = np.isfinite(x) & np.isfinite(y)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        raise ValueError(
            f"{where(i)}: centroid ({float(x[i])!r}, {float(y[i])!r}) is not a pair of finite numbers; "
            "every nucleus needs a finite x and y"
        )
    limit_x, limit_y = (MAX_COORDINATE_UM, MAX_COORDINATE_UM) if extent_um is None else extent_um
    slack_x, slack_y = 1e-9 * (1 + abs(limit_x)), 1e-9 * (1 + abs(limit_y))  # float rounding at the edge
    outside = (x < -slack_x) | (y < -slack_y) | (x > limit_x + slack_x) | (y > limit_y + slack_y)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        size = (
            f"the slide ({limit_x:.1f} x {limit_y:.1f} um)"
            if extent_um is not None
            else f"any slide (0 to {MAX_COORDINATE_UM:g} um)"
        )
        raise ValueError(
            f"{where(i)}: centroid ({x[i]:.6g}, {y[i]:.6g}) um lies outside {size}; "
            f"{int(outside.sum())} of {len(x)} nuclei do: wrong slide, or pixels read as micrometres?"
        )


def _check_measurements(probability: np.ndarray, area: np.ndarray, where: Callable[[int], str]) -> None:
    """Probabilities in [0, 1] and areas >= 0 (finite), or NaN for unknown."""
    p = np.asarray(probability, np.float64)
    bad = ~np.isnan(p) & ~((p >= 0) & (p <= 1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{where(i)}: probability {p[i]!r} is not in [0, 1] (leave it empty when unknown)")
    a = np.asarray(area, np.float64)
    bad = ~np.isnan(a) & ~(np.isfinite(a) & (a >= 0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{where(i)}: area {a[i]!r} um^2 is not a finite number >= 0 (leave it empty)")


def parse_label(text: str | int) -> int:
    """The code in :data:`LABELS` of a label name, tolerantly.

    Case and surrounding spaces are ignored. Accepted: ``tumour``/``tumor``/``t``
    (also ``cancer``, ``malignant``); ``normal``/``n`` and the non-tumour cell
    types (``stroma``, ``immune cells``, ``lymphocyte``, ``fibroblast``,
    ``epithelial``...), which count as normal for purity; ``other``/``o``
    (also ``necrosis``, ``ignore*``); ``unlabeled``/``unlabelled``/``u``/``none``
    and the empty string. A Python ``int`` is taken as a code; digit strings are
    refused because ``"1"`` could mean tumour in a 0/1 file and a code here.

    Parameters
    ----------
    text : str or int
        Label name (or integer code).

    Returns
    -------
    int
        Index into :data:`LABELS`.

    Raises
    ------
    ValueError
        For an unknown name, listing the accepted ones.

    Examples
    --------
    >>> parse_label("Tumor"), parse_label(" stroma "), parse_label("u")
    (1, 2, 0)

    """
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        if 0 <= int(text) < len(LABELS):
            return int(text)
        raise ValueError(f"label code must be 0-{len(LABELS) - 1} ({', '.join(LABELS)}), got {text}")
    key = " ".join(str(text).strip().lower().split())
    if key in _SYNONYMS:
        return _SYNONYMS[key]
    if key.isdigit():
        raise ValueError(f"numeric label {text!r} is ambiguous; write the name: one of {', '.join(LABELS)}")
    raise ValueError(
        f"unknown nucleus label {text!r}; use one of {', '.join(LABELS)} "
        "(also accepted: tumor, t, n, u, o, stroma, immune cells, lymphocyte, necrosis)"
    )


def _parse_source(text: str | int) -> int:
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        if 0 <= int(text) < len(SOURCES):
            return int(text)
    else:
        key = str(text).strip().lower()
        if key in SOURCES:
            return SOURCES.index(key)
        if key == "":
            return SOURCES.index("imported")
    raise ValueError(f"unknown nucleus source {text!r}; use one of {', '.join(SOURCES)}")


def _f64() -> np.ndarray:
    return np.zeros(0, np.float64)


def _f32() -> np.ndarray:
    return np.zeros(0, np.float32)


def _i8() -> np.ndarray:
    return np.zeros(0, np.int8)


_DTYPES = {
    "x_um": np.float64, "y_um": np.float64, "label": np.int8,
    "probability": np.float32, "area_um2": np.float32, "source": np.int8,
}  # fmt: skip


@dataclass(frozen=True, eq=False)
class NucleusPoints:
    """Nuclei as labelled points, one row per nucleus, coordinates in slide micrometres.

    Attributes
    ----------
    x_um, y_um : ndarray
        ``(N,)`` float64 centroids (level-0 frame, origin at the top-left corner); always
        finite (a table cannot hold, so no writer can write, an empty or NaN centroid).
    label : ndarray
        ``(N,)`` int8 codes into :data:`LABELS` (names are accepted and parsed).
    probability : ndarray
        ``(N,)`` float32 tumour probability, NaN where not classified.
    area_um2 : ndarray
        ``(N,)`` float32 nucleus area, NaN where unknown.
    source : ndarray
        ``(N,)`` int8 codes into :data:`SOURCES` (names are accepted).

    Examples
    --------
    >>> pts = NucleusPoints(np.array([1.0, 2.0, 3.0]), np.zeros(3), label=np.array([1, 2, 1]))
    >>> pts.counts()["tumour"], round(pts.purity(), 3)
    (2, 0.667)

    """

    x_um: np.ndarray = field(default_factory=_f64)
    y_um: np.ndarray = field(default_factory=_f64)
    label: np.ndarray | None = None
    probability: np.ndarray | None = None
    area_um2: np.ndarray | None = None
    source: np.ndarray | None = None

    def __post_init__(self) -> None:
        """Cast the columns, fill missing ones and check that all have one length."""
        x = np.asarray(self.x_um, np.float64).reshape(-1) if np.ndim(self.x_um) <= 1 else None
        if x is None:
            raise ValueError(f"x_um must be 1-D, got shape {np.shape(self.x_um)}")
        n = len(x)
        fill = {"label": UNLABELED, "probability": np.nan, "area_um2": np.nan, "source": 0}
        for name, dtype in _DTYPES.items():
            value = getattr(self, name)
            if value is None:
                arr = np.full(n, fill[name], dtype)
            else:
                raw = np.asarray(value)
                if raw.ndim > 1:
                    raise ValueError(f"column {name!r} must be 1-D, got shape {raw.shape}")
                if name in ("label", "source") and raw.dtype.kind in "USO":  # names, not codes
                    raw = _codes(
                        raw.reshape(-1).astype(str), parse_label if name == "label" else _parse_source
                    )
                arr = np.ascontiguousarray(raw.reshape(-1), dtype=dtype)
            if len(arr) != n:
                raise ValueError(f"column {name!r} has {len(arr)} rows but x_um has {n}; give equal lengths")
            object.__setattr__(self, name, arr)
        if n and not (np.isfinite(self.x_um).all() and np.isfinite(self.y_um).all()):
            bad = int(np.flatnonzero(~(np.isfinite(self.x_um) & np.isfinite(self.y_um)))[0])
            raise ValueError(
                f"nucleus {bad}: centroid ({float(self.x_um[bad])!r}, {float(self.y_um[bad])!r}) "
                "is not finite; every nucleus needs a finite x and y"
            )
        if n and (self.label.min() < 0 or self.label.max() >= len(LABELS)):
            raise ValueError(f"label codes must be 0-{len(LABELS) - 1} ({', '.join(LABELS)})")
        if n and (self.source.min() < 0 or self.source.max() >= len(SOURCES)):
            raise ValueError(f"source codes must be 0-{len(SOURCES) - 1} ({', '.join(SOURCES)})")

    # ------------------------------------------------------------------ construction
    def __len__(self) -> int:
        """Number of nuclei."""
        return int(self.x_um.shape[0])

    def __repr__(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in self.counts().items() if v and k != "total")
        return f"<NucleusPoints {len(self)} nuclei{': ' + counts if counts else ''}>"

    def xy_um(self) -> np.ndarray:
        """Centroids as an ``(N, 2)`` array of ``(x_um, y_um)``."""
        return np.column_stack([self.x_um, self.y_um]).reshape(-1, 2)

    @classmethod
    def empty(cls) -> NucleusPoints:
        """A table with no nuclei."""
        return cls()

    @classmethod
    def from_table(cls, table: NucleusTable, source: str = "detected") -> NucleusPoints:
        """Unlabeled, unclassified points from a detector's :class:`NucleusTable` (its area kept)."""
        code = _parse_source(source)
        return cls(table.x_um, table.y_um, area_um2=table.area_um2, source=np.full(len(table), code, np.int8))

    @classmethod
    def concat(cls, *parts: NucleusPoints) -> NucleusPoints:
        """Rows of several tables, in order (``concat(a, b)``; ``concat(*tables)`` for a list)."""
        if not parts:
            return cls()
        return cls(**{name: np.concatenate([getattr(p, name) for p in parts]) for name in _DTYPES})

    def subset(self, index: np.ndarray | Sequence[int] | slice) -> NucleusPoints:
        """The rows selected by a boolean mask, integer indices or a slice (a copy)."""
        if not isinstance(index, slice):
            index = np.asarray(index)
            if index.dtype == bool and index.shape != (len(self),):
                raise ValueError(f"boolean mask has shape {index.shape}, expected ({len(self)},)")
        return NucleusPoints(**{name: getattr(self, name)[index].copy() for name in _DTYPES})

    def with_labels(self, index: np.ndarray | Sequence[int] | slice, label: str | int) -> NucleusPoints:
        """A copy with the rows in ``index`` (mask, indices or slice) set to ``label``."""
        code = parse_label(label)
        labels = self.label.copy()
        labels[index] = code
        return self._replace(label=labels)

    def with_probabilities(
        self, probability: np.ndarray, index: np.ndarray | Sequence[int] | slice | None = None
    ) -> NucleusPoints:
        """A copy with tumour probabilities set (all rows, or the rows in ``index``)."""
        values = self.probability.copy()
        values[slice(None) if index is None else index] = np.asarray(probability, np.float32)
        return self._replace(probability=values)

    def _replace(self, **columns: np.ndarray) -> NucleusPoints:
        data = {name: getattr(self, name) for name in _DTYPES}
        data.update(columns)
        return NucleusPoints(**data)

    # ------------------------------------------------------------------ summaries
    def counts(self) -> dict[str, int]:
        """Number of nuclei per label (all four labels) and ``total``."""
        per = np.bincount(self.label.astype(np.int64), minlength=len(LABELS))
        out = {name: int(per[i]) for i, name in enumerate(LABELS)}
        out["total"] = len(self)
        return out

    def purity(self) -> float | None:
        """Ground-truth purity tumour / (tumour + normal), None without tumour or normal labels."""
        return _purity(self.counts())

    def predicted_purity(self) -> float | None:
        """Mean tumour probability over classified nuclei (finite probability), None when none is."""
        p = self.probability[np.isfinite(self.probability)]
        return float(np.mean(p, dtype=np.float64)) if len(p) else None

    def label_names(self) -> np.ndarray:
        """Labels as text (``(N,)`` array of str)."""
        return np.asarray(LABELS)[self.label]

    def source_names(self) -> np.ndarray:
        """Sources as text (``(N,)`` array of str)."""
        return np.asarray(SOURCES)[self.source]


def _purity(counts: Mapping[str, int]) -> float | None:
    known = counts["tumour"] + counts["normal"]
    return counts["tumour"] / known if known else None


@dataclass(frozen=True)
class RegionSummary:
    """Counts and purity of the nuclei inside one region.

    Attributes
    ----------
    name : str
        Region name.
    n : int
        Nuclei inside.
    counts : dict
        Nuclei per label (all of :data:`LABELS`).
    purity : float or None
        Ground truth tumour / (tumour + normal); None without such labels.
    predicted_purity : float or None
        Mean tumour probability of the classified nuclei inside; None when none is.
    difference : float or None
        ``predicted_purity - purity``; None when either is missing.
    area_um2 : float
        Region area (outer ring minus holes).
    """

    name: str
    n: int
    counts: dict[str, int]
    purity: float | None
    predicted_purity: float | None
    difference: float | None
    area_um2: float = 0.0


def region_summaries(
    points: NucleusPoints, polygons_um: Sequence[Polygon], names: Sequence[str] | None = None
) -> list[RegionSummary]:
    """Counts and purities of the nuclei inside each region.

    Parameters
    ----------
    points : NucleusPoints
        The nuclei.
    polygons_um : sequence of polygon
        Regions ``[outer, hole, ...]`` in micrometres (see :mod:`napari_pathology.geometry`).
        Regions may overlap; a nucleus counts in every region that holds it.
    names : sequence of str, optional
        One name per region; ``"region 1"``, ``"region 2"``... by default.

    Returns
    -------
    list of RegionSummary
        One per polygon, in order.

    """
    if names is not None and len(names) != len(polygons_um):
        raise ValueError(f"got {len(names)} names for {len(polygons_um)} regions; give one name per region")
    xy = points.xy_um()
    out = []
    for i, polygon in enumerate(polygons_um):
        inside = points_in_polygons(xy, [polygon]) == 0
        sub = points.subset(inside)
        counts = {k: v for k, v in sub.counts().items() if k != "total"}
        truth, predicted = _purity(counts), sub.predicted_purity()
        out.append(
            RegionSummary(
                name=str(names[i]) if names is not None else f"region {i + 1}",
                n=len(sub),
                counts=counts,
                purity=truth,
                predicted_purity=predicted,
                difference=None if truth is None or predicted is None else predicted - truth,
                area_um2=polygon_area(polygon),
            )
        )
    return out


# --------------------------------------------------------------------------- CSV

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


def _codes(names: Sequence[str], parse: Any, where: Callable[[int], str] | None = None) -> np.ndarray:
    """Parse each distinct name once (fast for 10^6 rows of a few names); an error names its first row."""
    unique, inverse = np.unique(np.asarray(names, dtype=str), return_inverse=True)
    codes = []
    for k, name in enumerate(unique):
        try:
            codes.append(parse(str(name)))
        except ValueError as exc:
            if where is None:
                raise
            raise ValueError(f"{where(int(np.flatnonzero(inverse == k)[0]))}: {exc}") from None
    table = np.array(codes, np.int8)
    return table[inverse].astype(np.int8) if len(unique) else np.zeros(0, np.int8)


# --------------------------------------------------------------------------- GeoJSON


def _mpp_pair(mpp: float | Sequence[float]) -> tuple[float, float]:
    pair = (float(mpp), float(mpp)) if np.ndim(mpp) == 0 else tuple(float(v) for v in mpp)  # type: ignore[arg-type]
    if len(pair) != 2 or not all(math.isfinite(v) and v > 0 for v in pair):
        raise ValueError(f"mpp (um per pixel) must be a positive number or an (x, y) pair, got {mpp!r}")
    return pair  # type: ignore[return-value]


def to_geojson(
    points: NucleusPoints, mpp: float | Sequence[float], object_type: str = "annotation"
) -> dict[str, Any]:
    """A GeoJSON FeatureCollection that QuPath imports (File > Import objects, or drag and drop).

    One ``Point`` feature per nucleus, in level-0 **pixels** from the image's top-left
    corner (QuPath's frame: ``x_px = x_um / mpp``). ``properties`` hold QuPath's
    ``objectType``, a ``classification`` ``{name, color}`` (Tumor, Normal, Other;
    none for unlabeled nuclei), ``measurements`` (``probability``, ``area_um2``;
    NaN left out) and this plugin's own ``label`` and ``source``, so that
    :func:`from_geojson` gives the table back exactly.

    Parameters
    ----------
    points : NucleusPoints
        The nuclei.
    mpp : float or (float, float)
        Level-0 micrometres per pixel of the slide.
    object_type : str
        ``"annotation"`` (QuPath point annotations, editable) or ``"detection"``
        (lighter in QuPath for 10^5+ nuclei).

    Returns
    -------
    dict
        The FeatureCollection (write it with :func:`write_geojson`).

    """
    if object_type not in ("annotation", "detection"):
        raise ValueError(f"object_type must be 'annotation' or 'detection', got {object_type!r}")
    mx, my = _mpp_pair(mpp)
    x_px = (points.x_um / mx).tolist()
    y_px = (points.y_um / my).tolist()
    # float32 through its shortest text, so JSON shows 0.9 rather than 0.8999999761581421
    prob, area = (_short(points.probability), _short(points.area_um2))
    labels, sources = points.label.tolist(), points.source.tolist()
    classes = [
        None if i == UNLABELED else {"name": QUPATH_CLASSES[n], "color": list(LABEL_COLOURS[n])}
        for i, n in enumerate(LABELS)
    ]
    features = []
    for i in range(len(points)):
        properties: dict[str, Any] = {"objectType": object_type}
        if classes[labels[i]] is not None:
            properties["classification"] = classes[labels[i]]
        measurements = {
            k: v for k, v in (("probability", prob[i]), ("area_um2", area[i])) if not math.isnan(v)
        }
        if measurements:
            properties["measurements"] = measurements
        properties["label"] = LABELS[labels[i]]
        properties["source"] = SOURCES[sources[i]]
        features.append(
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": [x_px[i], y_px[i]]},
             "properties": properties}
        )  # fmt: skip
    return {"type": "FeatureCollection", "features": features}


def _short(values: np.ndarray) -> list[float]:
    return values.astype(str).astype(np.float64).tolist()


def _features(obj: Any) -> list[Any]:
    if isinstance(obj, list):
        return obj
    if not isinstance(obj, dict):
        raise ValueError(f"GeoJSON must be an object or a list of features, got {type(obj).__name__}")
    kind = obj.get("type")
    if kind == "FeatureCollection":
        features = obj.get("features") or []
        if not isinstance(features, list):
            raise ValueError(f"GeoJSON 'features' must be a list, got {type(features).__name__}")
        return features
    if kind == "Feature":
        return [obj]
    if kind == "GeometryCollection":
        geometries = obj.get("geometries") or []
        if not isinstance(geometries, list):
            raise ValueError(f"GeoJSON 'geometries' must be a list, got {type(geometries).__name__}")
        return [{"type": "Feature", "geometry": g, "properties": {}} for g in geometries]
    if kind in ("Point", "MultiPoint", "Polygon", "MultiPolygon", "LineString", "MultiLineString"):
        return [{"type": "Feature", "geometry": obj, "properties": {}}]
    raise ValueError(f"not GeoJSON: expected a FeatureCollection, a Feature or a geometry, got type {kind!r}")


def _measurement(measurements: Any, name: str) -> float:
    if isinstance(measurements, dict):
        value = measurements.get(name)
    elif isinstance(measurements, list):  # QuPath before v0.4: [{"name": ..., "value": ...}]
        value = next(
            (m.get("value") for m in measurements if isinstance(m, dict) and m.get("name") == name), None
        )
    else:
        value = None
    if isinstance(value, bool):
        return math.nan
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _feature_label(properties: dict[str, Any], unknown: dict[str, int]) -> int:
    if "label" in properties:
        return parse_label(properties["label"])
    classification = properties.get("classification")
    name = classification.get("name") if isinstance(classification, dict) else classification
    if name is None:
        return UNLABELED
    try:
        return parse_label(str(name))
    except ValueError:
        unknown[str(name)] = unknown.get(str(name), 0) + 1
        return OTHER


def _coordinate(value: Any) -> float:
    """A JSON number as float; anything else (text, null, true) is refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"coordinate {value!r} is not a number")
    return float(value)


def from_geojson(
    obj: dict[str, Any] | list[Any],
    mpp: float | Sequence[float],
    extent_um: tuple[float, float] | None = None,
) -> NucleusPoints:
    """Nuclei from GeoJSON points in level-0 pixels (QuPath's export, or :func:`to_geojson`'s).

    Reads ``Point`` and ``MultiPoint`` features (every point of a MultiPoint gets
    its feature's class) from a FeatureCollection, a single feature, a geometry
    or a bare list of features. The label is the plugin's own ``label``
    property when present, else the QuPath classification name
    (case-insensitive, through :func:`parse_label`: Tumor, Normal, Stroma,
    Immune cells, Other...); an unknown class becomes ``other`` with a warning.
    Non-point features (polygons, lines) are skipped with a warning, and a file
    with only such features is refused. Coordinates must be finite numbers on
    the slide (``extent_um``, when given); the first bad feature is named
    (``feature 3`` is the third in the file).

    Parameters
    ----------
    obj : dict or list
        Parsed GeoJSON.
    mpp : float or (float, float)
        Level-0 micrometres per pixel of the slide.
    extent_um : (width_um, height_um), optional
        The slide's size in micrometres; points outside it are refused.

    Returns
    -------
    NucleusPoints
        Sources from the ``source`` property, ``imported`` when absent.

    Raises
    ------
    ValueError
        For something that is not GeoJSON, has no point features but other
        geometry, or holds a bad point (naming the feature).

    """
    mx, my = _mpp_pair(mpp)
    xs: list[float] = []
    ys: list[float] = []
    owner: list[int] = []  # feature number (1-based) of each point
    labels: list[int] = []
    probs: list[float] = []
    areas: list[float] = []
    sources: list[int] = []
    skipped: dict[str, int] = {}
    unknown: dict[str, int] = {}
    for number, feature in enumerate(_features(obj), start=1):
        if not isinstance(feature, dict):
            raise ValueError(f"feature {number}: must be an object, got {type(feature).__name__}")
        geometry = feature.get("geometry") if feature.get("type") == "Feature" else feature
        kind = geometry.get("type") if isinstance(geometry, dict) else None
        if kind == "Point":
            coords = [geometry.get("coordinates")]
        elif kind == "MultiPoint":
            coords = geometry.get("coordinates")
            if not isinstance(coords, list):
                raise ValueError(f"feature {number}: MultiPoint coordinates must be a list of [x, y]")
        else:
            skipped[str(kind)] = skipped.get(str(kind), 0) + 1
            continue
        properties = feature.get("properties") or {}
        if not isinstance(properties, dict):
            raise ValueError(
                f"feature {number}: properties must be an object, got {type(properties).__name__}"
            )
        try:
            label = _feature_label(properties, unknown)
            source = _parse_source(properties.get("source", "imported"))
        except ValueError as exc:
            raise ValueError(f"feature {number}: {exc}") from exc
        measurements = properties.get("measurements")
        prob, area = _measurement(measurements, "probability"), _measurement(measurements, "area_um2")
        for c in coords:
            if not isinstance(c, (list, tuple)) or len(c) < 2:
                raise ValueError(f"feature {number}: point coordinates must be [x, y], got {c!r}")
            try:
                x, y = _coordinate(c[0]), _coordinate(c[1])
            except ValueError as exc:
                raise ValueError(f"feature {number}: {exc}") from None
            xs.append(x * mx)
            ys.append(y * my)
            owner.append(number)
            labels.append(label)
            probs.append(prob)
            areas.append(area)
            sources.append(source)
    if skipped:
        what = ", ".join(f"{v} {k}" for k, v in sorted(skipped.items()))
        if not xs:
            raise ValueError(
                f"no Point or MultiPoint features to read as nuclei (found {what}); "
                "export nuclei as points (centroids), not outlines"
            )
        warnings.warn(
            f"skipped {what} feature(s): nuclei are read from points only", UserWarning, stacklevel=2
        )
    x_um, y_um = np.asarray(xs, np.float64), np.asarray(ys, np.float64)

    def where(i: int) -> str:
        return f"feature {owner[i]}"

    check_centroids(x_um, y_um, extent_um, where)
    probability, area_um2 = np.asarray(probs, np.float32), np.asarray(areas, np.float32)
    _check_measurements(np.asarray(probs), np.asarray(areas), where)
    if unknown:
        names = ", ".join(f"{k!r} ({v})" for k, v in sorted(unknown.items()))
        warnings.warn(f"unknown classification {names} read as 'other'", UserWarning, stacklevel=2)
    return NucleusPoints(
        x_um, y_um, label=np.asarray(labels, np.int8), probability=probability, area_um2=area_um2,
        source=np.asarray(sources, np.int8),
    )  # fmt: skip


def write_geojson(
    points: NucleusPoints,
    path: str | os.PathLike[str],
    mpp: float | Sequence[float],
    object_type: str = "annotation",
) -> None:
    """Write :func:`to_geojson` to ``path`` atomically (QuPath: File > Import objects, or drag and drop).

    Raises
    ------
    OutputError
        When the file system refuses the write (one line naming the folder).

    """
    text = json.dumps(to_geojson(points, mpp, object_type), separators=(",", ":"), allow_nan=False)
    atomic_write(path, text)


def read_geojson(
    path: str | os.PathLike[str],
    mpp: float | Sequence[float],
    extent_um: tuple[float, float] | None = None,
) -> NucleusPoints:
    """Read nuclei from a GeoJSON file (see :func:`from_geojson`); every error names the file.

    Parameters
    ----------
    path : path-like
        The GeoJSON file (regular, UTF-8; too deep nesting, NaN constants and
        syntax errors are refused through :func:`napari_pathology.fileio.read_json_file`).
    mpp : float or (float, float)
        Level-0 micrometres per pixel of the slide.
    extent_um : (width_um, height_um), optional
        The slide's size in micrometres; points outside it are refused.

    Raises
    ------
    NucleusFileError
        Naming the file, and the feature at fault.

    """
    path = Path(path)
    try:
        obj = read_json_file(path, "nucleus GeoJSON")
    except (ValueError, FileNotFoundError) as exc:
        raise NucleusFileError(f"{exc}") from exc
    try:
        return from_geojson(obj, mpp, extent_um)
    except NucleusFileError:
        raise
    except ValueError as exc:
        raise NucleusFileError(f"{path}: {exc}") from exc


# --------------------------------------------------------------------------- autosave

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


# --------------------------------------------------------------------------- import merge and export names


@dataclass(frozen=True)
class MergeResult:
    """Nuclei after an import: all of them, and how many were added or merged into existing ones."""

    points: NucleusPoints
    added: int
    merged: int
    relabelled: int

    def summary(self) -> str:
        """``"12 added, 30 already there (5 given the imported label)"``."""
        text = f"{self.added} added, {self.merged} already there"
        return text + (f" ({self.relabelled} given the imported label)" if self.relabelled else "")


def merge_points(existing: NucleusPoints, incoming: NucleusPoints, radius_um: float = 1.0) -> MergeResult:
    """Add imported nuclei without doubling the ones already there.

    An incoming nucleus within ``radius_um`` of an existing one whose label is
    the same, or where either is ``unlabeled``, is that nucleus: it is not
    added; an imported label replaces ``unlabeled``, and a missing probability
    or area is filled in. Each existing nucleus absorbs at most one incoming
    one. Nuclei with conflicting labels (tumour vs normal) stay apart.

    Parameters
    ----------
    existing, incoming : NucleusPoints
        Nuclei now, and nuclei read from a file.
    radius_um : float
        Largest distance between two copies of one nucleus.

    Returns
    -------
    MergeResult

    """
    if not (math.isfinite(radius_um) and radius_um >= 0):
        raise ValueError(f"radius_um must be a finite number >= 0, got {radius_um!r}")
    if not len(existing) or not len(incoming):
        return MergeResult(NucleusPoints.concat(existing, incoming), len(incoming), 0, 0)
    from scipy.spatial import cKDTree

    k = min(8, len(existing))
    distance, nearest = cKDTree(existing.xy_um()).query(
        incoming.xy_um(), k=k, distance_upper_bound=radius_um * (1 + 1e-12) + 1e-12
    )
    distance, nearest = distance.reshape(len(incoming), k), nearest.reshape(len(incoming), k)
    label, probability, area = existing.label.copy(), existing.probability.copy(), existing.area_um2.copy()
    taken = np.zeros(len(existing), bool)
    new = np.ones(len(incoming), bool)
    relabelled = 0
    for i in np.flatnonzero(np.isfinite(distance[:, 0])):
        code = incoming.label[i]
        for d, j in zip(distance[i], nearest[i], strict=True):
            if not math.isfinite(d):
                break
            if taken[j] or not (label[j] == code or label[j] == UNLABELED or code == UNLABELED):
                continue
            taken[j], new[i] = True, False
            if label[j] == UNLABELED and code != UNLABELED:
                label[j] = code
                relabelled += 1
            if np.isnan(probability[j]):
                probability[j] = incoming.probability[i]
            if np.isnan(area[j]):
                area[j] = incoming.area_um2[i]
            break
    kept = existing._replace(label=label, probability=probability, area_um2=area)
    added = incoming.subset(new)
    return MergeResult(NucleusPoints.concat(kept, added), len(added), int((~new).sum()), relabelled)


def protected_paths(slide_path: str | os.PathLike[str]) -> dict[Path, str]:
    """Files an export must never replace: the slide, its autosave and a synthetic slide's truth files."""
    from napari_pathology.slide.synthetic import truth_paths

    slide_path = Path(slide_path)
    out = {
        slide_path: "the slide itself",
        slide_path.with_name(slide_path.name + SIDECAR_SUFFIX): "the autosave",
    }
    for key, path in truth_paths(slide_path).items():
        if key != "slide_path":
            out[path] = "a synthetic slide's ground truth (written by napari-pathology synth)"
    return out


def refused_export_reason(
    path: str | os.PathLike[str], slide_path: str | os.PathLike[str] | None
) -> str | None:
    """Why ``path`` must not be an export target for ``slide_path`` (None when it may be)."""
    if slide_path is None:
        return None
    target = Path(path).expanduser().resolve()
    extra = {}
    try:
        extra[sidecar_path(slide_path).resolve()] = "the autosave"
    except OSError:
        pass
    for protected, why in {
        **{p.resolve(): w for p, w in protected_paths(slide_path).items()},
        **extra,
    }.items():
        if target == protected:
            return why
    return None


def free_path(path: str | os.PathLike[str]) -> Path:
    """``path`` when nothing is there, else ``<stem>-2<suffix>``, ``<stem>-3<suffix>``... (the first free)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return path
    for n in range(2, 100_000):
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        if not candidate.exists() and not candidate.is_symlink():
            return candidate
    raise OSError(f"no free file name like {path} in {path.parent}")


def export_path(
    slide_path: str | os.PathLike[str] | None, suffix: str, folder: str | os.PathLike[str] | None = None
) -> Path:
    """The file name to propose for exporting a slide's nuclei.

    ``<slide stem>.annotations<suffix>`` beside the slide (or in ``folder``),
    numbered (``-2``, ``-3``...) when taken: never the autosave
    (``<slide name>.nuclei.csv``), never a synthetic slide's ground truth
    (``<stem>.nuclei.csv``), never an existing file.
    """
    if not suffix.startswith("."):
        suffix = "." + suffix
    slide = Path(slide_path) if slide_path else Path("nuclei")
    base = Path(folder) if folder is not None else slide.parent
    candidate = free_path(base / f"{slide.with_suffix('').name}.annotations{suffix}")
    while slide_path is not None and refused_export_reason(candidate, slide_path):  # pragma: no cover
        candidate = free_path(candidate.with_name(candidate.stem + "-export" + candidate.suffix))
    return candidate
