"""The tile grid: which tiles of a slide a model sees, at which pyramid level, and how much tissue each holds.

See :mod:`napari_pathology.tiles` for the grid geometry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from napari_pathology.geometry import area_below, summed_area_table
from napari_pathology.tiles.levels import MPP_TOLERANCE, level_for_mpp, reads_directly
from napari_pathology.world import pixel_centre_um

__all__ = ["MAX_GRID_CELLS", "MPP_TOLERANCE", "MaskLike", "TileGrid", "make_tile_grid", "tissue_fractions"]

#: Most cells a tile grid may have (a stride far too small for the slide is refused, not allocated).
MAX_GRID_CELLS = 20_000_000

# Tissue fractions below this count as zero (summed-area-table round-off).
_FRACTION_EPS = 1e-6


@runtime_checkable
class MaskLike(Protocol):
    """A boolean tissue mask with its physical pixel size.

    Mask pixel ``(r, c)`` covers the physical square
    ``[c * mpp, (c + 1) * mpp) x [r * mpp, (r + 1) * mpp)`` um from the slide's
    top-left corner. ``tissue.TissueMask`` is one; any object with these two
    attributes will do.
    """

    mask: np.ndarray
    mpp: float


@dataclass(frozen=True, eq=False)
class TileGrid:
    """The tiles a model sees on one slide, at the model's um/px.

    Attributes
    ----------
    target_mpp : float
        um/px of the tiles given to the model.
    tile_size : int
        Model input side in px at ``target_mpp``.
    stride : int
        px at ``target_mpp`` between neighbouring tile origins.
    level : int
        Pyramid level read.
    level_mpp : float
        um/px of that level along x (level-0 ``mpp_x`` times the level's downsample).
    shape : tuple of int
        ``(rows, cols)`` of the full grid covering the slide.
    cells : ndarray
        ``(N, 2)`` int64 ``(row, col)`` of the kept tiles, row-major order.
    tissue_fraction : ndarray
        ``(N,)`` float32 tissue fraction of each kept tile's centre region
        (1.0 without a mask).
    slide_mpp : tuple of float
        Level-0 ``(mpp_x, mpp_y)``.
    slide_size : tuple of int
        Level-0 ``(width, height)`` in px.
    mpp_tolerance : float
        Relative um/px difference accepted without resampling.

    """

    target_mpp: float
    tile_size: int
    stride: int
    level: int
    level_mpp: float
    shape: tuple[int, int]
    cells: np.ndarray
    tissue_fraction: np.ndarray
    slide_mpp: tuple[float, float]
    slide_size: tuple[int, int]
    mpp_tolerance: float = MPP_TOLERANCE

    def __len__(self) -> int:
        return len(self.cells)

    # ------------------------------------------------------------------ physical geometry
    @property
    def cell_um(self) -> float:
        """Distance in um between neighbouring tiles (and heatmap cells)."""
        return self.stride * self.target_mpp

    @property
    def tile_um(self) -> float:
        """Side of one tile in um."""
        return self.tile_size * self.target_mpp

    @property
    def origins_um(self) -> np.ndarray:
        """``(N, 2)`` physical ``(x, y)`` of each tile's top-left corner, um."""
        return self.cells[:, ::-1].astype(np.float64) * self.cell_um

    @property
    def centres_um(self) -> np.ndarray:
        """``(N, 2)`` physical ``(x, y)`` of each tile's centre, um."""
        return self.origins_um + self.tile_um / 2.0

    @property
    def first_centre_um(self) -> tuple[float, float]:
        """Physical ``(y, x)`` centre of cell ``(0, 0)``, um: the centre of the first tile."""
        half = pixel_centre_um(0, self.tile_um)
        return (half, half)

    # ------------------------------------------------------------------ reading
    @property
    def level_downsample(self) -> float:
        """Downsample of the level read, relative to level 0."""
        return self.level_mpp / self.slide_mpp[0]

    @property
    def level_mpp_xy(self) -> tuple[float, float]:
        """``(mpp_x, mpp_y)`` of the level read."""
        ds = self.level_downsample
        return self.slide_mpp[0] * ds, self.slide_mpp[1] * ds

    @property
    def direct(self) -> bool:
        """Whether tiles are read without resampling (level um/px within tolerance of the target)."""
        return reads_directly(self.level_mpp_xy, self.target_mpp, self.mpp_tolerance)

    def level_box(self, i: int) -> tuple[float, float, float, float]:
        """The ``(x, y, w, h)`` region of the read level (float level px) that tile ``i`` covers."""
        row, col = (int(v) for v in self.cells[i])
        mx, my = self.level_mpp_xy
        x_um, y_um = col * self.cell_um, row * self.cell_um
        return x_um / mx, y_um / my, self.tile_um / mx, self.tile_um / my

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready geometry (without the per-tile arrays)."""
        return {
            "target_mpp": self.target_mpp,
            "tile_size": self.tile_size,
            "stride": self.stride,
            "level": self.level,
            "level_mpp": self.level_mpp,
            "shape": list(self.shape),
            "n_tiles": len(self),
            "cell_um": self.cell_um,
            "first_centre_um": list(self.first_centre_um),
            "slide_mpp": list(self.slide_mpp),
            "slide_size": list(self.slide_size),
        }

    def __repr__(self) -> str:
        return (
            f"<TileGrid {len(self)}/{self.shape[0] * self.shape[1]} tiles of {self.tile_size}px "
            f"@ {self.target_mpp:g} um/px, stride {self.stride}, level {self.level} "
            f"({self.level_mpp:.4g} um/px){'' if self.direct else ', resampled'}>"
        )


def _readonly(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def tissue_fractions(tissue: MaskLike, x0_um: np.ndarray, y0_um: np.ndarray, side_um: float) -> np.ndarray:
    """Tissue fraction of axis-aligned squares, exact for fractional mask-pixel overlap.

    Parameters
    ----------
    tissue : MaskLike
        Boolean mask and its um per mask pixel.
    x0_um, y0_um : ndarray
        Top-left corners of the squares, um.
    side_um : float
        Side of every square, um.

    Returns
    -------
    ndarray
        float32 fractions in [0, 1]; parts of a square outside the mask count
        as background.

    """
    mask = np.asarray(tissue.mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"a tissue mask must be 2-D, got shape {mask.shape}")
    mask_mpp = float(tissue.mpp)
    if not math.isfinite(mask_mpp) or mask_mpp <= 0:
        raise ValueError(f"tissue mask um/px must be positive, got {tissue.mpp!r}")
    x0 = np.asarray(x0_um, np.float64) / mask_mpp
    y0 = np.asarray(y0_um, np.float64) / mask_mpp
    side = side_um / mask_mpp
    if mask.size == 0 or side <= 0:
        return np.zeros(np.broadcast(x0, y0).shape, np.float32)
    sat = summed_area_table(mask)
    x1, y1 = x0 + side, y0 + side
    area = area_below(sat, x1, y1) - area_below(sat, x0, y1) - area_below(sat, x1, y0)
    area += area_below(sat, x0, y0)
    fraction = np.clip(area / (side * side), 0.0, 1.0)
    fraction[fraction < _FRACTION_EPS] = 0.0
    return fraction.astype(np.float32)


def make_tile_grid(
    slide: Any,
    target_mpp: float,
    tile_size: int,
    stride: int | None = None,
    *,
    tissue: MaskLike | None = None,
    min_tissue_fraction: float = 0.0,
    tissue_region_size: int | None = None,
    mpp_tolerance: float = MPP_TOLERANCE,
) -> TileGrid:
    """Lay a grid of model tiles over a slide and keep the tissue tiles.

    Parameters
    ----------
    slide : Slide
        An opened slide with um/px (from the file or set by the user).
    target_mpp : float
        um/px the model expects.
    tile_size : int
        Model input side in px at ``target_mpp``.
    stride : int, optional
        px at ``target_mpp`` between tile origins (default ``tile_size``).
    tissue : MaskLike, optional
        Tissue mask; without it every tile of the grid is kept.
    min_tissue_fraction : float
        Keep tiles whose centre region holds at least this tissue fraction
        (and some tissue at all, when a mask is given and this is 0).
    tissue_region_size : int, optional
        Side, px at ``target_mpp``, of the centred region the tissue fraction
        is measured over (default ``stride``: the part of the tile its heatmap
        cell stands for).
    mpp_tolerance : float
        Relative um/px difference accepted without resampling, and the
        margin by which a level may be coarser than the target.

    Returns
    -------
    TileGrid

    Raises
    ------
    SlideOpenError
        When the slide has no um/px.
    ValueError
        For bad arguments, or a slide whose full resolution is coarser than
        ``target_mpp``.

    """
    target_mpp = float(target_mpp)
    if not math.isfinite(target_mpp) or target_mpp <= 0:
        raise ValueError(f"target um/px must be a positive number, got {target_mpp!r}")
    tile_size = _positive_int(tile_size, "tile_size")
    stride = tile_size if stride is None else _positive_int(stride, "stride")
    region = stride if tissue_region_size is None else _positive_int(tissue_region_size, "tissue_region_size")
    if not 0.0 <= min_tissue_fraction <= 1.0:
        raise ValueError(f"min_tissue_fraction must be in [0, 1], got {min_tissue_fraction!r}")
    if not 0.0 <= mpp_tolerance < 1.0:
        raise ValueError(f"mpp_tolerance must be in [0, 1), got {mpp_tolerance!r}")

    mpp_x, mpp_y = (float(v) for v in slide.require_mpp())
    width, height = (int(v) for v in slide.dimensions)
    level = level_for_mpp(slide, target_mpp, mpp=(mpp_x, mpp_y), tolerance=mpp_tolerance)
    level_mpp = mpp_x * float(slide.level_downsamples[level])

    cell_um = stride * target_mpp
    rows = max(1, math.ceil(height * mpp_y / cell_um - 1e-6))
    cols = max(1, math.ceil(width * mpp_x / cell_um - 1e-6))
    if rows * cols > MAX_GRID_CELLS:
        name = getattr(slide, "name", "the slide")
        raise ValueError(
            f"a stride of {stride} px at {target_mpp:g} um/px lays {cols} x {rows} tiles over {name}: "
            f"more than {MAX_GRID_CELLS:,}; use a larger stride"
        )
    rr, cc = np.meshgrid(np.arange(rows, dtype=np.int64), np.arange(cols, dtype=np.int64), indexing="ij")
    cells = np.stack([rr.ravel(), cc.ravel()], axis=1)
    if tissue is None:
        fraction = np.ones(len(cells), np.float32)
    else:
        centre_offset = (tile_size - region) / 2.0 * target_mpp
        x0 = cells[:, 1] * cell_um + centre_offset
        y0 = cells[:, 0] * cell_um + centre_offset
        fraction = tissue_fractions(tissue, x0, y0, region * target_mpp)
        keep = fraction >= min_tissue_fraction
        if min_tissue_fraction <= 0.0:
            keep &= fraction > 0.0
        cells, fraction = cells[keep], fraction[keep]
    return TileGrid(
        target_mpp=target_mpp,
        tile_size=tile_size,
        stride=stride,
        level=level,
        level_mpp=level_mpp,
        shape=(rows, cols),
        cells=_readonly(np.ascontiguousarray(cells, dtype=np.int64)),
        tissue_fraction=_readonly(np.ascontiguousarray(fraction, dtype=np.float32)),
        slide_mpp=(mpp_x, mpp_y),
        slide_size=(width, height),
        mpp_tolerance=float(mpp_tolerance),
    )


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
