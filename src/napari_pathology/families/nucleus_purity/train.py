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
:func:`~napari_pathology.training.loop.fit`. No Qt, no napari.
"""

from __future__ import annotations

import csv
import io
import math
import os
import threading
from collections.abc import Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_pathology.analysis.metrics import roc_auc
from napari_pathology.families.nucleus_purity.model import FAMILY, INPUT_SIZE
from napari_pathology.fileio import read_text_file, require_finite
from napari_pathology.models.registry import PathologyModel, create_model
from napari_pathology.nuclei.classify import NucleusClassifyError, iter_nucleus_patches
from napari_pathology.progress import Progress
from napari_pathology.slide import open_slide
from napari_pathology.tiles import dihedral, to_tensor
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


@dataclass(frozen=True, eq=False)
class LabelledNuclei:
    """Nuclei of one slide labelled tumour or normal.

    Parameters
    ----------
    slide_path : Path
        The slide (or plain image) the points are on.
    xy_um : ndarray
        ``(N, 2)`` centroids ``x_um, y_um`` from the slide's top-left corner.
    is_tumour : ndarray
        ``(N,)`` bool: tumour (True) or normal (False).
    region_ids : ndarray, optional
        ``(N,)`` int: the drawn region each nucleus lies in (-1: none). Nuclei
        of one region stay on one side of the train/validation split, and
        purity is measured per region.
    mpp : float, optional
        um/px to use instead of the file's (required for files without it).

    Raises
    ------
    TrainingError
        For arrays of the wrong shape or length, or non-finite points.

    """

    slide_path: Path
    xy_um: np.ndarray
    is_tumour: np.ndarray
    region_ids: np.ndarray | None = None
    mpp: float | None = None

    def __post_init__(self) -> None:
        def fix(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        fix("slide_path", Path(self.slide_path))
        xy = np.asarray(self.xy_um, dtype=np.float64)
        xy = xy.reshape(0, 2) if xy.size == 0 else xy
        if xy.ndim != 2 or xy.shape[1] != 2 or not np.isfinite(xy).all():
            raise TrainingError(
                f"{self.slide_path.name}: xy_um must be a finite (N, 2) array, got {xy.shape}"
            )
        labels = np.asarray(self.is_tumour)
        if labels.shape != (len(xy),):
            raise TrainingError(
                f"{self.slide_path.name}: is_tumour must have one value per nucleus "
                f"({len(xy)}), got shape {labels.shape}"
            )
        if labels.dtype != bool:
            if labels.size and not np.isin(labels, (0, 1)).all():
                raise TrainingError(f"{self.slide_path.name}: is_tumour must be bool or 0/1")
            labels = labels.astype(bool)
        fix("xy_um", xy)
        fix("is_tumour", labels)
        if self.region_ids is not None:
            regions = np.asarray(self.region_ids)
            if regions.shape != (len(xy),) or (regions.size and not np.issubdtype(regions.dtype, np.integer)):
                raise TrainingError(
                    f"{self.slide_path.name}: region_ids must be (N,) integers (-1 = no region), "
                    f"got {regions.shape} {regions.dtype}"
                )
            fix("region_ids", regions.astype(np.int64))
        if self.mpp is not None and not (math.isfinite(float(self.mpp)) and float(self.mpp) > 0):
            raise TrainingError(f"{self.slide_path.name}: mpp must be a positive number, got {self.mpp!r}")

    def __len__(self) -> int:
        return len(self.xy_um)


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


# --------------------------------------------------------------------------- data


def synthetic_labelled_nuclei(slide_path: str | os.PathLike[str]) -> LabelledNuclei:
    """Every rendered nucleus of a synthetic slide, from its ``*.nuclei.csv``.

    Kind ``tumour`` is tumour; every other kind (epithelial, lymphocyte,
    fibroblast, histiocyte) is normal. No regions (the trainer makes blocks).

    Raises
    ------
    TrainingError
        When the CSV is missing or lacks the ``x_um``, ``y_um`` and ``kind`` columns.

    """
    from napari_pathology.slide.synthetic import truth_paths

    path = truth_paths(slide_path)["nuclei_csv"]
    if not path.is_file():
        raise TrainingError(f"no nucleus table beside {Path(slide_path).name} ({path.name} is missing)")
    try:
        rows = list(csv.DictReader(io.StringIO(read_text_file(path, "nucleus table"), newline="")))
    except (ValueError, csv.Error) as error:
        raise TrainingError(f"{path.name}: {error}") from None
    if rows and not {"x_um", "y_um", "kind"} <= set(rows[0]):
        raise TrainingError(f"{path.name} needs x_um, y_um and kind columns")
    xy = np.zeros((len(rows), 2), np.float64)
    for k, row in enumerate(rows):
        try:
            xy[k] = [require_finite(row["x_um"], "x_um"), require_finite(row["y_um"], "y_um")]
        except ValueError as error:
            raise TrainingError(f"{path.name}, line {k + 2}: {error}") from None
    tumour = np.array([r["kind"] == "tumour" for r in rows], bool)
    return LabelledNuclei(Path(slide_path), xy, tumour)


def _region_keys(data: LabelledNuclei, block_um: float, drawn_regions: bool = True) -> list[tuple[Any, ...]]:
    """One hashable region key per nucleus: the drawn region (if used), else the ``block_um`` block."""
    blocks = np.floor(data.xy_um / block_um).astype(np.int64)
    drawn = np.full(len(data), -1, np.int64)
    if drawn_regions and data.region_ids is not None:
        drawn = data.region_ids
    return [
        ("region", int(r)) if r >= 0 else ("block", int(bx), int(by))
        for r, (bx, by) in zip(drawn.tolist(), blocks.tolist(), strict=True)
    ]


def _group_ids(keys: list[tuple[Any, ...]]) -> np.ndarray:
    """``(N,)`` int64 group index of each region key."""
    if not keys:
        return np.zeros(0, np.int64)
    return np.unique(np.array([repr(k) for k in keys]), return_inverse=True)[1].astype(np.int64)


def split_by_region(
    groups: np.ndarray, labels: np.ndarray, fraction: float, seed: int, tries: int = 200
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean ``(train, validation)`` masks holding out whole groups (regions), about ``fraction`` of nuclei.

    Groups are drawn in a random order until the validation side reaches the
    share; up to ``tries`` orders are drawn until both sides hold both classes.

    Raises
    ------
    TrainingError
        When no split keeps both classes on both sides (too few regions of one class).

    """
    n = len(groups)
    if fraction == 0:
        return np.ones(n, bool), np.zeros(n, bool)
    unique, inverse = np.unique(groups, return_inverse=True)
    if len(unique) < 2:
        raise TrainingError(
            "all labelled nuclei are in one region: draw more regions (or label nuclei in more places), "
            "or set the validation fraction to 0"
        )
    sizes = np.bincount(inverse, minlength=len(unique))
    rng = np.random.default_rng(seed)
    target = fraction * n
    for _ in range(tries):
        order = rng.permutation(len(unique))
        count = np.cumsum(sizes[order])
        k = int(np.searchsorted(count, target)) + 1
        k = min(max(k, 1), len(unique) - 1)
        val = np.isin(inverse, order[:k])
        if 0 < labels[val].sum() < val.sum() and 0 < labels[~val].sum() < (~val).sum():
            return ~val, val
    raise TrainingError(
        "cannot hold out regions with both tumour and normal nuclei while keeping both in training: "
        "label both classes in more regions, or set the validation fraction to 0"
    )


def region_purity_rmse(
    is_tumour: np.ndarray, probabilities: np.ndarray, groups: np.ndarray, min_nuclei: int = 10
) -> tuple[float, int]:
    """RMSE of predicted (mean probability) vs true (tumour share) purity over groups with ``min_nuclei``.

    Returns ``(rmse, regions)``; the RMSE is NaN when no group is large enough.
    """
    unique, inverse = np.unique(groups, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(unique))
    truth = np.bincount(inverse, weights=np.asarray(is_tumour, np.float64), minlength=len(unique))
    predicted = np.bincount(inverse, weights=np.asarray(probabilities, np.float64), minlength=len(unique))
    keep = counts >= min_nuclei
    if not keep.any():
        return math.nan, 0
    error = (predicted[keep] - truth[keep]) / counts[keep]
    return float(np.sqrt(np.mean(error**2))), int(keep.sum())


def _read_patches(
    data: Sequence[LabelledNuclei], context_um: float, equalize: str
) -> Generator[Progress, None, np.ndarray]:
    parts = []
    for k, item in enumerate(data):
        try:
            slide = open_slide(item.slide_path, mpp=item.mpp)
        except Exception as error:
            raise TrainingError(f"{item.slide_path}: {error}") from error
        try:
            if slide.mpp is None:
                raise TrainingError(
                    f"{item.slide_path.name} has no um/px: give LabelledNuclei(mpp=...) (or set it in the "
                    "Slide panel) so nucleus patches have a physical size"
                )
            yield Progress(
                0, len(item), f"slide {k + 1}/{len(data)}: {item.slide_path.name}, {len(item)} nuclei"
            )
            job = iter_nucleus_patches(slide, item.xy_um, context_um, INPUT_SIZE, equalize=equalize)
            parts.append((yield from job))
        except NucleusClassifyError as error:
            raise TrainingError(f"{item.slide_path.name}: {error}") from error
        finally:
            slide.close()
    return np.concatenate(parts) if parts else np.zeros((0, INPUT_SIZE, INPUT_SIZE, 3), np.uint8)


def evaluate_nucleus_purity(
    data: LabelledNuclei,
    model: PathologyModel,
    *,
    block_um: float = 200.0,
    min_region_nuclei: int = 20,
    device: str = "cpu",
    batch_size: int = 512,
) -> Generator[Progress, None, dict[str, Any]]:
    """Classify labelled nuclei and measure nucleus AUC and region purity error.

    Regions are the drawn ones (``data.region_ids``), else square blocks of
    ``block_um``; those with at least ``min_region_nuclei`` nuclei count.

    Returns
    -------
    dict
        ``auc`` (NaN with one class), ``purity_rmse``, ``regions``,
        ``nuclei``, ``true_purity`` and ``predicted_purity`` (all nuclei),
        and ``probabilities`` (``(N,)`` float32).

    """
    from napari_pathology.nuclei.classify import classify_nuclei, predicted_purity

    try:
        slide = open_slide(data.slide_path, mpp=data.mpp)
    except Exception as error:
        raise TrainingError(f"{data.slide_path}: {error}") from error
    try:
        probs = yield from classify_nuclei(slide, data.xy_um, model, device=device, batch_size=batch_size)
    finally:
        slide.close()
    groups = _group_ids(_region_keys(data, block_um))
    rmse, regions = region_purity_rmse(data.is_tumour, probs, groups, min_region_nuclei)
    both = 0 < data.is_tumour.sum() < len(data)
    return {
        "auc": roc_auc(data.is_tumour, probs) if both else math.nan,
        "purity_rmse": rmse,
        "regions": regions,
        "nuclei": len(data),
        "true_purity": float(data.is_tumour.mean()) if len(data) else math.nan,
        "predicted_purity": predicted_purity(probs),
        "probabilities": probs,
    }


# --------------------------------------------------------------------------- model


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


# --------------------------------------------------------------------------- training


def _batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, orientations: bool, normalization: str
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled epochs at natural class frequencies; one random orientation per patch."""
    rng = np.random.default_rng(seed)
    labels = torch.from_numpy(y.astype(np.int64))
    while True:
        order = rng.permutation(len(y))
        for start in range(0, len(order), batch_size):
            take = order[start : start + batch_size]
            batch = to_tensor(x[take], normalization)
            if orientations:
                turns = rng.integers(0, 8, len(take))
                for k in np.unique(turns):
                    where = torch.from_numpy(np.flatnonzero(turns == k))
                    batch[where] = dihedral(batch[where], int(k))
            yield batch, labels[torch.from_numpy(take)]


def _validation(
    x: np.ndarray, y: np.ndarray, groups: np.ndarray, normalization: str, positive: int, min_nuclei: int
) -> Any:
    labels = torch.from_numpy(y.astype(np.int64))

    def validate(model: PathologyModel) -> dict[str, float]:
        device = next(model.parameters()).device
        logits = torch.cat(
            [
                model(to_tensor(x[i : i + 1024], normalization, device)).float().cpu()
                for i in range(0, len(x), 1024)
            ]
        )
        probs = torch.softmax(logits, 1)[:, positive].numpy()
        loss = float(F.cross_entropy(logits, labels))
        rmse, regions = region_purity_rmse(y == positive, probs, groups, min_nuclei)
        metrics = {
            "score": -loss,
            "val_loss": loss,
            "auc": roc_auc(y == positive, probs),
            "accuracy": float(((probs >= 0.5) == (y == positive)).mean()),
            "purity_rmse": rmse,
            "purity_regions": regions,
        }
        return metrics

    return validate


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
    groups = _group_ids([(k, *key) for k, d in enumerate(data) for key in _region_keys(d, settings.block_um)])
    split_note = f"{drawn} nuclei in drawn regions, the rest in {settings.block_um:g} um blocks"
    try:
        train, val = split_by_region(groups, labels, settings.validation_fraction, settings.seed)
    except TrainingError:
        if not drawn:
            raise
        # Too few drawn regions with both classes: split them into blocks, still never across a block.
        blocks = [(k, *key) for k, d in enumerate(data) for key in _region_keys(d, settings.block_um, False)]
        groups = _group_ids(blocks)
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
    x = yield from progress_as_log(_read_patches(data, context, equalize), total)
    batches = _batches(
        x[train], y[train], settings.batch_size, settings.seed, settings.dihedral, spec.normalization
    )
    validate = None
    if val.any():
        validate = _validation(
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
        )
    )
