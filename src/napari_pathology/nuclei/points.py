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
import json
import math
import os
import uuid
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

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


class NucleusFileError(ValueError):
    """A nucleus annotation file that cannot be read (the message names the file and the fix)."""


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
        ``(N,)`` float64 centroids (level-0 frame, origin at the top-left corner).
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
        Destination file (created or replaced) or an open text stream.

    """
    columns = [
        _format(points.x_um), _format(points.y_um), points.label_names().tolist(),
        _format(points.probability), _format(points.area_um2), points.source_names().tolist(),
    ]  # fmt: skip
    if hasattr(path, "write"):
        _write_rows(path, columns)  # type: ignore[arg-type]
        return
    with open(path, "w", newline="", encoding="utf-8") as fh:
        _write_rows(fh, columns)


def _write_rows(fh: TextIO, columns: list[list[str]]) -> None:
    writer = csv.writer(fh, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows(zip(*columns, strict=True))


def _column(header: list[str], aliases: Iterable[str]) -> int | None:
    for alias in aliases:
        if alias in header:
            return header.index(alias)
    return None


def _floats(columns: _Columns, col: int | None, n: int, name: str) -> np.ndarray:
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
        raise ValueError(f"column {name!r} row {bad[0] + 2} is {text[bad[0]]!r}, not a number") from None


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_csv(path: str | os.PathLike[str] | TextIO, mpp: float | None = None) -> NucleusPoints:
    """Read nuclei from a CSV file, tolerantly.

    Columns are matched by name (case-insensitive, any order, extra columns
    ignored). Only the centroid is required: ``x_um,y_um`` (also QuPath's
    ``Centroid X µm``), or pixel columns ``x,y`` (``x_px``, ``Centroid X px``)
    when ``mpp`` is given (QuPath's frame: level-0 pixels from the image's
    top-left corner, so ``x_um = x * mpp``). Understood as well:

    - this module's own CSV (:func:`write_csv`): exact round trip;
    - the detector's CSV (``NucleusTable.to_csv``): unlabeled, source ``detected``, area kept;
    - a synthetic slide's ``*.nuclei.csv`` (``x_um,y_um,label,radius_um,kind``): its
      ``label`` column is used; without one, ``kind`` "tumour" is tumour and every
      other kind (epithelial, lymphocyte, fibroblast, histiocyte) is normal.

    Labels go through :func:`parse_label`; a missing ``source`` column means
    ``detected`` for a detector CSV and ``imported`` otherwise.

    Parameters
    ----------
    path : path-like or text file
        The CSV.
    mpp : float, optional
        Micrometres per level-0 pixel, needed only for pixel columns.

    Returns
    -------
    NucleusPoints

    Raises
    ------
    NucleusFileError
        For a file without centroid columns, a cell that is not a number or an unknown label.

    """
    where = str(getattr(path, "name", None) or path)
    try:
        return _points_from_rows(_read_rows(path), mpp)
    except NucleusFileError:
        raise
    except ValueError as exc:
        raise NucleusFileError(f"{where}: {exc}") from exc


def _read_rows(path: str | os.PathLike[str] | TextIO) -> list[list[str]]:
    try:
        if hasattr(path, "read"):
            rows = list(csv.reader(path))  # type: ignore[arg-type]
        else:
            with open(path, newline="", encoding="utf-8-sig") as fh:
                rows = list(csv.reader(fh))
    except UnicodeDecodeError as exc:
        raise ValueError(f"not a text CSV file ({exc.reason})") from exc
    except csv.Error as exc:
        raise ValueError(f"not a readable CSV file ({exc})") from exc
    return [row for row in rows if len(row) > 1 or (row and row[0].strip())]


def _points_from_rows(rows: list[list[str]], mpp: float | None) -> NucleusPoints:
    """Parse CSV rows (header first); ValueError with the row and column at fault."""
    if not rows:
        raise ValueError("empty file; expected a header with x_um,y_um")
    header = [" ".join(cell.strip().lower().split()) for cell in rows[0]]
    body = rows[1:]
    n = len(body)
    if body and min(map(len, body)) < len(header):
        short = next(i for i, row in enumerate(body) if len(row) < len(header))
        raise ValueError(
            f"row {short + 2} has {len(body[short])} fields but the header has {len(header)} "
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
    x = _floats(columns, cx, n, header[cx]) * scale
    y = _floats(columns, cy, n, header[cy]) * scale
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        bad = int(np.flatnonzero(~(np.isfinite(x) & np.isfinite(y)))[0])
        raise ValueError(f"row {bad + 2} has no centroid; every row needs x and y")
    label = np.zeros(n, np.int8)
    col_label, col_kind = _column(header, ("label", "class", "classification")), _column(header, ("kind",))
    if col_label is not None:
        label[:] = _codes(columns[col_label], parse_label)
    elif col_kind is not None:
        kinds = np.char.lower(np.char.strip(np.asarray(columns[col_kind], dtype=str)))
        label[:] = np.where(kinds == "tumour", TUMOUR, NORMAL)
    col_source = _column(header, ("source",))
    if col_source is not None:
        source = _codes(columns[col_source], _parse_source)
    else:
        default = "detected" if "hematoxylin" in header else "imported"
        source = np.full(n, SOURCES.index(default), np.int8)
    return NucleusPoints(
        x,
        y,
        label=label,
        probability=_floats(columns, _column(header, ("probability",)), n, "probability"),
        area_um2=_floats(columns, _column(header, ("area_um2", "area µm^2", "area um^2")), n, "area_um2"),
        source=source,
    )


class _Columns:
    """Columns of CSV rows, each built on first use (only the few columns read are built)."""

    def __init__(self, rows: list[list[str]]) -> None:
        self.rows = rows
        self.cache: dict[int, list[str]] = {}

    def __getitem__(self, col: int) -> list[str]:
        if col not in self.cache:
            self.cache[col] = [row[col] for row in self.rows]
        return self.cache[col]


def _codes(names: Sequence[str], parse: Any) -> np.ndarray:
    """Parse each distinct name once (fast for 10^6 rows of a few names)."""
    unique, inverse = np.unique(np.asarray(names, dtype=str), return_inverse=True)
    table = np.array([parse(str(name)) for name in unique], np.int8)
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
        return list(obj.get("features") or [])
    if kind == "Feature":
        return [obj]
    if kind == "GeometryCollection":
        return [{"type": "Feature", "geometry": g, "properties": {}} for g in obj.get("geometries") or []]
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


def from_geojson(obj: dict[str, Any] | list[Any], mpp: float | Sequence[float]) -> NucleusPoints:
    """Nuclei from GeoJSON points in level-0 pixels (QuPath's export, or :func:`to_geojson`'s).

    Reads ``Point`` and ``MultiPoint`` features (every point of a MultiPoint gets
    its feature's class) from a FeatureCollection, a single feature, a geometry
    or a bare list of features. The label is the plugin's own ``label``
    property when present, else the QuPath classification name
    (case-insensitive, through :func:`parse_label`: Tumor, Normal, Stroma,
    Immune cells, Other...); an unknown class becomes ``other`` with a warning.
    Non-point features (polygons, lines) are skipped with a warning, and a file
    with only such features is refused.

    Parameters
    ----------
    obj : dict or list
        Parsed GeoJSON.
    mpp : float or (float, float)
        Level-0 micrometres per pixel of the slide.

    Returns
    -------
    NucleusPoints
        Sources from the ``source`` property, ``imported`` when absent.

    Raises
    ------
    ValueError
        For something that is not GeoJSON or has no point features but other geometry.

    """
    mx, my = _mpp_pair(mpp)
    xs: list[float] = []
    ys: list[float] = []
    labels: list[int] = []
    probs: list[float] = []
    areas: list[float] = []
    sources: list[int] = []
    skipped: dict[str, int] = {}
    unknown: dict[str, int] = {}
    for feature in _features(obj):
        if not isinstance(feature, dict):
            raise ValueError(f"GeoJSON feature must be an object, got {type(feature).__name__}")
        geometry = feature.get("geometry") if feature.get("type") == "Feature" else feature
        kind = geometry.get("type") if isinstance(geometry, dict) else None
        if kind == "Point":
            coords = [geometry.get("coordinates")]
        elif kind == "MultiPoint":
            coords = list(geometry.get("coordinates") or [])
        else:
            skipped[str(kind)] = skipped.get(str(kind), 0) + 1
            continue
        properties = feature.get("properties") or {}
        try:
            label = _feature_label(properties, unknown)
            source = _parse_source(properties.get("source", "imported"))
        except ValueError as exc:
            raise ValueError(f"GeoJSON feature {len(xs) + sum(skipped.values())}: {exc}") from exc
        measurements = properties.get("measurements")
        prob, area = _measurement(measurements, "probability"), _measurement(measurements, "area_um2")
        for c in coords:
            if not isinstance(c, (list, tuple)) or len(c) < 2:
                raise ValueError(f"GeoJSON point coordinates must be [x, y], got {c!r}")
            xs.append(float(c[0]) * mx)
            ys.append(float(c[1]) * my)
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
    if unknown:
        names = ", ".join(f"{k!r} ({v})" for k, v in sorted(unknown.items()))
        warnings.warn(f"unknown classification {names} read as 'other'", UserWarning, stacklevel=2)
    return NucleusPoints(
        np.asarray(xs, np.float64), np.asarray(ys, np.float64), label=np.asarray(labels, np.int8),
        probability=np.asarray(probs, np.float32), area_um2=np.asarray(areas, np.float32),
        source=np.asarray(sources, np.int8),
    )  # fmt: skip


def write_geojson(
    points: NucleusPoints,
    path: str | os.PathLike[str],
    mpp: float | Sequence[float],
    object_type: str = "annotation",
) -> None:
    """Write :func:`to_geojson` to ``path`` (QuPath: File > Import objects, or drag and drop)."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(to_geojson(points, mpp, object_type), fh, separators=(",", ":"))


def read_geojson(path: str | os.PathLike[str], mpp: float | Sequence[float]) -> NucleusPoints:
    """Read nuclei from a GeoJSON file (see :func:`from_geojson`)."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NucleusFileError(f"{path.name}: not valid GeoJSON ({exc})") from exc
    try:
        return from_geojson(obj, mpp)
    except NucleusFileError:
        raise
    except ValueError as exc:
        raise NucleusFileError(f"{path.name}: {exc}") from exc


# --------------------------------------------------------------------------- autosave

#: Suffix of the autosave file beside a slide (``slide.svs`` -> ``slide.svs.nuclei.csv``).
SIDECAR_SUFFIX = ".nuclei.csv"


def sidecar_path(slide_path: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the nucleus annotations of a slide are autosaved.

    ``<slide file name>.nuclei.csv`` (e.g. ``case1.svs.nuclei.csv``; the full
    file name keeps it apart from a synthetic slide's ``case1.nuclei.csv``
    ground truth) beside the slide, or inside ``out_dir`` when it is given or
    when the slide's folder is not writable. Without ``out_dir`` the fallback is
    the user data folder (``platformdirs.user_data_dir("napari-pathology")/nuclei``).

    Parameters
    ----------
    slide_path : path-like
        The slide file.
    out_dir : path-like, optional
        Folder for the autosave file (created when needed).

    Returns
    -------
    Path

    """
    slide_path = Path(slide_path)
    name = slide_path.name + SIDECAR_SUFFIX
    if out_dir is None:
        folder = slide_path.parent
        if os.access(folder, os.W_OK):
            return folder / name
        from platformdirs import user_data_dir

        out_dir = Path(user_data_dir("napari-pathology")) / "nuclei"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir / name


def save_atomic(points: NucleusPoints, path: str | os.PathLike[str]) -> Path:
    """Write the CSV so that a crash mid-write leaves the previous file intact.

    Writes a temporary file in the same folder, flushes and fsyncs it, then
    ``os.replace``-s it over ``path`` (atomic on POSIX and Windows). The
    temporary file is removed when anything fails.

    Returns
    -------
    Path
        ``path``.

    """
    path = Path(path)
    # a plain exclusive open (not mkstemp, whose files are private 0600) keeps the usual permissions
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "x", newline="", encoding="utf-8") as fh:
            write_csv(points, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_sidecar(path: str | os.PathLike[str]) -> NucleusPoints | None:
    """Read an autosave file; None when there is none.

    Raises
    ------
    NucleusFileError
        For a corrupt file, naming it; the file is left untouched.

    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        return _points_from_rows(_read_rows(path), None)
    except OSError as exc:
        raise NucleusFileError(
            f"cannot read the nucleus autosave {path}: {exc}; it was left untouched"
        ) from exc
    except ValueError as exc:
        reason = str(exc)
        raise NucleusFileError(
            f"the nucleus autosave {path} is corrupt ({reason}); it was left untouched: "
            "fix it or move it away to start afresh"
        ) from exc
