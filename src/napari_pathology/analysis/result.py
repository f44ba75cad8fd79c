"""Analysis results: what a run returns, how it is saved and reloaded.

A result folder holds ``heatmap.zarr`` (float32, NaN outside tissue and where
a cancelled run did not reach), ``detections.csv`` (``x_um,y_um,score``),
``detections.geojson`` (QuPath points in level-0 pixels) and ``result.json``
(``slide_score``, per-class ``scores``, ``partial``, the model spec, the grid
geometry and provenance, including the ``key`` that says whether the result is
still valid for a slide, model and settings).

The folder is written whole through :func:`napari_pathology.fileio.atomic_path`
(a kill at any moment leaves the previous result or the new one, never a mix),
and ``result.json`` records a SHA-256 of the heatmaps and the number of cells
written, checked on every load: a result whose zarr chunks were lost or
changed is refused, never reloaded as complete. A result folder belongs to the
slide whose path ``result.json`` records; :func:`save_result` refuses to
replace the result of another slide.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathology.fileio import atomic_path, read_json_file

__all__ = [
    "AnalysisResult",
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
RESULT_VERSION = 2


class ResultMismatchError(ValueError):
    """A saved result's arrays do not match what its ``result.json`` recorded (lost or changed chunks)."""


class ResultOwnerError(ValueError):
    """The result folder holds the result of another slide; it is not replaced."""


@dataclass
class AnalysisResult:
    """Everything a run produced for one slide and one model.

    Coordinates are physical micrometres from the slide's top-left corner
    (x right, y down); heatmap cell ``(r, c)`` is centred at
    ``first_centre_um + (r, c) * cell_um``.
    """

    slide_path: str | None
    slide_name: str
    spec: dict[str, Any]
    heatmap: np.ndarray  # (rows, cols) float32, positive-class probability
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

    @property
    def model_name(self) -> str:
        """Name of the model that produced the result."""
        return str(self.spec.get("name", "model"))

    def summary(self) -> str:
        """One line for logs and the CLI."""
        state = f"PARTIAL ({self.tiles_done}/{self.tiles_total} tiles)" if self.partial else "complete"
        return (
            f"{self.slide_name}: {self.model_name} slide score {self.slide_score:.3f}, "
            f"{len(self.detections)} detections, {self.tiles_done} tiles, {state}"
        )


def array_digest(array: np.ndarray) -> str:
    """SHA-256 of a float32 array's shape and values (every NaN counts as the same NaN)."""
    values = np.ascontiguousarray(np.asarray(array, dtype=np.float32))
    values = np.where(np.isnan(values), np.float32(np.nan), values)
    digest = hashlib.sha256(repr(values.shape).encode())
    digest.update(values.tobytes())
    return digest.hexdigest()


def _real(path: str | os.PathLike[str]) -> str:
    return os.path.realpath(os.path.expanduser(os.fspath(path)))


def same_slide_path(a: str | os.PathLike[str] | None, b: str | os.PathLike[str] | None) -> bool:
    """Whether two recorded slide paths name the same file (None matches only None)."""
    if a is None or b is None:
        return a is None and b is None
    if _real(a) == _real(b):
        return True
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)
    return False


_UNREADABLE = object()


def _recorded_slide(meta_path: Path) -> Any:
    """The slide path a ``result.json`` records, or ``_UNREADABLE``."""
    try:
        meta = read_json_file(meta_path, "result file")
    except (OSError, ValueError):
        return _UNREADABLE
    if not isinstance(meta, dict):
        return _UNREADABLE
    return meta.get("slide_realpath") or meta.get("slide_path")


def folder_owner(folder: str | os.PathLike[str], slide_path: str | None) -> bool | None:
    """Whether the results in ``folder`` (``result.json`` in it or its sub-folders) belong to ``slide_path``.

    Returns
    -------
    bool or None
        None when the folder holds no result (free), True when every result
        in it records ``slide_path``, False when one records another slide or
        cannot be read (never assumed to be ours).
    """
    folder = Path(folder)
    if not folder.exists():
        return None
    if not folder.is_dir():
        return False
    metas = [folder / "result.json"] if (folder / "result.json").exists() else []
    with contextlib.suppress(OSError):
        metas += sorted(
            p / "result.json" for p in folder.iterdir() if p.is_dir() and (p / "result.json").exists()
        )
    if not metas:
        return None
    for meta in metas:
        recorded = _recorded_slide(meta)
        if recorded is _UNREADABLE or not same_slide_path(recorded, slide_path):
            return False
    return True


def check_owner(out_dir: str | os.PathLike[str], slide_path: str | None) -> None:
    """Refuse a result folder whose ``result.json`` records another slide.

    Raises
    ------
    ResultOwnerError
        Naming the folder and the slide it belongs to.
    """
    meta_path = Path(out_dir) / "result.json"
    if not meta_path.exists():
        return
    recorded = _recorded_slide(meta_path)
    if recorded is not _UNREADABLE and not same_slide_path(recorded, slide_path):
        raise ResultOwnerError(
            f"{out_dir} holds the result of another slide ({recorded}); not replaced. "
            "Choose another output folder or remove that result."
        )


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in result.json")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def recover_result_folder(out_dir: str | os.PathLike[str]) -> None:
    """Repair what a kill in the middle of replacing a result folder left behind.

    A process killed between the two renames of a folder replacement leaves
    the previous result in a hidden ``.<name>.<pid>.<id>.old`` sibling: it is
    moved back when ``out_dir`` is missing. Temporaries of dead processes are
    removed.
    """
    import shutil

    out_dir = Path(out_dir)
    parent = out_dir.parent
    if not parent.is_dir():
        return
    leftovers = []
    for sibling in parent.glob(f".{out_dir.name}.*"):
        parts = sibling.name[len(out_dir.name) + 2 :].split(".")
        if len(parts) == 3 and parts[0].isdigit() and len(parts[1]) == 8 and parts[2] in ("old", "tmp"):
            if not _pid_alive(int(parts[0])):
                leftovers.append(sibling)
    olds = sorted(
        (p for p in leftovers if p.name.endswith(".old") and (p / "result.json").exists()),
        key=lambda p: p.stat().st_mtime_ns,
    )
    if not out_dir.exists() and olds:
        with contextlib.suppress(OSError):
            os.replace(olds[-1], out_dir)
    for sibling in leftovers:
        if sibling.exists():
            if sibling.is_dir() and not sibling.is_symlink():
                shutil.rmtree(sibling, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    sibling.unlink()


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
    slide_real = _real(result.slide_path) if result.slide_path else None
    check_owner(out_dir, result.slide_path)
    heatmap_values = np.asarray(result.heatmap, dtype=np.float32)
    class_values = None if result.class_heatmaps is None else np.asarray(result.class_heatmaps, np.float32)
    meta = {
        "format": RESULT_FORMAT,
        "version": RESULT_VERSION,
        "slide_path": result.slide_path,
        "slide_realpath": slide_real,
        "slide_name": result.slide_name,
        "slide_score": result.slide_score,
        "scores": result.scores,
        "partial": result.partial,
        "tiles_done": result.tiles_done,
        "tiles_total": result.tiles_total,
        "n_detections": len(result.detections),
        "cell_um": result.cell_um,
        "first_centre_um": list(result.first_centre_um),
        "slide_mpp": list(result.slide_mpp),
        "spec": result.spec,
        "key": result.key,
        "heatmap_shape": list(heatmap_values.shape),
        "cells_written": int(np.isfinite(heatmap_values).sum()),
        "heatmap_sha256": array_digest(heatmap_values),
        "class_heatmaps_sha256": None if class_values is None else array_digest(class_values),
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


def load_result(out_dir: str | Path, *, verify: bool = True) -> AnalysisResult:
    """Read a result folder written by :func:`save_result`.

    Parameters
    ----------
    out_dir : path-like
        The result folder.
    verify : bool
        Check the heatmaps against the digests and cell count in
        ``result.json`` (lost or changed zarr chunks are refused).

    Raises
    ------
    ValueError
        When the folder is not a readable result folder.
    ResultMismatchError
        When ``verify`` and the saved arrays do not match their record.
    """
    out_dir = Path(out_dir)
    recover_result_folder(out_dir)
    meta_path = out_dir / "result.json"
    try:
        meta = read_json_file(meta_path, "result file")
    except (OSError, ValueError) as exc:
        raise ValueError(f"{out_dir} is not a result folder ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != RESULT_FORMAT:
        raise ValueError(f"{meta_path} was not written by napari-pathology")
    try:
        heatmap = _read_array(out_dir / "heatmap.zarr")
        classes_path = out_dir / "class_heatmaps.zarr"
        class_heatmaps = _read_array(classes_path) if classes_path.exists() else None
        with open(out_dir / "detections.csv", newline="", encoding="utf-8") as handle:
            rows = [(float(r["x_um"]), float(r["y_um"]), float(r["score"])) for r in csv.DictReader(handle)]
    except Exception as exc:  # zarr raises many kinds for missing or corrupt stores
        raise ValueError(f"{out_dir} is not a complete result folder: {type(exc).__name__}: {exc}") from exc
    if verify:
        _verify(meta, out_dir, heatmap, class_heatmaps, len(rows))
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
            slide_score=float(meta["slide_score"]),
            scores={str(k): float(v) for k, v in meta["scores"].items()},
            partial=bool(meta["partial"]),
            tiles_done=int(meta["tiles_done"]),
            tiles_total=int(meta["tiles_total"]),
            key=str(meta.get("key", "")),
            provenance=dict(meta.get("provenance", {})),
            out_dir=out_dir,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{meta_path} is missing or has a bad field ({type(exc).__name__}: {exc})") from exc


def _verify(
    meta: dict[str, Any], out_dir: Path, heatmap: np.ndarray, class_heatmaps: np.ndarray | None, n_rows: int
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
    if problems:
        raise ResultMismatchError(
            f"the saved result in {out_dir} is damaged ({'; '.join(problems)}: chunks lost or changed); "
            "it will be recomputed"
        )
