"""Per-tile features of a frozen network, computed once per slide and cached as zarr.

Noorbakhsh et al. 2020 train their tile classifier on a *cache* of frozen
Inception v3 features: every tissue tile of every slide goes through the
trunk once, and the head trains on those vectors many times over. A cache
entry is keyed by the slide file (path, size, modification time), the
trunk's weights, the tile geometry and the tissue mask, so a changed input
never reuses a stale cache.

No Qt, no napari.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_pathology.analysis.engine import weights_digest
from napari_pathology.devices import resolve_device
from napari_pathology.fileio import atomic_path
from napari_pathology.models.registry import PathologyModel
from napari_pathology.progress import Progress
from napari_pathology.slide import Slide
from napari_pathology.tiles import TileGrid, TileLoader, make_tile_grid, to_tensor

__all__ = ["TileFeatures", "tile_features"]


@dataclass
class TileFeatures:
    """Features of a slide's tissue tiles.

    Attributes
    ----------
    features : ndarray
        ``(N, F)`` float32, one row per tile.
    cells : ndarray
        ``(N, 2)`` row/col of each tile in the grid.
    grid_shape : tuple of int
        Rows and columns of the full grid.
    path : Path or None
        The cache entry, when cached.
    """

    features: np.ndarray
    cells: np.ndarray
    grid_shape: tuple[int, int]
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.features)


def _cache_key(slide: Slide, model: PathologyModel, grid: TileGrid) -> str:
    stat = Path(slide.path).stat() if slide.path else None
    payload = {
        "slide": [slide.path, stat.st_size if stat else None, stat.st_mtime_ns if stat else None],
        "trunk": weights_digest(model.net.trunk),
        "grid": grid.to_dict(),
        "cells": hashlib.sha256(grid.cells.tobytes()).hexdigest(),
        "normalization": model.spec.normalization,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def tile_features(
    slide: Slide,
    model: PathologyModel,
    *,
    tissue: Any = None,
    cache_dir: str | os.PathLike[str] | None = None,
    min_tissue_fraction: float = 0.5,
    batch_size: int = 64,
    device: str = "cpu",
    workers: int = 2,
) -> Generator[Progress, None, TileFeatures]:
    """Trunk features of every tissue tile of ``slide`` (non-overlapping tiles at the model's um/px).

    Parameters
    ----------
    slide : Slide
        An opened slide with um/px.
    model : PathologyModel
        A model whose ``net`` has ``trunk`` and ``features(x)`` (the ``tumor-normal`` family).
    tissue : TissueMask, optional
        Tiles with less than ``min_tissue_fraction`` tissue are skipped.
    cache_dir : path-like, optional
        Where cache entries live (``<slide stem>-<key>.zarr``); None disables caching.
    min_tissue_fraction : float
        Minimum tissue per tile.
    batch_size : int
        Tiles per forward pass.
    device : str
        Where the trunk runs.
    workers : int
        Tile-reading threads.

    Yields
    ------
    Progress
        Tiles done.
    """
    import zarr

    spec = model.spec
    grid = make_tile_grid(
        slide, spec.mpp, spec.input_size, spec.input_size, tissue=tissue,
        min_tissue_fraction=min_tissue_fraction if tissue is not None else 0.0,
    )  # fmt: skip
    n_features = int(getattr(model.net, "n_features", 0))
    if len(grid) == 0:
        yield Progress(0, 0, f"{slide.name}: no tissue tiles")
        return TileFeatures(np.zeros((0, n_features), np.float32), np.zeros((0, 2), np.int64), grid.shape)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{Path(slide.name).stem}-{_cache_key(slide, model, grid)}.zarr"
        if path.exists():
            try:
                group = zarr.open_group(str(path), mode="r")
                cached = TileFeatures(
                    np.asarray(group["features"][:]), np.asarray(group["cells"][:]), grid.shape, path
                )
                yield Progress(
                    len(grid), len(grid), f"{slide.name}: {len(grid)} tile features from the cache"
                )
                return cached
            except Exception:  # a torn entry: recompute it
                shutil.rmtree(path, ignore_errors=True)
    torch_device = resolve_device(device)
    net = model.net.to(torch_device).eval()
    rows: np.ndarray | None = None  # allocated with the first batch's feature width
    done = 0
    with TileLoader(slide, grid, batch_size, workers=workers) as loader:
        for indices, tiles in loader:
            with torch.inference_mode():
                features = (
                    net.features(to_tensor(tiles, spec.normalization, torch_device)).float().cpu().numpy()
                )
            if rows is None:
                rows = np.empty((len(grid), features.shape[1]), np.float32)
            rows[indices] = features
            done += len(indices)
            yield Progress(done, len(grid), f"{slide.name}: features of {done}/{len(grid)} tiles")
    result = TileFeatures(rows, np.asarray(grid.cells), grid.shape, None)
    if path is not None:
        try:
            with atomic_path(path) as staging:  # a folder; the umask applies, a kill leaves no torn entry
                group = zarr.open_group(str(staging), mode="w")
                group.create_array("features", data=rows, chunks=(min(len(rows), 4096), rows.shape[1]))
                group.create_array("cells", data=result.cells)
                group.attrs["grid"] = grid.to_dict()
            result.path = path
        except OSError as error:  # the cache only saves time: train on, and say why it is missing
            yield Progress(len(grid), len(grid), f"{slide.name}: feature cache not written ({error})")
    return result
