"""Training and fine-tuning: generators of events that the CLI and the Train panel drive (no Qt)."""

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
from napari_pathology.training.metastasis import MetastasisTraining, train_metastasis
from napari_pathology.training.nucleus_purity import (
    LabelledNuclei,
    NucleusPurityTraining,
    train_nucleus_purity,
)

__all__ = [
    "LabelledNuclei",
    "LoopSettings",
    "MetastasisTraining",
    "NucleusPurityTraining",
    "TrainEvent",
    "TrainResult",
    "TrainingError",
    "check_output",
    "check_resume",
    "checkpoint_paths",
    "fit",
    "resume_state",
    "torch_threads",
    "train_metastasis",
    "train_nucleus_purity",
]
