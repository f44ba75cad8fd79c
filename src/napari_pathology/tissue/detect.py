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
from napari_pathology.tissue.mask import DEFAULT_PARAMS, TissueMask, TissueParams, _pair
from napari_pathology.tissue.pen import _as_rgb_uint8, pen_mask
from napari_pathology.tissue.resample import read_at_mpp

if TYPE_CHECKING:
    from napari_pathology.slide import Slide

__all__ = ["detect_tissue", "tissue_mask_from_rgb"]


def _saturation_u8(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation on 0-255 (as OpenCV computes it)."""
    mx = rgb.max(axis=-1).astype(np.float32)
    mn = rgb.min(axis=-1).astype(np.float32)
    sat = np.divide(mx - mn, mx, out=np.zeros_like(mx), where=mx > 0) * 255.0
    return np.clip(np.rint(sat), 0, 255).astype(np.uint8)


def _gray_u8(rgb: np.ndarray) -> np.ndarray:
    """Luma (ITU-R 601) on 0-255."""
    gray = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.rint(gray), 0, 255).astype(np.uint8)


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


def _foreground(rgb: np.ndarray, mpp: float, params: TissueParams) -> np.ndarray:
    """The thresholded (not yet cleaned) tissue map."""
    size = _odd(params.median_um / mpp)
    if params.method == "saturation":
        sat = _median(_saturation_u8(rgb), size)
        threshold = params.saturation_threshold
        if threshold is None:
            threshold = _otsu(sat, min_contrast=12.0)
            if threshold is None:
                return np.zeros(sat.shape, bool)
        return sat > threshold
    if params.method == "gray":
        gray = _median(_gray_u8(rgb), size)
        return gray <= params.gray_threshold * 255.0
    # otsu: tissue is darker than the glass
    gray = _median(_gray_u8(rgb), size)
    threshold = _otsu(255 - gray, min_contrast=12.0)
    return np.zeros(gray.shape, bool) if threshold is None else (255 - gray) > threshold


def _closing(mask: np.ndarray, size: int) -> np.ndarray:
    """Binary closing with a disk of diameter ``size`` px, without eroding at the border."""
    if size <= 1 or not mask.any():
        return mask
    from skimage.morphology import disk

    radius = size // 2
    padded = np.pad(mask, radius, mode="edge")
    closed = ndimage.binary_closing(padded, structure=disk(radius))
    return closed[radius:-radius, radius:-radius] | mask


def _fill_holes(mask: np.ndarray, max_hole_pixels: float | None) -> np.ndarray:
    """Fill holes (background not reaching the border) of at most ``max_hole_pixels`` (None: all)."""
    filled = ndimage.binary_fill_holes(mask)
    if max_hole_pixels is None:
        return filled
    holes = filled & ~mask
    if not holes.any() or max_hole_pixels <= 0:
        return mask
    labels, n = ndimage.label(holes)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    small = sizes <= max_hole_pixels
    small[0] = False
    return mask | small[labels]


def _remove_small(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    """Drop 8-connected pieces with fewer than ``min_pixels`` pixels."""
    if min_pixels <= 1 or not mask.any():
        return mask
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[labels]


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
    ``min_tissue_area_mm2``.

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
    mask = _foreground(rgb, mpp, params)
    mask = _closing(mask, _odd(params.closing_um / mpp))
    max_hole = None if params.fill_holes else params.min_hole_area_mm2 / pixel_mm2
    mask = _fill_holes(mask, max_hole)
    if params.exclude_pen:
        ink = pen_mask(rgb)
        if ink.any():
            ink = ndimage.binary_dilation(ink, structure=np.ones((3, 3), bool))
            mask &= ~ink
            # thin slivers of stroke edges left beside the ink
            mask = ndimage.binary_opening(mask, structure=np.ones((3, 3), bool)) | (
                mask & ~ndimage.binary_dilation(ink, iterations=3)
            )
    mask = _remove_small(mask, params.min_tissue_area_mm2 / pixel_mm2)
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
    slide.require_mpp()
    slide.require_brightfield()
    reader = read_at_mpp(slide, params.mask_mpp)
    total = 1
    while True:
        try:
            event = next(reader)
        except StopIteration as stop:
            rgb = stop.value
            break
        total = event.total + 1
        yield Progress(event.done, total, event.message)
    yield Progress(total - 1, total, f"finding tissue ({params.method})")
    mask = tissue_mask_from_rgb(
        rgb, params.mask_mpp, params, slide_size=slide.dimensions, slide_mpp=slide.require_mpp()
    )
    message = "no tissue found" if mask.is_empty else f"tissue {mask.area_mm2:.2f} mm^2"
    yield Progress(total, total, message)
    return mask
