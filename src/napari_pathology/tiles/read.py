"""Reading one grid tile, a patch anywhere, or any box of a pyramid level, at exactly a target um/px.

:func:`read_box` is the one reader of a float box of a level resampled to a
pixel size (area-averaged when shrinking, bilinear when enlarging); the
level comes from :func:`~napari_pathology.tiles.levels.level_for_mpp`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from napari_pathology.tiles.grid import TileGrid
from napari_pathology.tiles.levels import level_for_mpp, reads_directly

__all__ = ["read_box", "read_patch", "read_tile"]


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
    return read_box(slide, grid.level, grid.level_box(i), grid.tile_size, direct=grid.direct)


def read_patch(slide: Any, centre_um: tuple[float, float], size: int, mpp: float) -> np.ndarray:
    """Read a ``size`` px square centred on ``centre_um = (x, y)`` at ``mpp`` um/px (RGB uint8).

    The level and the resampling are those :func:`make_tile_grid` and
    :func:`read_tile` use for grid tiles; parts outside the slide are white.
    Used to sample training patches anywhere.
    """
    mpp = float(mpp)
    slide_mpp = tuple(float(v) for v in slide.require_mpp())
    level = level_for_mpp(slide, mpp, mpp=slide_mpp)
    downsample = float(slide.level_downsamples[level])
    mx, my = slide_mpp[0] * downsample, slide_mpp[1] * downsample
    side_um = size * mpp
    x0_um, y0_um = centre_um[0] - side_um / 2.0, centre_um[1] - side_um / 2.0
    box = (x0_um / mx, y0_um / my, side_um / mx, side_um / my)
    return read_box(slide, level, box, size, direct=reads_directly((mx, my), mpp))


def read_box(
    slide: Any,
    level: int,
    box: tuple[float, float, float, float],
    size: int | tuple[int, int],
    *,
    direct: bool = False,
) -> np.ndarray:
    """RGB uint8 ``(h, w, 3)`` of the float ``box = (x, y, w, h)`` of ``level`` (level px) at ``size``.

    ``size`` is ``(w, h)`` output pixels, or one side of a square. With
    ``direct`` (the level's um/px is the target's, see
    :func:`~napari_pathology.tiles.levels.reads_directly`) it is one
    ``read_region`` of ``size`` at the rounded origin; otherwise the box is read
    with a 1 px margin and resampled: area-averaged (PIL box filter, i.e.
    antialiased) when shrinking, bilinear when enlarging on both axes. Parts
    outside the slide are white. The array is the caller's (never a view of
    the slide's cache).

    Raises
    ------
    SlideReadError
        When the slide's pixels cannot be decoded.

    """
    out_w, out_h = (size, size) if isinstance(size, int | np.integer) else size
    x, y, w, h = box
    if direct:
        region = slide.read_region(level, round(x), round(y), out_w, out_h)
        return np.array(region, dtype=np.uint8, order="C", copy=True)
    from PIL import Image

    margin = 1
    x0, y0 = math.floor(x) - margin, math.floor(y) - margin
    x1, y1 = math.ceil(x + w) + margin, math.ceil(y + h) + margin
    region = slide.read_region(level, x0, y0, x1 - x0, y1 - y0)
    image = Image.fromarray(np.ascontiguousarray(region))
    enlarging = w < out_w and h < out_h
    resample = Image.Resampling.BILINEAR if enlarging else Image.Resampling.BOX
    box_in_region = (x - x0, y - y0, x - x0 + w, y - y0 + h)
    return np.array(image.resize((int(out_w), int(out_h)), resample, box=box_in_region))  # writable
