"""Training and fine-tuning: generators of events that the CLI and the Train panel drive (no Qt)."""

from napari_pathology.training.events import TrainEvent, TrainingError, TrainResult
from napari_pathology.training.loop import LoopSettings, checkpoint_paths, fit, resume_state
from napari_pathology.training.metastasis import MetastasisTraining, train_metastasis

__all__ = [
    "LoopSettings",
    "MetastasisTraining",
    "TrainEvent",
    "TrainResult",
    "TrainingError",
    "checkpoint_paths",
    "fit",
    "resume_state",
    "train_metastasis",
]
