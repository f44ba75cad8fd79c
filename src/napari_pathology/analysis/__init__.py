"""Running models over slides: one :func:`run` for every family, the engine, results, detections (no Qt)."""

from napari_pathology.analysis.engine import (
    HeatmapBlock,
    ModelOutputError,
    NoTissueError,
    RunSettings,
    RunSettingsError,
    aggregate,
    check_run,
    result_folder,
    run_analysis,
    tissue_or_detect,
)
from napari_pathology.analysis.nms import non_maximum_suppression
from napari_pathology.analysis.result import (
    AnalysisResult,
    ResultMismatchError,
    ResultOwnerError,
    load_result,
    save_result,
)
from napari_pathology.analysis.runners import RUNNERS, run, runner_for

__all__ = [
    "RUNNERS",
    "AnalysisResult",
    "HeatmapBlock",
    "ModelOutputError",
    "NoTissueError",
    "ResultMismatchError",
    "ResultOwnerError",
    "RunSettings",
    "RunSettingsError",
    "aggregate",
    "check_run",
    "load_result",
    "non_maximum_suppression",
    "result_folder",
    "run",
    "run_analysis",
    "runner_for",
    "save_result",
    "tissue_or_detect",
]
