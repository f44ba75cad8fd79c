"""Bags for CLAM training: patch features from CLAM-layout h5 files, checked where they come in.

A slide's bag is ``<features_dir>/<slide stem>.h5`` as CLAM's extractor and
``napari-pathology features`` write it (read by
:func:`napari_pathology.features.clam_h5.read_clam_h5`: ``features`` (N, D)
and ``coords`` (N, 2)). A missing file, a file that is not HDF5, one
without ``features``, coords that do not match the features or (given the
slide's size) lie outside the slide, an empty or non-finite bag, or a feature
size other than the model's is refused in one line naming the file. No Qt,
no napari.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from napari_pathology.training.events import TrainingError

__all__ = ["BagCache", "bag_path", "read_bag", "slide_dimensions"]

#: Bytes of features kept in memory between epochs (the rest is read again from disk each time).
CACHE_BYTES = 2 * 2**30


def bag_path(features_dir: str | os.PathLike[str], slide: str | os.PathLike[str]) -> Path:
    """``<features_dir>/<slide stem>.h5``."""
    return Path(features_dir) / f"{Path(slide).stem}.h5"


def slide_dimensions(slide: str | os.PathLike[str]) -> tuple[int, int] | None:
    """A slide's level-0 ``(width, height)`` from its header; None when it cannot be opened.

    A bag's coords are checked against it (:func:`read_bag`); a slide that
    cannot be opened leaves its bag unchecked (training reads features only).
    """
    from napari_pathology.slide import SlideOpenError, UnsupportedFormatError, open_slide

    try:
        with open_slide(slide, remembered=False) as opened:
            width, height = opened.dimensions
    except (SlideOpenError, UnsupportedFormatError, OSError, ValueError):
        return None
    return int(width), int(height)


def read_bag(
    path: str | os.PathLike[str], embed_dim: int | None = None, slide_size: tuple[int, int] | None = None
) -> np.ndarray:
    """The ``(N, D)`` float32 features of a CLAM-layout h5 file, checked (D must be ``embed_dim``).

    ``slide_size`` (the slide's level-0 ``(width, height)``, when known)
    refuses coords outside the slide: a file of another slide, or of another
    pyramid level.

    Raises
    ------
    TrainingError
        One line naming the file: missing, not HDF5, no ``features``, as many
        coords as patches, coords outside the slide, no patches, NaN or
        infinite values, or another feature size.

    """
    from napari_pathology.features.clam_h5 import read_clam_h5

    path = Path(path)
    if not path.exists():
        raise TrainingError(
            f"no features for this slide: {path} does not exist (extract them with "
            f"'napari-pathology features SLIDE --out {path.parent}', or give --features-dir)"
        )
    try:
        features = read_clam_h5(path, slide_size).features
    except (OSError, ValueError, KeyError) as error:
        raise TrainingError(str(error).splitlines()[0] if str(error) else f"{path}: unreadable") from None
    if len(features) == 0:
        raise TrainingError(f"{path}: the bag holds no patches (no tissue found on the slide?)")
    if embed_dim is not None and features.shape[1] != embed_dim:
        raise TrainingError(
            f"{path}: features of dimension {features.shape[1]}, the model takes {embed_dim} "
            "(features from another encoder?)"
        )
    if not np.isfinite(features).all():
        raise TrainingError(f"{path}: the features hold NaN or infinite values; extract them again")
    return features


class BagCache:
    """Bags read once and kept in memory up to ``limit`` bytes; the others are read from disk each time.

    ``embed_dim`` (None: taken from the first bag read) is the feature size every bag must have.
    """

    def __init__(self, embed_dim: int | None = None, limit: int = CACHE_BYTES) -> None:
        self.embed_dim, self.limit, self.used = embed_dim, int(limit), 0
        self._kept: dict[Path, np.ndarray] = {}

    def keep(self, path: Path, bag: np.ndarray) -> None:
        """Keep a bag already read (and checked) if it fits in the memory budget."""
        if path not in self._kept and self.used + bag.nbytes <= self.limit:
            self._kept[path] = bag
            self.used += bag.nbytes

    def __call__(self, path: Path) -> np.ndarray:
        """The bag at ``path``."""
        if path in self._kept:
            return self._kept[path]
        bag = read_bag(path, self.embed_dim)
        self.embed_dim = bag.shape[1]
        self.keep(path, bag)
        return bag
