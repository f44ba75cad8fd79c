"""Reading a whole slide as RGB at exactly a given um/px (what the detectors work on)."""

from __future__ import annotations

import math
from collections.abc import Generator
from typing import TYPE_CHECKING

import numpy as np
from scipy import sparse

from napari_pathology.progress import Progress
from napari_pathology.tiles.levels import level_for_mpp
from napari_pathology.tissue.mask import _mask_shape

if TYPE_CHECKING:
    from napari_pathology.slide import Slide

__all__ = ["MAX_MASK_PIXELS", "READ_BLOCK", "read_at_mpp"]

#: The largest mask detect_tissue will build (pixels); past it, ask for a coarser mask_mpp.
MAX_MASK_PIXELS = 200_000_000

#: Side of the level region read at once by :func:`read_at_mpp` (level pixels).
READ_BLOCK = 2048
#: How much coarser than the target a level read by :func:`read_at_mpp` may be (relative): a hair,
#: for level factors such as 4.016 for 4 (the output is an exact area average of whatever level is read).
LEVEL_TOLERANCE = 0.01


def _axis_weights(out_start: int, out_stop: int, k: float, in_start: int, in_stop: int) -> sparse.csr_matrix:
    """Box-filter (area-average) matrix for one axis.

    Output pixel ``i`` covers level coordinates ``[i * k, (i + 1) * k)``; level
    pixel ``j`` covers ``[j, j + 1)``. Rows are normalised over the level
    pixels ``in_start:in_stop`` that exist (rows with none stay zero).
    """
    n_out = out_stop - out_start
    lo = np.arange(out_start, out_stop, dtype=np.float64) * k
    hi = lo + k
    first = np.maximum(np.floor(lo).astype(np.int64), in_start)
    last = np.minimum(np.ceil(hi).astype(np.int64), in_stop)  # exclusive
    span = int(max(1, (last - first).max(initial=1)))
    j = first[:, None] + np.arange(span)[None, :]
    weight = np.minimum(hi[:, None], j + 1.0) - np.maximum(lo[:, None], j.astype(np.float64))
    valid = (j < last[:, None]) & (weight > 0)
    weight = np.where(valid, weight, 0.0)
    total = weight.sum(axis=1, keepdims=True)
    weight = np.divide(weight, total, out=np.zeros_like(weight), where=total > 0)
    rows = np.repeat(np.arange(n_out), span)
    cols = np.clip(j - in_start, 0, max(in_stop - in_start - 1, 0)).ravel()
    return sparse.csr_matrix(
        (weight.ravel().astype(np.float32), (rows, cols)), shape=(n_out, max(in_stop - in_start, 1))
    )


def read_at_mpp(
    slide: Slide,
    mpp: float,
    block: int = READ_BLOCK,
    *,
    box: tuple[int, int, int, int] | None = None,
    out: np.ndarray | None = None,
    max_pixels: int | None = MAX_MASK_PIXELS,
) -> Generator[Progress, None, np.ndarray]:
    """Read the whole slide (or a ``box`` of it) as RGB at exactly ``mpp`` micrometres per pixel.

    The best pyramid level (the coarsest one not coarser than needed,
    :func:`~napari_pathology.tiles.levels.level_for_mpp`; level 0, enlarged,
    when the slide is coarser than ``mpp``) is read
    region by region and area-averaged to the target grid: output pixel
    ``(r, c)`` is the mean colour of the physical square
    ``[c * mpp, (c + 1) * mpp) x [r * mpp, (r + 1) * mpp)``. Memory stays
    bounded by ``block`` (level pixels per side) plus the output.

    Parameters
    ----------
    slide : Slide
        An opened slide with a known um/px.
    mpp : float
        Target micrometres per pixel.
    block : int
        Side of the level region read at once.
    box : (r0, r1, c0, c1), optional
        Only these output rows and columns (px at ``mpp``; the same pixels as
        the whole slide's read would hold there).
    out : ndarray, optional
        ``(r1 - r0, c1 - c0, 3)`` uint8 array to fill (e.g. a memory-mapped
        file, so a slide larger than memory is never held whole); returned.
    max_pixels : int, optional
        Refuse a result of more pixels than this (None: no limit).

    Yields
    ------
    Progress
        One event per region read.

    Returns
    -------
    ndarray
        ``(rows, cols, 3)`` uint8 with ``rows, cols`` from the slide's
        physical size divided by ``mpp`` (rounded up), or the ``box``'s.

    Raises
    ------
    SlideOpenError
        When the slide has no um/px (the message says how to set it).
    ValueError
        When the result would be larger than ``max_pixels``, or a ``box`` or
        ``out`` that does not fit the slide.

    """
    mpp_x, mpp_y = slide.require_mpp()
    mpp = float(mpp)
    rows, cols = _mask_shape(slide.dimensions, (mpp_x, mpp_y), mpp)
    r_lo, r_hi, c_lo, c_hi = (0, rows, 0, cols) if box is None else (int(v) for v in box)
    if not (0 <= r_lo < r_hi <= rows and 0 <= c_lo < c_hi <= cols):
        raise ValueError(f"box {box} is not inside the {cols}x{rows} px of {slide.name} at {mpp:g} um/px")
    if max_pixels is not None and (r_hi - r_lo) * (c_hi - c_lo) > max_pixels:
        raise ValueError(
            f"a {c_hi - c_lo}x{r_hi - r_lo} image of {slide.name} at {mpp:g} um/px is too large; "
            "use a larger um/px"
        )
    level = level_for_mpp(slide, mpp, mpp=(mpp_x, mpp_y), tolerance=LEVEL_TOLERANCE, enlarge=True)
    factor = float(slide.level_downsamples[level])
    level_w, level_h = slide.level_dimensions[level]
    kx = mpp / (mpp_x * factor)
    ky = mpp / (mpp_y * factor)
    out_bx = max(1, min(cols, int(block // max(kx, 1e-9))))
    out_by = max(1, min(rows, int(block // max(ky, 1e-9))))
    row_starts = list(range(r_lo, r_hi, out_by))
    col_starts = list(range(c_lo, c_hi, out_bx))
    total = len(row_starts) * len(col_starts)
    if out is None:
        out = np.full((r_hi - r_lo, c_hi - c_lo, 3), 255, np.uint8)
    elif out.shape != (r_hi - r_lo, c_hi - c_lo, 3) or out.dtype != np.uint8:
        raise ValueError(f"out must be ({r_hi - r_lo}, {c_hi - c_lo}, 3) uint8, got {out.shape} {out.dtype}")
    else:
        out[:] = 255
    done = 0
    yield Progress(0, total, f"reading {slide.name} at {mpp:g} um/px (level {level})")
    # the level is the target grid: its pixels are the output (what the weights below would give)
    same_grid = abs(kx - 1.0) < 1e-9 and abs(ky - 1.0) < 1e-9
    for r0 in row_starts:
        r1 = min(r_hi, r0 + out_by)
        y_start = min(max(0, math.floor(r0 * ky)), max(level_h - 1, 0))
        y_stop = min(level_h, max(y_start + 1, math.ceil(r1 * ky)))
        wy = None if same_grid else _axis_weights(r0, r1, ky, y_start, y_stop)
        for c0 in col_starts:
            c1 = min(c_hi, c0 + out_bx)
            x_start = min(max(0, math.floor(c0 * kx)), max(level_w - 1, 0))
            x_stop = min(level_w, max(x_start + 1, math.ceil(c1 * kx)))
            region = slide.read_region(level, x_start, y_start, x_stop - x_start, y_stop - y_start)
            done += 1
            if same_grid:
                h, w = min(r1 - r0, y_stop - r0, region.shape[0]), min(c1 - c0, x_stop - c0, region.shape[1])
                out[r0 - r_lo : r0 - r_lo + h, c0 - c_lo : c0 - c_lo + w] = region[:h, :w]
                yield Progress(done, total, f"read block {done}/{total} of {slide.name}")
                continue
            wx = _axis_weights(c0, c1, kx, x_start, x_stop)
            h, w = region.shape[:2]
            flat = region.reshape(h, w * 3).astype(np.float32)
            tmp = np.asarray(wy @ flat).reshape(r1 - r0, w, 3)  # (ho, w, 3)
            tmp = np.ascontiguousarray(tmp.transpose(1, 0, 2)).reshape(w, (r1 - r0) * 3)
            res = np.asarray(wx @ tmp).reshape(c1 - c0, r1 - r0, 3).transpose(1, 0, 2)
            covered_y = np.asarray(wy.sum(axis=1)).ravel() > 0
            covered_x = np.asarray(wx.sum(axis=1)).ravel() > 0
            res = np.where(covered_y[:, None, None] & covered_x[None, :, None], res, 255.0)
            out[r0 - r_lo : r1 - r_lo, c0 - c_lo : c1 - c_lo] = np.clip(np.rint(res), 0, 255).astype(np.uint8)
            yield Progress(done, total, f"read block {done}/{total} of {slide.name}")
    return out
