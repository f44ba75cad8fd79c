"""Reading one grid tile, or a patch anywhere, at exactly a model's um/px."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from napari_pathology.tiles.grid import MPP_TOLERANCE, TileGrid, _choose_level

__all__ = ["read_patch", "read_tile"]


def read_tile(slide: Any, grid: TileGrid, i: int) -> np.ndarray:
    """Read tile ``i`` of ``grid`` as ``(tile_size, tile_size, 3)`` RGB uint8 at ``target_mpp``.

    When the level's um/px matches the target within tolerance this is a
    single ``read_region`` of ``tile_size`` px at the rounded origin;
    otherwise the float level box is read (with a 1 px margin) and
    area-averaged (PIL box filter, i.e. antialiased) to exactly
    ``tile_size`` px. Parts outside the slide are white.

    Raises
    ------
    SlideReadError
        When the slide's pixels cannot be decoded.

    """
    return _read_level_box(slide, grid.level, grid.level_box(i), grid.tile_size, grid.direct)


def read_patch(slide: Any, centre_um: tuple[float, float], size: int, mpp: float) -> np.ndarray:
    """Read a ``size`` px square centred on ``centre_um = (x, y)`` at ``mpp`` um/px (RGB uint8).

    The level and the resampling are those :func:`make_tile_grid` and
    :func:`read_tile` use for grid tiles; parts outside the slide are white.
    Used to sample training patches anywhere.
    """
    mpp = float(mpp)
    slide_mpp = tuple(float(v) for v in slide.require_mpp())
    level = _choose_level(slide, slide_mpp, mpp, MPP_TOLERANCE)
    downsample = float(slide.level_downsamples[level])
    mx, my = slide_mpp[0] * downsample, slide_mpp[1] * downsample
    direct = all(abs(m / mpp - 1.0) <= MPP_TOLERANCE for m in (mx, my))
    side_um = size * mpp
    x0_um, y0_um = centre_um[0] - side_um / 2.0, centre_um[1] - side_um / 2.0
    return _read_level_box(slide, level, (x0_um / mx, y0_um / my, side_um / mx, side_um / my), size, direct)


def _read_level_box(
    slide: Any, level: int, box: tuple[float, float, float, float], size: int, direct: bool
) -> np.ndarray:
    """``size`` px RGB of the float ``(x, y, w, h)`` box of ``level``, area-resampled unless ``direct``."""
    x, y, w, h = box
    if direct:
        region = slide.read_region(level, round(x), round(y), size, size)
        return np.array(region, dtype=np.uint8, order="C", copy=True)  # never a view of the slide
    from PIL import Image

    margin = 1
    x0, y0 = math.floor(x) - margin, math.floor(y) - margin
    x1, y1 = math.ceil(x + w) + margin, math.ceil(y + h) + margin
    region = slide.read_region(level, x0, y0, x1 - x0, y1 - y0)
    image = Image.fromarray(np.ascontiguousarray(region))
    box_in_region = (x - x0, y - y0, x - x0 + w, y - y0 + h)
    return np.array(image.resize((size, size), Image.Resampling.BOX, box=box_in_region))  # writable
