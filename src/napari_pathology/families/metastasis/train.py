"""Training Liu et al. 2017's metastasis detector from slides and tumour polygons.

:func:`train_metastasis` is a generator of
:class:`~napari_pathology.training.events.TrainEvent`: it reads the slide
table, splits it by slide, samples patches as the paper did (class, then
slide, then position; 8 orientations, colour and 8 px jitter), optimises
with RMSProp (momentum 0.9, decay 0.9, epsilon 1.0; learning rate 0.05
halved every 2M examples, or 0.002 when fine-tuning), validates on a fixed
balanced set of patches from the held-out slides (AUC, accuracy, loss) and
writes the best (lowest validation loss) and last checkpoints.

Every setting is checked when the job is made; the output folder, an
existing model and the state to resume are checked before any slide is read
or any reader thread starts, and every thread the job starts is closed when
it ends, however it ends.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Generator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from napari_pathology.analysis.metrics import roc_auc
from napari_pathology.cohort import read_slide_table
from napari_pathology.families.metastasis import FAMILY
from napari_pathology.families.metastasis.patches import (
    BatchStream,
    PatchSampler,
    fixed_patches,
    mine_hard_negatives,
    prepare_regions,
)
from napari_pathology.models.registry import PathologyModel
from napari_pathology.training.augment import Augmentation
from napari_pathology.training.common import (
    check_count,
    check_flag,
    check_number,
    model_name_for,
    progress_as_log,
    provenance_entries,
    split_by_slide,
    starting_model,
)
from napari_pathology.training.events import TrainEvent, TrainingError, TrainResult
from napari_pathology.training.loop import (
    LoopSettings,
    check_output,
    check_resume,
    checkpoint_paths,
    fit,
    seed_everything,
    torch_threads,
)

__all__ = ["MetastasisTraining", "train_metastasis"]


@dataclass(frozen=True)
class MetastasisTraining:
    """A metastasis training job.

    Parameters
    ----------
    data : Path
        Slide table (CSV with ``slide``, ``label``, ``annotations``) or a folder.
    out : Path
        Best checkpoint; ``<stem>.last.pt`` holds the last one.
    start : str
        Registry name (train from its initialisation) or checkpoint / trained
        name (fine-tune).
    steps : int
        Optimiser steps.
    batch_size : int
        Patches per step.
    lr : float, optional
        Learning rate (default 0.05, or 0.002 when fine-tuning).
    val_fraction : float
        Share of slides held out for validation.
    val_patches : int
        Size of the fixed validation set.
    eval_every : int
        Steps between validations and saves.
    device : str
        ``"cpu"``, ``"cuda:N"`` or ``"auto"``.
    amp : bool
        Mixed precision on CUDA.
    seed : int
        Seeds sampling, augmentation and initialisation.
    resume : bool
        Continue from the last checkpoint of ``out``.
    hard_negative_fraction : float
        After each validation, score ``hard_negative_candidates`` random
        normal patches and draw this share of later normal patches from those
        the model calls tumour (hard-negative mining; 0 = Liu et al.'s plain
        sampling).
    hard_negative_candidates : int
        Normal patches scored per mining round.
    log_every : int
        Steps between ``step`` events (loss curve points).
    threads : int, optional
        CPU threads torch uses for the job (default: the usable cores, at most 4).
    overwrite : bool
        Replace an existing model at ``out`` (otherwise refused unless ``resume``).

    Raises
    ------
    TrainingError
        For any setting out of range (naming it), when the job is made.
    """

    data: Path
    out: Path
    start: str = "metastasis-small-10x"
    steps: int = 2000
    batch_size: int = 32
    lr: float | None = None
    val_fraction: float = 0.2
    val_patches: int = 256
    eval_every: int = 100
    device: str = "cpu"
    amp: bool = True
    seed: int = 0
    augmentation: Augmentation = field(default_factory=Augmentation)
    workers: int = 2
    resume: bool = False
    hard_negative_fraction: float = 0.0
    hard_negative_candidates: int = 768
    log_every: int = 5
    threads: int | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", Path(self.data))
        object.__setattr__(self, "out", Path(self.out))
        for name in ("steps", "batch_size", "val_patches", "eval_every", "workers"):
            check_count(self, name)
        for name in ("hard_negative_candidates", "log_every"):
            check_count(self, name)
        check_count(self, "seed", 0)
        check_count(self, "threads", optional=True)
        check_number(self, "lr", 0, inclusive=False, optional=True)
        check_number(self, "val_fraction", 0, below=1)
        check_number(self, "hard_negative_fraction", 0, 1)
        for name in ("amp", "resume", "overwrite"):
            check_flag(self, name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings for provenance."""
        out = asdict(self)
        out["data"], out["out"] = str(self.data), str(self.out)
        return out


def train_metastasis(
    job: MetastasisTraining, stop: threading.Event | None = None
) -> Generator[TrainEvent, None, TrainResult]:
    """Run a metastasis training job (see :class:`MetastasisTraining`); yields events, returns the result."""
    with torch_threads(job.threads):
        return (yield from _train(job, stop))


def _train(job: MetastasisTraining, stop: threading.Event | None) -> Generator[TrainEvent, None, TrainResult]:
    check_output(job.out, resume=job.resume, overwrite=job.overwrite)
    resume = check_resume(job.out) if job.resume else None  # before any reader thread starts
    seed_everything(job.seed)
    model, pretrained = _start(job, resume[0] if resume else None)
    spec = model.spec
    entries = read_slide_table(job.data)
    train, val = split_by_slide(entries, job.val_fraction, job.seed)
    yield TrainEvent("log", 0, job.steps, message=(
        f"{len(train)} training and {len(val)} validation slides; {model.spec.name} at {spec.mpp:g} um/px, "
        f"{spec.input_size} px patches labelled by their centre {spec.centre_size} px"
    ))  # fmt: skip
    regions = yield from progress_as_log(prepare_regions(train, spec), job.steps)
    validate = None
    if val:
        val_regions = yield from progress_as_log(prepare_regions(val, spec), job.steps)
        val_x, val_y = fixed_patches(val_regions, spec, job.val_patches, seed=job.seed + 7)
        validate = _patch_validation(val_x, val_y)
    init = getattr(model.net, "init", "unknown")
    lr = job.lr if job.lr is not None else (0.002 if pretrained else 0.05)
    optimizer = torch.optim.RMSprop(
        [p for p in model.parameters() if p.requires_grad], lr=lr, alpha=0.9, momentum=0.9, eps=1.0
    )
    halve_every = max(1, math.ceil(2_000_000 / job.batch_size))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=halve_every, gamma=0.5)
    if resume:
        started = f"resumed from {checkpoint_paths(job.out)[1].name} at step {resume[1]['step']}"
    else:
        started = f"checkpoint {job.start}" if pretrained else init
    yield TrainEvent("log", 0, job.steps, message=f"initialisation: {started}")
    provenance = {
        "family": "metastasis", "job": job.to_dict(), "lr": lr, "optimizer": "RMSProp(0.9, 0.9, eps 1.0)",
        "initialisation": f"checkpoint {job.start}" if pretrained else init,
        "train_slides": provenance_entries(train), "val_slides": provenance_entries(val),
        "sampling": "class, then slide, then position (Liu et al. 2017)",
    }  # fmt: skip
    settings = LoopSettings(
        job.steps, Path(job.out), job.eval_every, job.device, job.amp, log_every=max(1, job.log_every)
    )
    after_validation = None
    if job.hard_negative_fraction > 0:

        def after_validation(net: PathologyModel, step: int) -> str:
            hard, scored = mine_hard_negatives(net, sampler, job.hard_negative_candidates)
            sampler.set_hard_negatives(hard, job.hard_negative_fraction)
            if not hard:
                return f"hard negatives: none of {scored} random normal patches scores >= 0.5"
            return (
                f"hard negatives: {len(hard)} of {scored} random normal patches score >= 0.5; "
                f"{job.hard_negative_fraction:.0%} of normal patches now come from them"
            )

    sampler = PatchSampler(regions, spec, margin=job.augmentation.jitter, seed=job.seed, workers=job.workers)
    try:
        stream = BatchStream(sampler, job.batch_size, job.augmentation, seed=job.seed)
        try:
            return (
                yield from fit(
                    model, stream, optimizer, settings, validate=validate, scheduler=scheduler,
                    provenance=provenance, stop=stop, resume=resume[1] if resume else None,
                    after_validation=after_validation, loss=FAMILY.loss(), best_metric=FAMILY.best_metric,
                    best_mode=FAMILY.best_mode,
                )
            )  # fmt: skip
        finally:
            stream.close()
    finally:
        sampler.close()


def _start(job: MetastasisTraining, resumed: PathologyModel | None) -> tuple[PathologyModel, bool]:
    if resumed is not None:
        model, pretrained = resumed, True
    else:
        model, pretrained = starting_model(job.start)
    if model.spec.family != "metastasis":
        raise TrainingError(f"{job.start!r} is a {model.spec.family!r} model, not a metastasis detector")
    if model.spec.centre_size is None:
        raise TrainingError(f"{model.spec.name!r} has no centre (label) region")
    model.spec = model.spec.replace(name=model_name_for(job.out))
    return model, pretrained


def _patch_validation(x: torch.Tensor, y: torch.Tensor) -> Any:
    labels = y.numpy()

    def validate(model: PathologyModel) -> dict[str, float]:
        device = next(model.parameters()).device
        logits = torch.cat([model(x[i : i + 64].to(device)).float().cpu() for i in range(0, len(x), 64)])
        probs = torch.softmax(logits, 1)[:, model.spec.positive_index].numpy()
        loss = float(F.cross_entropy(logits, y))
        return {  # the best is the lowest val_loss (the family's best_metric): a proper scoring rule;
            # AUC saturates on a few hundred patches
            "auc": roc_auc(labels, probs),
            "accuracy": float(((probs >= 0.5) == (labels == 1)).mean()),
            "val_loss": loss,
        }

    return validate
