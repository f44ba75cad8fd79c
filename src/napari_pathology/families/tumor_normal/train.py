"""Training Noorbakhsh et al. 2020's tumour/normal tile classifier from slide labels.

Every tissue tile of a slide takes the slide's label. Trunk features are
computed once per slide and cached (:mod:`napari_pathology.features`); the head (FC 1024,
ReLU, dropout 0.2, softmax) trains on them with Adam in batches of 512,
the majority class undersampled afresh each epoch. Validation is by slide:
each held-out slide's **TPF** (tumour-predicted fraction of its tiles) and
the slide AUC of TPF, plus tile accuracy against slide labels.

Slide labels are noisy in one direction only: every tile of a normal slide
is normal, but most tiles of a tumour slide are normal too (a metastasis
covers a few to a few tens of percent of a node). With classes balanced,
normal-looking tiles then sit near a 50/50 posterior and artefacts tip them
over to tumour. ``normal_weight`` (> 1) draws that many normal tiles per
tumour tile into every epoch, the sampling form of a class weight in the
loss, so that argmax calls tumour only where a tile looks unlike normal
tissue; 1 (the default) is the paper's balanced sampling.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Generator, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_pathology.analysis.metrics import roc_auc
from napari_pathology.cohort import SlideEntry, read_slide_table
from napari_pathology.families.tumor_normal.encoder import trunk_encoder
from napari_pathology.features import Encoder, extract_features
from napari_pathology.models.registry import ModelError, PathologyModel, resolve_model
from napari_pathology.progress import run_to_completion
from napari_pathology.slide import open_slide
from napari_pathology.tissue import TissueParams, detect_tissue
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

__all__ = ["TumorNormalTraining", "slide_classes", "train_tumor_normal"]


@dataclass(frozen=True)
class TumorNormalTraining:
    """A tumour/normal (TPF) training job.

    Parameters
    ----------
    data : Path
        Slide table: CSV with ``slide`` and ``label`` columns (or a folder of synthetic slides).
    out : Path
        Best checkpoint; ``<stem>.last.pt`` holds the last one.
    start : str
        Registry name or checkpoint of the ``tumor-normal`` family.
    trunk_from : str, optional
        A checkpoint or name whose Inception trunk replaces the starting
        trunk (e.g. a trained metastasis detector when no ImageNet weights exist).
    epochs : int
        Passes over the (balanced) training tiles.
    batch_size : int
        Tiles per step (512 in the paper).
    lr : float
        Adam learning rate.
    val_fraction : float
        Share of slides held out, per label.
    normal_weight : float
        Normal tiles drawn per tile of each other class in every epoch (1:
        balanced, as in the paper; > 1 offsets the noise of tumour slide labels).
    min_tissue_fraction : float
        Minimum tissue per tile.
    device : str
        Where features and training run.
    cache_dir : Path, optional
        Feature cache (default: ``features/`` beside ``out``).
    seed : int
        Split, sampling and initialisation seed.
    resume : bool
        Continue from the last checkpoint of ``out``.
    threads : int, optional
        CPU threads torch uses for the job (default: the usable cores, at most 4).
    overwrite : bool
        Replace an existing model at ``out`` (otherwise refused unless ``resume``).
    classes : tuple of str, optional
        Class names of a multi-class model (e.g. ``("LUAD", "LUSC")``); without
        them every slide label must be tumour or normal, so a typo is refused
        instead of becoming a class.

    Raises
    ------
    TrainingError
        For any setting out of range (naming it), when the job is made.
    """

    data: Path
    out: Path
    start: str = "tumor-normal-inception-v3"
    trunk_from: str | None = None
    epochs: int = 20
    batch_size: int = 512
    lr: float = 1e-4
    val_fraction: float = 0.2
    normal_weight: float = 1.0
    min_tissue_fraction: float = 0.5
    device: str = "cpu"
    amp: bool = True
    cache_dir: Path | None = None
    seed: int = 0
    resume: bool = False
    threads: int | None = None
    overwrite: bool = False
    classes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", Path(self.data))
        object.__setattr__(self, "out", Path(self.out))
        if self.classes is not None:
            names = tuple(str(c).strip() for c in self.classes)
            if len(names) < 2 or not all(names) or len({n.lower() for n in names}) != len(names):
                raise TrainingError(f"classes must be two or more distinct names, got {list(self.classes)}")
            object.__setattr__(self, "classes", names)
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        for name in ("epochs", "batch_size"):
            check_count(self, name)
        check_count(self, "seed", 0)
        check_count(self, "threads", optional=True)
        check_number(self, "lr", 0, inclusive=False)
        check_number(self, "normal_weight", 0, inclusive=False)
        check_number(self, "val_fraction", 0, below=1)
        check_number(self, "min_tissue_fraction", 0, 1)
        for name in ("amp", "resume", "overwrite"):
            check_flag(self, name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings for provenance."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def slide_classes(entries: list[SlideEntry]) -> tuple[str, ...]:
    """Class names from slide labels: ``normal`` first, then the others sorted (``tumour`` for binary)."""
    labels = {str(e.label).strip() for e in entries if e.label}
    missing = [e.name for e in entries if not e.label]
    if missing:
        raise TrainingError(
            f"slides without a label: {', '.join(missing[:5])}; the table needs a 'label' column"
        )
    canonical = {"tumor": "tumour", "positive": "tumour", "negative": "normal"}
    labels = {canonical.get(label.lower(), label) for label in labels}
    if len(labels) < 2:
        raise TrainingError(f"only one class among the slides ({', '.join(labels)}); at least two are needed")
    return tuple(sorted(labels, key=lambda c: (c != "normal", c)))


def _label_of(entry: SlideEntry, classes: tuple[str, ...]) -> int:
    canonical = {"tumor": "tumour", "positive": "tumour", "negative": "normal"}
    label = str(entry.label).strip()
    return classes.index(canonical.get(label.lower(), label))


def _build_model(
    job: TumorNormalTraining, classes: tuple[str, ...], resumed: PathologyModel | None = None
) -> tuple[PathologyModel, bool, str]:
    if resumed is not None:
        if tuple(resumed.spec.classes) != classes:
            raise TrainingError(
                f"cannot resume {checkpoint_paths(job.out)[1]}: its classes are "
                f"{', '.join(resumed.spec.classes)}, the slide table's {', '.join(classes)}"
            )
        return resumed, True, f"resumed from {checkpoint_paths(job.out)[1]}"
    start, pretrained = starting_model(job.start)
    if start.spec.family != "tumor-normal":
        raise TrainingError(f"{job.start!r} is a {start.spec.family!r} model, not a tumour/normal classifier")
    spec = start.spec.replace(
        name=model_name_for(job.out), classes=classes,
        positive_class="tumour" if "tumour" in classes else None,
    )  # fmt: skip
    from napari_pathology.models.registry import create_model

    model = create_model(spec) if spec.classes != start.spec.classes else start
    model.spec = spec
    init = getattr(model.net, "init", "unknown")
    if model is start and pretrained:
        init = f"checkpoint {job.start}"
    elif model is not start:
        model.net.trunk.load_state_dict(start.net.trunk.state_dict())
    if job.trunk_from:
        try:
            donor = resolve_model(job.trunk_from)
        except ModelError as error:
            raise TrainingError(str(error)) from error
        trunk = getattr(donor.net, "trunk", None)
        try:
            model.net.trunk.load_state_dict(trunk.state_dict())
        except (AttributeError, RuntimeError) as error:
            raise TrainingError(
                f"the trunk of {job.trunk_from!r} does not fit {job.start!r} (width or architecture differ)"
            ) from error
        init = f"trunk from {Path(job.trunk_from).name} ({donor.spec.name}), frozen; head random"
    return model, pretrained, init


def train_tumor_normal(
    job: TumorNormalTraining, stop: threading.Event | None = None
) -> Generator[TrainEvent, None, TrainResult]:
    """Run a tumour/normal job (see :class:`TumorNormalTraining`); yields events, returns the result."""
    with torch_threads(job.threads):
        return (yield from _train(job, stop))


def _train(
    job: TumorNormalTraining, stop: threading.Event | None
) -> Generator[TrainEvent, None, TrainResult]:
    check_output(job.out, resume=job.resume, overwrite=job.overwrite)
    resume = check_resume(job.out) if job.resume else None  # before minutes of feature extraction
    generator = seed_everything(job.seed)
    entries = read_slide_table(job.data, classes=job.classes)
    classes = slide_classes(entries)
    weights = _class_weights(classes, job.normal_weight)
    model, pretrained, init = _build_model(job, classes, resume[0] if resume else None)
    trained = pretrained or bool(job.trunk_from) or "ImageNet" in init
    encoder = trunk_encoder(model, trained=trained, source=job.trunk_from or job.start).to(job.device)
    train, val = split_by_slide(entries, job.val_fraction, job.seed)
    cache = job.cache_dir or Path(job.out).parent / "features"
    spec = model.spec
    yield TrainEvent("log", 0, 0, message=(
        f"{len(train)} training and {len(val)} validation slides, classes {', '.join(classes)}; "
        f"{spec.input_size} px tiles at {spec.mpp:g} um/px; {init}"
    ))  # fmt: skip
    data = {}
    for k, entry in enumerate(train + val):
        yield TrainEvent("log", 0, 0, message=f"features {k + 1}/{len(entries)}: {entry.name}")
        data[entry.path] = yield from progress_as_log(_features(entry, encoder, job, cache), 0)
    x_train, y_train = _stack(train, data, classes)
    if len(np.unique(y_train)) < 2:
        raise TrainingError("the training slides have tissue tiles of one class only")
    per_class = np.bincount(y_train, minlength=len(classes))
    per_epoch = _epoch_counts(per_class, weights)
    steps_per_epoch = max(1, math.ceil(per_epoch.sum() / job.batch_size))
    total = job.epochs * steps_per_epoch
    yield TrainEvent("log", 0, total, message=(
        f"{len(y_train)} training tiles "
        f"({', '.join(f'{c} {n}' for c, n in zip(classes, per_class, strict=True))}); per epoch "
        f"{', '.join(f'{c} {n}' for c, n, k in zip(classes, per_epoch, per_class, strict=True) if k)} "
        f"(normal weight {job.normal_weight:g}): {steps_per_epoch} steps per epoch"
    ))  # fmt: skip
    batches = _balanced_batches(x_train, y_train, job.batch_size, generator, weights)
    validate = _tpf_validation(val, data, classes, spec.positive_index) if val else None
    optimizer = torch.optim.Adam(model.net.head.parameters(), lr=job.lr)
    provenance = {
        "family": "tumor-normal", "job": job.to_dict(), "initialisation": init, "classes": list(classes),
        "train_slides": provenance_entries(train), "val_slides": provenance_entries(val),
        "training_tiles": len(y_train), "labels": "slide-level (every tile takes its slide's label)",
    }  # fmt: skip
    settings = LoopSettings(
        total, Path(job.out), eval_every=max(1, steps_per_epoch), device=job.device, amp=job.amp
    )
    return (
        yield from fit(
            model,
            batches,
            optimizer,
            settings,
            validate=validate,
            forward=lambda m, f: m.net.head(f),
            provenance=provenance,
            stop=stop,
            resume=resume[1] if resume else None,
        )
    )


def _features(entry: SlideEntry, encoder: Encoder, job: TumorNormalTraining, cache: Path):
    try:
        slide = open_slide(entry.path, mpp=entry.mpp)
        slide.require_mpp()
    except Exception as error:
        raise TrainingError(f"{entry.path}: {error}") from error
    tissue = run_to_completion(detect_tissue(slide, TissueParams()))
    return (
        yield from extract_features(
            slide, encoder, tissue=tissue, cache_dir=cache, min_tissue_fraction=job.min_tissue_fraction
        )
    )


def _stack(entries: list[SlideEntry], data: dict, classes: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    xs = [data[e.path].features for e in entries]
    ys = [np.full(len(data[e.path]), _label_of(e, classes), np.int64) for e in entries]
    return np.concatenate(xs), np.concatenate(ys)


def _class_weights(classes: tuple[str, ...], normal_weight: float) -> np.ndarray:
    """Per-class sampling weights: ``normal_weight`` for ``normal``, 1 for the others."""
    if not (np.isfinite(normal_weight) and normal_weight > 0):
        raise TrainingError(f"normal_weight must be a positive number (1 = balanced), got {normal_weight!r}")
    if normal_weight != 1 and "normal" not in classes:
        raise TrainingError(
            f"normal_weight {normal_weight:g} needs a 'normal' class; the classes are {', '.join(classes)}"
        )
    return np.array([normal_weight if c == "normal" else 1.0 for c in classes])


def _epoch_counts(per_class: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Tiles of each class per epoch: proportional to ``weights``, as many as the classes allow.

    With equal weights every class keeps as many tiles as the rarest one has
    (the majority undersampled); classes without tiles get none.
    """
    present = per_class > 0
    unit = (per_class[present] / weights[present]).min()
    counts = np.zeros_like(per_class)
    counts[present] = np.minimum(per_class[present], np.maximum(1, np.round(unit * weights[present])))
    return counts.astype(np.int64)


def _balanced_batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    generator: torch.Generator,
    weights: np.ndarray | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches; each epoch draws tiles of every class in proportion to ``weights`` (default equal).

    Tiles are drawn without replacement, afresh each epoch, as many as the
    scarcest class (relative to its weight) allows.
    """
    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    n_classes = int(y.max()) + 1 if len(y) else 0
    weights = np.ones(n_classes) if weights is None else np.asarray(weights, float)
    per_class = np.bincount(y, minlength=len(weights))
    counts = _epoch_counts(per_class, weights)
    by_class = [(np.flatnonzero(y == k), int(counts[k])) for k in range(len(weights)) if counts[k] > 0]
    features, labels = torch.from_numpy(x), torch.from_numpy(y)
    while True:
        epoch = rng.permutation(np.concatenate([rng.choice(idx, n, replace=False) for idx, n in by_class]))
        for start in range(0, len(epoch), batch_size):
            take = torch.from_numpy(epoch[start : start + batch_size])
            yield features[take], labels[take]


def _tpf_validation(val: list[SlideEntry], data: dict, classes: tuple[str, ...], positive: int):
    feats = [torch.from_numpy(data[e.path].features) for e in val]
    slide_labels = np.array([_label_of(e, classes) for e in val])

    def validate(model: PathologyModel) -> dict[str, float]:
        device = next(model.net.head.parameters()).device
        tpf, correct, losses, count = [], 0, 0.0, 0
        for f, label in zip(feats, slide_labels, strict=True):
            if len(f) == 0:
                tpf.append(0.0)
                continue
            logits = model.net.head(f.to(device)).float().cpu()
            winners = logits.argmax(1)
            tpf.append(float((winners == positive).float().mean()))
            correct += int((winners == int(label)).sum())
            losses += float(F.cross_entropy(logits, torch.full((len(f),), int(label)), reduction="sum"))
            count += len(f)
        metrics = {"tile_accuracy": correct / max(count, 1), "val_loss": losses / max(count, 1)}
        binary = (slide_labels == positive).astype(int)
        if 0 < binary.sum() < len(binary):
            metrics["slide_auc"] = roc_auc(binary, np.array(tpf))
        pos = [t for t, b in zip(tpf, binary, strict=True) if b]
        neg = [t for t, b in zip(tpf, binary, strict=True) if not b]
        metrics["mean_tpf_tumour"] = float(np.mean(pos)) if pos else float("nan")
        metrics["mean_tpf_normal"] = float(np.mean(neg)) if neg else float("nan")
        # Best = slide AUC, ties broken by the gap between tumour and normal slides' mean TPF.
        gap = metrics["mean_tpf_tumour"] - metrics["mean_tpf_normal"]
        metrics["score"] = metrics.get("slide_auc", metrics["tile_accuracy"]) + 0.01 * np.nan_to_num(gap)
        return metrics

    return validate
