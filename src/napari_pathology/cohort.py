"""Slide tables: which slides, their labels and their tumour annotations.

Training and evaluation read a *slide table*: a CSV with a ``slide`` column
(path, relative to the CSV's folder or absolute), an optional ``label``
column (``tumour``/``normal`` and their synonyms, see :data:`TUMOUR_LABELS`
and :data:`NORMAL_LABELS`; other class names only when the caller names the
classes of a multi-class family), an optional
``annotations`` column (a GeoJSON of tumour polygons, as QuPath exports or
the synthetic ground truth writes) and an optional ``normal_annotations``
column (a GeoJSON of regions known to be normal, where normal training
patches are then taken from). A folder works too: every slide in it,
with ``<stem>.tumour.geojson`` or ``<stem>.geojson`` beside it as its
annotations and ``<stem>.truth.json`` (synthetic slides) giving its label.

What a table may not hold, and is refused with the file and line named: text
that is not UTF-8, a slide listed twice (it could land on both sides of a
train/validation split), a label outside the vocabulary (a typo such as
``tumuor`` would otherwise make a third class or drop the slide from an AUC),
an implausible ``mpp``, and annotations whose polygons have fewer than 3
distinct points, non-finite or absurdly large coordinates, or (when the
slide's size is known) lie entirely outside the slide.

:func:`write_synthetic_cohort` makes such a folder of synthetic slides with
known truth: tumour slides with macro- and micro-metastases, and negatives.

No Qt, no napari, no torch.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import math
import os
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathology.fileio import atomic_write, read_json_file, read_text_file
from napari_pathology.geometry import MAX_COORDINATE, Polygon, geojson_to_polygons
from napari_pathology.progress import Progress
from napari_pathology.vocabulary import (
    NORMAL,
    SLIDE_NORMAL_SPELLINGS,
    SLIDE_TUMOUR_SPELLINGS,
    TUMOUR,
    slide_label,
)

__all__ = [
    "NORMAL_LABELS",
    "TUMOUR_LABELS",
    "CohortError",
    "SlideEntry",
    "canonical_label",
    "read_annotations",
    "read_slide_table",
    "table_labels",
    "write_slide_table",
    "write_synthetic_cohort",
]

#: Spellings of the tumour class (lower case); from :mod:`napari_pathology.vocabulary`.
TUMOUR_LABELS = SLIDE_TUMOUR_SPELLINGS
#: Spellings of the normal class (lower case).
NORMAL_LABELS = SLIDE_NORMAL_SPELLINGS


class CohortError(ValueError):
    """A slide table or folder cannot be used; the message says which row and why."""


def canonical_label(label: str | None) -> str | None:
    """``"tumour"`` or ``"normal"`` for any accepted spelling of them, None for anything else.

    The vocabulary's :func:`~napari_pathology.vocabulary.slide_label`.

    Examples
    --------
    >>> canonical_label(" Tumor "), canonical_label("negative"), canonical_label("LUAD")
    ('tumour', 'normal', None)
    """
    return slide_label(label)


def _checked_label(label: str | None, classes: Sequence[str] | None, where: str) -> str | None:
    """The label in its canonical spelling; unknown ones refused with the closest known label."""
    if label is None or not str(label).strip():
        return None
    text = str(label).strip()
    known = (TUMOUR, NORMAL) if classes is None else tuple(str(c).strip() for c in classes)
    by_key = {canonical_label(c) or c.lower(): c for c in known}
    key = canonical_label(text) or text.lower()
    if key in by_key:
        return by_key[key]
    spellings = {**{s: TUMOUR for s in TUMOUR_LABELS}, **{s: NORMAL for s in NORMAL_LABELS}}
    if classes is not None:
        synonyms = {k: by_key[v] for k, v in spellings.items() if v in by_key}
        spellings = synonyms | {c.lower(): c for c in known}
    close = difflib.get_close_matches(text.lower(), list(spellings), n=1, cutoff=0.5)
    hint = f"did you mean {spellings[close[0]]!r}? " if close else ""
    vocabulary = "tumour or normal" if classes is None else ", ".join(known)
    multi = " (a multi-class family needs its class names given)" if classes is None else ""
    raise CohortError(f"{where}: unknown label {text!r}; {hint}labels must be {vocabulary}{multi}")


@dataclass(frozen=True)
class SlideEntry:
    """One slide of a cohort.

    Attributes
    ----------
    path : Path
        The slide file.
    label : str or None
        Slide-level class (``"tumour"``, ``"normal"``, a subtype...), None when unknown.
    annotations : Path or None
        GeoJSON of tumour polygons (level-0 pixels, as QuPath and the
        synthetic ground truth write them; see :meth:`tumour_polygons_um`).
    mpp : float or None
        um/px override for files that do not carry it.
    extra : dict
        Other columns of the slide table.
    normal_annotations : Path or None
        GeoJSON of regions known to be normal (same conventions as
        ``annotations``); when given, normal training patches are centred
        only inside them (see :meth:`normal_polygons_um`).
    source : str or None
        Where the entry came from (``"slides.csv, line 3"``), for messages.
    """

    path: Path
    label: str | None = None
    annotations: Path | None = None
    mpp: float | None = None
    extra: dict[str, str] = field(default_factory=dict, compare=False)
    normal_annotations: Path | None = None
    source: str | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        """The slide's file stem."""
        return self.path.stem

    @property
    def is_tumour(self) -> bool | None:
        """True for a tumour label, False for a normal one, None when unknown or another class."""
        value = canonical_label(self.label)
        return None if value is None else value == "tumour"

    def tumour_polygons_um(
        self,
        slide_mpp: float | tuple[float, float] | None = None,
        slide_size: tuple[int, int] | None = None,
    ) -> list[Polygon]:
        """Tumour polygons in micrometres (``[outer, *holes]`` rings of ``(x, y)``).

        GeoJSON from QuPath and the synthetic ground truth is in level-0
        pixels and is scaled by ``slide_mpp``; a file that says
        ``"units": "um"`` is taken as is.

        Parameters
        ----------
        slide_mpp : float or tuple of float, optional
            The slide's level-0 um/px.
        slide_size : tuple of int, optional
            The slide's level-0 ``(width, height)`` in px: a polygon entirely
            outside it is refused (wrong slide or wrong units).

        Raises
        ------
        CohortError
            If the file cannot be read, holds unusable polygons, or holds
            pixels and ``slide_mpp`` is unknown; the row and feature are named.
        """
        return _polygons_um(self.annotations, slide_mpp, slide_size, self.source)

    def normal_polygons_um(
        self,
        slide_mpp: float | tuple[float, float] | None = None,
        slide_size: tuple[int, int] | None = None,
    ) -> list[Polygon]:
        """Normal-region polygons in micrometres (as :meth:`tumour_polygons_um`); [] when none.

        Raises
        ------
        CohortError
            As :meth:`tumour_polygons_um`.
        """
        return _polygons_um(self.normal_annotations, slide_mpp, slide_size, self.source)


def _mpp_pair(slide_mpp: float | tuple[float, float]) -> np.ndarray:
    mx, my = (slide_mpp, slide_mpp) if np.isscalar(slide_mpp) else slide_mpp
    return np.array([float(mx), float(my)])


def read_annotations(
    path: str | os.PathLike[str],
    slide_mpp: float | tuple[float, float] | None = None,
    slide_size: tuple[int, int] | None = None,
    where: str | None = None,
) -> tuple[list[Polygon], str]:
    """Validated polygons of an annotation GeoJSON in the file's own units, and those units.

    Every ring must have 3 distinct finite vertices and no coordinate past
    :data:`napari_pathology.geometry.MAX_COORDINATE`; with ``slide_size`` (level-0 px; and
    ``slide_mpp`` for a file in um) a polygon entirely off the slide is refused.

    Returns
    -------
    polygons, units
        Open rings, outer first; ``"um"`` or ``"px"``.

    Raises
    ------
    CohortError
        Naming ``where`` (the table row), the file and the feature.
    """
    prefix = f"{where}: " if where else ""
    try:
        data = read_json_file(path, "annotations")
        units = _geojson_units(data)
        extent = None
        if slide_size is not None:
            extent = (float(slide_size[0]), float(slide_size[1]))
            if units == "um":
                extent = None if slide_mpp is None else tuple(np.array(extent) * _mpp_pair(slide_mpp))
        polygons = geojson_to_polygons(data, max_coordinate=MAX_COORDINATE, extent=extent)
    except FileNotFoundError as error:
        raise CohortError(f"{prefix}{error}") from error
    except ValueError as error:
        text = str(error)
        if str(path) not in text:
            text = f"annotations {path}: {text}"
        raise CohortError(f"{prefix}{text}") from error
    return polygons, units


def _polygons_um(
    path: Path | None,
    slide_mpp: float | tuple[float, float] | None,
    slide_size: tuple[int, int] | None = None,
    where: str | None = None,
) -> list[Polygon]:
    """Polygons of a GeoJSON file in micrometres (pixels scaled by ``slide_mpp``)."""
    if path is None:
        return []
    polygons, units = read_annotations(path, slide_mpp, slide_size, where)
    if units == "um":
        return polygons
    if slide_mpp is None:
        raise CohortError(f"{path} is in pixels; the slide's um/px is needed to place it")
    scale = _mpp_pair(slide_mpp)
    return [[np.asarray(ring, float) * scale for ring in polygon] for polygon in polygons]


def _geojson_units(data: Any) -> str:
    """``"um"`` when the GeoJSON says its coordinates are micrometres, else ``"px"``."""
    if isinstance(data, dict):
        for holder in (data, data.get("properties") or {}):
            units = str(holder.get("units", holder.get("unit", ""))).lower()
            if units in ("um", "µm", "micrometre", "micrometer", "micrometres", "micrometers", "microns"):
                return "um"
    return "px"


def _find_annotations(slide: Path) -> Path | None:
    stem = slide.with_suffix("")
    for suffix in (".tumour.geojson", ".tumor.geojson", ".geojson", ".json"):
        candidate = stem.with_name(stem.name + suffix)
        if candidate.is_file() and not candidate.name.endswith(".truth.json"):
            return candidate
    return None


def _label_from_truth(slide: Path) -> str | None:
    from napari_pathology.slide.synthetic import load_truth

    try:
        return str(load_truth(slide).get("label")) or None
    except (OSError, ValueError):
        return None


def _unchecked_entries(source: Path) -> list[SlideEntry]:
    """The rows of a slide table (or the slides of a folder) as written, labels unchecked."""
    from napari_pathology.slide import is_supported_path

    if source.is_dir():
        slides = sorted(p for p in source.iterdir() if p.is_file() and is_supported_path(p))
        slides = [p for p in slides if not p.name.endswith((".tissue.png", ".tumour.png"))]
        return [
            SlideEntry(p, _label_from_truth(p), _find_annotations(p), source=f"{source}: {p.name}")
            for p in slides
        ]
    if source.is_file():
        return _read_csv(source)
    raise CohortError(f"{source} is neither a slide table (CSV) nor a folder of slides")


def table_labels(source: str | os.PathLike[str]) -> tuple[str, ...] | None:
    """The labels a slide table holds, for reading it as a multi-class table.

    Returns
    -------
    tuple of str or None
        None when every label is a spelling of ``tumour`` or ``normal`` (read the
        table without ``classes``); otherwise the distinct labels (case and
        tumour/normal synonyms folded) as first written, in the order of first
        appearance (``classes`` for :func:`read_slide_table`).

    Raises
    ------
    CohortError
        A table that cannot be read (as :func:`read_slide_table`).
    """
    labels: dict[str, str] = {}  # one spelling per label, compared as read_slide_table compares them
    for entry in _unchecked_entries(Path(source)):
        text = str(entry.label or "").strip()
        if text:
            labels.setdefault(canonical_label(text) or text.lower(), text)
    if all(key in (TUMOUR, NORMAL) for key in labels):
        return None
    return tuple(labels.values())


def read_slide_table(
    source: str | os.PathLike[str], classes: Sequence[str] | None = None
) -> list[SlideEntry]:
    """Read a slide table (CSV) or scan a folder of slides, refusing what would mislead training.

    Parameters
    ----------
    source : path-like
        A CSV with columns ``slide`` and optionally ``label``, ``annotations``,
        ``normal_annotations``, ``mpp``; or a folder of slides.
    classes : sequence of str, optional
        The class names of a multi-class family. Without them a label must be
        ``tumour`` or ``normal`` (or a synonym); with them, one of the classes.

    Returns
    -------
    list of SlideEntry
        In file order (CSV) or sorted by name (folder). Labels are in their
        canonical spelling (``tumour``, ``normal``, or as given in ``classes``).

    Raises
    ------
    CohortError
        Naming the file and line: a missing file or column, text that is not
        UTF-8, a slide that does not exist or is listed twice, an unknown
        label (with the closest known one), an implausible ``mpp``, unusable
        annotation polygons, or an empty table.
    """
    source = Path(source)
    entries = _unchecked_entries(source)
    if not entries:
        raise CohortError(f"{source} lists no slides")
    _refuse_duplicates(source, entries)
    checked = []
    for entry in entries:
        where = entry.source or str(entry.path)
        label = _checked_label(entry.label, classes, where)
        for geojson in (entry.annotations, entry.normal_annotations):
            if geojson is not None:
                read_annotations(geojson, entry.mpp, where=where)
        checked.append(entry if label == entry.label else _replace(entry, label=label))
    return checked


def _replace(entry: SlideEntry, **changes: Any) -> SlideEntry:
    from dataclasses import replace

    return replace(entry, **changes)


def _refuse_duplicates(source: Path, entries: Sequence[SlideEntry]) -> None:
    """A slide listed more than once (same file after resolving links) is refused, rows named."""
    seen: dict[Path, list[SlideEntry]] = {}
    for entry in entries:
        try:
            key = entry.path.resolve()
        except OSError:
            key = entry.path.absolute()
        seen.setdefault(key, []).append(entry)
    for key, same in seen.items():
        if len(same) > 1:
            rows = [e.source.rsplit(", ", 1)[-1] if e.source else str(e.path) for e in same]
            raise CohortError(
                f"{source}: slide {key.name} is listed {len(same)} times ({', '.join(rows)}); list each "
                "slide once (a repeated slide can land on both sides of the train/validation split)"
            )


def _read_csv(path: Path) -> list[SlideEntry]:
    from napari_pathology.slide.backends import PLAUSIBLE_MPP

    try:
        text = read_text_file(path, "slide table")
    except FileNotFoundError as error:
        raise CohortError(str(error)) from error
    except ValueError as error:
        raise CohortError(str(error)) from error
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        columns = [(c or "").strip().lower() for c in reader.fieldnames or []]
        if "slide" not in columns and "path" not in columns:
            raise CohortError(f"{path}: needs a 'slide' column (found: {', '.join(columns) or 'none'})")
        rows = [
            (reader.line_num, {(k or "").strip().lower(): _cell(v) for k, v in row.items()}) for row in reader
        ]
    except csv.Error as error:
        raise CohortError(f"{path}, line {reader.line_num + 1}: not a readable CSV row ({error})") from error
    entries = []
    low, high = PLAUSIBLE_MPP
    for number, row in rows:
        where = f"{path.name}, line {number}"
        slide = _resolve(path.parent, row.get("slide") or row.get("path") or "")
        if slide is None:
            raise CohortError(f"{path}, line {number}: empty slide path")
        if not slide.exists():
            raise CohortError(f"{path}, line {number}: slide {slide} does not exist")
        annotations = _resolve(path.parent, row.get("annotations", ""))
        if annotations is not None and not annotations.is_file():
            raise CohortError(f"{path}, line {number}: annotations {annotations} do not exist")
        normal = _resolve(path.parent, row.get("normal_annotations", ""))
        if normal is not None and not normal.is_file():
            raise CohortError(f"{path}, line {number}: normal annotations {normal} do not exist")
        mpp = row.get("mpp") or None
        try:
            mpp_value = float(mpp) if mpp else None
        except ValueError as error:
            raise CohortError(f"{path}, line {number}: mpp {mpp!r} is not a number") from error
        if mpp_value is not None and not (math.isfinite(mpp_value) and low <= mpp_value <= high):
            raise CohortError(
                f"{path}, line {number}: mpp {mpp!r} is not a plausible um/px (expected {low:g} to {high:g})"
            )
        known = {"slide", "path", "label", "annotations", "normal_annotations", "mpp"}
        extra = {k: v for k, v in row.items() if k not in known}
        entries.append(
            SlideEntry(slide, row.get("label") or None, annotations, mpp_value, extra, normal, source=where)
        )
    return entries


def _cell(value: Any) -> str:
    """A CSV cell as stripped text (extra cells of a long row arrive as a list)."""
    if isinstance(value, list):
        value = ",".join(str(v) for v in value)
    return (value or "").strip()


def _resolve(folder: Path, value: str) -> Path | None:
    if not value:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else folder / path


def write_slide_table(entries: Sequence[SlideEntry], path: str | os.PathLike[str]) -> Path:
    """Write entries as a slide table CSV (paths relative to its folder where possible).

    The ``normal_annotations`` and ``mpp`` columns are written only when some entry has them.
    """
    path = Path(path)

    def rel(p: Path | None) -> str:
        if p is None:
            return ""
        try:
            return str(Path(p).resolve().relative_to(path.parent.resolve()))
        except ValueError:
            return str(p)

    with_normal = any(e.normal_annotations is not None for e in entries)
    with_mpp = any(e.mpp is not None for e in entries)

    def write(fh: Any) -> None:
        writer = csv.writer(fh)
        writer.writerow(
            ["slide", "label", "annotations"] + ["normal_annotations"] * with_normal + ["mpp"] * with_mpp
        )
        for entry in entries:
            row = [rel(entry.path), entry.label or "", rel(entry.annotations)]
            row += [rel(entry.normal_annotations)] * with_normal
            row += [repr(float(entry.mpp)) if entry.mpp is not None else ""] * with_mpp
            writer.writerow(row)

    return atomic_write(path, write, text=True)


def synthetic_cohort_plan(
    n_slides: int,
    seed: int,
    negative_fraction: float = 0.4,
    micro_fraction: float = 0.5,
    balanced_artefacts: bool = False,
) -> list[dict[str, Any]]:
    """Per-slide options of a synthetic cohort: seeds, negatives, micro-metastases, pen marks.

    Negatives come first in a fixed proportion (not sampled), so a cohort of
    ``n`` slides always has ``round(n * negative_fraction)`` of them. Pen
    marks (25%) and blurred patches (15%) are drawn at random, or, with
    ``balanced_artefacts``, given to the same share of tumour and normal
    slides, so that a model trained on slide labels cannot learn an artefact
    as a shortcut for the label (a training cohort should be built so).
    """
    if n_slides < 1:
        raise ValueError(f"a cohort needs at least one slide, got {n_slides}")
    rng = np.random.default_rng(seed)
    n_negative = round(n_slides * negative_fraction)
    n_micro = round((n_slides - n_negative) * micro_fraction)
    plan = []
    for k in range(n_slides):
        negative = k < n_negative
        micro = not negative and (k - n_negative) < n_micro
        plan.append(
            {
                "seed": int(seed) * 1000 + k,
                "negative": negative,
                "tumour_size": "micro" if micro else "macro",
                "pen_mark": bool(rng.random() < 0.25),
                "blurred_patch": bool(rng.random() < 0.15),
            }
        )
    if balanced_artefacts:
        for group in ([p for p in plan if p["negative"]], [p for p in plan if not p["negative"]]):
            for key, share, phase in (("pen_mark", 0.25, 0.0), ("blurred_patch", 0.15, 0.5)):
                n, k = len(group), round(len(group) * share)
                chosen = {int(n * (i + phase) / k) for i in range(k)}
                for i, options in enumerate(group):
                    options[key] = i in chosen
    return plan


def write_synthetic_cohort(
    folder: str | os.PathLike[str],
    n_slides: int,
    seed: int,
    *,
    size: int = 8192,
    mpp: float = 0.5,
    negative_fraction: float = 0.4,
    micro_fraction: float = 0.5,
    balanced_artefacts: bool = False,
) -> Generator[Progress, None, Path]:
    """Write a cohort of synthetic slides with ground truth and its slide table.

    Slides already written with the same options are kept (generation is
    deterministic), so an interrupted run resumes.

    Parameters
    ----------
    folder : path-like
        Output folder; the table is ``folder/cohort.csv``.
    n_slides : int
        Number of slides.
    seed : int
        Cohort seed; slide ``k`` uses seed ``seed * 1000 + k``.
    size : int
        Level-0 side in px.
    mpp : float
        Level-0 um/px.
    negative_fraction, micro_fraction : float
        Share of tumour-free slides, and of micro-metastases among the others.
    balanced_artefacts : bool
        Give pen marks and blur to the same share of each class (see
        :func:`synthetic_cohort_plan`).

    Yields
    ------
    Progress
        One step per slide.

    Returns
    -------
    Path
        The slide table.
    """
    from napari_pathology.slide.synthetic import generate_synthetic_slide, load_truth, truth_paths

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plan = synthetic_cohort_plan(n_slides, seed, negative_fraction, micro_fraction, balanced_artefacts)
    entries = []
    for k, options in enumerate(plan):
        kind = "negative" if options["negative"] else options["tumour_size"]
        path = folder / f"synthetic-{options['seed']:06d}-{kind}.tif"
        yield Progress(k, len(plan), f"slide {k + 1}/{len(plan)}: {path.name}")
        paths = truth_paths(path)
        wanted = {**options, "size": size, "mpp": mpp}
        if not (path.is_file() and paths["truth_json"].is_file() and _same_options(path, wanted)):
            options = dict(options)
            slide_seed = options.pop("seed")
            job = generate_synthetic_slide(path, size, slide_seed, mpp=mpp, **options)
            for _ in job:
                pass
            _write_options(path, wanted)
        label = str(load_truth(path).get("label", "normal" if options["negative"] else "tumour"))
        entries.append(SlideEntry(path, label, paths["tumour_geojson"]))
    table = write_slide_table(entries, folder / "cohort.csv")
    yield Progress(len(plan), len(plan), f"{len(plan)} slides in {folder}")
    return table


def _options_path(slide: Path) -> Path:
    return slide.with_name(slide.stem + ".options.json")


def _same_options(slide: Path, wanted: dict[str, Any]) -> bool:
    try:
        return read_json_file(_options_path(slide), "options file") == wanted
    except (OSError, ValueError):
        return False


def _write_options(slide: Path, options: dict[str, Any]) -> None:
    atomic_write(_options_path(slide), json.dumps(options, sort_keys=True))
