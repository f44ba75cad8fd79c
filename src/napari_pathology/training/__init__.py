"""Training machinery shared by every family: events, the loop (with a loss hook), checkpoints (no Qt).

Each family's trainer and settings live in its folder
(:mod:`napari_pathology.families`); drive one with
``get_family(name).train(settings, data, out, stop)``.
"""

from napari_pathology.training.events import TrainEvent, TrainingError, TrainResult
from napari_pathology.training.loop import (
    LoopSettings,
    check_output,
    check_resume,
    checkpoint_paths,
    fit,
    resume_state,
    torch_threads,
)

__all__ = [
    "LoopSettings",
    "TrainEvent",
    "TrainResult",
    "TrainingError",
    "check_output",
    "check_resume",
    "checkpoint_paths",
    "fit",
    "resume_state",
    "torch_threads",
]
