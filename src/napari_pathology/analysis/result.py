"""Analysis results: what a run returns, how it is saved and reloaded.

A result folder holds ``heatmap.zarr`` (float32, NaN outside tissue and where
a cancelled run did not reach), ``detections.csv`` (``x_um,y_um,score``),
``detections.geojson`` (QuPath points in level-0 pixels) and ``result.json``
(``slide_score``, per-class ``scores``, ``partial``, the model spec, the grid
geometry and provenance, including the ``key`` that says whether the result is
still valid for a slide, model and settings).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

RESULT_FORMAT = "napari-pathology-result"


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


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in result.json")


def save_result(result: AnalysisResult, out_dir: str | Path) -> Path:
    """Write a result folder atomically (a temporary folder renamed into place).

    Returns
    -------
    Path
        The result folder.
    """
    import zarr

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        heatmap = zarr.open_array(
            store=str(staging / "heatmap.zarr"), mode="w", shape=result.heatmap.shape,
            chunks=(256, 256), dtype="float32", fill_value=np.nan,
        )  # fmt: skip
        heatmap[:] = result.heatmap.astype(np.float32)
        if result.class_heatmaps is not None:
            classes = zarr.open_array(
                store=str(staging / "class_heatmaps.zarr"), mode="w",
                shape=result.class_heatmaps.shape, chunks=(1, 256, 256), dtype="float32",
                fill_value=np.nan,
            )  # fmt: skip
            classes[:] = result.class_heatmaps.astype(np.float32)
        _write_detections(result, staging)
        meta = {
            "format": RESULT_FORMAT,
            "version": 1,
            "slide_path": result.slide_path,
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
            "provenance": result.provenance,
        }
        (staging / "result.json").write_text(json.dumps(meta, indent=2, default=_json_default))
        if out_dir.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-old-", dir=out_dir.parent))
            os.replace(out_dir, trash / "old")
            os.replace(staging, out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result.out_dir = out_dir
    return out_dir


def _write_detections(result: AnalysisResult, folder: Path) -> None:
    with open(folder / "detections.csv", "w", newline="") as handle:
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
    (folder / "detections.geojson").write_text(json.dumps(collection))


def load_result(out_dir: str | Path) -> AnalysisResult:
    """Read a result folder written by :func:`save_result`.

    Raises
    ------
    ValueError
        When the folder is not a complete result folder.
    """
    import zarr

    out_dir = Path(out_dir)
    meta_path = out_dir / "result.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{out_dir} is not a result folder ({exc})") from exc
    if meta.get("format") != RESULT_FORMAT:
        raise ValueError(f"{meta_path} was not written by napari-pathology")
    heatmap = np.asarray(zarr.open_array(str(out_dir / "heatmap.zarr"), mode="r")[:])
    classes_path = out_dir / "class_heatmaps.zarr"
    class_heatmaps = (
        np.asarray(zarr.open_array(str(classes_path), mode="r")[:]) if classes_path.exists() else None
    )
    with open(out_dir / "detections.csv", newline="") as handle:
        rows = [(float(r["x_um"]), float(r["y_um"]), float(r["score"])) for r in csv.DictReader(handle)]
    return AnalysisResult(
        slide_path=meta["slide_path"],
        slide_name=meta["slide_name"],
        spec=meta["spec"],
        heatmap=heatmap,
        class_heatmaps=class_heatmaps,
        cell_um=float(meta["cell_um"]),
        first_centre_um=tuple(meta["first_centre_um"]),
        slide_mpp=tuple(meta["slide_mpp"]),
        detections=np.array(rows, dtype=np.float64).reshape(-1, 3),
        slide_score=float(meta["slide_score"]),
        scores={k: float(v) for k, v in meta["scores"].items()},
        partial=bool(meta["partial"]),
        tiles_done=int(meta["tiles_done"]),
        tiles_total=int(meta["tiles_total"]),
        key=meta.get("key", ""),
        provenance=meta.get("provenance", {}),
        out_dir=out_dir,
    )
