"""Whole-slide nucleus purity: detect every nucleus in the tissue, classify each (the ``nucleus`` runner).

What **Run** does when the chosen model reads nuclei (METHODS.md section 3):
nuclei are detected chunk by chunk inside the tissue, each gets a tumour
probability, and the result is an :class:`~napari_pathology.analysis.result.AnalysisResult`
like every other run's: the nuclei are its ``points``, the mean tumour
probability per :data:`GRID_CELL_UM` cell its heatmap (kind ``purity``), and
its slide score the predicted purity (the mean probability), saved with
:func:`~napari_pathology.analysis.result.save_result` (atomic, digest-checked).
No Qt.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathology.analysis.engine import ModelOutputError
from napari_pathology.analysis.folders import check_owner
from napari_pathology.analysis.result import AnalysisResult, load_result, save_result
from napari_pathology.analysis.settings import NoTissueError, RunSettings, check_run, run_key, weights_digest
from napari_pathology.fileio import ensure_writable_dir
from napari_pathology.progress import Progress

__all__ = ["GRID_CELL_UM", "PURITY_SCORE_NAME", "run_nucleus_analysis"]

#: Side of the purity grid cells of a result (micrometres).
GRID_CELL_UM = 64.0
#: What the slide score of a nucleus run is.
PURITY_SCORE_NAME = "predicted purity (mean tumour probability)"


def run_nucleus_analysis(
    slide: Any,
    model: Any,
    tissue: Any,
    settings: RunSettings | None = None,
    out_dir: str | Path | None = None,
    cancel: threading.Event | None = None,
    detector_params: Any = None,
    on_saved: Callable[[AnalysisResult], None] | None = None,
    reuse: bool = True,
) -> Generator[Progress, None, AnalysisResult]:
    """Detect and classify every nucleus in the tissue; a generator of :class:`Progress`.

    Parameters
    ----------
    slide : Slide
        An opened slide with um/px.
    model : PathologyModel
        A model whose spec's output is ``nuclei`` (a nucleus classifier).
    tissue : TissueMask or None
        Where to look (chunks without tissue are skipped); None searches the whole slide.
    settings : RunSettings, optional
        Device and batch size (the tile settings are not used here).
    out_dir : path-like, optional
        Result folder (``nuclei.csv``, ``heatmap.zarr``, ``result.json``...).
    cancel : threading.Event, optional
        Set it to stop; the nuclei found so far are kept and labelled partial.
    detector_params : NucleusParams, optional
        Parameters of the default detector.
    on_saved : callable, optional
        Called with the result once it is on disk (saved, or reloaded).
    reuse : bool
        Reload a complete result saved in ``out_dir`` for the same slide, model
        weights, settings, tissue and detector instead of detecting again.

    Returns
    -------
    Generator
        Yields :class:`Progress`, returns an :class:`AnalysisResult` (heatmap kind ``purity``,
        the nuclei as ``points``, ``tiles_done`` / ``tiles_total`` counted in nuclei classified / found).

    Raises
    ------
    NoTissueError
        When the tissue mask is empty.
    ModelOutputError
        When the model gives NaN or infinite probabilities (nothing is saved).
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
    digest = weights_digest(model)
    key = run_key(slide, model.spec.to_dict(), digest, settings, tissue)
    key = hashlib.sha256(f"{key} {detector_params!r}".encode()).hexdigest()[:24]  # and the detector
    if reuse and out_dir is not None:
        previous = _saved(Path(out_dir), key)
        if previous is not None:
            return _reloaded(previous, on_saved)
    detection = detect_in_slide(slide, tissue=tissue, params=detector_params, cancel=cancel)
    return _run(slide, model, (key, digest), detection, settings, out_dir, cancel, on_saved)


def _saved(out_dir: Path, key: str) -> AnalysisResult | None:
    """The complete result saved for this run's key, if there is one that verifies."""
    if not (out_dir / "result.json").exists():
        return None
    try:
        previous = load_result(out_dir)
    except ValueError:  # damaged, another version, not a result: computed again
        return None
    return previous if previous.key == key and not previous.partial else None


def _reloaded(
    previous: AnalysisResult, on_saved: Callable[[AnalysisResult], None] | None
) -> Generator[Progress, None, AnalysisResult]:
    if on_saved is not None:
        on_saved(previous)
    yield Progress(previous.tiles_total, previous.tiles_total, "reloaded saved result")
    return previous


def _classify(
    slide: Any, model: Any, nuclei: Any, settings: RunSettings, cancel: threading.Event
) -> Generator[Progress, None, np.ndarray | None]:
    """Tumour probabilities of ``nuclei``, or None when cancelled."""
    from napari_pathology.nuclei.classify import classify_nuclei

    job = classify_nuclei(
        slide, nuclei.xy_um(), model, device=settings.device, batch_size=max(64, settings.batch_size)
    )
    try:
        while True:
            event = next(job)
            if cancel.is_set():
                job.close()
                return None
            yield Progress(event.done, event.total, f"classifying {len(nuclei)} nuclei: {event.message}")
    except StopIteration as finished:
        probability = np.asarray(finished.value, dtype=np.float64)
    if not np.isfinite(probability).all():
        bad = int((~np.isfinite(probability)).sum())
        raise ModelOutputError(
            f"model {model.spec.name} produced NaN or infinite outputs for {bad} of {len(probability)} "
            "nuclei; its weights are probably broken. Retrain it or use another checkpoint; nothing was "
            "saved."
        )
    return probability


def _run(
    slide: Any,
    model: Any,
    key_and_digest: tuple[str, str],
    detection: Generator[Progress, None, Any],
    settings: RunSettings,
    out_dir: str | Path | None,
    cancel: threading.Event,
    on_saved: Callable[[AnalysisResult], None] | None,
) -> Generator[Progress, None, AnalysisResult]:
    from napari_pathology.nuclei.density import density_grid
    from napari_pathology.nuclei.points import NucleusPoints

    started = time.perf_counter()
    table = yield from detection
    nuclei = NucleusPoints.from_table(table, source="detected")
    partial = cancel.is_set()
    if len(nuclei) and not partial:
        probability = yield from _classify(slide, model, nuclei, settings, cancel)
        if probability is None:
            partial = True
        else:
            nuclei = nuclei.with_probabilities(probability)
    mpp_x, mpp_y = slide.require_mpp()
    width, height = slide.dimensions
    grid = density_grid(nuclei.xy_um(), (width * mpp_x, height * mpp_y), GRID_CELL_UM, nuclei.probability)
    key, digest = key_and_digest
    spec = model.spec.to_dict()
    purity = nuclei.predicted_purity()
    slide_score = float("nan") if purity is None else float(purity)
    result = AnalysisResult(
        slide_path=slide.path, slide_name=slide.name, spec=spec, heatmap=grid.mean_probability,
        class_heatmaps=None, cell_um=grid.cell_um, first_centre_um=grid.first_centre_um,
        slide_mpp=(mpp_x, mpp_y), detections=np.zeros((0, 3)), slide_score=slide_score,
        scores=_class_scores(list(model.spec.classes), model.spec.positive_index, slide_score),
        partial=partial, tiles_done=int(np.isfinite(nuclei.probability).sum()), tiles_total=len(nuclei),
        key=key,
        provenance={
            "settings": asdict(settings), "weights": digest, "cancelled": partial,
            "seconds": round(time.perf_counter() - started, 3), "grid_cell_um": GRID_CELL_UM,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
        heatmap_kind="purity", points=nuclei, unit="nuclei", score_name=PURITY_SCORE_NAME,
    )  # fmt: skip
    if out_dir is not None:
        save_result(result, out_dir)
        if on_saved is not None:
            on_saved(result)
    return result


def _class_scores(classes: list[str], positive: int, purity: float) -> dict[str, float]:
    """Mean probability of each class over the nuclei: the purity, and one minus it for the other class."""
    if len(classes) != 2:
        return {classes[positive]: purity}
    return {name: purity if k == positive else 1.0 - purity for k, name in enumerate(classes)}
