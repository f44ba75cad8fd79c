"""Feature files in CLAM's layout (HDF5), written and read.

CLAM (Lu et al. 2021) keeps one ``<slide id>.h5`` per slide: a dataset
``features`` float32 ``(N, D)`` and a dataset ``coords`` ``(N, 2)`` of
integer level-0 ``(x, y)`` top-left corners of the patches, whose attributes
``patch_size`` (the patch side in px of the level read) and ``patch_level``
(the pyramid level read) are what ``create_patches_fp.py`` records and CLAM's
heatmap and training code read. Files written here have that layout, plus
attributes of their own on the root (encoder, its weights and whether they
are trained, um/px), which CLAM ignores.

No Qt, no napari.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathology.fileio import atomic_path, require_regular_file

__all__ = ["ClamFeatures", "check_coords", "read_clam_h5", "write_clam_h5"]


@dataclass
class ClamFeatures:
    """The content of a CLAM-layout feature file.

    Attributes
    ----------
    features : ndarray
        ``(N, D)`` float32.
    coords : ndarray
        ``(N, 2)`` int64 level-0 ``(x, y)`` top-left corners.
    patch_size : int or None
        Patch side in px at ``patch_level`` (None when the file does not say).
    patch_level : int or None
        Pyramid level the patches were read from.
    attrs : dict
        The file's other root attributes (JSON strings decoded).
    """

    features: np.ndarray
    coords: np.ndarray
    patch_size: int | None
    patch_level: int | None
    attrs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.features)


def _attr_value(value: Any) -> Any:
    if isinstance(value, dict | list | tuple):
        return json.dumps(value)
    if value is None:
        return "null"
    return value


def write_clam_h5(
    path: str | os.PathLike[str],
    features: np.ndarray,
    coords: np.ndarray,
    patch_size: int,
    patch_level: int,
    attrs: dict[str, Any] | None = None,
) -> Path:
    """Write a feature file in CLAM's layout, atomically (a temporary file renamed into place).

    Parameters
    ----------
    path : path-like
        Destination ``.h5``.
    features : ndarray
        ``(N, D)`` features (stored float32).
    coords : ndarray
        ``(N, 2)`` integer level-0 ``(x, y)`` top-left corners.
    patch_size : int
        Patch side in px at ``patch_level`` (attribute of ``coords``).
    patch_level : int
        Pyramid level read (attribute of ``coords``).
    attrs : dict, optional
        Extra root attributes (dicts and lists stored as JSON strings).

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        Shapes that do not match, or non-integer coordinates.
    OutputError
        When the file system refuses the write.
    """
    import h5py

    features = np.asarray(features)
    coords = np.asarray(coords)
    if features.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {features.shape}")
    if coords.shape != (len(features), 2):
        raise ValueError(f"coords must be ({len(features)}, 2) to match the features, got {coords.shape}")
    if coords.size and not np.issubdtype(coords.dtype, np.integer):
        if not np.array_equal(coords, np.round(coords)):
            raise ValueError("coords must be whole level-0 pixel positions")
    if int(patch_size) < 1 or int(patch_level) < 0:
        raise ValueError(f"patch_size must be >= 1 and patch_level >= 0, got {patch_size}, {patch_level}")
    path = Path(path)
    with atomic_path(path, suffix=".h5") as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("features", data=features.astype(np.float32, copy=False))
        dset = h5.create_dataset("coords", data=coords.astype(np.int64, copy=False))
        dset.attrs["patch_size"] = int(patch_size)
        dset.attrs["patch_level"] = int(patch_level)
        for key, value in (attrs or {}).items():
            h5.attrs[key] = _attr_value(value)
    return path


def _decoded(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if (isinstance(value, str) and value[:1] in "[{") or value == "null":
        try:
            return json.loads(value)
        except ValueError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    return value


def check_coords(
    coords: np.ndarray, slide_size: tuple[int, int] | None = None, where: str = "coords"
) -> None:
    """Refuse patch corners that cannot belong to the slide: negative, or (with its size) outside it.

    Parameters
    ----------
    coords : ndarray
        ``(N, 2)`` level-0 ``(x, y)`` top-left corners.
    slide_size : (int, int), optional
        The slide's level-0 ``(width, height)`` in px; None checks the sign only.
    where : str
        What the message names (the feature file).

    Raises
    ------
    ValueError
        One line naming ``where``, the first bad corner and its row: features
        for another slide, or coordinates of another pyramid level, are the
        usual mix-ups.
    """
    coords = np.asarray(coords)
    if coords.size == 0:
        return
    bad = (coords < 0).any(axis=1)
    if slide_size is not None:
        width, height = (int(v) for v in slide_size)
        bad |= (coords[:, 0] >= width) | (coords[:, 1] >= height)
    if bad.any():
        row = int(np.argmax(bad))
        x, y = (int(v) for v in coords[row])
        inside = f" of {slide_size[0]} x {slide_size[1]} px" if slide_size is not None else ""
        raise ValueError(
            f"{where}: patch {row} at ({x}, {y}) lies outside the slide{inside} ({int(bad.sum())} of "
            f"{len(coords)} patches do); features of another slide, or coords of another level?"
        )


def read_clam_h5(path: str | os.PathLike[str], slide_size: tuple[int, int] | None = None) -> ClamFeatures:
    """Read a CLAM-layout feature file (CLAM's own or one written by :func:`write_clam_h5`).

    Parameters
    ----------
    path : path-like
        The ``.h5`` file.
    slide_size : (int, int), optional
        The slide's level-0 ``(width, height)`` in px, when known: patch
        corners outside it are refused (see :func:`check_coords`).

    Raises
    ------
    ValueError
        Not an HDF5 file, no ``features`` dataset, shapes that do not fit,
        as many coords as feature rows, or coords outside the slide (one line
        naming the file).
    """
    import h5py

    path = require_regular_file(path, "feature file")
    try:
        h5 = h5py.File(path, "r")
    except OSError as error:
        raise ValueError(f"{path} is not an HDF5 feature file ({error})") from None
    with h5:
        if "features" not in h5:
            raise ValueError(f"{path} has no 'features' dataset (keys: {', '.join(h5.keys()) or 'none'})")
        features = np.asarray(h5["features"][()], np.float32)
        if features.ndim != 2:
            raise ValueError(f"{path}: 'features' must be (N, D), got shape {features.shape}")
        if "coords" not in h5:
            raise ValueError(f"{path} has no 'coords' dataset")
        coords_set = h5["coords"]
        coords = np.asarray(coords_set[()])
        if coords.ndim != 2 or coords.shape[1:] != (2,):
            raise ValueError(f"{path}: 'coords' must be (N, 2) level-0 (x, y), got shape {coords.shape}")
        if len(coords) != len(features):
            raise ValueError(
                f"{path}: {len(coords)} coords for {len(features)} feature rows (one corner per patch)"
            )
        if coords.size and not np.issubdtype(coords.dtype, np.integer):
            if not np.isfinite(coords).all() or not np.array_equal(coords, np.round(coords)):
                raise ValueError(f"{path}: 'coords' must be whole level-0 pixel positions")
        check_coords(coords, slide_size, str(path))
        size = coords_set.attrs.get("patch_size")
        level = coords_set.attrs.get("patch_level")
        attrs = {k: _decoded(v) for k, v in h5.attrs.items()}
    return ClamFeatures(
        features, coords.astype(np.int64), None if size is None else int(size),
        None if level is None else int(level), attrs,
    )  # fmt: skip
