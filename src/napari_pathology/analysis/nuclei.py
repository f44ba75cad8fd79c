"""Whole-slide nucleus purity through the engine: detect every nucleus in the tissue, classify each.

What **Run** does when the chosen model is a ``nucleus-purity`` classifier
(METHODS.md section 3): nuclei are detected chunk by chunk inside the tissue,
each gets a tumour probability, and the slide score is the predicted purity
(the mean probability). The result is saved beside the other results: the
nuclei as CSV, a purity grid, and a JSON summary. No Qt.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathology.analysis.engine import ModelOutputError, NoTissueError, RunSettings, check_run
from napari_pathology.analysis.result import check_owner, recover_result_folder
from napari_pathology.fileio import atomic_path, ensure_writable_dir
from napari_pathology.nuclei.density import DensityGrid, density_grid
from napari_pathology.nuclei.points import NucleusPoints, write_csv
from napari_pathology.progress import Progress

__all__ = ["NucleusAnalysisResult", "run_nucleus_analysis"]

#: Side of the purity grid cells saved with a result (micrometres).
GRID_CELL_UM = 64.0


@dataclass(frozen=True)
class NucleusAnalysisResult:
    """Every nucleus of a slide with its tumour probability, and the slide's predicted purity.

    Attributes
    ----------
    nuclei : NucleusPoints
        Detected nuclei (source ``detected``) with ``probability`` set, unless cancelled before.
    predicted_purity : float or None
        Mean tumour probability over the classified nuclei.
    grid : DensityGrid
        Nuclei per cell and mean tumour probability per cell.
    spec : dict
        The model's spec.
    partial : bool
        Whether the run was cancelled (nuclei found so far are kept).
    out_dir : Path or None
        Where it was saved.
    """

    nuclei: NucleusPoints
    predicted_purity: float | None
    grid: DensityGrid
    spec: dict[str, Any]
    partial: bool
    out_dir: Path | None

    def summary(self) -> str:
        """One line for logs and the CLI."""
        state = "PARTIAL (cancelled)" if self.partial else "complete"
        purity = "-" if self.predicted_purity is None else f"{self.predicted_purity:.3f}"
        return f"{self.spec.get('name')}: {state}, {len(self.nuclei)} nuclei, predicted purity {purity}"

    @property
    def detections(self) -> np.ndarray:
        """No tile detections: an empty ``(0, 3)`` array, as a tile result without any has."""
        return np.empty((0, 3))

    @property
    def slide_score(self) -> float:
        """The predicted purity (NaN when nothing was classified)."""
        return float("nan") if self.predicted_purity is None else self.predicted_purity


def run_nucleus_analysis(
    slide: Any,
    model: Any,
    tissue: Any,
    settings: RunSettings | None = None,
    out_dir: str | Path | None = None,
    cancel: threading.Event | None = None,
    detector_params: Any = None,
) -> Generator[Progress, None, NucleusAnalysisResult]:
    """Detect and classify every nucleus in the tissue; a generator of :class:`Progress`.

    Parameters
    ----------
    slide : Slide
        An opened slide with um/px.
    model : PathologyModel
        A ``nucleus-purity`` model.
    tissue : TissueMask or None
        Where to look (chunks without tissue are skipped); None searches the whole slide.
    settings : RunSettings, optional
        Device and batch size (others are ignored here).
    out_dir : path-like, optional
        Folder for ``nuclei.csv``, ``purity_grid.npy`` and ``result.json``.
    cancel : threading.Event, optional
        Set it to stop; the nuclei found so far are kept and labelled partial.
    detector_params : NucleusParams, optional
        Parameters of the default detector.

    Returns
    -------
    Generator
        Yields :class:`Progress`, returns a :class:`NucleusAnalysisResult`.

    Raises
    ------
    NoTissueError
        When the tissue mask is empty.
    """
    from napari_pathology.nuclei.classify import require_purity_model
    from napari_pathology.nuclei.run import detect_in_slide

    settings = settings or RunSettings()
    cancel = cancel or threading.Event()
    slide.require_mpp()
    check_run(slide, model.spec, settings)
    if out_dir is not None:  # before the long detection
        ensure_writable_dir(Path(out_dir).parent)
        check_owner(out_dir, slide.path)
    if tissue is not None and tissue.is_empty:
        raise NoTissueError(f"No tissue found in {slide.name}; draw or import a tissue mask.")
    require_purity_model(model)  # before the long detection
    detection = detect_in_slide(slide, tissue=tissue, params=detector_params, cancel=cancel)
    return _run(slide, model, detection, settings, out_dir, cancel)


def _run(
    slide: Any,
    model: Any,
    detection: Generator[Progress, None, Any],
    settings: RunSettings,
    out_dir: str | Path | None,
    cancel: threading.Event,
) -> Generator[Progress, None, NucleusAnalysisResult]:
    from napari_pathology.nuclei.classify import classify_nuclei

    table = yield from detection
    nuclei = NucleusPoints.from_table(table, source="detected")
    partial = cancel.is_set()
    if len(nuclei) and not partial:
        job = classify_nuclei(
            slide, nuclei.xy_um(), model, device=settings.device, batch_size=max(64, settings.batch_size)
        )
        try:
            while True:
                event = next(job)
                if cancel.is_set():
                    job.close()
                    partial = True
                    break
                yield Progress(event.done, event.total, f"classifying {len(nuclei)} nuclei: {event.message}")
        except StopIteration as finished:
            probability = np.asarray(finished.value, dtype=np.float64)
            if not np.isfinite(probability).all():
                bad = int((~np.isfinite(probability)).sum())
                raise ModelOutputError(
                    f"model {model.spec.name} produced NaN or infinite outputs for {bad} of "
                    f"{len(probability)} nuclei; its weights are probably broken. Retrain it or use "
                    "another checkpoint; nothing was saved."
                ) from None
            nuclei = nuclei.with_probabilities(finished.value)
    mpp_x, mpp_y = slide.require_mpp()
    width, height = slide.dimensions
    grid = density_grid(nuclei.xy_um(), (width * mpp_x, height * mpp_y), GRID_CELL_UM, nuclei.probability)
    result = NucleusAnalysisResult(
        nuclei=nuclei,
        predicted_purity=nuclei.predicted_purity(),
        grid=grid,
        spec=model.spec.to_dict(),
        partial=partial,
        out_dir=Path(out_dir) if out_dir is not None else None,
    )
    if out_dir is not None:
        save_nucleus_result(result, slide.name, slide.path)
    return result


def save_nucleus_result(
    result: NucleusAnalysisResult, slide_name: str, slide_path: str | None = None
) -> Path:
    """Write ``nuclei.csv``, ``purity_grid.npy`` and ``result.json`` into ``result.out_dir``, atomically.

    The folder is written whole (:func:`napari_pathology.fileio.atomic_path`):
    a kill or a full disk leaves the previous result, never a torn one.

    Raises
    ------
    ResultOwnerError
        When the folder holds the result of another slide.
    OutputError
        When the disk refuses the write (one line naming the folder).
    """
    if result.out_dir is None:
        raise ValueError("the result has no out_dir to save into")
    folder = Path(result.out_dir)
    recover_result_folder(folder)
    check_owner(folder, slide_path)
    summary = {
        "slide": slide_name,
        "slide_path": slide_path,
        "slide_realpath": os.path.realpath(slide_path) if slide_path else None,
        "model": result.spec.get("name"),
        "n_nuclei": len(result.nuclei),
        "predicted_purity": result.predicted_purity,
        "partial": result.partial,
        "grid_cell_um": result.grid.cell_um,
        "spec": result.spec,
    }
    with atomic_path(folder) as staging:
        staging.mkdir()  # permissions from the umask
        write_csv(result.nuclei, staging / "nuclei.csv")
        np.save(staging / "purity_grid.npy", result.grid.mean_probability)
        (staging / "result.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return folder
