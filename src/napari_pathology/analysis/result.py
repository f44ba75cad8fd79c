"""Analysis results: the one type every runner returns, how it is saved and reloaded (no Qt).

Every runner (tile, nucleus, bag, slide) returns an :class:`AnalysisResult`;
the Analyze panel, the CLI's ``run`` and ``evaluate`` show and use what it
holds and never ask which runner made it. A runner fills it this way:

- ``heatmap`` (rows, cols) float32 with ``heatmap_kind`` saying what a cell
  holds (:data:`HEATMAP_KINDS`: ``probability`` of the positive class for
  tile models, ``attention`` for attention-MIL models such as CLAM,
  ``purity`` for nucleus models, ``activation`` for a whole-slide class
  activation map); NaN where nothing was computed (outside tissue, not
  reached by a cancelled run). Cell ``(r, c)`` is centred at
  ``first_centre_um + (r, c) * cell_um``. ``class_heatmaps`` (classes, rows,
  cols) is optional.
- ``detections`` (N, 3) ``x_um, y_um, score``: points of interest (an empty
  ``(0, 3)`` array when the model finds none or makes none).
- ``points``: optional per-object points with properties, the nuclei of a
  nucleus model (:class:`~napari_pathology.nuclei.points.NucleusPoints`:
  position, tumour probability, label).
- ``slide_score`` (NaN when the model gives none) named by ``score_name``
  (default ``slide score (<aggregator>)``), per-class ``scores``, ``partial``,
  ``tiles_done`` / ``tiles_total`` counted in ``unit`` (``tiles``,
  ``nuclei``...), the run ``key`` and ``provenance``.

A result folder holds ``heatmap.zarr``, ``class_heatmaps.zarr`` when there are
class heatmaps, ``detections.csv`` (``x_um,y_um,score``),
``detections.geojson`` (QuPath points in level-0 pixels), ``nuclei.csv`` when
there are points (:func:`napari_pathology.nuclei.points.write_csv`) and
``result.json`` (scores, geometry, spec, provenance and the key that says
whether the result is still valid for a slide, model and settings).

The folder is written whole through :func:`napari_pathology.fileio.atomic_path`
(a kill at any moment leaves the previous result or the new one, never a mix),
and ``result.json`` records SHA-256 digests of the heatmaps and the points and
the number of cells, detections and points written, checked on every load: a
result whose files were lost or changed is refused, never reloaded as
complete. Folders of format version 2 (tile results before points and heatmap
kinds) load as results of kind ``probability``. A result folder belongs to the
slide whose path ``result.json`` records (:mod:`napari_pathology.analysis.folders`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_pathology.analysis.folders import (
    ResultOwnerError,
    check_owner,
    folder_owner,
    real_path,
    recover_result_folder,
    same_slide_path,
)
from napari_pathology.fileio import atomic_path, read_json_file

if TYPE_CHECKING:
    from napari_pathology.nuclei.points import NucleusPoints

__all__ = [
    "HEATMAP_KINDS",
    "RESULT_VERSION",
    "AnalysisResult",
    "HeatmapKind",
    "ResultMismatchError",
    "ResultOwnerError",
    "array_digest",
    "check_owner",
    "folder_owner",
    "load_result",
    "recover_result_folder",
    "same_slide_path",
    "save_result",
]

RESULT_FORMAT = "napari-pathology-result"
#: 3: heatmap kinds, points (``nuclei.csv``), units and score names. 2 (tile results) still loads.
RESULT_VERSION = 3
_READABLE_VERSIONS = (1, 2, 3)
POINTS_FILE = "nuclei.csv"


class ResultMismatchError(ValueError):
    """A saved result's files do not match what its ``result.json`` recorded (lost or changed)."""


@dataclass(frozen=True)
class HeatmapKind:
    """What the cells of a result's heatmap hold.

    Attributes
    ----------
    name : str
        The kind, as ``AnalysisResult.heatmap_kind`` and ``result.json`` store it.
    title : str
        Short name for layers and files (``"<slide> <model> <title>"``).
    meaning : str
        One line saying what a cell's value is.
    bounded : bool
        Values lie in [0, 1] (shown on a fixed 0-1 scale); otherwise the scale follows the data.
    """

    name: str
    title: str
    meaning: str
    bounded: bool


#: Every heatmap kind a runner may return, by name.
HEATMAP_KINDS: dict[str, HeatmapKind] = {
    kind.name: kind
    for kind in (
        HeatmapKind("probability", "heatmap", "probability of the positive class in each tile", True),
        HeatmapKind("attention", "attention", "attention score of each tile (raw, before softmax)", False),
        HeatmapKind("purity", "purity", "mean tumour probability of the nuclei in each cell", True),
        HeatmapKind("activation", "activation map", "class activation of each cell", False),
    )
}


@dataclass
class AnalysisResult:
    """Everything a run produced for one slide and one model (see the module docstring for the fields).

    Coordinates are physical micrometres from the slide's top-left corner
    (x right, y down); heatmap cell ``(r, c)`` is centred at
    ``first_centre_um + (r, c) * cell_um``.

    Raises
    ------
    ValueError
        When made with an unknown heatmap kind or arrays of the wrong shape.
    """

    slide_path: str | None
    slide_name: str
    spec: dict[str, Any]
    heatmap: np.ndarray  # (rows, cols) float32, meaning per heatmap_kind
    class_heatmaps: np.ndarray | None  # (classes, rows, cols) float32 or None
    cell_um: float
    first_centre_um: tuple[float, float]  # (y, x)
    slide_mpp: tuple[float, float]  # (x, y)
    detections: np.ndarray  # (N, 3) x_um, y_um, score
    slide_score: float
    scores: dict[str, float]
    partial: bool
    tiles_done: int
    tiles_total: int
    key: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None
    heatmap_kind: str = "probability"
    points: NucleusPoints | None = None
    unit: str = "tiles"
    score_name: str = ""

    def __post_init__(self) -> None:
        """Refuse an unknown heatmap kind and arrays of the wrong shape, in one line."""
        if self.heatmap_kind not in HEATMAP_KINDS:
            raise ValueError(
                f"unknown heatmap kind {self.heatmap_kind!r} (known: {', '.join(HEATMAP_KINDS)})"
            )
        self.heatmap = np.asarray(self.heatmap, dtype=np.float32)
        if self.heatmap.ndim != 2:
            raise ValueError(f"a result's heatmap must be (rows, cols), got shape {self.heatmap.shape}")
        if self.class_heatmaps is not None:
            self.class_heatmaps = np.asarray(self.class_heatmaps, dtype=np.float32)
            if self.class_heatmaps.ndim != 3 or self.class_heatmaps.shape[1:] != self.heatmap.shape:
                raise ValueError(
                    f"class heatmaps must be (classes, {self.heatmap.shape[0]}, {self.heatmap.shape[1]}), "
                    f"got shape {self.class_heatmaps.shape}"
                )
        detections = np.asarray(self.detections, dtype=np.float64)
        if detections.size == 0:
            detections = detections.reshape(0, 3)
        if detections.ndim != 2 or detections.shape[1] != 3:
            raise ValueError(f"detections must be (N, 3) x_um, y_um, score; got shape {detections.shape}")
        self.detections = detections
        if self.points is not None and not _is_points(self.points):
            raise ValueError(f"points must be NucleusPoints, got {type(self.points).__name__}")

    @property
    def model_name(self) -> str:
        """Name of the model that produced the result."""
        return str(self.spec.get("name", "model"))

    @property
    def kind(self) -> HeatmapKind:
        """What the heatmap's cells hold (:data:`HEATMAP_KINDS`)."""
        return HEATMAP_KINDS[self.heatmap_kind]

    @property
    def score_title(self) -> str:
        """What the slide score is, e.g. ``slide score (max)`` or ``predicted purity``."""
        return self.score_name or f"slide score ({self.spec.get('aggregator', 'model')})"

    @property
    def n_points(self) -> int:
        """Number of points (nuclei) the result holds."""
        return 0 if self.points is None else len(self.points)

    def progress_text(self) -> str:
        """``complete`` or ``PARTIAL (done/total unit)``."""
        if not self.partial:
            return "complete"
        return f"PARTIAL ({self.tiles_done}/{self.tiles_total} {self.unit})"

    def summary(self) -> str:
        """One line for logs and the CLI."""
        score = "-" if not math.isfinite(self.slide_score) else f"{self.slide_score:.3f}"
        points = f", {self.n_points} nuclei" if self.points is not None else ""
        return (
            f"{self.slide_name}: {self.model_name} {self.score_title} {score}, "
            f"{len(self.detections)} detections{points}, {self.tiles_done} {self.unit}, "
            f"{self.progress_text()}"
        )


def _is_points(value: Any) -> bool:
    from napari_pathology.nuclei.points import NucleusPoints

    return isinstance(value, NucleusPoints)


def array_digest(array: np.ndarray) -> str:
    """SHA-256 of a float32 array's shape and values (every NaN counts as the same NaN)."""
    values = np.ascontiguousarray(np.asarray(array, dtype=np.float32))
    values = np.where(np.isnan(values), np.float32(np.nan), values)
    digest = hashlib.sha256(repr(values.shape).encode())
    digest.update(values.tobytes())
    return digest.hexdigest()


def _finite_or_none(value: Any) -> float | None:
    """A score as JSON holds it: None for NaN (no score yet, e.g. a cancelled bag run)."""
    value = float(value)
    return value if math.isfinite(value) else None


def _float_or_nan(value: Any) -> float:
    """A saved score back: NaN for None."""
    return float("nan") if value is None else float(value)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in result.json")


def _points_text(points: NucleusPoints) -> str:
    from napari_pathology.nuclei.points import write_csv

    buffer = io.StringIO()
    write_csv(points, buffer)
    return buffer.getvalue()


def save_result(result: AnalysisResult, out_dir: str | Path) -> Path:
    """Write a result folder atomically (a temporary folder moved into place).

    Returns
    -------
    Path
        The result folder.

    Raises
    ------
    ResultOwnerError
        When ``out_dir`` holds the result of another slide (it is kept).
    OutputError
        When the disk refuses the write (one line naming the folder; the
        previous result is untouched).
    """
    import zarr

    out_dir = Path(out_dir)
    recover_result_folder(out_dir)
    check_owner(out_dir, result.slide_path)
    heatmap_values = np.asarray(result.heatmap, dtype=np.float32)
    class_values = None if result.class_heatmaps is None else np.asarray(result.class_heatmaps, np.float32)
    points_bytes = None if result.points is None else _points_text(result.points).encode("utf-8")
    meta = {
        "format": RESULT_FORMAT,
        "version": RESULT_VERSION,
        "slide_path": result.slide_path,
        "slide_realpath": real_path(result.slide_path) if result.slide_path else None,
        "slide_name": result.slide_name,
        "slide_score": _finite_or_none(result.slide_score),
        "score_name": result.score_name,
        "scores": {str(k): _finite_or_none(v) for k, v in result.scores.items()},
        "partial": result.partial,
        "tiles_done": result.tiles_done,
        "tiles_total": result.tiles_total,
        "unit": result.unit,
        "n_detections": len(result.detections),
        "heatmap_kind": result.heatmap_kind,
        "cell_um": result.cell_um,
        "first_centre_um": list(result.first_centre_um),
        "slide_mpp": list(result.slide_mpp),
        "spec": result.spec,
        "key": result.key,
        "heatmap_shape": list(heatmap_values.shape),
        "cells_written": int(np.isfinite(heatmap_values).sum()),
        "heatmap_sha256": array_digest(heatmap_values),
        "class_heatmaps_sha256": None if class_values is None else array_digest(class_values),
        "n_points": None if result.points is None else len(result.points),
        "points_sha256": None if points_bytes is None else hashlib.sha256(points_bytes).hexdigest(),
        "provenance": result.provenance,
    }
    text = json.dumps(meta, indent=2, default=_json_default)
    with atomic_path(out_dir) as staging:
        staging.mkdir()  # permissions from the umask
        heatmap = zarr.open_array(
            store=str(staging / "heatmap.zarr"), mode="w", shape=heatmap_values.shape,
            chunks=(256, 256), dtype="float32", fill_value=np.nan,
        )  # fmt: skip
        heatmap[:] = heatmap_values
        if class_values is not None:
            classes = zarr.open_array(
                store=str(staging / "class_heatmaps.zarr"), mode="w",
                shape=class_values.shape, chunks=(1, 256, 256), dtype="float32", fill_value=np.nan,
            )  # fmt: skip
            classes[:] = class_values
        _write_detections(result, staging)
        if points_bytes is not None:
            (staging / POINTS_FILE).write_bytes(points_bytes)
        with open(staging / "result.json", "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    result.out_dir = out_dir
    return out_dir


def _write_detections(result: AnalysisResult, folder: Path) -> None:
    with open(folder / "detections.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["x_um", "y_um", "score"])
        for x, y, score in result.detections:
            writer.writerow([f"{x:.2f}", f"{y:.2f}", f"{score:.5f}"])
    mpp_x, mpp_y = result.slide_mpp
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [x / mpp_x, y / mpp_y]},
            "properties": {
                "objectType": "detection",
                "classification": {"name": "Tumor", "color": [200, 0, 0]},
                "measurements": {"score": float(score)},
                "model": result.model_name,
            },
        }
        for x, y, score in result.detections
    ]
    collection = {"type": "FeatureCollection", "features": features}
    (folder / "detections.geojson").write_text(json.dumps(collection), encoding="utf-8")


def _read_array(path: Path) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_array(str(path), mode="r")[:])


def _read_meta(out_dir: Path) -> dict[str, Any]:
    meta_path = out_dir / "result.json"
    try:
        meta = read_json_file(meta_path, "result file")
    except (OSError, ValueError) as exc:
        raise ValueError(f"{out_dir} is not a result folder ({exc})") from exc
    if isinstance(meta, dict) and "format" not in meta and "predicted_purity" in meta:
        raise ValueError(
            f"{out_dir} holds a nucleus result of an older version (nuclei.csv, purity_grid.npy) that "
            "records no um/px; run the model again to get a result this version reads"
        )
    if not isinstance(meta, dict) or meta.get("format") != RESULT_FORMAT:
        raise ValueError(f"{meta_path} was not written by napari-pathology")
    if meta.get("version") not in _READABLE_VERSIONS:
        raise ValueError(
            f"{meta_path} has format version {meta.get('version')!r}; this version of napari-pathology "
            f"reads {', '.join(map(str, _READABLE_VERSIONS))} (a newer napari-pathology wrote it?)"
        )
    return meta


def load_result(out_dir: str | Path, *, verify: bool = True) -> AnalysisResult:
    """Read a result folder written by :func:`save_result` (this version or version 2).

    Parameters
    ----------
    out_dir : path-like
        The result folder.
    verify : bool
        Check the heatmaps, detections and points against the digests and
        counts in ``result.json`` (lost or changed files are refused).

    Raises
    ------
    ValueError
        When the folder is not a readable result folder.
    ResultMismatchError
        When ``verify`` and the saved files do not match their record.
    """
    out_dir = Path(out_dir)
    recover_result_folder(out_dir)
    meta = _read_meta(out_dir)
    points = points_bytes = None
    try:
        heatmap = _read_array(out_dir / "heatmap.zarr")
        classes_path = out_dir / "class_heatmaps.zarr"
        class_heatmaps = _read_array(classes_path) if classes_path.exists() else None
        with open(out_dir / "detections.csv", newline="", encoding="utf-8") as handle:
            rows = [(float(r["x_um"]), float(r["y_um"]), float(r["score"])) for r in csv.DictReader(handle)]
        if meta.get("n_points") is not None:
            from napari_pathology.nuclei.points import read_csv

            points_bytes = (out_dir / POINTS_FILE).read_bytes()
            points = read_csv(io.StringIO(points_bytes.decode("utf-8")))
    except Exception as exc:  # zarr raises many kinds for missing or corrupt stores
        raise ValueError(f"{out_dir} is not a complete result folder: {type(exc).__name__}: {exc}") from exc
    if verify:
        _verify(meta, out_dir, heatmap, class_heatmaps, len(rows), points_bytes, points)
    try:
        return AnalysisResult(
            slide_path=meta["slide_path"],
            slide_name=str(meta["slide_name"]),
            spec=dict(meta["spec"]),
            heatmap=heatmap,
            class_heatmaps=class_heatmaps,
            cell_um=float(meta["cell_um"]),
            first_centre_um=tuple(float(v) for v in meta["first_centre_um"]),
            slide_mpp=tuple(float(v) for v in meta["slide_mpp"]),
            detections=np.array(rows, dtype=np.float64).reshape(-1, 3),
            slide_score=_float_or_nan(meta["slide_score"]),
            scores={str(k): _float_or_nan(v) for k, v in meta["scores"].items()},
            partial=bool(meta["partial"]),
            tiles_done=int(meta["tiles_done"]),
            tiles_total=int(meta["tiles_total"]),
            key=str(meta.get("key", "")),
            provenance=dict(meta.get("provenance", {})),
            out_dir=out_dir,
            heatmap_kind=str(meta.get("heatmap_kind", "probability")),
            points=points,
            unit=str(meta.get("unit", "tiles")),
            score_name=str(meta.get("score_name", "")),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(
            f"{out_dir / 'result.json'} is missing or has a bad field ({type(exc).__name__}: {exc})"
        ) from exc


def _verify(
    meta: dict[str, Any],
    out_dir: Path,
    heatmap: np.ndarray,
    class_heatmaps: np.ndarray | None,
    n_rows: int,
    points_bytes: bytes | None,
    points: NucleusPoints | None,
) -> None:
    if "heatmap_sha256" not in meta:
        raise ResultMismatchError(
            f"{out_dir} was saved without a heatmap digest (an older version); it cannot be verified"
        )
    written = int(np.isfinite(heatmap).sum())
    problems = []
    if written != meta.get("cells_written") or array_digest(heatmap) != meta["heatmap_sha256"]:
        problems.append(f"heatmap.zarr has {written} of {meta.get('cells_written')} recorded cells")
    if meta.get("class_heatmaps_sha256") is not None and (
        class_heatmaps is None or array_digest(class_heatmaps) != meta["class_heatmaps_sha256"]
    ):
        problems.append("class_heatmaps.zarr does not match its digest")
    if n_rows != meta.get("n_detections"):
        problems.append(f"detections.csv has {n_rows} of {meta.get('n_detections')} rows")
    if points is not None and points_bytes is not None:
        if len(points) != meta["n_points"]:
            problems.append(f"{POINTS_FILE} has {len(points)} of {meta['n_points']} nuclei")
        elif hashlib.sha256(points_bytes).hexdigest() != meta.get("points_sha256"):
            problems.append(f"{POINTS_FILE} does not match its digest")
    if problems:
        raise ResultMismatchError(
            f"the saved result in {out_dir} is damaged ({'; '.join(problems)}: files lost or changed); "
            "it will be recomputed"
        )
