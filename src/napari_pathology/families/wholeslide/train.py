"""Training the whole-slide CNN from slide labels (Chen et al. 2021), one slide at a time, tile by tile.

A slide table (``slide,label``) names the slides; each slide's tissue (its
bounding box, found at low resolution; or the whole slide) is read at
``input_mpp`` um/px (Chen: x4, about 2.5 um/px) from the pyramid's best
level region by region, optionally padded with white (or centre-cropped) to
a fixed square ``input_size``, kept as uint8 in a disk cache after its
first read (:mod:`.inputs`), augmented (flips, 90 degree rotations,
brightness and contrast) and normalised tile by tile on the device. The
network (:mod:`.model`) runs through the exact tiled pass of
:mod:`.streaming`, so a training step's memory is bounded by the tile
(chosen from ``memory_gb`` unless ``tile`` is given), not the slide; out of
memory, the tile is halved and the step retried. ``accumulation`` slides
make one optimiser step (one slide per forward and backward, gradients
accumulated); Adam at lr 2e-5, divided by 10 down to 2e-6 when the
validation loss stops improving. Slides are split into training
and validation by slide, stratified by label; the best checkpoint has the
lowest validation loss (validation accuracy and, for two classes, AUC are
reported).

Stop, resume, best and last checkpoints and events are those of
:func:`~napari_pathology.training.loop.fit`. No Qt, no napari.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_pathology.cohort import SlideEntry, read_slide_table, table_labels
from napari_pathology.families.wholeslide.inputs import (
    SlideBox,
    SlideImages,
    SlideInputError,
    as_tensor,
    augment,
    cache_folder,
    locate_slide,
)
from napari_pathology.families.wholeslide.model import ARCHS, FAMILY, INPUT_MPP, TOTAL_STRIDE, wholeslide_spec
from napari_pathology.families.wholeslide.streaming import choose_tile, graphs_within, stream_trunk
from napari_pathology.models.registry import PathologyModel, create_model
from napari_pathology.tiles.tensors import normalize_uint8
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
    crop_to_tissue : bool
        Crop each slide to its tissue's bounding box (found at low resolution)
        before padding; off: the whole slide.
    tile : int, optional
        Tile side in px (a multiple of 32) of the tiled pass; none: the largest the memory budget holds.
    memory_gb : float
        Memory budget of one training step, GiB: picks the tile.
    cache_gb : float
        Disk space (GiB) for the slides' images at ``input_mpp`` after their
        first read (then each epoch reads one file per slide instead of
        decoding the pyramid); 0: no cache.
    cache_dir : Path, optional
        Folder of that cache; none: ``<out stem>.slides-cache`` beside the model.
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
    crop_to_tissue: bool = True
    tile: int | None = None
    memory_gb: float = 6.0
    cache_gb: float = 20.0
    cache_dir: Path | None = None
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
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))
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
        check_number(self, "cache_gb", 0)
        for name in ("imagenet", "crop_to_tissue", "flips", "rotations", "amp", "resume", "overwrite"):
            check_flag(self, name)
        if self.classes is not None:
            names = tuple(str(c).strip() for c in self.classes)
            if len(names) < 2 or not all(names) or len(set(names)) != len(names):
                raise TrainingError(f"classes must be two or more distinct names, got {list(self.classes)}")
            object.__setattr__(self, "classes", names)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings for provenance."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def read_slide_image(
    entry: SlideEntry, mpp: float, size: int | None = None, *, crop_to_tissue: bool = False
) -> np.ndarray:
    """A slide as ``(H, W, 3)`` uint8 at ``mpp`` um/px (its tissue's bounding box with ``crop_to_tissue``).

    Read region by region from the best pyramid level; with ``size`` the image
    is padded with white (centred) or centre-cropped to ``size`` x ``size``.

    Raises
    ------
    TrainingError
        A slide without um/px, one that cannot be read, or one without tissue (naming it).
    """
    try:
        where = locate_slide(entry.path, mpp, crop_to_tissue=crop_to_tissue, slide_mpp=entry.mpp)
        return SlideImages(size).image(where)
    except SlideInputError as error:
        raise TrainingError(str(error)) from None


class _Forward:
    """``fit``'s forward hook: each uint8 slide through the tiled trunk (normalised per tile), the head."""

    def __init__(self, job: WholeSlideTraining) -> None:
        self.job = job
        self.tiles: dict[tuple[int, int], tuple[int, int]] = {}
        self.halvings = 0  # tiles halved after running out of memory
        self.graphs: dict[tuple[int, ...], int] = {}

    def tile_for(self, net: Any, height: int, width: int) -> tuple[int, int]:
        """The settings' tile, or the largest that the memory budget holds for this size (halved on OOM)."""
        if self.job.tile is not None:
            tile = (self.job.tile, self.job.tile)
        else:
            if (height, width) not in self.tiles:
                try:
                    budget = int(self.job.memory_gb * 2**30)
                    self.tiles[height, width] = choose_tile(net, height, width, budget)
                except ValueError as error:
                    raise TrainingError(f"{error} (memory_gb {self.job.memory_gb})") from None
            tile = self.tiles[height, width]
        scale = 2**self.halvings
        return tuple(max(TOTAL_STRIDE, t // scale // TOTAL_STRIDE * TOTAL_STRIDE) for t in tile)  # type: ignore[return-value]

    def shrink(self) -> str | None:
        """After running out of memory: halve the tiles (a log message), or None at the smallest tile."""
        if self.halvings >= 6:
            return None
        self.halvings += 1
        shown = self.job.tile or max((t for pair in self.tiles.values() for t in pair), default=0)
        side = max(TOTAL_STRIDE, shown // 2**self.halvings // TOTAL_STRIDE * TOTAL_STRIDE) if shown else 0
        return f"retrying the step with tiles halved ({side} px)" if side else "retrying with tiles halved"

    def trimmed(self, x: torch.Tensor) -> torch.Tensor:
        """One slide without the white rows and columns that batching slides of other sizes added."""
        if self.job.input_size is not None or len(x) != 1:
            return x
        if not (bool((x[0, :, -1, :] == 255).all()) and bool((x[0, :, :, -1] == 255).all())):
            return x
        ink = (x[0] != 255).any(dim=0)
        rows, cols = torch.nonzero(ink.any(dim=1)), torch.nonzero(ink.any(dim=0))
        height = int(rows[-1]) + 1 if len(rows) else TOTAL_STRIDE
        width = int(cols[-1]) + 1 if len(cols) else TOTAL_STRIDE
        return x[:, :, :height, :width]

    def graphs_for(self, net: Any, height: int, width: int, tile: tuple[int, int]) -> int:
        """How many tiles' graphs the forward keeps (each spares the backward a recomputation)."""
        key = (height, width, *tile)
        if key not in self.graphs:
            budget = int(self.job.memory_gb * 2**30)
            self.graphs[key] = graphs_within(net, height, width, tile, budget) if not self.halvings else 1
        return self.graphs[key]

    def __call__(self, model: PathologyModel, x: torch.Tensor) -> torch.Tensor:
        net = model.net
        prepare = functools.partial(normalize_uint8, normalization=model.spec.normalization)
        logits = []
        for i in range(len(x)):
            slide = self.trimmed(x[i : i + 1])
            height, width = int(slide.shape[2]), int(slide.shape[3])
            tile = self.tile_for(net, height, width)
            keep = self.graphs_for(net, height, width, tile)
            cuda = slide.device.type == "cuda"  # channels-last convolutions are faster there (tensor cores)
            fmap = stream_trunk(
                net.stages(), slide, tile, prepare=prepare, keep_graphs=keep, channels_last=cuda
            )  # fmt: skip
            logits.append(net.head(fmap))
        return torch.cat(logits)


def _stack(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 slide images of any sizes as one ``(B, 3, H, W)`` batch, padded (bottom, right) with white."""
    if len(images) == 1:
        return as_tensor(images[0])
    height = max(image.shape[0] for image in images)
    width = max(image.shape[1] for image in images)
    out = torch.full((len(images), 3, height, width), 255, dtype=torch.uint8)
    for i, image in enumerate(images):
        out[i, :, : image.shape[0], : image.shape[1]] = as_tensor(image)[0]
    return out


def _batches(
    items: Sequence[tuple[SlideBox, int]], job: WholeSlideTraining, images: SlideImages
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless ``accumulation``-slide batches (uint8), each epoch in a new random order, augmented."""
    rng = np.random.default_rng(job.seed)
    while True:
        order = rng.permutation(len(items))
        for start in range(0, len(order) - job.accumulation + 1, job.accumulation):
            chosen = [items[i] for i in order[start : start + job.accumulation]]
            batch = [
                augment(images.image(where), rng, rotations=job.rotations, flips=job.flips, colour=job.colour)
                for where, _ in chosen
            ]
            yield _stack(batch), torch.tensor([label for _, label in chosen])


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
        input_size=job.input_size or 4096, mpp=job.input_mpp, fixed_size=job.input_size is not None,
    )  # fmt: skip
    model = create_model(spec)
    provenance = model.net.load_imagenet() if job.imagenet else None
    return model, provenance or f"random initialisation (fixed seed), {job.arch} width {job.width}"


def _initialise_from_data(
    model: PathologyModel, slides: Sequence[SlideBox], images: SlideImages, seed: int
) -> str:
    """Start a fresh network from its frozen BatchNorm statistics measured on crops of training slides."""
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(slides))[:8]
    side = 256
    crops = []
    for i in chosen:
        image = images.image(slides[int(i)])
        h, w = image.shape[:2]
        top, left = max(0, (h - side) // 2), max(0, (w - side) // 2)
        crop = np.full((side, side, 3), 255, np.uint8)
        part = image[top : top + side, left : left + side]
        crop[: part.shape[0], : part.shape[1]] = part
        crops.append(crop)
    x = normalize_uint8(torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2), model.spec.normalization)
    model.net.initialise_from_data(x)
    return f"batch-norm statistics from {len(crops)} training slides, residual blocks starting as identities"


def _validation(items: Sequence[tuple[SlideBox, int]], images: SlideImages, forward: _Forward) -> Any:
    from napari_pathology.analysis.metrics.roc import roc_auc

    def validate(model: PathologyModel) -> dict[str, float]:
        device = next(model.net.parameters()).device
        logits = []
        for where, _ in items:
            x = as_tensor(images.image(where))
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
    try:  # labels other than tumour/normal (e.g. subtypes) are the classes, normal first
        entries = read_slide_table(job.data, classes=job.classes or table_labels(job.data))
    except ValueError as error:
        raise TrainingError(str(error)) from error
    classes = table_classes(entries, job.classes)
    train, val = split_by_slide(entries, job.val_fraction, job.seed)
    if len(train) < job.accumulation:
        raise TrainingError(
            f"{len(train)} training slides cannot fill an accumulation of {job.accumulation}; lower it"
        )
    model, init = _build_model(job, classes, resume[0] if resume else None)
    forward = _Forward(job)
    yield TrainEvent(
        "log", 0, 0, message=f"finding the tissue of {len(entries)} slides at {job.input_mpp:g} um/px"
    )
    where = {}
    for entry in [*train, *val]:
        try:
            where[entry.path] = locate_slide(
                entry.path, job.input_mpp, crop_to_tissue=job.crop_to_tissue, slide_mpp=entry.mpp
            )
        except SlideInputError as error:
            raise TrainingError(str(error)) from None
    images = SlideImages(job.input_size, cache_folder(job.out, job.cache_dir), int(job.cache_gb * 2**30))
    if (
        job.tile is None
    ):  # every slide's step fits the budget, or the job says which does not, before training
        for path, found in where.items():
            try:
                forward.tile_for(model.net, *images.shape(found))
            except TrainingError as error:
                raise TrainingError(f"{path.name} at {job.input_mpp:g} um/px: {error}") from None
    items = [(where[e.path], classes.index(str(e.label))) for e in train]
    val_items = [(where[e.path], classes.index(str(e.label))) for e in val]
    if init.startswith("random initialisation"):  # a fresh network: its statistics from training slides
        init += "; " + _initialise_from_data(model, [w for w, _ in items], images, job.seed)
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

    validate = _validation(val_items, images, forward) if val_items else None
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
        "input_px": {str(p.name): list(images.shape(w)) for p, w in where.items()},
    }  # fmt: skip
    loop = LoopSettings(
        job.epochs * steps_per_epoch, job.out, eval_every=steps_per_epoch, device=job.device, amp=job.amp,
        log_every=max(1, min(5, steps_per_epoch)), precise_bn_batches=0, micro_batch=1,
    )  # fmt: skip
    run = fit(
        model, _batches(items, job, images), optimizer, loop, validate=validate, forward=forward,
        provenance=provenance, stop=stop, resume=resume[1] if resume else None,
        after_validation=after_validation if validate else None, shrink=forward.shrink,
        best_metric="val_loss" if validate else "score", best_mode="min" if validate else "max",
    )  # fmt: skip
    if job.cache_gb > 0:
        yield TrainEvent("log", 0, 0, message=(
            f"each slide's image at {job.input_mpp:g} um/px is kept in {images.cache_dir} after its first "
            f"read (at most {job.cache_gb:g} GiB, {images.cached_bytes() / 2**30:.2f} GiB there now; "
            "delete it when done)"
        ))  # fmt: skip
    try:
        return (yield from run)
    except SlideInputError as error:  # a slide became unreadable mid-training: the checkpoints on disk stay
        raise TrainingError(str(error)) from None


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
