"""Training CLAM (family ``clam``) from slide labels and patch features, as Lu et al. 2021 did.

A slide table (``slide,label``) names the slides; each slide's bag is its
CLAM-layout feature file ``<features_dir>/<slide stem>.h5`` (see
:mod:`.bags`), extracted first with the settings' encoder for slides that
have none (see :mod:`.extraction`); the trained spec names that encoder.
Slides are split into training and validation by slide, stratified by
label. One slide per optimiser step (CLAM's batch of one
bag), drawn class-balanced (each class equally often, as CLAM's weighted
sampler); the loss is ``bag_weight`` x cross-entropy + (1 - ``bag_weight``) x
the instance-clustering loss (0.7 / 0.3); Adam, lr 2e-4, weight decay 1e-5;
at most 200 epochs, validated after each. The best checkpoint is the one
with the lowest **validation loss** (CLAM's early stopping criterion;
validation AUC and accuracy are reported), and training ends early when
the validation loss has not improved for ``patience`` (20) epochs, no
earlier than ``min_epochs`` (50).

Stop, resume, best and last checkpoints and events are those of
:func:`~napari_pathology.training.loop.fit`. No Qt, no napari.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_pathology.cohort import SlideEntry, read_slide_table
from napari_pathology.families.clam.bags import BagCache, bag_path, read_bag, slide_dimensions
from napari_pathology.families.clam.extraction import FeatureSource, prepare_bags
from napari_pathology.families.clam.interop import import_clam_checkpoint
from napari_pathology.families.clam.losses import INSTANCE_LOSSES, clam_loss
from napari_pathology.families.clam.model import (
    DEFAULT_ENCODER,
    FAMILY,
    MODEL_TYPES,
    SIZES,
    ClamNet,
    build_clam,
    clam_spec,
)
from napari_pathology.models.registry import ModelError, PathologyModel
from napari_pathology.training.common import (
    check_count,
    check_flag,
    check_number,
    model_name_for,
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

__all__ = ["ClamTraining", "bag_metrics", "slide_classes", "train_clam", "train_from_family"]


@dataclass(frozen=True)
class ClamTraining:
    """A CLAM training job (defaults: the paper's).

    Parameters
    ----------
    data : Path
        Slide table: CSV with ``slide`` and ``label`` columns (or a folder of synthetic slides).
    out : Path
        Best checkpoint (lowest validation loss); ``<stem>.last.pt`` holds the last one.
    features_dir : Path, optional
        Folder of CLAM-layout feature files ``<slide stem>.h5`` (default:
        ``features/`` beside the slide table); a slide without one has its
        features extracted into it first (batches cached in ``.cache/``).
    encoder : str
        Feature encoder of the slides' patches (see ``napari-pathology features --list``);
        a feature file recorded as another encoder's is refused.
    encoder_weights : str, optional
        The encoder's weights: a file, or a model name for a family's encoder
        (default: trained weights found on this machine).
    model_type : {"sb", "mb"}
        CLAM-SB (one attention branch) or CLAM-MB (one per class).
    gated : bool
        Gated attention (the paper's) instead of plain.
    size : {"small", "big"}
        Network size: FC 512 and attention 256 (small) or 384 (big).
    hidden : int, optional
        FC width L instead of the size's (512).
    attention_dim : int, optional
        Attention network width D instead of the size's.
    dropout : float
        Dropout after the FC layer and in the attention network.
    k_sample : int
        B: most and least attended patches per pseudo-label in instance clustering.
    bag_weight : float
        Weight of the slide loss; the instance loss gets 1 - bag_weight.
    inst_loss : {"svm", "ce"}
        Instance loss: smooth top-1 SVM (the paper's) or cross-entropy.
    subtyping : bool, optional
        Mutually exclusive subtypes: the other classes' attention branches
        give negatives too (default: on unless the classes are normal and one other).
    lr : float
        Adam learning rate.
    weight_decay : float
        Adam weight decay (L2).
    epochs : int
        Most passes over the training slides (early stopping may end sooner).
    early_stopping : bool
        End when the validation loss has not improved for ``patience`` epochs.
    patience : int
        Epochs without a lower validation loss before early stopping.
    min_epochs : int
        Epochs that must pass before early stopping may end the job.
    val_fraction : float
        Share of slides held out for validation, per label.
    weighted_sample : bool
        Draw training slides class-balanced (each class equally often).
    classes : tuple of str, optional
        Class names in logit order (e.g. ``normal,A,B``); default: the labels
        of the table, ``normal`` first. Needed for labels other than tumour/normal.
    start : str, optional
        A trained model to fine-tune: a checkpoint of this family or a CLAM
        checkpoint (``s_0_checkpoint.pt``); a registered name without weights
        (``clam-sb``) or none: a fresh network as these settings say.
    seed : int
        Split, sampling and initialisation seed.
    device : str
        ``"cpu"``, ``"cuda:N"`` or ``"auto"``.
    amp : bool
        Mixed precision on CUDA.
    resume : bool
        Continue from the last checkpoint of ``out``.
    overwrite : bool
        Replace an existing model at ``out`` (otherwise refused unless ``resume``).
    threads : int, optional
        CPU threads torch uses for the job (default: the usable cores, at most 4).

    Raises
    ------
    TrainingError
        For any setting out of range (naming it), when the job is made.
    """

    data: Path
    out: Path
    features_dir: Path | None = None
    encoder: str = DEFAULT_ENCODER
    encoder_weights: str | None = None
    model_type: str = "sb"
    gated: bool = True
    size: str = "small"
    hidden: int | None = None
    attention_dim: int | None = None
    dropout: float = 0.25
    k_sample: int = 8
    bag_weight: float = 0.7
    inst_loss: str = "svm"
    subtyping: bool | None = None
    lr: float = 2e-4
    weight_decay: float = 1e-5
    epochs: int = 200
    early_stopping: bool = True
    patience: int = 20
    min_epochs: int = 50
    val_fraction: float = 0.1
    weighted_sample: bool = True
    classes: tuple[str, ...] | None = None
    start: str | None = None
    seed: int = 0
    device: str = "cpu"
    amp: bool = True
    resume: bool = False
    overwrite: bool = False
    threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("data", "out", "features_dir"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        for name, allowed in (
            ("model_type", MODEL_TYPES),
            ("size", tuple(SIZES)),
            ("inst_loss", INSTANCE_LOSSES),
        ):
            if getattr(self, name) not in allowed:
                raise TrainingError(
                    f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        if self.classes is not None:
            names = tuple(str(c).strip() for c in self.classes)
            if len(names) < 2 or not all(names) or len({n.lower() for n in names}) != len(names):
                raise TrainingError(f"classes must be two or more distinct names, got {list(self.classes)}")
            object.__setattr__(self, "classes", names)
        for name in ("start", "encoder_weights"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, str(getattr(self, name)))
        if not isinstance(self.encoder, str) or not self.encoder.strip():
            raise TrainingError(f"encoder must be an encoder name, got {self.encoder!r}")
        object.__setattr__(self, "encoder", self.encoder.strip())
        for name in ("hidden", "attention_dim"):
            check_count(self, name, optional=True)
        for name in ("k_sample", "epochs", "patience"):
            check_count(self, name)
        check_count(self, "min_epochs", 0)
        check_count(self, "seed", 0)
        check_count(self, "threads", optional=True)
        check_number(self, "lr", 0, inclusive=False)
        check_number(self, "weight_decay", 0)
        check_number(self, "dropout", 0, below=1)
        check_number(self, "bag_weight", 0, 1)
        check_number(self, "val_fraction", 0, below=1)
        for name in ("gated", "early_stopping", "weighted_sample", "amp", "resume", "overwrite"):
            check_flag(self, name)
        if self.subtyping is not None:
            check_flag(self, "subtyping")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings for provenance."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def slide_classes(entries: Sequence[SlideEntry], classes: Sequence[str] | None = None) -> tuple[str, ...]:
    """The class names: ``classes`` if given, else the labels with ``normal`` first; two at least.

    Raises
    ------
    TrainingError
        For slides without a label, or a table with fewer than two classes.

    """
    missing = [e.name for e in entries if not e.label]
    if missing:
        raise TrainingError(
            f"slides without a label: {', '.join(missing[:5])}; the table needs a 'label' column"
        )
    labels = {str(e.label) for e in entries}
    if len(labels) < 2:
        raise TrainingError(
            f"all {len(entries)} slides are labelled {labels.pop()!r}; CLAM learns from slides of two or "
            "more classes"
        )
    if classes is not None:
        return tuple(classes)
    return tuple(sorted(labels, key=lambda c: (c != "normal", c)))


# --------------------------------------------------------------------------- model


def _build_model(
    job: ClamTraining,
    classes: tuple[str, ...],
    embed_dim: int,
    resumed: PathologyModel | None,
    source: FeatureSource,
) -> tuple[PathologyModel, str]:
    """The network to train and where it starts from; its spec names the features' encoder."""
    if resumed is not None:
        if tuple(resumed.spec.classes) != classes or resumed.spec.family != FAMILY:
            raise TrainingError(
                f"cannot resume {job.out}: it is a {resumed.spec.family} model of classes "
                f"{', '.join(resumed.spec.classes)}, the slide table's are {', '.join(classes)}"
            )
        trained_on = resumed.spec.config.get("encoder", DEFAULT_ENCODER)
        if trained_on != source.encoder:
            raise TrainingError(
                f"cannot resume {job.out}: it was trained on features of {trained_on}, these settings' "
                f"encoder is {source.encoder}"
            )
        return resumed, f"resumed from {resumed.source}"
    spec = clam_spec(
        model_name_for(job.out), model_type=job.model_type, classes=classes, gate=job.gated, size=job.size,
        embed_dim=embed_dim, dropout=job.dropout, k_sample=job.k_sample, subtyping=job.subtyping,
        instance_loss=job.inst_loss, hidden=job.hidden, attention_dim=job.attention_dim,
        **source.spec_kwargs(),
    )  # fmt: skip
    fresh = PathologyModel(build_clam(len(classes), **spec.config), spec), "random initialisation"
    if job.start is None:
        return fresh
    try:
        start, trained = starting_model(job.start)
    except TrainingError as error:
        if "bare state_dict" not in str(error):
            raise
        try:
            start, trained = import_clam_checkpoint(job.start, classes), True
        except ModelError as clam_error:
            raise TrainingError(str(clam_error)) from clam_error
    if start.spec.family != FAMILY or not isinstance(start.net, ClamNet):
        raise TrainingError(f"{job.start!r} is a {start.spec.family!r} model, not a CLAM model")
    if not trained:  # a registered architecture without weights: the settings say which network
        return fresh
    net = start.net
    if net.n_classes != len(classes) or net.embed_dim != embed_dim:
        raise TrainingError(
            f"{job.start!r} has {net.n_classes} classes on {net.embed_dim}-d features; the table has "
            f"{len(classes)} classes and the feature files {embed_dim}-d"
        )
    keep = {"model_type": net.model_type, "gate": net.gate, "embed_dim": net.embed_dim}
    keep.update(hidden=net.hidden, attention_dim=net.attention_dim)
    spec = spec.replace(config={**spec.config, **keep})
    model = PathologyModel(build_clam(len(classes), **spec.config), spec)
    model.net.load_state_dict(start.net.state_dict())
    return model, f"fine-tuning {job.start}"


# --------------------------------------------------------------------------- steps and validation


def _forward(model: PathologyModel, bag: torch.Tensor) -> Any:
    """Logits in evaluation; ``(logits, {"instance_losses"})`` in training (for :func:`clam_loss`)."""
    if not model.training:
        return model.net.run(bag).logits
    out = model.net.run(bag, instance_eval=True)
    return out.logits, {"instance_losses": out.instance_losses}


def _batches(
    items: list[tuple[Path, int]],
    load: Callable[[Path], np.ndarray],
    weighted: bool,
    seed: int,
    n_classes: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless epochs of ``len(items)`` bags ``(1, N, D)`` and labels, class-balanced if ``weighted``."""
    rng = np.random.default_rng(seed)
    labels = np.array([label for _, label in items])
    counts = np.bincount(labels, minlength=n_classes)
    p = (1.0 / counts[labels]) / (1.0 / counts[labels]).sum()
    while True:
        order = rng.choice(len(items), len(items), p=p) if weighted else rng.permutation(len(items))
        for k in order:
            path, label = items[int(k)]
            yield torch.from_numpy(load(path))[None], torch.tensor([label])


def bag_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Validation metrics of slide predictions: cross-entropy, accuracy, and AUC (one-vs-rest mean).

    ``labels`` are ``(S,)`` class indices, ``probabilities`` ``(S, C)``. The
    AUC is the binary AUC of the last class for two classes, else the mean of
    the one-vs-rest AUCs of the classes present with others (NaN if none).
    """
    from napari_pathology.analysis.metrics import roc_auc

    labels = np.asarray(labels, np.int64)
    probabilities = np.asarray(probabilities, np.float64)
    picked = np.clip(probabilities[np.arange(len(labels)), labels], 1e-12, 1.0)
    aucs = []
    columns = [1] if probabilities.shape[1] == 2 else range(probabilities.shape[1])
    for c in columns:
        positive = labels == c
        if 0 < positive.sum() < len(labels):
            aucs.append(roc_auc(positive, probabilities[:, c]))
    return {
        "val_loss": float(-np.log(picked).mean()),
        "auc": float(np.mean(aucs)) if aucs else math.nan,
        "accuracy": float((probabilities.argmax(1) == labels).mean()),
    }


def _validation(
    items: list[tuple[Path, int]], load: Callable[[Path], np.ndarray], losses: list[float]
) -> Callable[[PathologyModel], dict[str, float]]:
    labels = np.array([label for _, label in items])

    def validate(model: PathologyModel) -> dict[str, float]:
        device = next(model.parameters()).device
        probabilities = [
            F.softmax(model.net.run(torch.from_numpy(load(path)).to(device)).logits.float(), 1)[0]
            .cpu()
            .numpy()
            for path, _ in items
        ]
        metrics = bag_metrics(labels, np.stack(probabilities))
        losses.append(metrics["val_loss"])
        return {**metrics, "score": -metrics["val_loss"]}

    return validate


class _EitherStop(threading.Event):
    """Set by early stopping, or when the user's ``stop`` event is set."""

    def __init__(self, user: threading.Event | None) -> None:
        super().__init__()
        self.user = user
        self.reason = ""

    def is_set(self) -> bool:
        return super().is_set() or (self.user is not None and self.user.is_set())


def _early_stopping(
    job: ClamTraining, losses: list[float], steps_per_epoch: int, halt: _EitherStop
) -> Callable[[PathologyModel, int], str | None]:
    """After each validation, CLAM's rule: no better validation loss in ``patience`` epochs."""

    def check(_model: PathologyModel, step: int) -> str | None:
        if not job.early_stopping or not losses:
            return None
        best, waited = math.inf, 0
        for value in losses:  # as CLAM: a loss equal to the best resets the count, a NaN never does
            if value <= best:
                best, waited = value, 0
            else:
                waited += 1
        epoch = step // steps_per_epoch
        if waited >= job.patience and epoch > job.min_epochs:
            halt.reason = (
                f"early stopping after epoch {epoch}: the validation loss has not improved for {waited} "
                f"epochs (best {best:.4f})"
            )
            halt.set()
            return halt.reason
        return None

    return check


def _relabelled(
    job: Generator[TrainEvent, None, TrainResult], halt: _EitherStop
) -> Generator[TrainEvent, None, TrainResult]:
    """``fit``'s events and result, saying "early stopping" (not "stopped") when that ended the job."""
    while True:
        try:
            event = next(job)
        except StopIteration as done:
            result = done.value
            break
        if event.kind == "done" and halt.reason:
            event = replace(event, message=f"{halt.reason}; {event.message.replace('stopped', 'ended', 1)}")
        try:
            yield event
        except GeneratorExit:
            job.close()
            raise
    if halt.reason and not (halt.user is not None and halt.user.is_set()):
        result.stopped = False
    return result


# --------------------------------------------------------------------------- the job


def train_clam(
    job: ClamTraining, stop: threading.Event | None = None
) -> Generator[TrainEvent, None, TrainResult]:
    """Run a CLAM training job (see :class:`ClamTraining`); yields events, returns the result.

    Raises
    ------
    TrainingError
        One line: a table with one class or unlabelled slides, a missing or
        unreadable feature file, feature files of different sizes, too few
        slides for the split, a start model that does not fit.

    """
    with torch_threads(job.threads):
        return (yield from _train(job, stop))


def _train(job: ClamTraining, stop: threading.Event | None) -> Generator[TrainEvent, None, TrainResult]:
    check_output(job.out, resume=job.resume, overwrite=job.overwrite)
    resume, afresh = None, ""
    if job.resume and not any(p.exists() for p in checkpoint_paths(job.out)[:2]):
        afresh = f"; nothing of {job.out.name} trained yet (stopped in feature extraction): from step 0"
    elif job.resume:
        resume = check_resume(job.out)
    try:
        entries = read_slide_table(job.data, classes=job.classes)
    except ValueError as error:
        raise TrainingError(str(error)) from error
    classes = slide_classes(entries, job.classes)
    features_dir = job.features_dir or job.data.parent / "features"
    if job.data.is_dir():
        features_dir = job.features_dir or job.data / "features"
    source = yield from prepare_bags(
        entries, features_dir, job.encoder, job.encoder_weights, device=job.device, stop=stop
    )
    if source.stopped:
        message = f"{source.stopped}; the finished slides and batches are kept: Resume (or Start) continues"
        yield TrainEvent("done", 0, 0, message=message)
        return TrainResult(None, None, 0, True, {})
    seed_everything(job.seed)  # after extraction (building an encoder draws numbers): the same network
    cache = BagCache()
    sizes: dict[Path, int] = {}
    for k, entry in enumerate(entries):  # every bag checked before training starts
        if k % 50 == 0:
            yield TrainEvent(
                "log", 0, 0, message=f"reading features {k + 1}/{len(entries)} from {features_dir}"
            )
        path = bag_path(features_dir, entry.path)
        bag = read_bag(path, slide_size=slide_dimensions(entry.path))  # coords of this slide?
        if cache.embed_dim is not None and bag.shape[1] != cache.embed_dim:
            first = bag_path(features_dir, entries[0].path).name
            raise TrainingError(
                f"the feature files in {features_dir} have different sizes ({cache.embed_dim} in {first}, "
                f"{bag.shape[1]} in {path.name}); extract every slide with the same encoder"
            )
        cache.embed_dim = bag.shape[1]
        cache.keep(path, bag)
        sizes[entry.path] = len(bag)
    dim = int(cache.embed_dim or 0)
    model, init = _build_model(job, classes, dim, resume[0] if resume else None, source)
    init += afresh
    train, val = split_by_slide(entries, job.val_fraction, job.seed)

    def items(group: list[SlideEntry]) -> list[tuple[Path, int]]:
        return [(bag_path(features_dir, e.path), classes.index(str(e.label))) for e in group]

    train_items, val_items = items(train), items(val)
    small = sum(1 for e in entries if sizes[e.path] < 2 * model.net.k_sample)
    net = model.net
    yield TrainEvent("log", 0, 0, message=(
        f"{len(train)} training and {len(val)} validation slides, classes {', '.join(classes)}; "
        f"CLAM-{net.model_type.upper()} {'gated' if net.gate else 'plain'}, {dim}-d {source.encoder} "
        f"features from {features_dir}; {init}"
        + (f"; {small} bag(s) hold fewer than 2B = {2 * net.k_sample} patches (B = N // 2)" if small else "")
    ))  # fmt: skip
    steps_per_epoch = len(train_items)
    total = job.epochs * steps_per_epoch
    losses: list[float] = []
    if resume:
        losses += [float(h["val_loss"]) for h in resume[1].get("history", []) if "val_loss" in h]
    halt = _EitherStop(stop)
    batches = _batches(train_items, cache, job.weighted_sample, job.seed, len(classes))
    validate = _validation(val_items, cache, losses) if val_items else None
    optimizer = torch.optim.Adam(
        (p for p in model.parameters() if p.requires_grad), lr=job.lr, weight_decay=job.weight_decay
    )
    provenance = {
        "family": FAMILY, "job": job.to_dict(), "initialisation": init, "classes": list(classes),
        "train_slides": provenance_entries(train), "val_slides": provenance_entries(val),
        "features_dir": str(features_dir), "labels": "slide-level (attention MIL)",
        "encoder": {**source.provenance, "name": source.encoder}, "features_extracted": source.extracted,
    }  # fmt: skip
    loop = LoopSettings(
        total, job.out, eval_every=steps_per_epoch, device=job.device, amp=job.amp,
        log_every=max(1, min(20, steps_per_epoch)),
    )  # fmt: skip
    run = fit(
        model, batches, optimizer, loop, validate=validate, forward=_forward, provenance=provenance,
        stop=halt, resume=resume[1] if resume else None, loss=clam_loss(job.bag_weight),
        after_validation=_early_stopping(job, losses, steps_per_epoch, halt) if validate else None,
        best_metric="val_loss" if validate else "score", best_mode="min" if validate else "max",
    )  # fmt: skip
    return (yield from _relabelled(run, halt))


def train_from_family(
    settings: ClamTraining, data: Any, out: str | os.PathLike[str], stop: threading.Event | None
) -> Generator[TrainEvent, None, TrainResult]:
    """:func:`train_clam` behind the family's one trainer signature (``data`` and ``out`` win)."""
    return train_clam(replace(settings, data=Path(data), out=Path(out)), stop)
