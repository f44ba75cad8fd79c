"""Running models over slides: one :func:`run` for every family, one result type, the engine (no Qt).

:func:`run` picks the runner of the model's input kind (:data:`RUNNERS`);
every runner returns an :class:`AnalysisResult` (:mod:`.result` says how a
runner fills it). :mod:`.settings` holds the run settings and the checks
before any work, :mod:`.folders` where results go, :mod:`.engine` the
sliding-window loop of tile models, :mod:`.nuclei` the nucleus runner,
:mod:`.jobs` the whole of a Run for the Analyze panel.
"""

from napari_pathology.analysis.engine import (
    TILE_AGGREGATORS,
    HeatmapBlock,
    ModelOutputError,
    aggregate,
    run_analysis,
)
from napari_pathology.analysis.folders import ResultOwnerError, result_folder
from napari_pathology.analysis.jobs import analysis_job, default_results_dir, tissue_or_detect
from napari_pathology.analysis.nms import non_maximum_suppression
from napari_pathology.analysis.result import (
    HEATMAP_KINDS,
    AnalysisResult,
    HeatmapKind,
    ResultMismatchError,
    load_result,
    save_result,
)
from napari_pathology.analysis.runners import RUNNERS, run, runner_for
from napari_pathology.analysis.settings import NoTissueError, RunSettings, RunSettingsError, check_run

__all__ = [
    "HEATMAP_KINDS",
    "RUNNERS",
    "TILE_AGGREGATORS",
    "AnalysisResult",
    "HeatmapBlock",
    "HeatmapKind",
    "ModelOutputError",
    "NoTissueError",
    "ResultMismatchError",
    "ResultOwnerError",
    "RunSettings",
    "RunSettingsError",
    "aggregate",
    "analysis_job",
    "check_run",
    "default_results_dir",
    "load_result",
    "non_maximum_suppression",
    "result_folder",
    "run",
    "run_analysis",
    "runner_for",
    "save_result",
    "tissue_or_detect",
]
