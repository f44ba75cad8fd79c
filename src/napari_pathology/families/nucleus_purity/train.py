"""Training the nucleus purity classifier (family ``nucleus-purity``) from labelled nuclei.

Noorbakhsh et al. 2020 trained Hlavcheva et al.'s CNN from scratch on
nucleus patches (32 x 32 px, histogram-equalised) labelled tumour or normal,
and predicted the purity of a region as the mean tumour probability of its
nuclei. :func:`train_nucleus_purity` does the same from
:class:`LabelledNuclei` (points on slides):

1. Patches are read once for every labelled nucleus (progress as ``log`` events).
2. Nuclei are split into training and validation **by region**: the
   regions a person drew (``region_ids``), otherwise square blocks of
   ``block_um`` micrometres, so that neighbouring nuclei, whose patches
   overlap, never straddle the split. Regions are drawn at random until the
   validation share is reached, both sides keeping both classes (when the
   drawn regions cannot do that, e.g. one all-tumour and one all-normal
   region, every nucleus is split by blocks instead, and the log says so).
3. The network trains with cross-entropy on batches drawn with the classes
   at their natural frequencies (so the mean probability of a region
   estimates its purity without a prior correction), each patch in one of
   its 8 orientations; AdamW at 3e-3 with a cosine schedule (the paper
   gives no optimiser settings). The rate is high on purpose: Adam moves a
   weight by about the rate per step, and mean-probability purity needs
   confident logits; at 1e-3 short runs left tumour nuclei at p ~ 0.8 and
   under-estimated purity by 0.1-0.15.
4. Every epoch: nucleus AUC, accuracy and cross-entropy on the validation
   nuclei, and the RMSE of predicted against true purity over the validation
   regions with at least ``min_region_nuclei`` nuclei. The best checkpoint is
   the one with the lowest validation **cross-entropy**: a proper scoring
   rule, so the kept model has calibrated probabilities, which is what
   mean-probability purity needs (AUC ignores calibration and saturates).

Stop, resume, checkpoints and out-of-memory retries are those of
:func:`~napari_pathology.training.loop.fit`, which keeps the best checkpoint
by the family's ``best_metric`` (``val_loss``, lowest) with its ``loss()``.
The labelled nuclei are in :mod:`.data`, the split and purity error by
region in :mod:`.regions`, patch reading and batches in :mod:`.patches`,
the validation metrics and evaluation in :mod:`.evaluate`; their public
names are re-exported here. No Qt, no napari.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Generator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_pathology.families.nucleus_purity import FAMILY as NUCLEUS_PURITY
from napari_pathology.families.nucleus_purity.data import LabelledNuclei, synthetic_labelled_nuclei
from napari_pathology.families.nucleus_purity.evaluate import evaluate_nucleus_purity, patch_validation
from napari_pathology.families.nucleus_purity.model import FAMILY, INPUT_SIZE
from napari_pathology.families.nucleus_purity.patches import patch_batches, read_patches
from napari_pathology.families.nucleus_purity.regions import (
    group_ids,
    region_keys,
    region_purity_rmse,
    split_by_region,
)
from napari_pathology.models.registry import PathologyModel, create_model
from napari_pathology.training.common import (
    check_count,
    check_flag,
    check_number,
    model_name_for,
    progress_as_log,
    starting_model,
)
from napari_pathology.training.events import TrainEvent, TrainingError, TrainResult
from napari_pathology.training.loop import (
    LoopSettings,
    check_output,
    check_resume,
    fit,
    seed_everything,
    torch_threads,
)

__all__ = [
    "LabelledNuclei",
    "NucleusPurityTraining",
    "evaluate_nucleus_purity",
    "region_purity_rmse",
    "split_by_region",
    "synthetic_labelled_nuclei",
    "train_nucleus_purity",
]

DEFAULT_START = "nucleus-purity-cnn"


@dataclass(frozen=True)
class NucleusPurityTraining:
    """Hyper-parameters of a nucleus purity training job.

    Parameters
    ----------
    context_um : float, optional
        Side of the square read around each nucleus, um (default: the
        starting model's, 16 um for ``nucleus-purity-cnn``). A fine-tuned
        model keeps its own.
    epochs : int
        Passes over the training nuclei.
    batch_size : int
        Nuclei per optimiser step.
    lr : float
        Learning rate.
    weight_decay : float
        Decoupled weight decay (AdamW) or L2 (SGD).
    optimizer : {"adam", "sgd"}
        AdamW, or SGD with Nesterov momentum 0.9.
    validation_fraction : float
        Share of the nuclei held out, whole regions at a time (0: no validation).
    block_um : float
        Side of the square blocks that act as regions for nuclei outside drawn regions.
    min_per_class : int
        Fewest labelled nuclei of each class accepted.
    min_region_nuclei : int
        Fewest nuclei for a validation region to count in the purity RMSE.
    dihedral : bool
        Train on the 8 orientations of each patch.
    seed : int
        Seeds the split, sampling and initialisation.
    device : str
        ``"cpu"``, ``"cuda:N"`` or ``"auto"``.
    amp : bool
        Mixed precision on CUDA.
    log_every : int
        Steps between ``step`` events.
    eval_every : int, optional
        Steps between validations and saves (default: one epoch).
    resume : bool
        Continue from the last checkpoint of ``out``.
    threads : int, optional
        CPU threads torch uses for the job (default: the usable cores, at most 4).
    overwrite : bool
        Replace an existing model at ``out`` (otherwise refused unless ``resume``).
    start : str, optional
        Registry name (fresh, default ``nucleus-purity-cnn``) or checkpoint /
        trained name (fine-tune).

    Raises
    ------
    TrainingError
        For any setting out of range (naming it), when the settings are made.

    """

    context_um: float | None = None
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    optimizer: str = "adam"
    validation_fraction: float = field(default=0.2, metadata={"flag": "--val-fraction"})
    block_um: float = 150.0
    min_per_class: int = 20
    min_region_nuclei: int = 10
    dihedral: bool = True
    seed: int = 0
    device: str = "cpu"
    amp: bool = True
    log_every: int = 10
    eval_every: int | None = None
    resume: bool = False
    threads: int | None = None
    overwrite: bool = False
    start: str | None = None

    def __post_init__(self) -> None:
        if self.start is not None:
            object.__setattr__(self, "start", str(self.start))
        for name in ("epochs", "batch_size", "min_per_class", "min_region_nuclei", "log_every"):
            check_count(self, name)
        check_count(self, "eval_every", optional=True)
        check_count(self, "threads", optional=True)
        check_count(self, "seed", 0)
        for name in ("lr", "block_um"):
            check_number(self, name, 0, inclusive=False)
        check_number(self, "context_um", 0, inclusive=False, optional=True)
        check_number(self, "weight_decay", 0)
        check_number(self, "validation_fraction", 0, below=1)
        for name in ("dihedral", "amp", "resume", "overwrite"):
            check_flag(self, name)
        if self.optimizer not in ("adam", "sgd"):
            raise TrainingError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings for provenance (``start`` is recorded as the initialisation)."""
        out = asdict(self)
        del out["start"]
        return out


def _starting_model(
    start: str | os.PathLike[str] | None,
    out: Path,
    settings: NucleusPurityTraining,
    resumed: PathologyModel | None = None,
) -> tuple[PathologyModel, str]:
    if resumed is not None:
        model, init = resumed, f"resumed from {out.stem}.last.pt"
    else:
        model, pretrained = starting_model(str(start) if start is not None else DEFAULT_START)
        init = f"checkpoint {start}" if pretrained else getattr(model.net, "init", "random initialisation")
    spec = model.spec
    if spec.family != FAMILY:
        raise TrainingError(
            f"{start!r} is a {spec.family!r} model, not a nucleus purity classifier ({FAMILY!r})"
        )
    context = float(spec.config.get("context_um", spec.mpp * spec.input_size))
    wanted = settings.context_um
    if wanted is not None and not math.isclose(wanted, context, rel_tol=1e-6):
        if init.startswith(("checkpoint", "resumed")):
            raise TrainingError(
                f"{start or out.name} reads {context:g} um nucleus patches; a trained model keeps its "
                f"context (leave context_um empty, or start from {DEFAULT_START!r})"
            )
        spec = spec.replace(config={**spec.config, "context_um": wanted}, mpp=wanted / spec.input_size)
        model = create_model(spec)
    model.spec = model.spec.replace(name=model_name_for(out))
    return model, init


def train_nucleus_purity(
    data: Sequence[LabelledNuclei],
    out: str | os.PathLike[str],
    settings: NucleusPurityTraining | None = None,
    start: str | os.PathLike[str] | None = None,
    stop: threading.Event | None = None,
) -> Generator[TrainEvent, None, TrainResult]:
    """Train a nucleus purity classifier on labelled nuclei; yields events, returns the result.

    Parameters
    ----------
    data : sequence of LabelledNuclei
        Labelled nuclei, one item per slide.
    out : path-like
        Best checkpoint (lowest validation cross-entropy); ``<stem>.last.pt`` holds the last one.
    settings : NucleusPurityTraining, optional
        Hyper-parameters (defaults when omitted).
    start : str or path-like, optional
        A registry name (fresh, default ``nucleus-purity-cnn``) or a checkpoint /
        trained name such as ``nucleus-purity`` (fine-tuning).
    stop : threading.Event, optional
        Set it to finish the current step, save and return.

    Raises
    ------
    TrainingError
        For no data, fewer than ``min_per_class`` nuclei of a class, a slide
        without um/px, a model of another family, or a split that cannot keep
        both classes on both sides.

    """
    settings = settings or NucleusPurityTraining()
    start = start if start is not None else settings.start
    with torch_threads(settings.threads):
        return (yield from _train(data, Path(out), settings, start, stop))


def _train(
    data: Sequence[LabelledNuclei],
    out: Path,
    settings: NucleusPurityTraining,
    start: str | os.PathLike[str] | None,
    stop: threading.Event | None,
) -> Generator[TrainEvent, None, TrainResult]:
    check_output(out, resume=settings.resume, overwrite=settings.overwrite)
    resume = check_resume(out) if settings.resume else None
    data = list(data)
    if not data or not all(isinstance(d, LabelledNuclei) for d in data):
        raise TrainingError("train_nucleus_purity needs a list of LabelledNuclei (one per slide)")
    labels = np.concatenate([d.is_tumour for d in data])
    n_tumour, n_normal = int(labels.sum()), int((~labels).sum())
    if n_tumour == 0 or n_normal == 0:
        only = "tumour" if n_tumour else "normal"
        raise TrainingError(
            f"all {len(labels)} labelled nuclei are {only}: label nuclei of both classes (tumour and normal)"
        )
    if min(n_tumour, n_normal) < settings.min_per_class:
        raise TrainingError(
            f"too few labelled nuclei: {n_tumour} tumour and {n_normal} normal; label at least "
            f"{settings.min_per_class} of each class"
        )
    seed_everything(settings.seed)
    model, init = _starting_model(start, out, settings, resume[0] if resume else None)
    spec = model.spec
    context = float(spec.config["context_um"])
    equalize = str(spec.config.get("equalize", "channel"))
    drawn = sum(int((d.region_ids >= 0).sum()) for d in data if d.region_ids is not None)
    groups = group_ids([(k, *key) for k, d in enumerate(data) for key in region_keys(d, settings.block_um)])
    split_note = f"{drawn} nuclei in drawn regions, the rest in {settings.block_um:g} um blocks"
    try:
        train, val = split_by_region(groups, labels, settings.validation_fraction, settings.seed)
    except TrainingError:
        if not drawn:
            raise
        # Too few drawn regions with both classes: split them into blocks, still never across a block.
        blocks = [(k, *key) for k, d in enumerate(data) for key in region_keys(d, settings.block_um, False)]
        groups = group_ids(blocks)
        train, val = split_by_region(groups, labels, settings.validation_fraction, settings.seed)
        split_note = (
            f"the drawn regions cannot hold out both classes, so all nuclei are split by "
            f"{settings.block_um:g} um blocks"
        )
    y = labels.astype(np.int64) if spec.positive_index == 1 else (~labels).astype(np.int64)
    n_train = int(train.sum())
    steps_per_epoch = max(1, math.ceil(n_train / settings.batch_size))
    total = settings.epochs * steps_per_epoch
    yield TrainEvent("log", 0, total, message=(
        f"{len(labels)} nuclei ({n_tumour} tumour, {n_normal} normal) on {len(data)} slide(s); "
        f"{len(np.unique(groups[train]))} training and {len(np.unique(groups[val]))} validation regions "
        f"({split_note}); "
        f"{context:g} um patches at {INPUT_SIZE} px, {equalize} equalisation; {init}"
    ))  # fmt: skip
    x = yield from progress_as_log(read_patches(data, context, equalize), total)
    batches = patch_batches(
        x[train], y[train], settings.batch_size, settings.seed, settings.dihedral, spec.normalization
    )
    validate = None
    if val.any():
        validate = patch_validation(
            x[val], y[val], groups[val], spec.normalization, spec.positive_index, settings.min_region_nuclei
        )
    params = model.parameters()
    if settings.optimizer == "adam":
        optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    else:
        optimizer = torch.optim.SGD(
            params, lr=settings.lr, momentum=0.9, nesterov=True, weight_decay=settings.weight_decay
        )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    provenance = {
        "family": FAMILY, "settings": settings.to_dict(), "initialisation": init,
        "start": str(start) if start is not None else DEFAULT_START,
        "slides": [
            {"slide": d.slide_path.name, "nuclei": len(d), "tumour": int(d.is_tumour.sum())} for d in data
        ],
        "train_nuclei": n_train, "val_nuclei": int(val.sum()),
        "split": split_note,
        "labels": "nucleus-level tumour/normal",
        "context_um": context, "equalize": equalize,
    }  # fmt: skip
    loop = LoopSettings(
        total, out, eval_every=settings.eval_every or steps_per_epoch, device=settings.device,
        amp=settings.amp, log_every=settings.log_every,
    )  # fmt: skip
    return (
        yield from fit(
            model,
            batches,
            optimizer,
            loop,
            validate=validate,
            scheduler=scheduler,
            provenance=provenance,
            stop=stop,
            resume=resume[1] if resume else None,
            loss=NUCLEUS_PURITY.loss(),
            best_metric=NUCLEUS_PURITY.best_metric,
            best_mode=NUCLEUS_PURITY.best_mode,
        )
    )
