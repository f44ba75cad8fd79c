"""The tissue detectors ("saturation", "otsu", "gray") on an RGB image and on a slide.

See :mod:`napari_pathology.tissue` for the methods and their sources. Every
size is physical (kernels in micrometres, area filters in square millimetres).
"""

from __future__ import annotations

import math
from collections.abc import Generator
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from napari_pathology.progress import Progress
from napari_pathology.tissue.filters import (
    candidate_boxes,
    closing,
    fill_holes,
    gray_u8,
    majority,
    remove_small,
    saturation_above,
    saturation_u8,
)
from napari_pathology.tissue.mask import DEFAULT_PARAMS, TissueMask, TissueParams, _mask_shape, _pair
from napari_pathology.tissue.pen import _as_rgb_uint8, pen_mask
from napari_pathology.tissue.resample import read_at_mpp

if TYPE_CHECKING:
    from napari_pathology.slide import Slide

__all__ = ["detect_tissue", "tissue_mask_from_rgb"]


def _odd(pixels: float) -> int:
    """An odd kernel size of about ``pixels`` (at least 1)."""
    n = max(1, round(pixels))
    return n if n % 2 else n + 1


def _median(image: np.ndarray, size: int) -> np.ndarray:
    if size <= 1 or min(image.shape) < 2:
        return image
    from skimage.filters.rank import median

    return median(image, footprint=np.ones((size, size), bool))


def _otsu(image: np.ndarray, min_contrast: float) -> float | None:
    """Otsu's threshold of a uint8 image, or None when the two classes barely differ."""
    from skimage.filters import threshold_otsu

    if image.size == 0 or int(image.min()) == int(image.max()):
        return None
    hist = np.bincount(image.ravel(), minlength=256)
    threshold = float(threshold_otsu(hist=hist))
    levels = np.arange(256)
    below, above = levels <= threshold, levels > threshold
    if hist[below].sum() == 0 or hist[above].sum() == 0:
        return None
    mean_below = float((hist[below] * levels[below]).sum() / hist[below].sum())
    mean_above = float((hist[above] * levels[above]).sum() / hist[above].sum())
    if mean_above - mean_below < min_contrast:
        return None
    return threshold


#: Pen ink is never less saturated than this (0-255): the weak rule of :func:`pen_mask` is 0.12.
_PEN_MIN_SATURATION = 30


class _Foreground:
    """The thresholded (not yet cleaned) tissue map, computed box by box where it can be.

    ``candidate`` holds every pixel that can be foreground (and, with pen
    removal, every ink pixel); :meth:`box` gives the foreground inside one box
    of :func:`~napari_pathology.tissue.filters.candidate_boxes`. The fixed
    thresholds ("saturation" with a threshold, "gray") blur only inside the
    boxes; Otsu's thresholds need the blurred image of the whole slide first.
    """

    def __init__(self, rgb: np.ndarray, size: int, params: TissueParams) -> None:
        self.size = size
        self.above: np.ndarray | None = None  # per-box input of majority(): the unblurred threshold
        self.full: np.ndarray | None = None  # the whole foreground, when it had to be computed at once
        self.invert = False
        if params.method == "saturation" and params.saturation_threshold is not None:
            self.above = saturation_above(rgb, float(params.saturation_threshold))
            self.candidate = self.above
        elif params.method == "gray":  # tissue where the blurred gray is at most the threshold
            self.above, self.invert = gray_u8(rgb) > params.gray_threshold * 255.0, True
            self.candidate = ~self.above
        else:
            if params.method == "saturation":
                blurred = _median(saturation_u8(rgb), size)
            else:  # otsu: tissue is darker than the glass
                blurred = 255 - _median(gray_u8(rgb), size)
            threshold = _otsu(blurred, min_contrast=12.0)
            self.full = np.zeros(blurred.shape, bool) if threshold is None else blurred > threshold
            self.candidate = self.full
        if params.exclude_pen:
            self.candidate = self.candidate | saturation_above(rgb, _PEN_MIN_SATURATION)

    def box(self, box: tuple[slice, slice]) -> np.ndarray:
        """The foreground inside ``box``."""
        if self.full is not None:
            return self.full[box]
        blurred = majority(self.above[box], self.size)
        return ~blurred if self.invert else blurred


def _remove_pen(mask: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """``mask`` without marker ink (and the thin slivers of stroke edges left beside it)."""
    ink = pen_mask(rgb)
    if not ink.any():
        return mask
    ink = ndimage.binary_dilation(ink, structure=np.ones((3, 3), bool))
    mask = mask & ~ink
    return ndimage.binary_opening(mask, structure=np.ones((3, 3), bool)) | (
        mask & ~ndimage.binary_dilation(ink, iterations=3)
    )


def tissue_mask_from_rgb(
    rgb: np.ndarray,
    mpp: float,
    params: TissueParams = DEFAULT_PARAMS,
    slide_size: tuple[int, int] | None = None,
    slide_mpp: float | tuple[float, float] | None = None,
) -> TissueMask:
    """Tissue mask of an RGB image of a whole slide (a thumbnail) at ``mpp`` um/px.

    The mask has the image's own resolution (``params.mask_mpp`` is not used
    here; :func:`detect_tissue` resamples the slide to it before calling this).

    Steps: threshold (per ``params.method``, after a median blur of
    ``median_um``), closing with a disk of ``closing_um``, hole filling
    (holes below ``min_hole_area_mm2``, or all with ``fill_holes``), pen
    removal (``exclude_pen``), then removal of pieces below
    ``min_tissue_area_mm2``. On uint8 and bool arrays throughout, and only in
    boxes around candidate tissue (pixels that pass the threshold unblurred),
    which gives the same mask as the whole image would in a fraction of the
    time on sparse slides.

    Parameters
    ----------
    rgb : ndarray
        ``(H, W, 3)`` or RGBA uint8 (float in [0, 1] is accepted).
    mpp : float
        Micrometres per pixel of ``rgb``.
    params : TissueParams
        Detector and cleaning parameters.
    slide_size : (int, int), optional
        Level-0 ``(width, height)`` of the slide the image shows; by default
        the image is the slide (at ``slide_mpp``).
    slide_mpp : float or (float, float), optional
        Level-0 um/px of the slide; ``mpp`` by default.

    Returns
    -------
    TissueMask
        Possibly empty (check :attr:`TissueMask.is_empty`).

    """
    rgb = _as_rgb_uint8(rgb)
    mpp = float(mpp)
    if not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive number of um/px, got {mpp!r}")
    rows, cols = rgb.shape[:2]
    slide_mpp_xy = _pair(slide_mpp) if slide_mpp is not None else (mpp, mpp)
    if slide_size is None:
        slide_size = (
            max(1, round(cols * mpp / slide_mpp_xy[0])),
            max(1, round(rows * mpp / slide_mpp_xy[1])),
        )
    pixel_mm2 = (mpp / 1000.0) ** 2
    size, close = _odd(params.median_um / mpp), _odd(params.closing_um / mpp)
    max_hole = None if params.fill_holes else params.min_hole_area_mm2 / pixel_mm2
    min_pixels = params.min_tissue_area_mm2 / pixel_mm2
    foreground = _Foreground(rgb, size, params)
    mask = np.zeros((rows, cols), bool)
    # every step below reaches at most this far from the foreground (median, closing, pen)
    reach = 2 * (size // 2) + 2 * (close // 2) + 8
    for box in candidate_boxes(foreground.candidate, reach):
        part = closing(foreground.box(box), close)
        part = fill_holes(part, max_hole)
        if params.exclude_pen:
            part = _remove_pen(part, rgb[box])
        mask[box] = remove_small(part, min_pixels)
    return TissueMask(
        mask=mask,
        mpp=mpp,
        slide_size=(int(slide_size[0]), int(slide_size[1])),
        slide_mpp=slide_mpp_xy,
        method=params.method,
        params=params.to_dict(),
    )


# --------------------------------------------------------------------------------------
# Detection on a slide
# --------------------------------------------------------------------------------------


def _coarsest_is_grid(slide: Slide, mpp: float) -> bool:
    """Whether the slide's coarsest level is exactly the grid of a mask at ``mpp`` (read as it is)."""
    mpp_x, mpp_y = slide.require_mpp()
    last = slide.level_count - 1
    factor = float(slide.level_downsamples[last])
    rows, cols = _mask_shape(slide.dimensions, (mpp_x, mpp_y), mpp)
    return (
        tuple(slide.level_dimensions[last]) == (cols, rows)
        and abs(mpp / (mpp_x * factor) - 1.0) < 1e-9
        and abs(mpp / (mpp_y * factor) - 1.0) < 1e-9
    )


def detect_tissue(
    slide: Slide,
    params: TissueParams = DEFAULT_PARAMS,
) -> Generator[Progress, None, TissueMask]:
    """Find the tissue on a slide.

    Reads the best pyramid level for ``params.mask_mpp`` region by region
    (bounded memory), resamples it to exactly ``mask_mpp`` um/px and runs
    :func:`tissue_mask_from_rgb`.

    Parameters
    ----------
    slide : Slide
        An opened slide; it must know its um/px.
    params : TissueParams
        Detector and cleaning parameters.

    Yields
    ------
    Progress
        One event per region read, then one for the mask.

    Returns
    -------
    TissueMask
        An empty mask (``is_empty``) when no tissue is found; that is not an error.

    Raises
    ------
    SlideOpenError
        When the slide has no um/px; the message names the slide and says to
        set it in the Slide panel (or with ``--mpp``).
    NotBrightfieldError
        When the slide is a fluorescence (dark-field) slide: these detectors
        find light glass around stained tissue.

    """
    # the brightfield judgement reads the coarsest level; when that level is the mask's grid it is
    # judged from the mask's own read instead (and nothing is reported before, so a fluorescence
    # slide is refused by the first next() either way)
    reuse = _coarsest_is_grid(slide, params.mask_mpp)
    if not reuse:
        slide.require_brightfield()
    reader = read_at_mpp(slide, params.mask_mpp)
    total, held = 1, []
    while True:
        try:
            event = next(reader)
        except StopIteration as stop:
            rgb = stop.value
            break
        total = event.total + 1
        held.append(Progress(event.done, total, event.message))
        if not reuse:
            yield held.pop()
    if reuse:
        slide.require_brightfield(coarsest=rgb)
        yield from held
    yield Progress(total - 1, total, f"finding tissue ({params.method})")
    mask = tissue_mask_from_rgb(
        rgb, params.mask_mpp, params, slide_size=slide.dimensions, slide_mpp=slide.require_mpp()
    )
    message = "no tissue found" if mask.is_empty else f"tissue {mask.area_mm2:.2f} mm^2"
    yield Progress(total, total, message)
    return mask
