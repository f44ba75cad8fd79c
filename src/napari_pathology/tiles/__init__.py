"""Tile grids at a model's um/px, tile reading, batching and test-time augmentation.

A model sees square tiles of ``tile_size`` pixels at ``target_mpp`` micrometres
per pixel. :func:`make_tile_grid` lays a regular grid of such tiles over the
whole slide in *physical* coordinates (micrometres from the slide's top-left
corner, x right, y down), keeps the tiles that hold enough tissue, and picks
the pyramid level to read from. :func:`read_tile` reads one tile at exactly
``target_mpp``; :class:`TileLoader` reads batches in background threads so
reading overlaps compute. :func:`to_tensor`, :func:`dihedral` and
:func:`tta_mean` turn batches into normalised tensors and average the eight
orientations.

Grid geometry
-------------
Cell ``(r, c)`` has its tile origin (top-left) at physical
``(x, y) = (c * stride * target_mpp, r * stride * target_mpp)`` um, and its
tile centre ``tile_size * target_mpp / 2`` um further right and down. The
heatmap value of a cell stands for the tile's centre region (``stride`` px,
e.g. Liu et al.'s 128 px label region of a 299 px tile), so heatmap cell
``(r, c)`` is centred at ``first_centre_um + (r, c) * cell_um``. The grid has
``ceil(slide size / cell_um)`` rows and columns; the last tiles may reach past
the slide's edge and are read padded with white (``read_region`` pads).

Layout: :mod:`~napari_pathology.tiles.levels` (:func:`level_for_mpp`, :func:`reads_directly`:
which level to read at a um/px), :mod:`~napari_pathology.tiles.grid` (:class:`TileGrid`,
:func:`make_tile_grid`, :func:`tissue_fractions`), :mod:`~napari_pathology.tiles.read`
(:func:`read_box`, :func:`read_tile`, :func:`read_patch`), :mod:`~napari_pathology.tiles.loader`
(:class:`TileLoader`) and :mod:`~napari_pathology.tiles.tensors` (:func:`to_tensor`, :func:`dihedral`,
:func:`tta_mean`); every name is importable from ``napari_pathology.tiles``.

Nothing here imports Qt or napari; torch is imported only by the tensor helpers.

Examples
--------
>>> import numpy as np
>>> from napari_pathology.slide import InMemoryBackend, Slide
>>> slide = Slide(InMemoryBackend([np.full((1000, 1500, 3), 200, np.uint8)], mpp=0.5))
>>> grid = make_tile_grid(slide, target_mpp=1.0, tile_size=100)
>>> grid.shape, len(grid), grid.cell_um, grid.first_centre_um
((5, 8), 40, 100.0, (50.0, 50.0))
>>> read_tile(slide, grid, 0).shape
(100, 100, 3)

"""

from napari_pathology.tiles.grid import (
    MAX_GRID_CELLS,
    MaskLike,
    TileGrid,
    make_tile_grid,
    tissue_fractions,
)
from napari_pathology.tiles.levels import MPP_TOLERANCE, level_for_mpp, reads_directly
from napari_pathology.tiles.loader import TileLoader
from napari_pathology.tiles.read import read_box, read_patch, read_tile
from napari_pathology.tiles.tensors import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NORMALIZATIONS,
    dihedral,
    normalize_unit,
    to_tensor,
    tta_mean,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAX_GRID_CELLS",
    "MPP_TOLERANCE",
    "NORMALIZATIONS",
    "MaskLike",
    "TileGrid",
    "TileLoader",
    "dihedral",
    "level_for_mpp",
    "make_tile_grid",
    "normalize_unit",
    "read_box",
    "read_patch",
    "read_tile",
    "reads_directly",
    "tissue_fractions",
    "to_tensor",
    "tta_mean",
]
