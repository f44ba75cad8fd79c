"""Running models over slides: the engine, results, detections (no Qt)."""

from napari_pathology.analysis.engine import (
    HeatmapBlock,
    NoTissueError,
    RunSettings,
    aggregate,
    result_folder,
    run_analysis,
    tissue_or_detect,
)
from napari_pathology.analysis.nms import non_maximum_suppression
from napari_pathology.analysis.result import AnalysisResult, load_result, save_result

__all__ = [
    "AnalysisResult",
    "HeatmapBlock",
    "NoTissueError",
    "RunSettings",
    "aggregate",
    "load_result",
    "non_maximum_suppression",
    "result_folder",
    "run_analysis",
    "save_result",
    "tissue_or_detect",
]
