"""Per-tile features of a slide through an encoder, cached as zarr, resumable.

Every tissue tile of a slide goes through a frozen encoder once; the result
is cached per slide x encoder (name and weights digest) x grid (tile size,
um/px, stride, the tiles the tissue mask keeps). Later uses (a head trained
many epochs on the vectors, a CLAM bag, a CLAM h5 export) read the cache.

The cache entry ``<slide stem>-<key>.zarr`` is created empty at once
(atomically) and filled batch by batch: rows are written as soon as they are
computed, and a chunk of rows is marked done only once all its rows are in.
An interrupted extraction (Ctrl-C, a kill, a closed generator) keeps what
was done, and the next call with the same inputs computes only the rest.

No Qt, no napari.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathology.features.encoders import Encoder
from napari_pathology.fileio import atomic_path, safe_name
from napari_pathology.progress import Progress
from napari_pathology.tiles import TileGrid, TileLoader, make_tile_grid

__all__ = ["FeatureBatch", "SlideFeatures", "extract_features", "feature_grid", "level0_coords"]

#: Version of the cache layout (part of the key: an old layout is never read as a new one).
CACHE_LAYOUT = 1


@dataclass(frozen=True)
class FeatureBatch:
    """Features of the tiles one batch just computed (the payload of extraction progress).

    Attributes
    ----------
    cells : ndarray
        ``(B, 2)`` row/col of each tile in the grid.
    features : ndarray
        ``(B, D)`` float32.
    """

    cells: np.ndarray
    features: np.ndarray


@dataclass
class SlideFeatures:
    """Features of a slide's tissue tiles.

    Attributes
    ----------
    features : ndarray
        ``(N, D)`` float32, one row per tile.
    cells : ndarray
        ``(N, 2)`` row/col of each tile in the grid.
    coords : ndarray
        ``(N, 2)`` int64 level-0 ``(x, y)`` px of each tile's top-left corner.
    grid : TileGrid
        The tiles' geometry.
    path : Path or None
        The cache entry, when cached.
    encoder : dict
        The encoder's provenance (name, weights, trained, digest).
    """

    features: np.ndarray
    cells: np.ndarray
    coords: np.ndarray
    grid: TileGrid
    path: Path | None = None
    encoder: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.features)

    @property
    def grid_shape(self) -> tuple[int, int]:
        """Rows and columns of the full grid."""
        return self.grid.shape

    def clam_patch(self) -> tuple[int, int]:
        """``(patch_size, patch_level)`` as CLAM records them: the tile's side in px of the level read."""
        return round(self.grid.tile_um / self.grid.level_mpp_xy[0]), int(self.grid.level)


def level0_coords(grid: TileGrid) -> np.ndarray:
    """``(N, 2)`` int64 level-0 ``(x, y)`` px of the top-left corner of each kept tile."""
    origins = grid.origins_um / np.asarray(grid.slide_mpp, np.float64)
    return np.rint(origins).astype(np.int64).reshape(-1, 2)


def feature_grid(
    slide: Any,
    encoder: Encoder,
    *,
    tissue: Any = None,
    min_tissue_fraction: float = 0.5,
    patch_size: int | None = None,
    mpp: float | None = None,
    stride: int | None = None,
) -> TileGrid:
    """The tiles an encoder sees: its patch size and um/px (or the ones given), tissue tiles only."""
    size = int(patch_size or encoder.patch_size)
    return make_tile_grid(
        slide, float(mpp or encoder.mpp), size, stride or size, tissue=tissue,
        min_tissue_fraction=min_tissue_fraction if tissue is not None else 0.0,
    )  # fmt: skip


def _cache_key(slide: Any, encoder: Encoder, digest: str, grid: TileGrid) -> str:
    stat = Path(slide.path).stat() if getattr(slide, "path", None) else None
    payload = {
        "layout": CACHE_LAYOUT,
        "slide": [str(slide.path) if stat else slide.name, stat.st_size if stat else None,
                  stat.st_mtime_ns if stat else None],
        "encoder": [encoder.name, digest, encoder.normalization, encoder.dim],
        "grid": grid.to_dict(),
        "cells": hashlib.sha256(np.ascontiguousarray(grid.cells).tobytes()).hexdigest(),
    }  # fmt: skip
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _create_entry(path: Path, key: str, grid: TileGrid, encoder: Encoder, chunk_rows: int) -> None:
    import zarr

    n = len(grid)
    with atomic_path(path) as staging:  # a folder; a kill while creating leaves no half entry
        group = zarr.open_group(str(staging), mode="w")
        group.create_array("features", shape=(n, encoder.dim), chunks=(chunk_rows, encoder.dim),
                           dtype="float32", fill_value=0.0)  # fmt: skip
        group.create_array("done", shape=(-(-n // chunk_rows),), chunks=(1,), dtype="bool", fill_value=False)
        group.create_array("cells", data=np.asarray(grid.cells, np.int64))
        group.create_array("coords", data=level0_coords(grid))
        group.attrs.update(
            {"key": key, "chunk_rows": chunk_rows, "n_tiles": n, "grid": grid.to_dict(),
             "encoder": encoder.provenance, "complete": False}
        )  # fmt: skip


def _open_entry(path: Path, key: str, n: int) -> tuple[Any, np.ndarray] | None:
    """The entry's group and done flags, or None (removed) when it is torn or not this key's."""
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r+")
        ok = group.attrs.get("key") == key and group.attrs.get("n_tiles") == n
        done = np.asarray(group["done"][:], bool) if ok else None
        if ok and group["features"].shape[0] == n:
            return group, done
    except Exception:  # a torn or foreign folder: computed again
        pass
    shutil.rmtree(path, ignore_errors=True)
    return None


def _runs(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """Contiguous runs ``(start_row, stop_row, offset in rows)`` of sorted row numbers."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(rows)]])
    return [(int(rows[a]), int(rows[b - 1]) + 1, int(a)) for a, b in zip(starts, stops, strict=True)]


def extract_features(
    slide: Any,
    encoder: Encoder,
    *,
    tissue: Any = None,
    min_tissue_fraction: float = 0.5,
    patch_size: int | None = None,
    mpp: float | None = None,
    stride: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    workers: int = 2,
    stop: threading.Event | None = None,
) -> Generator[Progress, None, SlideFeatures]:
    """Features of every tissue tile of ``slide`` through ``encoder``, cached and resumable.

    Parameters
    ----------
    slide : Slide
        An opened slide with um/px.
    encoder : Encoder
        The network (on the device it should run on).
    tissue : TissueMask, optional
        Tiles with less than ``min_tissue_fraction`` tissue are skipped; None keeps every tile.
    min_tissue_fraction : float
        Minimum tissue per tile.
    patch_size, mpp : int, float, optional
        Tile side (px) and um/px (default: the encoder's).
    stride : int, optional
        px at ``mpp`` between tile origins (default: ``patch_size``, non-overlapping).
    cache_dir : path-like, optional
        Where cache entries live (``<slide stem>-<key>.zarr``); None keeps everything in memory.
    batch_size : int
        Tiles per forward pass.
    workers : int
        Tile-reading threads.
    stop : threading.Event, optional
        Set it to stop after the current batch (what is done stays in the cache).

    Yields
    ------
    Progress
        Tiles done out of the slide's tissue tiles.

    Returns
    -------
    SlideFeatures
        Features of every tile (read back from the cache when cached).

    Raises
    ------
    InterruptedError
        When ``stop`` was set before the last batch (the cache keeps the batches done).

    Notes
    -----
    A cache that cannot be written (a full or read-only disk) only costs
    time: the extraction says so in a progress message and runs in memory.
    """
    grid = feature_grid(
        slide, encoder, tissue=tissue, min_tissue_fraction=min_tissue_fraction,
        patch_size=patch_size, mpp=mpp, stride=stride,
    )  # fmt: skip
    n = len(grid)
    provenance = {**encoder.provenance, "digest": encoder.digest()}
    coords = level0_coords(grid)
    if n == 0:
        yield Progress(0, 0, f"{slide.name}: no tissue tiles")
        empty = np.zeros((0, encoder.dim), np.float32)
        return SlideFeatures(empty, np.asarray(grid.cells), coords, grid, None, provenance)
    group, done, path, opened = None, None, None, None
    chunk_rows = max(1, int(batch_size))
    if cache_dir is not None:
        key = _cache_key(slide, encoder, provenance["digest"], grid)
        path = Path(cache_dir) / f"{safe_name(Path(slide.name).stem, 'slide')}-{key}.zarr"
        opened = _open_entry(path, key, n) if path.exists() else None
        if opened is None:
            try:
                _create_entry(path, key, grid, encoder, chunk_rows)
                opened = _open_entry(path, key, n)
            except OSError as error:  # the cache only saves time: go on, and say why it is missing
                yield Progress(0, n, f"{slide.name}: feature cache not written ({error})")
                path = None
    if opened is not None:
        group, done = opened
        chunk_rows = int(group.attrs["chunk_rows"])
        stored, flags = group["features"], group["done"]
        rows = None
    else:
        rows = np.zeros((n, encoder.dim), np.float32)
        done = np.zeros(-(-n // chunk_rows), bool)
    chunk_of = np.arange(n) // chunk_rows
    pending = np.flatnonzero(~done[chunk_of])
    finished = n - len(pending)
    if finished:
        yield Progress(finished, n, f"{slide.name}: {finished}/{n} tile features from the cache")
    left = np.bincount(chunk_of[pending], minlength=len(done))  # rows still to write, per chunk
    with TileLoader(slide, grid, batch_size, indices=pending, workers=workers) as loader:
        for indices, tiles in loader:
            features = encoder.embed(tiles)
            order = np.argsort(indices, kind="stable")
            indices, features = indices[order], features[order]
            if group is not None:
                for start, stop_row, offset in _runs(indices):
                    stored[start:stop_row] = features[offset : offset + stop_row - start]
            else:
                rows[indices] = features
            chunks, counts = np.unique(chunk_of[indices], return_counts=True)
            left[chunks] -= counts
            for chunk in chunks[left[chunks] == 0]:
                done[chunk] = True
                if group is not None:
                    flags[int(chunk)] = True  # only once every row of the chunk is on disk
            finished += len(indices)
            batch = FeatureBatch(np.asarray(grid.cells)[indices], features)
            yield Progress(finished, n, f"{slide.name}: features of {finished}/{n} tiles", batch)
            if stop is not None and stop.is_set() and finished < n:
                raise InterruptedError(
                    f"{slide.name}: stopped after {finished}/{n} tiles"
                    + (f"; the cache {path} keeps them" if path else "")
                )
    if finished < n:  # the loader was closed from outside
        raise InterruptedError(f"{slide.name}: stopped after {finished}/{n} tiles")
    if group is not None:
        group.attrs["complete"] = True
        rows = np.asarray(stored[:], np.float32)
    return SlideFeatures(rows, np.asarray(grid.cells), coords, grid, path, provenance)
