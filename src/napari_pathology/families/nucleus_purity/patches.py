"""Nucleus patches for training: read once around every labelled nucleus, then drawn in shuffled batches.

No Qt, no napari.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence

import numpy as np
import torch

from napari_pathology.families.nucleus_purity.data import LabelledNuclei
from napari_pathology.families.nucleus_purity.model import INPUT_SIZE
from napari_pathology.nuclei.classify import NucleusClassifyError, iter_nucleus_patches
from napari_pathology.progress import Progress
from napari_pathology.slide import open_slide
from napari_pathology.tiles import dihedral, to_tensor
from napari_pathology.training.events import TrainingError

__all__ = ["patch_batches", "read_patches"]


def read_patches(
    data: Sequence[LabelledNuclei], context_um: float, equalize: str
) -> Generator[Progress, None, np.ndarray]:
    """``(N, S, S, 3)`` uint8 patches of ``context_um`` around every labelled nucleus, slide by slide.

    Raises
    ------
    TrainingError
        For a slide that cannot be opened or has no um/px (one line naming it).

    """
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


def patch_batches(
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
