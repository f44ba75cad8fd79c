"""What one Run does, start to end, off the Qt thread: open, load, check, find tissue, run (no Qt).

The Analyze panel runs :func:`analysis_job` in a worker; every step that can
take more than a moment (opening the slide, loading the model, finding the
tissue, the run itself) happens inside the generator.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from napari_pathology.analysis.result import AnalysisResult
from napari_pathology.analysis.settings import NoTissueError, RunSettings
from napari_pathology.progress import Progress

__all__ = ["analysis_job", "default_results_dir", "tissue_or_detect"]


def default_results_dir() -> Path:
    """Where results go unless the user picks a folder: ``<cache>/results``."""
    from napari_pathology.demo import cache_dir

    return cache_dir() / "results"


def tissue_or_detect(slide: Any, tissue: Any = None) -> Generator[Progress, None, Any]:
    """The given tissue mask, or one found with the default parameters (a generator).

    Raises
    ------
    NoTissueError
        When no tissue is given and none is found.
    """
    from napari_pathology.tissue import TissueParams, detect_tissue

    if tissue is not None:
        return tissue
    yield Progress(0, 0, "finding tissue...")
    tissue = yield from detect_tissue(slide, TissueParams())
    if tissue.is_empty:
        raise NoTissueError(f"No tissue found in {slide.name}; draw or import a tissue mask.")
    return tissue


def analysis_job(
    open_slide: Callable[[], Any],
    model_source: str | os.PathLike[str],
    settings: RunSettings,
    tissue: Any,
    out_root: str | os.PathLike[str],
    cancel: threading.Event,
) -> Generator[Progress, None, AnalysisResult]:
    """Open the slide, load the model, check, find tissue and run the model as its family runs.

    Parameters
    ----------
    open_slide : callable
        Returns the :class:`~napari_pathology.slide.Slide` (called in the job: opening may be slow).
    model_source : str or path-like
        Registry name or checkpoint.
    settings : RunSettings
        The run settings.
    tissue : TissueMask or None
        A mask the user made; None finds one with the default parameters.
    out_root : path-like
        Results go to ``out_root/<slide>/<model>`` (:func:`~napari_pathology.analysis.result_folder`).
    cancel : threading.Event
        Set it to stop; what is finished is kept, marked partial.

    Returns
    -------
    Generator
        Yields :class:`Progress`, returns the :class:`AnalysisResult`.
    """
    from napari_pathology.analysis.folders import result_folder
    from napari_pathology.analysis.runners import run
    from napari_pathology.analysis.settings import check_run
    from napari_pathology.models import resolve_model

    slide = open_slide()
    slide.require_mpp()
    yield Progress(0, 0, f"loading {Path(model_source).name}...")
    model = resolve_model(model_source)
    check_run(slide, model.spec, settings)  # the real cause (um/px, stride...) before "no tissue"
    tissue = yield from tissue_or_detect(slide, tissue)
    out_dir = result_folder(out_root, slide, model.spec.name)
    return (yield from run(slide, model, tissue=tissue, settings=settings, out_dir=out_dir, cancel=cancel))
