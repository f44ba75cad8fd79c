"""Fast uint8 / binary filters of the tissue detectors, and the boxes of candidate tissue.

Each function gives exactly what its plain counterpart gives (tests compare
them): :func:`median_above` is scikit-image's rank median followed by a
threshold, computed as a count of pixels above the threshold in each window;
:func:`closing` is a binary closing with a disk, done as separable runs of
logical OR / AND over the disk's rectangles; :func:`fill_holes` and
:func:`remove_small` label once. :func:`candidate_boxes` splits a sparse
slide's mask into independent boxes, so the filters run only where there is
tissue.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import ndimage

__all__ = [
    "candidate_boxes",
    "closing",
    "disk_rectangles",
    "fill_holes",
    "gray_u8",
    "majority",
    "median_above",
    "remove_small",
    "saturation_above",
    "saturation_u8",
]

Box = tuple[slice, slice]


@functools.cache
def _saturation_table() -> np.ndarray:
    """HSV saturation (0-255, rounded half to even) indexed by ``max * 256 + min`` of a pixel."""
    mx = np.repeat(np.arange(256, dtype=np.float32), 256)
    mn = np.tile(np.arange(256, dtype=np.float32), 256)
    sat = np.divide(mx - mn, mx, out=np.zeros_like(mx), where=mx > 0) * 255.0
    return np.clip(np.rint(sat), 0, 255).astype(np.uint8)


#: Pixels per chunk of the table look-ups (their index arrays stay small and in cache).
_CHUNK = 1 << 20


def _max_min_index(rgb: np.ndarray) -> np.ndarray:
    """``max * 256 + min`` of each pixel's channels (uint16)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    index = np.maximum(np.maximum(r, g), b).astype(np.uint16)
    index <<= 8
    index |= np.minimum(np.minimum(r, g), b)
    return index


def _look_up(table: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """``table[max * 256 + min]`` for every pixel, a band of rows at a time."""
    rows = max(1, _CHUNK // max(1, rgb.shape[1]))
    out = np.empty(rgb.shape[:2], table.dtype)
    for start in range(0, rgb.shape[0], rows):
        out[start : start + rows] = table.take(_max_min_index(rgb[start : start + rows]))
    return out


def saturation_u8(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation on 0-255 of a uint8 RGB image (as OpenCV computes it).

    Parameters
    ----------
    rgb : ndarray
        ``(H, W, 3)`` uint8.

    Returns
    -------
    ndarray
        ``(H, W)`` uint8, ``round(255 * (max - min) / max)`` (0 where max is 0).

    """
    return _look_up(_saturation_table(), rgb)


def saturation_above(rgb: np.ndarray, threshold: float) -> np.ndarray:
    """Where the HSV saturation (0-255, :func:`saturation_u8`) of a uint8 RGB image exceeds ``threshold``."""
    return _look_up(_saturation_table() > threshold, rgb)


def gray_u8(rgb: np.ndarray) -> np.ndarray:
    """Luma (ITU-R 601) on 0-255 of a uint8 RGB image."""
    gray = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.rint(gray), 0, 255).astype(np.uint8)


def _sum_along(values: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Sums over centred windows of ``size`` along ``axis`` (zero outside), in the dtype of ``values``."""
    half = size // 2
    n = values.shape[axis]
    pad = [(0, 0), (0, 0)]
    if size <= 9:  # a few shifted adds
        pad[axis] = (half, half)
        padded = np.pad(values, pad)
        out = np.zeros_like(values)
        for shift in range(size):
            out += padded[
                (slice(shift, shift + n), slice(None))
                if axis == 0
                else (slice(None), slice(shift, shift + n))
            ]
        return out
    pad[axis] = (half + 1, half)
    cumulative = np.cumsum(np.pad(values, pad), axis=axis, dtype=values.dtype)
    if axis == 0:
        return cumulative[size:] - cumulative[:-size]
    return cumulative[:, size:] - cumulative[:, :-size]


def _inside(n: int, size: int) -> np.ndarray:
    """Along one axis of length ``n``: how many of each centred ``size`` window's pixels lie inside."""
    half = size // 2
    index = np.arange(n)
    return np.minimum(index + half, n - 1) - np.maximum(index - half, 0) + 1


def majority(above: np.ndarray, size: int) -> np.ndarray:
    """Where at least half of each ``size`` x ``size`` window (its pixels inside the image) is set.

    With ``above = image > t`` this is ``skimage.filters.rank.median(image,
    np.ones((size, size))) > t``: the median of a window exceeds ``t`` exactly
    when at least half of it does.

    Parameters
    ----------
    above : ndarray
        ``(H, W)`` bool.
    size : int
        Odd window side (1: ``above`` itself).

    Returns
    -------
    ndarray
        ``(H, W)`` bool.

    """
    if size <= 1 or min(above.shape) < 2:
        return above
    dtype = np.uint8 if size <= 15 else np.uint16 if size <= 255 else np.uint32
    counts = _sum_along(_sum_along(above.view(np.uint8).astype(dtype), size, 0), size, 1)
    out = counts >= (size * size + 1) // 2
    rows, cols = above.shape
    half = size // 2
    inside_r, inside_c = _inside(rows, size), _inside(cols, size)
    for r in (slice(0, half), slice(max(half, rows - half), rows)):  # windows cut by the border
        out[r] = counts[r] >= (inside_r[r, None] * inside_c[None, :] + 1) // 2
    for c in (slice(0, half), slice(max(half, cols - half), cols)):
        out[:, c] = counts[:, c] >= (inside_r[:, None] * inside_c[None, c] + 1) // 2
    return out


def median_above(image: np.ndarray, threshold: float, size: int) -> np.ndarray:
    """Where the ``size`` x ``size`` median of a uint8 image exceeds ``threshold``.

    The same as ``skimage.filters.rank.median(image, np.ones((size, size))) > threshold``
    (whose windows hold only the pixels inside the image), by :func:`majority`.

    Parameters
    ----------
    image : ndarray
        ``(H, W)`` uint8.
    threshold : float
        Threshold on 0-255.
    size : int
        Odd window side (1: no blur).

    Returns
    -------
    ndarray
        ``(H, W)`` bool.

    """
    return majority(image > threshold, size)


@functools.cache
def disk_rectangles(radius: int) -> tuple[tuple[int, int], ...]:
    """``skimage.morphology.disk(radius)`` as a union of centred rectangles ``(half_height, half_width)``."""
    rows = [math.isqrt(radius * radius - dy * dy) for dy in range(radius + 1)]  # half-width at |dy|
    rectangles = []
    for dy, width in enumerate(rows):
        if dy == radius or rows[dy + 1] < width:
            rectangles.append((dy, width))
    return tuple(rectangles)


def _run(image: np.ndarray, half: int, axis: int, dilate: bool) -> np.ndarray:
    """OR (``dilate``) or AND over centred windows of ``2 * half + 1`` along ``axis``, False outside."""
    if half == 0:
        return image
    n = image.shape[axis]
    if half <= 4:  # a few shifted in-place ORs / ANDs, no padded copy
        out = image.copy()

        def part(start: int | None, stop: int | None) -> tuple[slice, slice]:
            return (slice(start, stop), slice(None)) if axis == 0 else (slice(None), slice(start, stop))

        for shift in range(1, min(half, n - 1) + 1):
            if dilate:
                out[part(shift, None)] |= image[part(None, n - shift)]
                out[part(None, n - shift)] |= image[part(shift, None)]
            else:
                out[part(shift, None)] &= image[part(None, n - shift)]
                out[part(None, n - shift)] &= image[part(shift, None)]
        if not dilate:  # these windows reach outside, where it is False
            out[part(None, min(half, n))] = False
            out[part(max(n - half, 0), None)] = False
        return out
    pad = [(0, 0), (0, 0)]
    pad[axis] = (half, half)
    out = np.pad(image, pad)
    combine = np.logical_or if dilate else np.logical_and
    width, span = 2 * half + 1, 1
    while span < width:  # windows of span pixels, doubled (overlaps are harmless for OR / AND)
        step = min(span, width - span)
        if axis == 0:
            out = combine(out[:-step], out[step:])
        else:
            out = combine(out[:, :-step], out[:, step:])
        span += step
    return out


def _by_disk(image: np.ndarray, radius: int, dilate: bool) -> np.ndarray:
    """Binary dilation or erosion (False outside) of a bool image with ``disk(radius)``."""
    combine = np.logical_or if dilate else np.logical_and
    out = None
    for half_h, half_w in disk_rectangles(radius):
        part = _run(_run(image, half_h, 0, dilate), half_w, 1, dilate)
        out = part if out is None else combine(out, part, out=out if out is not image else None)
    return image if out is None else out


def closing(mask: np.ndarray, size: int) -> np.ndarray:
    """Binary closing with a disk of diameter ``size`` px, without eroding at the border.

    The same as padding by the radius (edge values), ``scipy.ndimage.binary_closing``
    with ``skimage.morphology.disk(size // 2)``, cropping and keeping ``mask``.
    """
    if size <= 1 or not mask.any():
        return mask
    radius = size // 2
    padded = np.pad(mask, radius, mode="edge")
    closed = _by_disk(_by_disk(padded, radius, dilate=True), radius, dilate=False)
    return closed[radius:-radius, radius:-radius] | mask


#: Above this many pieces to change, one gather over the whole image beats a loop over their boxes.
_LOOP_PIECES = 512


Boxes = list[tuple[slice, slice] | None]


def _boxes(labels: np.ndarray, pieces: np.ndarray, boxes: Boxes | None) -> Boxes:
    return boxes if boxes is not None else ndimage.find_objects(labels, max_label=int(pieces.max()))


def _set_pieces(
    mask: np.ndarray, labels: np.ndarray, pieces: np.ndarray, value: bool, boxes: Boxes | None = None
) -> np.ndarray:
    """``mask`` with the labelled ``pieces`` (label numbers) set to ``value``."""
    if len(pieces) == 0:
        return mask
    if len(pieces) > _LOOP_PIECES:
        chosen = np.zeros(int(labels.max()) + 1, bool)
        chosen[pieces] = True
        return mask | chosen[labels] if value else mask & ~chosen[labels]
    out = mask.copy()
    boxes = _boxes(labels, pieces, boxes)
    for piece in pieces.tolist():
        box = boxes[piece - 1]
        out[box][labels[box] == piece] = value
    return out


def _sizes(labels: np.ndarray, pieces: np.ndarray, boxes: Boxes | None = None) -> np.ndarray:
    """Pixel counts of the labelled ``pieces`` (label numbers)."""
    if len(pieces) == 0:
        return np.zeros(0, np.int64)
    if len(pieces) > _LOOP_PIECES:
        return np.bincount(labels.ravel(), minlength=int(pieces.max()) + 1)[pieces]
    boxes = _boxes(labels, pieces, boxes)
    return np.array([np.count_nonzero(labels[boxes[p - 1]] == p) for p in pieces.tolist()], np.int64)


def fill_holes(mask: np.ndarray, max_hole_pixels: float | None) -> np.ndarray:
    """Fill holes (background 4-connected pieces not reaching the border) of at most ``max_hole_pixels``.

    None fills every hole; the result is ``scipy.ndimage.binary_fill_holes`` then.
    """
    if max_hole_pixels is not None and max_hole_pixels <= 0:
        return mask
    labels, n = ndimage.label(~mask)
    if n == 0:
        return mask
    outside = np.zeros(n + 1, bool)
    for edge in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        outside[edge] = True
    holes = np.flatnonzero(~outside[1:]) + 1
    if len(holes) == 0:
        return mask
    boxes = None if len(holes) > _LOOP_PIECES else _boxes(labels, holes, None)
    if max_hole_pixels is not None:
        holes = holes[_sizes(labels, holes, boxes) <= max_hole_pixels]
    return _set_pieces(mask, labels, holes, True, boxes)


def remove_small(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    """Drop 8-connected pieces with fewer than ``min_pixels`` pixels."""
    if min_pixels <= 1 or not mask.any():
        return mask
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    boxes = ndimage.find_objects(labels)
    # a piece whose bounding box is smaller than min_pixels is small for sure; the others are counted
    area = np.array([(b[0].stop - b[0].start) * (b[1].stop - b[1].start) for b in boxes], np.int64)
    pieces = np.arange(1, n + 1)
    unsure = pieces[area >= min_pixels]
    small = np.concatenate([pieces[area < min_pixels], unsure[_sizes(labels, unsure, boxes) < min_pixels]])
    return _set_pieces(mask, labels, np.sort(small), False, boxes)


def candidate_boxes(candidate: np.ndarray, margin: int, block: int = 64) -> list[Box]:
    """Boxes that hold every candidate pixel, each with at least ``margin`` px of non-candidates around.

    The image is cut into ``block`` px blocks; blocks holding a candidate pixel,
    grown by enough blocks to cover ``margin``, are grouped into 8-connected
    pieces, and each piece is filled to its bounding box until the pieces are
    rectangles that neither overlap nor touch. Outside the
    boxes there is no candidate pixel, and none lies within ``margin`` px of a
    box side that is not the image's border, so a filter that reaches at most
    ``margin`` px gives inside a box what it gives on the whole image.

    Parameters
    ----------
    candidate : ndarray
        ``(H, W)`` bool.
    margin : int
        Pixels of reach of the filters run in the boxes.
    block : int
        Block side in pixels.

    Returns
    -------
    list of (slice, slice)
        Disjoint boxes, in row-major order of their top-left corners; empty
        when there is no candidate.

    """
    rows, cols = candidate.shape
    occupied = np.logical_or.reduceat(candidate, np.arange(0, rows, block), axis=0)
    occupied = np.logical_or.reduceat(occupied, np.arange(0, cols, block), axis=1)
    if not occupied.any():
        return []
    grow = 1 + margin // block
    grown = ndimage.binary_dilation(occupied, np.ones((3, 3), bool), iterations=grow)
    eight = np.ones((3, 3), bool)
    while True:  # fill each piece's bounding box until the pieces are rectangles apart from each other
        labels, _ = ndimage.label(grown, eight)
        pieces = ndimage.find_objects(labels)
        filled = np.zeros_like(grown)
        for piece in pieces:
            filled[piece] = True
        if np.array_equal(filled, grown):
            break
        grown = filled
    boxes = sorted((p[0].start, p[0].stop, p[1].start, p[1].stop) for p in pieces)
    return [
        (slice(y0 * block, min(rows, y1 * block)), slice(x0 * block, min(cols, x1 * block)))
        for y0, y1, x0, x1 in boxes
    ]
