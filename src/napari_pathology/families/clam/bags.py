"""Bags for CLAM training: patch features from CLAM-layout h5 files, checked where they come in.

A slide's bag is ``<features_dir>/<slide stem>.h5`` as CLAM's extractor and
``napari-pathology features`` write it: a dataset ``features`` (N, D) of
floats and, optionally for training, ``coords`` (N, 2). Read with h5py; a
missing file, a file that is not HDF5, one without ``features``, an empty or
non-finite bag, or a feature size other than the model's is refused in one
line naming the file. No Qt, no napari.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from napari_pathology.training.events import TrainingError

__all__ = ["BagCache", "bag_path", "bag_shape", "read_bag"]

#: Bytes of features kept in memory between epochs (the rest is read again from disk each time).
CACHE_BYTES = 2 * 2**30


def bag_path(features_dir: str | os.PathLike[str], slide: str | os.PathLike[str]) -> Path:
    """``<features_dir>/<slide stem>.h5``."""
    return Path(features_dir) / f"{Path(slide).stem}.h5"


def _open(path: Path):
    import h5py

    if not path.is_file():
        raise TrainingError(
            f"no features for this slide: {path} does not exist (extract them with "
            f"'napari-pathology features SLIDE --out {path.parent}', or give --features-dir)"
        )
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise TrainingError(f"{path}: not an HDF5 feature file, or a damaged one ({error})") from None


def _dataset(handle, path: Path):
    import h5py

    features = handle.get("features")
    if not isinstance(features, h5py.Dataset):
        raise TrainingError(
            f"{path}: no 'features' dataset (a CLAM feature file holds features (N, D) and coords (N, 2))"
        )
    if features.ndim != 2 or features.dtype.kind not in "fiu":
        raise TrainingError(
            f"{path}: 'features' must be a 2-D array of numbers (N patches, D), got {features.shape} "
            f"{features.dtype}"
        )
    if features.shape[0] == 0:
        raise TrainingError(f"{path}: the bag holds no patches (no tissue found on the slide?)")
    coords = handle.get("coords")
    if isinstance(coords, h5py.Dataset) and coords.shape != (features.shape[0], 2):
        raise TrainingError(
            f"{path}: 'coords' has shape {coords.shape}, expected ({features.shape[0]}, 2) for its features"
        )
    return features


def bag_shape(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(N, D)`` of a feature file, checked, without reading the features."""
    path = Path(path)
    with _open(path) as handle:
        return tuple(int(n) for n in _dataset(handle, path).shape)  # type: ignore[return-value]


def read_bag(path: str | os.PathLike[str], embed_dim: int | None = None) -> np.ndarray:
    """The ``(N, D)`` float32 features of a CLAM-layout h5 file, checked (D must be ``embed_dim``)."""
    path = Path(path)
    with _open(path) as handle:
        dataset = _dataset(handle, path)
        if embed_dim is not None and dataset.shape[1] != embed_dim:
            raise TrainingError(
                f"{path}: features of dimension {dataset.shape[1]}, the model takes {embed_dim} "
                "(features from another encoder?)"
            )
        features = np.asarray(dataset[()], dtype=np.float32)
    if not np.isfinite(features).all():
        raise TrainingError(f"{path}: the features hold NaN or infinite values; extract them again")
    return features


class BagCache:
    """Bags read once and kept in memory up to ``limit`` bytes; the others are read from disk each time."""

    def __init__(self, embed_dim: int, limit: int = CACHE_BYTES) -> None:
        self.embed_dim, self.limit, self.used = int(embed_dim), int(limit), 0
        self._kept: dict[Path, np.ndarray] = {}

    def __call__(self, path: Path) -> np.ndarray:
        """The bag at ``path``."""
        if path in self._kept:
            return self._kept[path]
        bag = read_bag(path, self.embed_dim)
        if self.used + bag.nbytes <= self.limit:
            self._kept[path] = bag
            self.used += bag.nbytes
        return bag
