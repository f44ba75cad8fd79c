"""Training patches for patch classifiers: where tumour and normal are, and Liu's sampling.

For each slide, :func:`prepare_regions` finds the tissue (low resolution)
and rasterises the tumour polygons on the same grid; a patch is *tumour*
when its centre region (``spec.centre_size``) touches tumour, *normal* when
its centre region is tissue far from any tumour (and, when the slide has
normal-region annotations, its centre lies inside them). :class:`PatchSampler`
draws patches as Liu et al. 2017 did: a class with equal probability, then
a slide that has that class, then a position in it. :class:`BatchStream`
reads, augments and normalises batches in a background thread so reading
overlaps the optimiser step.

No Qt, no napari.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from napari_pathology.cohort import SlideEntry
from napari_pathology.geometry import rasterize_polygons
from napari_pathology.models.registry import ModelSpec
from napari_pathology.progress import Progress, run_to_completion
from napari_pathology.slide import Slide, open_slide
from napari_pathology.tiles import normalize_unit, read_patch, to_tensor
from napari_pathology.tissue import TissueParams, detect_tissue
from napari_pathology.training.augment import Augmentation, augment_batch
from napari_pathology.training.events import TrainingError

__all__ = [
    "BatchStream",
    "Draw",
    "PatchSampler",
    "SlideRegions",
    "fixed_patches",
    "mine_hard_negatives",
    "prepare_regions",
]

NORMAL, TUMOUR = 0, 1


@dataclass
class SlideRegions:
    """Where patches of each class can be centred on one slide (mask-grid pixels)."""

    entry: SlideEntry
    slide: Slide
    mask_mpp: float
    tumour_px: np.ndarray
    normal_px: np.ndarray

    def count(self, label: int) -> int:
        """Candidate positions of class ``label``."""
        return len(self.tumour_px if label == TUMOUR else self.normal_px)


def prepare_regions(
    entries: Sequence[SlideEntry],
    spec: ModelSpec,
    tissue_params: TissueParams | None = None,
) -> Generator[Progress, None, list[SlideRegions]]:
    """Open each slide, find its tissue and tumour, and list candidate patch centres.

    Normal centres are tissue clear of tumour; for a slide with
    ``normal_annotations`` they are further restricted to those polygons.

    Raises
    ------
    TrainingError
        When a slide cannot be opened or has no um/px, or when no slide has tumour
        or none has normal tissue.
    """
    tissue_params = tissue_params or TissueParams()
    out = []
    label_um = (spec.centre_size or spec.input_size) * spec.mpp
    for k, entry in enumerate(entries):
        yield Progress(k, len(entries), f"finding tissue and tumour in {entry.name}")
        try:
            slide = open_slide(entry.path, mpp=entry.mpp)
            mpp = slide.require_mpp()
        except Exception as error:
            raise TrainingError(f"{entry.path}: {error}") from error
        tissue = run_to_completion(detect_tissue(slide, tissue_params))
        polygons = entry.tumour_polygons_um(mpp)
        if entry.is_tumour and not polygons:
            raise TrainingError(
                f"{entry.name} is labelled tumour but has no tumour annotations: a patch model needs "
                "polygons (GeoJSON) saying where the tumour is"
            )
        tumour = rasterize_polygons(polygons, tissue.mask.shape, scale=tissue.mpp) if polygons else None
        # Normal centres: tissue whose label region (centre_size) stays clear of tumour.
        normal = tissue.mask.copy()
        if entry.normal_annotations is not None:
            normal_polygons = entry.normal_polygons_um(mpp)
            normal &= (
                rasterize_polygons(normal_polygons, tissue.mask.shape, scale=tissue.mpp)
                if normal_polygons
                else False
            )
        if tumour is not None and tumour.any():
            reach = math.ceil(label_um / 2.0 * math.sqrt(2.0) / tissue.mpp) + 1
            normal &= ~ndimage.binary_dilation(tumour, iterations=reach)
        tumour_px = np.argwhere(tumour) if tumour is not None else np.zeros((0, 2), np.int64)
        out.append(SlideRegions(entry, slide, tissue.mpp, tumour_px, np.argwhere(normal)))
    for label, name in ((TUMOUR, "tumour"), (NORMAL, "normal tissue")):
        if not any(r.count(label) for r in out):
            raise TrainingError(f"none of the {len(out)} slides has {name} to sample patches from")
    yield Progress(len(entries), len(entries), f"{len(out)} slides ready")
    return out


#: One sampled patch: its slide, centre ``(x, y)`` in um and label.
Draw = tuple[SlideRegions, tuple[float, float], int]


class PatchSampler:
    """Draw labelled patches: class with equal probability, then a slide with it, then a position.

    Parameters
    ----------
    regions : sequence of SlideRegions
        From :func:`prepare_regions`.
    spec : ModelSpec
        Patch size and um/px.
    margin : int
        Extra px read on each side (room for jitter).
    seed : int
        Sampling seed.
    workers : int
        Reading threads.
    """

    def __init__(
        self,
        regions: Sequence[SlideRegions],
        spec: ModelSpec,
        margin: int = 8,
        seed: int = 0,
        workers: int = 2,
    ) -> None:
        self.regions = list(regions)
        self.spec = spec
        self.size = spec.input_size + 2 * int(margin)
        self.rng = np.random.default_rng(seed)
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="patches")
        self._hard: list[Draw] = []
        self._hard_fraction = 0.0
        self._by_class = {label: [r for r in self.regions if r.count(label)] for label in (NORMAL, TUMOUR)}

    def set_hard_negatives(self, draws: Sequence[Draw], fraction: float) -> None:
        """Draw this ``fraction`` of normal patches from ``draws`` (mined hard negatives) from now on."""
        self._hard = list(draws)  # replaced whole: the producer thread reads it without a lock
        self._hard_fraction = float(fraction) if self._hard else 0.0

    def positions(self, n: int, label: int | None = None, uniform: bool = False) -> list[Draw]:
        """``n`` draws of ``(slide, centre (x, y) um, label)``; ``uniform`` ignores hard negatives."""
        draws = []
        hard, hard_fraction = self._hard, self._hard_fraction
        for _ in range(n):
            cls = int(self.rng.integers(2)) if label is None else int(label)
            if cls == NORMAL and hard and not uniform and self.rng.random() < hard_fraction:
                draws.append(hard[int(self.rng.integers(len(hard)))])
                continue
            region = self._by_class[cls][int(self.rng.integers(len(self._by_class[cls])))]
            pixels = region.tumour_px if cls == TUMOUR else region.normal_px
            row, col = pixels[int(self.rng.integers(len(pixels)))]
            dx, dy = self.rng.random(2)
            draws.append((region, ((col + dx) * region.mask_mpp, (row + dy) * region.mask_mpp), cls))
        return draws

    def read(self, draws: Sequence[Draw]) -> tuple[np.ndarray, np.ndarray]:
        """Patches ``(n, size, size, 3)`` uint8 and labels ``(n,)`` for ``draws``."""
        patches = list(
            self._pool.map(lambda d: read_patch(d[0].slide, d[1], self.size, self.spec.mpp), draws)
        )
        return np.stack(patches), np.array([d[2] for d in draws], np.int64)

    def sample(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` random labelled patches."""
        return self.read(self.positions(n))

    def close(self) -> None:
        """Stop the reading threads: queued reads are cancelled, running ones finish (idempotent)."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def mine_hard_negatives(
    model: torch.nn.Module, sampler: PatchSampler, n_candidates: int, threshold: float = 0.5, batch: int = 64
) -> tuple[list[Draw], int]:
    """Score ``n_candidates`` uniformly drawn normal patches; return those the model calls tumour.

    Hard-negative mining (Wang et al. 2016, the Camelyon16 winners): normal
    tissue that looks like tumour (lymphoid aggregates, crushed or blurred
    areas) is rare under uniform sampling, so the network sees too little
    of it. Returns the draws scoring at least ``threshold`` and the number scored.
    """
    spec = sampler.spec
    draws = sampler.positions(n_candidates, NORMAL, uniform=True)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    hard: list[Draw] = []
    try:
        for start in range(0, len(draws), batch):
            chunk = draws[start : start + batch]
            patches, _ = sampler.read(chunk)
            margin = (patches.shape[1] - spec.input_size) // 2
            crop = patches[:, margin : margin + spec.input_size, margin : margin + spec.input_size]
            x = to_tensor(crop, spec.normalization)
            with torch.no_grad():
                p = torch.softmax(model(x.to(device)).float(), 1)[:, spec.positive_index].cpu().numpy()
            hard += [d for d, score in zip(chunk, p, strict=True) if score >= threshold]
    finally:
        model.train(was_training)
    return hard, len(draws)


def fixed_patches(
    regions: Sequence[SlideRegions], spec: ModelSpec, n: int, seed: int = 12345
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, balanced validation set: ``n`` centred patches (half per class), normalised."""
    sampler = PatchSampler(regions, spec, margin=0, seed=seed)
    try:
        half = max(1, n // 2)
        draws = sampler.positions(half, TUMOUR) + sampler.positions(n - half, NORMAL)
        patches, labels = sampler.read(draws)
    finally:
        sampler.close()
    return to_tensor(patches, spec.normalization), torch.from_numpy(labels)


class BatchStream(Iterator[tuple[torch.Tensor, torch.Tensor]]):
    """Endless augmented, normalised batches from a sampler, prepared ``prefetch`` batches ahead."""

    def __init__(
        self,
        sampler: PatchSampler,
        batch_size: int,
        augmentation: Augmentation | None = None,
        seed: int = 0,
        prefetch: int = 2,
    ) -> None:
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.augmentation = augmentation or Augmentation()
        self.rng = np.random.default_rng(seed + 1)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="batch-stream", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        spec = self.sampler.spec
        while not self._stop.is_set():
            try:
                patches, labels = self.sampler.sample(self.batch_size)
                x = augment_batch(patches, spec.input_size, self.rng, self.augmentation)
                item: object = (normalize_unit(x, spec.normalization), torch.from_numpy(labels))
            except Exception as error:  # hand it to the consumer
                item = error
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, Exception):
                return

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        while True:
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise StopIteration from None
                continue
            if isinstance(item, Exception):
                raise item
            return item

    def close(self, timeout: float = 30.0) -> None:
        """Stop producing batches and wait for the producer thread and the readers to end (idempotent).

        Leaving them running while the interpreter exits aborts the process
        (a reader inside torch or a slide library when its state is torn down).
        """
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self.sampler.close()

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
