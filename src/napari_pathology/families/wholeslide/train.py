"""Training the whole-slide CNN from slide labels (Chen et al. 2021), one slide at a time, tile by tile.

A slide table (``slide,label``) names the slides; each is read whole at
``input_mpp`` um/px (Chen: x4, about 2.5 um/px) from the pyramid's best
level, optionally padded with white (or centre-cropped) to a fixed square
``input_size``, augmented (flips, 90 degree rotations, brightness and
contrast) and ImageNet-normalised. The network (:mod:`.model`) runs through
the exact tiled pass of :mod:`.streaming`, so a training step's memory is
bounded by the tile (chosen from ``memory_gb`` unless ``tile`` is given),
not the slide. ``accumulation`` slides make one optimiser step (gradients
accumulated slide by slide); Adam at lr 2e-5, divided by 10 down to 2e-6
when the validation loss stops improving. Slides are split into training
and validation by slide, stratified by label; the best checkpoint has the
lowest validation loss (validation accuracy and, for two classes, AUC are
reported).

Stop, resume, best and last checkpoints and events are those of
:func:`~napari_pathology.training.loop.fit`. No Qt, no napari.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_pathology.cohort import SlideEntry, read_slide_table
from napari_pathology.families.wholeslide.model import ARCHS, FAMILY, INPUT_MPP, wholeslide_spec
from napari_pathology.families.wholeslide.streaming import choose_tile, stream_trunk
from napari_pathology.models.registry import PathologyModel, create_model
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
    fit,
    seed_everything,
    torch_threads,
)

__all__ = ["WholeSlideTraining", "read_slide_image", "table_classes", "train_from_family", "train_wholeslide"]


@dataclass(frozen=True)
class WholeSlideTraining:
    """A whole-slide training job (defaults: Chen et al. 2021's, at a workstation's memory).

    Parameters
    ----------
    data : Path
        Slide table: CSV with ``slide`` and ``label`` columns (or a folder of synthetic slides).
    out : Path
        Best checkpoint (lowest validation loss); ``<stem>.last.pt`` holds the last one.
    arch : {"resnet18", "resnet34", "resnet50"}
        The ResNet (Chen: resnet50).
    width : int
        Base width of the ResNet (64: torchvision's; less for a small CPU demo network).
    imagenet : bool
        Start from ImageNet weights when torchvision's file is on disk (never downloaded).
    input_mpp : float
        um/px the slides are read at (Chen: 2.5 at x4, 5 at x2).
    input_size : int, optional
        Pad with white (or centre-crop) every slide to this square side in px
        at ``input_mpp`` (Chen: 21,500 at x4); none: each slide as it is.
    tile : int, optional
        Tile side in px (a multiple of 32) of the tiled pass; none: the largest the memory budget holds.
    memory_gb : float
        Memory budget of one training step, GiB: picks the tile.
    accumulation : int
        Slides per optimiser step (gradients accumulated one slide at a time).
    epochs : int
        Passes over the training slides.
    lr : float
        Adam learning rate at the start.
    min_lr : float
        Lowest learning rate the plateau decay reaches.
    patience : int
        Validations without a lower validation loss before the learning rate is divided by 10.
    val_fraction : float
        Share of slides held out for validation, per label.
    flips : bool
        Random horizontal and vertical flips.
    rotations : bool
        Random 90 degree rotations.
    colour : float
        Brightness and contrast jitter (fraction, 0: none).
    classes : tuple of str, optional
        Class names in logit order; default: the table's labels, ``normal`` first.
    start : str, optional
        A trained checkpoint of this family to fine-tune; none: a fresh network.
    seed : int
        Split, sampling and initialisation seed.
    device : str
        ``"cpu"``, ``"cuda:N"`` or ``"auto"``.
    amp : bool
        Mixed precision (bf16 where supported).
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
    arch: str = "resnet50"
    width: int = 64
    imagenet: bool = True
    input_mpp: float = INPUT_MPP
    input_size: int | None = None
    tile: int | None = None
    memory_gb: float = 6.0
    accumulation: int = 4
    epochs: int = 30
    lr: float = 2e-5
    min_lr: float = 2e-6
    patience: int = 3
    val_fraction: float = 0.2
    flips: bool = True
    rotations: bool = True
    colour: float = 0.1
    classes: tuple[str, ...] | None = None
    start: str | None = None
    seed: int = 0
    device: str = "cpu"
    amp: bool = True
    resume: bool = False
    overwrite: bool = False
    threads: int | None = field(default=None)

    def __post_init__(self) -> None:
        for name in ("data", "out"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        if self.arch not in ARCHS:
            raise TrainingError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        check_count(self, "width")
        if self.width > 64:
            raise TrainingError(f"width must be from 1 to 64, got {self.width}")
        for name in ("accumulation", "epochs", "patience"):
            check_count(self, name)
        for name in ("input_size", "threads"):
            check_count(self, name, optional=True)
        check_count(self, "tile", optional=True)
        if self.tile is not None and self.tile % 32:
            raise TrainingError(f"tile must be a multiple of 32 px (the network's stride), got {self.tile}")
        check_count(self, "seed", 0)
        for name in ("input_mpp", "memory_gb", "lr", "min_lr"):
            check_number(self, name, 0, inclusive=False)
        check_number(self, "val_fraction", 0, below=1)
        check_number(self, "colour", 0, below=1)
        for name in ("imagenet", "flips", "rotations", "amp", "resume", "overwrite"):
            check_flag(self, name)
        if self.classes is not None:
            names = tuple(str(c).strip() for c in self.classes)
            if len(names) < 2 or not all(names) or len(set(names)) != len(names):
                raise TrainingError(f"classes must be two or more distinct names, got {list(self.classes)}")
            object.__setattr__(self, "classes", names)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings for provenance."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def read_slide_image(entry: SlideEntry, mpp: float, size: int | None = None) -> np.ndarray:
    """The whole slide as ``(H, W, 3)`` uint8 at ``mpp`` um/px, from its best pyramid level.

    With ``size`` the image is padded with white (centred) or centre-cropped to ``size`` x ``size``.

    Raises
    ------
    TrainingError
        A slide without um/px, or one that cannot be read (naming it).
    """
    from skimage.transform import resize

    from napari_pathology.slide.backends.errors import SlideOpenError
    from napari_pathology.slide.slide import open_slide

    try:
        with open_slide(entry.path, mpp=entry.mpp) as slide:
            slide_mpp = float(np.mean(slide.require_mpp()))
            downsample = mpp / slide_mpp
            level = slide.best_level_for_downsample(downsample)
            width, height = slide.level_dimensions[level]
            image = slide.read_region(level, 0, 0, width, height)
            factor = downsample / slide.level_downsamples[level]
    except SlideOpenError as error:  # no um/px, unreadable pixels: the backend's message names the slide
        raise TrainingError(str(error)) from None
    except (OSError, ValueError) as error:
        raise TrainingError(f"{entry.path.name}: {error}") from None
    shape = (max(1, round(height / factor)), max(1, round(width / factor)))
    if shape != image.shape[:2]:
        image = resize(image, shape, order=1, anti_aliasing=factor > 1, preserve_range=True)
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    if size is not None:
        out = np.full((size, size, 3), 255, np.uint8)
        h, w = min(size, shape[0]), min(size, shape[1])
        y0, x0 = (shape[0] - h) // 2, (shape[1] - w) // 2
        oy, ox = (size - h) // 2, (size - w) // 2
        out[oy : oy + h, ox : ox + w] = image[y0 : y0 + h, x0 : x0 + w]
        image = out
    return np.ascontiguousarray(image)


def _tensor(image: np.ndarray, job: WholeSlideTraining, rng: np.random.Generator | None) -> torch.Tensor:
    """``(3, H, W)`` ImageNet-normalised float, augmented when ``rng`` is given."""
    from napari_pathology.tiles.tensors import normalize_unit

    x = torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)
    if rng is not None:
        if job.rotations:
            x = torch.rot90(x, int(rng.integers(4)), dims=(1, 2))
        if job.flips and rng.random() < 0.5:
            x = x.flip(2)
        if job.flips and rng.random() < 0.5:
            x = x.flip(1)
        if job.colour > 0:
            contrast = 1.0 + rng.uniform(-job.colour, job.colour)
            brightness = rng.uniform(-job.colour, job.colour)
            x = ((x - 0.5) * contrast + 0.5 + brightness).clamp_(0.0, 1.0)
    return normalize_unit(x.unsqueeze(0).contiguous(), "imagenet")[0]


def _stack(images: Sequence[torch.Tensor], white: torch.Tensor) -> torch.Tensor:
    """Slides of different sizes in one batch: each padded (bottom, right) with normalised white."""
    height = max(x.shape[1] for x in images)
    width = max(x.shape[2] for x in images)
    out = white.reshape(1, 3, 1, 1).expand(len(images), 3, height, width).clone()
    for i, x in enumerate(images):
        out[i, :, : x.shape[1], : x.shape[2]] = x
    return out


def _batches(
    items: Sequence[tuple[SlideEntry, int]], job: WholeSlideTraining, white: torch.Tensor
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless ``accumulation``-slide batches, each epoch in a new random order, augmented."""
    rng = np.random.default_rng(job.seed)
    while True:
        order = rng.permutation(len(items))
        for start in range(0, len(order) - job.accumulation + 1, job.accumulation):
            chosen = [items[i] for i in order[start : start + job.accumulation]]
            images = [
                _tensor(read_slide_image(e, job.input_mpp, job.input_size), job, rng) for e, _ in chosen
            ]
            yield _stack(images, white), torch.tensor([label for _, label in chosen])


class _Forward:
    """``fit``'s forward hook: each slide of the batch through the tiled trunk, then pooling and head."""

    def __init__(self, job: WholeSlideTraining) -> None:
        self.job = job
        self.tiles: dict[tuple[int, int], int | tuple[int, int]] = {}

    def tile_for(self, net: Any, height: int, width: int) -> int | tuple[int, int]:
        """The settings' tile, or the largest that the memory budget holds for this size."""
        if self.job.tile is not None:
            return self.job.tile
        if (height, width) not in self.tiles:
            try:
                budget = int(self.job.memory_gb * 2**30)
                self.tiles[height, width] = choose_tile(net, height, width, budget)
            except ValueError as error:
                raise TrainingError(f"{error} (memory_gb {self.job.memory_gb})") from None
        return self.tiles[height, width]

    def __call__(self, model: PathologyModel, x: torch.Tensor) -> torch.Tensor:
        net = model.net
        tile = self.tile_for(net, int(x.shape[2]), int(x.shape[3]))
        fmaps = [stream_trunk(net.stages(), x[i : i + 1], tile) for i in range(len(x))]
        return torch.cat([net.head(f) for f in fmaps])


def _build_model(
    job: WholeSlideTraining, classes: tuple[str, ...], resume: PathologyModel | None
) -> tuple[PathologyModel, str]:
    if resume is not None:
        return resume, "resumed from the last checkpoint"
    if job.start:
        model, _ = starting_model(job.start)
        if model.spec.family != FAMILY or tuple(model.spec.classes) != classes:
            raise TrainingError(
                f"{job.start} is a {model.spec.family} model for {list(model.spec.classes)}, "
                f"not a {FAMILY} model for {list(classes)}"
            )
        return model, f"fine-tuning {job.start}"
    spec = wholeslide_spec(
        model_name_for(job.out), classes=classes, arch=job.arch, width=job.width,
        input_size=job.input_size or 4096, mpp=job.input_mpp,
    )  # fmt: skip
    model = create_model(spec)
    provenance = model.net.load_imagenet() if job.imagenet else None
    return model, provenance or f"random initialisation (fixed seed), {job.arch} width {job.width}"


def _validation(items: Sequence[tuple[SlideEntry, int]], job: WholeSlideTraining, forward: _Forward) -> Any:
    from napari_pathology.analysis.metrics.roc import roc_auc

    def validate(model: PathologyModel) -> dict[str, float]:
        device = next(model.net.parameters()).device
        logits = []
        for entry, _ in items:
            x = _tensor(read_slide_image(entry, job.input_mpp, job.input_size), job, None)[None]
            logits.append(forward(model, x.to(device)).float().cpu())
        logits_t = torch.cat(logits)
        labels = torch.tensor([label for _, label in items])
        metrics = {
            "val_loss": float(F.cross_entropy(logits_t, labels)),
            "val_accuracy": float((logits_t.argmax(1) == labels).float().mean()),
        }
        if logits_t.shape[1] == 2 and len(set(labels.tolist())) == 2:
            metrics["val_auc"] = float(roc_auc(labels.numpy(), logits_t.softmax(1)[:, 1].numpy()))
        return metrics

    return validate


def train_wholeslide(
    job: WholeSlideTraining, stop: threading.Event | None = None
) -> Generator[TrainEvent, None, TrainResult]:
    """Run a whole-slide training job (see :class:`WholeSlideTraining`); yields events, returns the result.

    Raises
    ------
    TrainingError
        One line: a table with one class or unlabelled slides, a slide without
        um/px, too few slides for the split or a batch, a budget too small for the slides.
    """
    with torch_threads(job.threads):
        return (yield from _train(job, stop))


def _train(job: WholeSlideTraining, stop: threading.Event | None) -> Generator[TrainEvent, None, TrainResult]:
    check_output(job.out, resume=job.resume, overwrite=job.overwrite)
    resume = check_resume(job.out) if job.resume else None
    seed_everything(job.seed)
    try:
        entries = read_slide_table(job.data, classes=job.classes)
    except ValueError as error:
        raise TrainingError(str(error)) from error
    classes = table_classes(entries, job.classes)
    train, val = split_by_slide(entries, job.val_fraction, job.seed)
    if len(train) < job.accumulation:
        raise TrainingError(
            f"{len(train)} training slides cannot fill an accumulation of {job.accumulation}; lower it"
        )
    model, init = _build_model(job, classes, resume[0] if resume else None)
    items = [(e, classes.index(str(e.label))) for e in train]
    val_items = [(e, classes.index(str(e.label))) for e in val]
    forward = _Forward(job)
    white = _tensor(np.full((1, 1, 3), 255, np.uint8), job, None)[:, 0, 0]
    steps_per_epoch = len(items) // job.accumulation
    losses: list[float] = []
    optimizer = torch.optim.Adam(model.parameters(), lr=job.lr)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=0.1, patience=job.patience, min_lr=job.min_lr
    )

    def after_validation(_model: PathologyModel, _step: int) -> str | None:
        if not losses:
            return None
        before = optimizer.param_groups[0]["lr"]
        plateau.step(losses[-1])
        after = optimizer.param_groups[0]["lr"]
        return (
            f"validation loss on a plateau: learning rate {before:.2g} -> {after:.2g}"
            if after < before
            else None
        )

    validate = _validation(val_items, job, forward) if val_items else None
    if validate is not None:
        inner = validate

        def validate(model: PathologyModel) -> dict[str, float]:
            metrics = inner(model)
            losses.append(metrics["val_loss"])
            return metrics

    yield TrainEvent("log", 0, 0, message=(
        f"{len(train)} training and {len(val)} validation slides, classes {', '.join(classes)}; "
        f"{job.arch} width {job.width} at {job.input_mpp:g} um/px, {job.accumulation} slides per step; {init}"
    ))  # fmt: skip
    provenance = {
        "family": FAMILY, "job": job.to_dict(), "initialisation": init, "classes": list(classes),
        "train_slides": provenance_entries(train), "val_slides": provenance_entries(val),
        "labels": "slide-level (whole-slide CNN, global max pooling)",
    }  # fmt: skip
    loop = LoopSettings(
        job.epochs * steps_per_epoch, job.out, eval_every=steps_per_epoch, device=job.device, amp=job.amp,
        log_every=max(1, min(5, steps_per_epoch)), precise_bn_batches=0,
    )  # fmt: skip
    run = fit(
        model, _batches(items, job, white), optimizer, loop, validate=validate, forward=forward,
        provenance=provenance, stop=stop, resume=resume[1] if resume else None,
        after_validation=after_validation if validate else None,
        best_metric="val_loss" if validate else "score", best_mode="min" if validate else "max",
    )  # fmt: skip
    return (yield from run)


def table_classes(entries: Sequence[SlideEntry], classes: Sequence[str] | None) -> tuple[str, ...]:
    """The class names in logit order (``classes``, else the labels with ``normal`` first).

    Raises
    ------
    TrainingError
        An unlabelled slide, one class in the table, or labels outside ``classes``.
    """
    labels = [e.label for e in entries]
    if any(label is None for label in labels):
        missing = next(e for e in entries if e.label is None)
        raise TrainingError(f"{missing.path.name} has no label; every slide of the table needs one")
    found = sorted(set(map(str, labels)), key=lambda c: (c != "normal", c))
    if classes is None:
        classes = found
    if len(found) < 2:
        raise TrainingError(f"the table has one class ({found[0]}); a slide classifier needs two or more")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise TrainingError(f"labels {unknown} are not among the classes {list(classes)}")
    return tuple(classes)


def train_from_family(
    settings: WholeSlideTraining, data: Any, out: str | os.PathLike[str], stop: threading.Event | None
) -> Generator[TrainEvent, None, TrainResult]:
    """:func:`train_wholeslide` behind the family's one trainer signature (``data`` and ``out`` win)."""
    return train_wholeslide(replace(settings, data=Path(data), out=Path(out)), stop)
