"""Tissue masks: find the tissue on a slide, save it, load it, measure it.

Three detectors work on a low-resolution RGB image of the slide resampled to
exactly ``mask_mpp`` micrometres per pixel (8 um/px by default):

``"saturation"`` (CLAM, Lu et al. 2021)
    HSV saturation, median blur, a fixed threshold (8 on 0-255) or Otsu,
    morphological closing, then connected components filtered by area
    (tissue pieces and holes).
``"otsu"``
    Otsu's threshold on grayscale (tissue darker than the glass). Optical
    density was tried too: Otsu then splits dense tumour from pale stroma.
``"gray"`` (Liu et al. 2017)
    Background is where the gray value exceeds 0.8.

Every size is physical: kernels are given in micrometres and area filters in
square millimetres, so a mask computed at 4 or 16 um/px means the same thing.
With ``exclude_pen`` green, blue and red marker ink is removed (HSV hue and
saturation rules in the spirit of HistoQC / histolab, with hysteresis so the
faint rim of a stroke goes with its core).

A :class:`TissueMask` knows where it lies on the slide: mask pixel ``(r, c)``
covers the physical square ``[c * mpp, (c + 1) * mpp) x [r * mpp, (r + 1) * mpp)``
micrometres from the slide's top-left corner. It answers "how much of this
rectangle is tissue" for many rectangles at once (:meth:`TissueMask.fractions`,
an integral image), and converts to polygons in level-0 pixels and GeoJSON.

Nothing here imports Qt or napari.

Examples
--------
>>> import numpy as np
>>> from napari_pathology.tissue import TissueParams, tissue_mask_from_rgb
>>> rgb = np.full((64, 64, 3), 245, np.uint8)
>>> rgb[16:48, 16:48] = (200, 120, 180)  # a pink square of "tissue"
>>> mask = tissue_mask_from_rgb(rgb, mpp=8.0, params=TissueParams(min_tissue_area_mm2=0.01))
>>> bool(mask.mask[20:44, 20:44].all()), round(mask.area_mm2, 3)
(True, 0.064)

"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage, sparse

from napari_pathology.fileio import (
    atomic_path,
    atomic_write,
    ensure_writable_dir,
    read_json_file,
    require_regular_file,
)
from napari_pathology.geometry import (
    area_below,
    geojson_to_polygons,
    mask_to_polygons,
    polygons_to_geojson,
    rasterize_polygons,
    summed_area_table,
)
from napari_pathology.progress import Progress

if TYPE_CHECKING:
    from napari_pathology.slide import Slide

__all__ = [
    "METHODS",
    "TissueMask",
    "TissueParams",
    "detect_tissue",
    "load_tissue_mask",
    "pen_mask",
    "read_at_mpp",
    "read_tissue_file",
    "save_tissue_mask",
    "tissue_mask_from_geojson",
    "tissue_mask_from_image",
    "tissue_mask_from_rgb",
    "write_tissue_outputs",
]

#: The tissue detectors :class:`TissueParams` accepts.
METHODS = ("saturation", "otsu", "gray")

#: GeoJSON class name and colour of tissue polygons (QuPath style).
TISSUE_CLASS = "Tissue"
TISSUE_COLOR = (80, 160, 80)

#: The largest mask detect_tissue will build (pixels); past it, ask for a coarser mask_mpp.
MAX_MASK_PIXELS = 200_000_000

#: Side of the level region read at once by :func:`read_at_mpp` (level pixels).
READ_BLOCK = 2048

#: Largest mask image read (bytes of decoded pixels: a 1-bit or gray mask counts one per pixel).
MAX_MASK_IMAGE_BYTES = 2**28

#: A mask image larger than this on its longer side is averaged down before use.
MAX_MASK_SIDE = 8192

#: Largest coordinate (level-0 px) accepted in tissue GeoJSON; no slide is larger.
MAX_GEOJSON_COORDINATE = 1e7

_FORMAT = "napari-pathology tissue mask v1"


# --------------------------------------------------------------------------------------
# Parameters and result
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TissueParams:
    """How to find tissue.

    Parameters
    ----------
    method : {"saturation", "otsu", "gray"}
        The detector (see the module docstring).
    mask_mpp : float
        Micrometres per pixel of the working mask. :func:`detect_tissue` reads
        the best pyramid level and resamples it to exactly this resolution.
    saturation_threshold : float or None
        ``"saturation"``: tissue where the median-blurred saturation (0-255)
        exceeds this (CLAM's default 8); None picks it by Otsu's method.
    gray_threshold : float
        ``"gray"``: background where the gray value (0-1) exceeds this (Liu's 0.8).
    median_um : float
        Side of the median-blur window in micrometres (CLAM's 7 px at 8 um/px).
    closing_um : float
        Side of the morphological-closing element in micrometres (CLAM's 4 px at 8 um/px).
    min_tissue_area_mm2 : float
        Drop tissue pieces smaller than this.
    min_hole_area_mm2 : float
        Fill holes smaller than this; larger holes stay holes (CLAM's ``a_h``).
    fill_holes : bool
        Fill every hole, whatever its size.
    exclude_pen : bool
        Remove green, blue and red marker ink from the mask.

    """

    method: str = "saturation"
    mask_mpp: float = 8.0
    saturation_threshold: float | None = 8.0
    gray_threshold: float = 0.8
    median_um: float = 56.0
    closing_um: float = 32.0
    min_tissue_area_mm2: float = 0.01
    min_hole_area_mm2: float = 0.02
    fill_holes: bool = False
    exclude_pen: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown tissue method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not (math.isfinite(self.mask_mpp) and self.mask_mpp > 0):
            raise ValueError(f"mask_mpp must be a positive number of um/px, got {self.mask_mpp!r}")
        if self.saturation_threshold is not None and not 0 <= self.saturation_threshold <= 255:
            raise ValueError(f"saturation_threshold must be in [0, 255], got {self.saturation_threshold!r}")
        if not 0 <= self.gray_threshold <= 1:
            raise ValueError(f"gray_threshold must be in [0, 1], got {self.gray_threshold!r}")
        for name in ("median_um", "closing_um", "min_tissue_area_mm2", "min_hole_area_mm2"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary of the parameters."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TissueParams:
        """Parameters from :meth:`to_dict` output; unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _pair(value: float | Sequence[float]) -> tuple[float, float]:
    if isinstance(value, int | float | np.number):
        return float(value), float(value)
    x, y = value
    return float(x), float(y)


@dataclass(eq=False)
class TissueMask:
    """A boolean tissue mask laid over a slide.

    Attributes
    ----------
    mask : ndarray
        ``(H, W)`` bool; pixel ``(r, c)`` covers the physical square
        ``[c * mpp, (c + 1) * mpp) x [r * mpp, (r + 1) * mpp)`` um from the
        slide's top-left corner.
    mpp : float
        Micrometres per mask pixel.
    slide_size : (int, int)
        Level-0 ``(width, height)`` of the slide in pixels.
    slide_mpp : (float, float)
        Level-0 ``(mpp_x, mpp_y)`` of the slide (a single float is accepted).
    method : str
        How the mask was made (a detector name, ``"geojson"``, ``"image"``, ``"painted"``...).
    params : dict
        The parameters used, for the record.

    """

    mask: np.ndarray
    mpp: float
    slide_size: tuple[int, int]
    slide_mpp: tuple[float, float]
    method: str = "saturation"
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        mask = np.asarray(self.mask)
        if mask.ndim != 2:
            raise ValueError(f"a tissue mask must be 2-D, got shape {mask.shape}")
        self.mask = mask.astype(bool, copy=False)
        self.mpp = float(self.mpp)
        if not (math.isfinite(self.mpp) and self.mpp > 0):
            raise ValueError(f"mask um/px must be positive, got {self.mpp!r}")
        width, height = self.slide_size
        self.slide_size = (int(width), int(height))
        self.slide_mpp = _pair(self.slide_mpp)
        self._integral: np.ndarray | None = None

    # ------------------------------------------------------------------ facts
    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the mask."""
        return self.mask.shape  # type: ignore[return-value]

    @property
    def slide_size_um(self) -> tuple[float, float]:
        """Physical ``(width, height)`` of the slide in micrometres."""
        return self.slide_size[0] * self.slide_mpp[0], self.slide_size[1] * self.slide_mpp[1]

    @property
    def is_empty(self) -> bool:
        """True when no pixel is tissue."""
        return not bool(self.mask.any())

    @property
    def area_mm2(self) -> float:
        """Tissue area in square millimetres (inside the slide's bounds)."""
        if self.is_empty:
            return 0.0
        width_um, height_um = self.slide_size_um
        return float(self._tissue_um2(np.array([[0.0, 0.0, width_um, height_um]]))[0]) / 1e6

    # ------------------------------------------------------------------ fractions
    def invalidate(self) -> None:
        """Forget cached sums after changing :attr:`mask` in place."""
        self._integral = None

    def _integral_image(self) -> np.ndarray:
        if self._integral is None or self._integral.shape != (self.shape[0] + 1, self.shape[1] + 1):
            self._integral = summed_area_table(self.mask)
        return self._integral

    def _cumulative(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Tissue (mask pixels) in ``[0, x) x [0, y)`` (mask units); exact for fractional corners."""
        return area_below(self._integral_image(), x, y)

    def _tissue_um2(self, boxes_um: np.ndarray) -> np.ndarray:
        """Tissue area (um^2) inside each box, clipped to the slide."""
        width_um, height_um = self.slide_size_um
        x0 = np.clip(boxes_um[:, 0], 0, width_um) / self.mpp
        y0 = np.clip(boxes_um[:, 1], 0, height_um) / self.mpp
        x1 = np.clip(boxes_um[:, 2], 0, width_um) / self.mpp
        y1 = np.clip(boxes_um[:, 3], 0, height_um) / self.mpp
        f = self._cumulative
        pixels = f(x1, y1) - f(x0, y1) - f(x1, y0) + f(x0, y0)
        return np.maximum(pixels, 0.0) * self.mpp**2

    def fractions(self, boxes_um: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
        """Tissue fraction of many physical rectangles at once.

        Parameters
        ----------
        boxes_um : array-like
            ``(N, 4)`` rows ``(x0, y0, x1, y1)`` in micrometres from the slide's
            top-left corner. Parts outside the slide count as background.

        Returns
        -------
        ndarray
            ``(N,)`` float64 in ``[0, 1]``; 0 for empty boxes.

        """
        boxes = np.asarray(boxes_um, dtype=np.float64)
        if boxes.size == 0:
            return np.zeros(0, np.float64)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes must be an (N, 4) array of x0, y0, x1, y1, got shape {boxes.shape}")
        x0, x1 = np.minimum(boxes[:, 0], boxes[:, 2]), np.maximum(boxes[:, 0], boxes[:, 2])
        y0, y1 = np.minimum(boxes[:, 1], boxes[:, 3]), np.maximum(boxes[:, 1], boxes[:, 3])
        ordered = np.stack([x0, y0, x1, y1], axis=1)
        area = (x1 - x0) * (y1 - y0)
        out = np.zeros(len(boxes), np.float64)
        ok = area > 0
        if ok.any() and not self.is_empty:
            out[ok] = self._tissue_um2(ordered[ok]) / area[ok]
        return np.clip(out, 0.0, 1.0)

    def fraction_in(self, x0_um: float, y0_um: float, x1_um: float, y1_um: float) -> float:
        """Tissue fraction of one physical rectangle (um from the slide's top-left)."""
        return float(self.fractions(np.array([[x0_um, y0_um, x1_um, y1_um]]))[0])

    # ------------------------------------------------------------------ geometry
    @property
    def level0_scale(self) -> tuple[float, float]:
        """Level-0 pixels per mask pixel along ``(x, y)``."""
        return self.mpp / self.slide_mpp[0], self.mpp / self.slide_mpp[1]

    def polygons(self, tolerance: float = 0.0) -> list[list[np.ndarray]]:
        """Tissue outlines in level-0 pixel coordinates (outer ring first, then holes).

        Parameters
        ----------
        tolerance : float
            Simplify rings by up to this many mask pixels (0 keeps every vertex).

        """
        sx, sy = self.level0_scale
        polygons = mask_to_polygons(self.mask, tolerance=tolerance)
        return [[ring * np.array([sx, sy]) for ring in polygon] for polygon in polygons]

    def to_geojson(self, tolerance: float = 0.0) -> dict[str, Any]:
        """QuPath-style GeoJSON (class ``Tissue``) of :meth:`polygons`, in level-0 pixels."""
        return polygons_to_geojson(self.polygons(tolerance), classification=TISSUE_CLASS, color=TISSUE_COLOR)

    def resampled(self, mpp: float) -> TissueMask:
        """The same mask at another resolution (area-weighted: a pixel is tissue when at least half is).

        Parameters
        ----------
        mpp : float
            Micrometres per pixel of the new mask.

        """
        rows, cols = _mask_shape(self.slide_size, self.slide_mpp, mpp)
        edges_x = np.arange(cols + 1) * float(mpp)
        edges_y = np.arange(rows + 1) * float(mpp)
        f = self._cumulative
        xx0, yy0 = np.meshgrid(edges_x[:-1] / self.mpp, edges_y[:-1] / self.mpp)
        xx1, yy1 = np.meshgrid(edges_x[1:] / self.mpp, edges_y[1:] / self.mpp)
        tissue = f(xx1, yy1) - f(xx0, yy1) - f(xx1, yy0) + f(xx0, yy0)
        area = (xx1 - xx0) * (yy1 - yy0)
        return dataclasses.replace(self, mask=tissue >= 0.5 * area - 1e-9, mpp=float(mpp))

    def info(self) -> dict[str, Any]:
        """JSON-ready facts of the mask (what ``tissue.json`` holds)."""
        return {
            "format": _FORMAT,
            "mpp": self.mpp,
            "shape": list(self.shape),
            "slide_size": list(self.slide_size),
            "slide_mpp": list(self.slide_mpp),
            "method": self.method,
            "params": _jsonable(self.params),
            "area_mm2": self.area_mm2,
            "is_empty": self.is_empty,
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def _mask_shape(slide_size: Sequence[int], slide_mpp: float | Sequence[float], mpp: float) -> tuple[int, int]:
    """``(rows, cols)`` of a mask at ``mpp`` covering the whole slide."""
    mpp_x, mpp_y = _pair(slide_mpp)
    width, height = slide_size
    cols = max(1, math.ceil(width * mpp_x / mpp - 1e-9))
    rows = max(1, math.ceil(height * mpp_y / mpp - 1e-9))
    return rows, cols


# --------------------------------------------------------------------------------------
# Reading a slide at a given resolution
# --------------------------------------------------------------------------------------


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


def read_at_mpp(slide: Slide, mpp: float, block: int = READ_BLOCK) -> Generator[Progress, None, np.ndarray]:
    """Read the whole slide as RGB at exactly ``mpp`` micrometres per pixel.

    The best pyramid level (the coarsest one not coarser than needed) is read
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

    Yields
    ------
    Progress
        One event per region read.

    Returns
    -------
    ndarray
        ``(rows, cols, 3)`` uint8 with ``rows, cols`` from the slide's
        physical size divided by ``mpp`` (rounded up).

    Raises
    ------
    SlideOpenError
        When the slide has no um/px (the message says how to set it).
    ValueError
        When the result would be unreasonably large.

    """
    mpp_x, mpp_y = slide.require_mpp()
    mpp = float(mpp)
    rows, cols = _mask_shape(slide.dimensions, (mpp_x, mpp_y), mpp)
    if rows * cols > MAX_MASK_PIXELS:
        raise ValueError(
            f"a {cols}x{rows} mask of {slide.name} at {mpp:g} um/px is too large; use a larger mask um/px"
        )
    level = slide.best_level_for_downsample(min(mpp / mpp_x, mpp / mpp_y))
    factor = float(slide.level_downsamples[level])
    level_w, level_h = slide.level_dimensions[level]
    kx = mpp / (mpp_x * factor)
    ky = mpp / (mpp_y * factor)
    out_bx = max(1, min(cols, int(block // max(kx, 1e-9))))
    out_by = max(1, min(rows, int(block // max(ky, 1e-9))))
    row_starts = list(range(0, rows, out_by))
    col_starts = list(range(0, cols, out_bx))
    total = len(row_starts) * len(col_starts)
    out = np.full((rows, cols, 3), 255, np.uint8)
    done = 0
    yield Progress(0, total, f"reading {slide.name} at {mpp:g} um/px (level {level})")
    for r0 in row_starts:
        r1 = min(rows, r0 + out_by)
        y_start = min(max(0, math.floor(r0 * ky)), max(level_h - 1, 0))
        y_stop = min(level_h, max(y_start + 1, math.ceil(r1 * ky)))
        wy = _axis_weights(r0, r1, ky, y_start, y_stop)
        for c0 in col_starts:
            c1 = min(cols, c0 + out_bx)
            x_start = min(max(0, math.floor(c0 * kx)), max(level_w - 1, 0))
            x_stop = min(level_w, max(x_start + 1, math.ceil(c1 * kx)))
            wx = _axis_weights(c0, c1, kx, x_start, x_stop)
            region = slide.read_region(level, x_start, y_start, x_stop - x_start, y_stop - y_start)
            h, w = region.shape[:2]
            flat = region.reshape(h, w * 3).astype(np.float32)
            tmp = np.asarray(wy @ flat).reshape(r1 - r0, w, 3)  # (ho, w, 3)
            tmp = np.ascontiguousarray(tmp.transpose(1, 0, 2)).reshape(w, (r1 - r0) * 3)
            res = np.asarray(wx @ tmp).reshape(c1 - c0, r1 - r0, 3).transpose(1, 0, 2)
            covered_y = np.asarray(wy.sum(axis=1)).ravel() > 0
            covered_x = np.asarray(wx.sum(axis=1)).ravel() > 0
            res = np.where(covered_y[:, None, None] & covered_x[None, :, None], res, 255.0)
            out[r0:r1, c0:c1] = np.clip(np.rint(res), 0, 255).astype(np.uint8)
            done += 1
            yield Progress(done, total, f"read block {done}/{total} of {slide.name}")
    return out


# --------------------------------------------------------------------------------------
# Detection on an RGB image
# --------------------------------------------------------------------------------------


def _as_rgb_uint8(rgb: np.ndarray) -> np.ndarray:
    from napari_pathology.slide.backends import to_rgb_uint8

    array = np.asarray(rgb)
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 3, 4)):
        return to_rgb_uint8(array)
    raise ValueError(f"expected an RGB(A) image of shape (H, W, 3|4), got shape {array.shape}")


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees [0, 360), saturation and value in [0, 1] (float32)."""
    from skimage.color import rgb2hsv

    hsv = rgb2hsv(rgb).astype(np.float32)
    return hsv[..., 0] * 360.0, hsv[..., 1], hsv[..., 2]


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


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Where marker ink (green, blue, red) lies on an RGB image.

    Hue/saturation rules (HSV, hue in degrees) in the spirit of HistoQC's
    pen-marking module and histolab's pen filters, tuned on TCGA thumbnails:
    H&E tissue has hues from violet to pink-red (about 240-345 degrees) with
    moderate saturation, so

    * green / blue ink is a *strong* pixel with hue 75-240 and saturation > 0.25,
    * red ink is a *strong* pixel with hue 345-25 and saturation > 0.75
      (eosin stays below ~0.7),

    and each colour grows by hysteresis into connected *weak* pixels (hue
    60-252 and saturation > 0.12; hue 338-30 and saturation > 0.5), which
    takes the faint rim and ink over dark nuclei without reaching plain tissue.
    Black ink is not detected (it looks like dense hematoxylin).

    Parameters
    ----------
    rgb : ndarray
        ``(H, W, 3)`` (or RGBA, composited on white) uint8 or float in [0, 1].

    Returns
    -------
    ndarray
        ``(H, W)`` bool, True on ink.

    """
    rgb = _as_rgb_uint8(rgb)
    hue, sat, val = _hsv(rgb)
    structure = np.ones((3, 3), bool)
    out = np.zeros(hue.shape, bool)
    rules = (
        ((hue >= 75) & (hue < 240) & (sat > 0.25) & (val > 0.15),
         (hue >= 60) & (hue < 252) & (sat > 0.12) & (val > 0.1)),
        (((hue >= 345) | (hue < 25)) & (sat > 0.75) & (val > 0.3),
         ((hue >= 338) | (hue < 30)) & (sat > 0.5) & (val > 0.2)),
    )  # fmt: skip
    for strong, weak in rules:
        if strong.any():
            out |= ndimage.binary_propagation(strong, mask=weak | strong, structure=structure)
    return out


def tissue_mask_from_rgb(
    rgb: np.ndarray,
    mpp: float,
    params: TissueParams = TissueParams(),
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
    params: TissueParams = TissueParams(),
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


# --------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------


def save_tissue_mask(
    mask: TissueMask, out_dir: str | os.PathLike[str], stem: str = "tissue"
) -> dict[str, Path]:
    """Write ``STEM.png`` (0/255), ``STEM.json`` (facts) and ``STEM.geojson`` (level-0 px).

    Parameters
    ----------
    mask : TissueMask
        The mask to save.
    out_dir : path-like
        Folder (created if needed).
    stem : str
        File name stem.

    Returns
    -------
    dict of str to Path
        ``{"png": ..., "json": ..., "geojson": ...}``.

    """
    from PIL import Image

    out = ensure_writable_dir(out_dir)
    paths = {
        "png": out / f"{stem}.png",
        "json": out / f"{stem}.json",
        "geojson": out / f"{stem}.geojson",
    }
    info = mask.info()
    info["png"] = paths["png"].name
    info["geojson"] = paths["geojson"].name
    geojson = json.dumps(mask.to_geojson())  # everything is computed before the first byte is written
    with atomic_path(paths["png"], suffix=".png") as tmp:
        Image.fromarray(mask.mask.astype(np.uint8) * 255).save(tmp)
    atomic_write(paths["geojson"], geojson)
    atomic_write(paths["json"], json.dumps(info, indent=2))  # last: its presence means the set is whole
    return paths


def _read_mask_image(path: Path, reduce: bool = True) -> np.ndarray:
    """A mask image as bool, size-checked before decoding; ``reduce``: averaged down to MAX_MASK_SIDE.

    Raises
    ------
    ValueError
        One line naming the file: unreadable, or more than
        :data:`MAX_MASK_IMAGE_BYTES` of decoded pixels.

    """
    from napari_pathology.slide.backends import open_image_checked

    image = open_image_checked(path, "tissue mask image", max_bytes=MAX_MASK_IMAGE_BYTES)
    try:
        with image:
            palette = image.mode in ("P", "PA")
            if palette and image.size[0] * image.size[1] * 4 > MAX_MASK_IMAGE_BYTES:
                raise ValueError(
                    f"tissue mask image {path.name} is a {image.size[0]} x {image.size[1]} px palette image: "
                    "too large to read; save it as a 1-bit or gray PNG"
                )
            image.load()
            array = np.asarray(image.convert("RGBA") if palette else image)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, SyntaxError, MemoryError) as exc:
        if isinstance(exc, ValueError) and path.name in str(exc):
            raise
        raise ValueError(f"Cannot read the mask image {path.name}: {exc}") from None
    mask = _binarise(array, path.name)
    del array
    if reduce and max(mask.shape) > MAX_MASK_SIDE:
        mask = _reduce_mask(mask, math.ceil(max(mask.shape) / MAX_MASK_SIDE))
    return mask


def _reduce_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """``factor`` x ``factor`` blocks of a bool mask to one pixel (tissue when at least half is)."""
    height, width = mask.shape
    rows, cols = math.ceil(height / factor), math.ceil(width / factor)
    out = np.empty((rows, cols), bool)
    col_starts = np.arange(0, width, factor)
    col_counts = np.diff(np.append(col_starts, width))
    step = max(1, 2**22 // (factor * width))  # output rows per strip: about 4 Mpx of the mask at once
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        block = mask[r0 * factor : r1 * factor]
        row_starts = np.arange(0, block.shape[0], factor)
        row_counts = np.diff(np.append(row_starts, block.shape[0]))
        sums = np.add.reduceat(
            np.add.reduceat(block.astype(np.uint32), row_starts, axis=0), col_starts, axis=1
        )
        out[r0:r1] = 2 * sums >= row_counts[:, None] * col_counts[None, :]
    return out


def _binarise(array: np.ndarray, name: str) -> np.ndarray:
    """Any mask image to bool: alpha when it is the only varying channel, else non-zero / bright."""
    array = np.asarray(array)
    if array.ndim == 3:
        if array.shape[-1] in (2, 4) and array[..., :-1].min() == array[..., :-1].max():
            array = array[..., -1]
        else:
            array = array[..., : min(3, array.shape[-1])].max(axis=-1)
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"{name} is not a 2-D mask image (shape {array.shape})")
    if array.dtype == bool:
        return array
    values = np.unique(array)
    if len(values) <= 2:
        return array > values.min() if len(values) == 2 else np.full(array.shape, bool(values[0] > 0))
    top = float(array.max())
    return array >= top / 2.0


def load_tissue_mask(path: str | os.PathLike[str]) -> TissueMask:
    """Load a mask written by :func:`save_tissue_mask` (give the PNG or the JSON).

    Raises
    ------
    FileNotFoundError
        When the PNG or its JSON is missing.
    ValueError
        When the JSON is corrupt or does not match the PNG.

    """
    path = Path(path)
    if path.suffix.lower() == ".png":
        png, meta = path, path.with_suffix(".json")
    elif path.suffix.lower() == ".json":
        png, meta = path.with_suffix(".png"), path
    elif path.suffix.lower() == ".geojson":
        raise ValueError(
            f"{path.name} is GeoJSON: use tissue_mask_from_geojson with the slide's size and um/px"
        )
    else:
        raise ValueError(f"{path.name}: expected the tissue mask's .png or .json")
    if not meta.exists():
        raise FileNotFoundError(
            f"{meta.name} not found beside {png.name}: a saved tissue mask needs its JSON "
            "(um/px and slide size); import a bare mask image with tissue_mask_from_image"
        )
    info = read_json_file(meta, "tissue mask description")
    try:
        if not isinstance(info, dict):
            raise ValueError("it is not a JSON object")
        mpp = float(info["mpp"])
        slide_size = tuple(int(v) for v in info["slide_size"])
        slide_mpp = tuple(float(v) for v in info["slide_mpp"])
        if len(slide_size) != 2 or len(slide_mpp) != 2:
            raise ValueError("slide_size and slide_mpp need two values")
        if not all(math.isfinite(v) and v > 0 for v in (mpp, *slide_mpp)) or min(slide_size) <= 0:
            raise ValueError("mpp, slide_size and slide_mpp must be positive finite numbers")
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"{meta.name} is not a valid tissue mask description: {exc}") from None
    if "png" in info and path.suffix.lower() == ".json":
        png = meta.with_name(Path(str(info["png"])).name)  # a name beside the JSON, never a path elsewhere
    if not png.exists():
        raise FileNotFoundError(f"tissue mask image {png} not found")
    mask = _read_mask_image(png, reduce=False)
    expected = info.get("shape") or list(_mask_shape(slide_size, slide_mpp, mpp))  # type: ignore[arg-type]
    if list(mask.shape) != [int(v) for v in expected]:
        raise ValueError(
            f"{png.name} is {mask.shape[1]}x{mask.shape[0]} px but {meta.name} describes a "
            f"{expected[1]}x{expected[0]} mask: the files do not belong together"
        )
    return TissueMask(
        mask=mask,
        mpp=mpp,
        slide_size=slide_size,  # type: ignore[arg-type]
        slide_mpp=slide_mpp,  # type: ignore[arg-type]
        method=str(info.get("method", "loaded")),
        params=dict(info.get("params") or {}),
    )


def tissue_mask_from_geojson(
    geojson: dict[str, Any] | list[Any] | str | os.PathLike[str],
    slide_size: tuple[int, int],
    slide_mpp: float | tuple[float, float],
    mask_mpp: float = 8.0,
    *,
    source: str | None = None,
) -> TissueMask:
    """Rasterise GeoJSON polygons (level-0 pixels, e.g. from QuPath) into a tissue mask.

    Parameters
    ----------
    geojson : dict, list, str or path
        A FeatureCollection / Feature / geometry, or a file holding one.
    slide_size : (int, int)
        Level-0 ``(width, height)`` of the slide.
    slide_mpp : float or (float, float)
        Level-0 um/px of the slide.
    mask_mpp : float
        Micrometres per pixel of the mask.
    source : str, optional
        Name of the file the parsed GeoJSON came from, for messages.

    Raises
    ------
    ValueError
        For unreadable GeoJSON, no polygons, a ring with non-finite or absurd
        coordinates or fewer than 3 vertices, or a polygon entirely off the
        slide; the file and the feature are named.

    """
    name = source or "GeoJSON"
    if isinstance(geojson, str | os.PathLike):
        path = Path(geojson)
        name = path.name
        geojson = read_json_file(path, "tissue GeoJSON")
    if not isinstance(geojson, dict | list):
        raise ValueError(f"{name} is not GeoJSON (expected an object or a list of features)")
    width, height = int(slide_size[0]), int(slide_size[1])
    try:  # every ring finite, >= 3 vertices, not absurd and not wholly off the slide; the feature is named
        polygons = geojson_to_polygons(geojson, max_coordinate=MAX_GEOJSON_COORDINATE, extent=(width, height))
    except RecursionError:
        raise ValueError(f"{name} is nested too deeply to be GeoJSON") from None
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{name}: {exc}") from None
    if not polygons:
        raise ValueError(f"{name} has no Polygon or MultiPolygon geometry")
    mpp_x, mpp_y = _pair(slide_mpp)
    rows, cols = _mask_shape(slide_size, (mpp_x, mpp_y), mask_mpp)
    sx, sy = mask_mpp / mpp_x, mask_mpp / mpp_y  # level-0 px per mask px
    in_mask_units = [[np.asarray(ring, np.float64) / np.array([sx, sy]) for ring in p] for p in polygons]
    xs = np.concatenate([p[0][:, 0] for p in polygons if len(p) and len(p[0])])
    ys = np.concatenate([p[0][:, 1] for p in polygons if len(p) and len(p[0])])
    if xs.max() < 0 or ys.max() < 0 or xs.min() > width or ys.min() > height:
        raise ValueError(
            f"the polygons of {name} (x {xs.min():.0f}..{xs.max():.0f}, y {ys.min():.0f}..{ys.max():.0f}) "
            f"lie outside the {width}x{height} px slide: wrong slide, or not level-0 pixels?"
        )
    mask = rasterize_polygons(in_mask_units, (rows, cols))
    return TissueMask(mask, mask_mpp, (int(width), int(height)), (mpp_x, mpp_y), "geojson", {"source": name})


def tissue_mask_from_image(
    path_or_array: str | os.PathLike[str] | np.ndarray,
    slide_size: tuple[int, int],
    slide_mpp: float | tuple[float, float],
) -> TissueMask:
    """A mask image of any size (PNG, TIFF, array) stretched over the whole slide.

    The image's pixels are taken to tile the slide exactly; its um/px is the
    slide's width in um over the image width. Non-zero (or bright) pixels are
    tissue; a 2-valued image uses its larger value.

    Raises
    ------
    ValueError
        For an unreadable image, or one whose aspect ratio is far from the slide's.

    """
    if isinstance(path_or_array, str | os.PathLike):
        path = Path(path_or_array)
        mask = _read_mask_image(path)
        name = path.name
    else:
        mask = _binarise(np.asarray(path_or_array), "the mask array")
        if max(mask.shape) > MAX_MASK_SIDE:
            mask = _reduce_mask(mask, math.ceil(max(mask.shape) / MAX_MASK_SIDE))
        name = "array"
    mpp_x, mpp_y = _pair(slide_mpp)
    width_um = slide_size[0] * mpp_x
    height_um = slide_size[1] * mpp_y
    rows, cols = mask.shape
    mpp_cols, mpp_rows = width_um / cols, height_um / rows
    if abs(mpp_cols / mpp_rows - 1.0) > 0.05:
        raise ValueError(
            f"the {cols}x{rows} mask image {name} does not have the slide's aspect ratio "
            f"({slide_size[0]}x{slide_size[1]} px); is it the mask of another slide?"
        )
    mpp = max(mpp_cols, mpp_rows)
    return TissueMask(
        mask, mpp, (int(slide_size[0]), int(slide_size[1])), (mpp_x, mpp_y), "image", {"source": name}
    )


def read_tissue_file(
    path: str | os.PathLike[str],
    slide_size: tuple[int, int],
    slide_mpp: float | tuple[float, float],
    mask_mpp: float = 8.0,
) -> TissueMask:
    """Read any tissue mask file for a given slide (what the Import button and ``--tissue FILE`` take).

    * ``.geojson`` (or a ``.json`` holding GeoJSON): polygons in level-0
      pixels, rasterised at ``mask_mpp``;
    * a mask saved by :func:`save_tissue_mask` (its ``.png`` or ``.json``):
      loaded as is, after checking it was made for a slide of this size;
    * any other image (``.png``, ``.tif``, ``.jpg``...): stretched over the slide.

    Raises
    ------
    FileNotFoundError
        When the file does not exist.
    ValueError
        When the file is unreadable or belongs to another slide.

    """
    path = require_regular_file(path, "tissue mask file")  # a FIFO or folder is refused, never opened
    suffix = path.suffix.lower()
    slide_size = (int(slide_size[0]), int(slide_size[1]))
    if suffix in (".geojson", ".json"):
        data = read_json_file(path, "tissue mask file")
        if isinstance(data, list) or (isinstance(data, dict) and "type" in data):
            return tissue_mask_from_geojson(data, slide_size, slide_mpp, mask_mpp, source=path.name)
        mask = load_tissue_mask(path)
    elif suffix == ".png" and path.with_suffix(".json").exists():
        mask = load_tissue_mask(path)
    else:
        return tissue_mask_from_image(path, slide_size, slide_mpp)
    if tuple(mask.slide_size) != slide_size:
        raise ValueError(
            f"{path.name} was made for a {mask.slide_size[0]}x{mask.slide_size[1]} px slide, "
            f"not this {slide_size[0]}x{slide_size[1]} px one"
        )
    return mask


# --------------------------------------------------------------------------------------
# The command-line job
# --------------------------------------------------------------------------------------


def write_tissue_outputs(
    slide_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    params: TissueParams = TissueParams(),
    mpp: float | None = None,
) -> Generator[Progress, None, dict[str, Path]]:
    """Detect tissue on a slide file and save ``tissue.png``, ``tissue.json``, ``tissue.geojson``.

    What ``napari-pathology tissue SLIDE --out DIR`` runs. An empty result is
    saved too (``"is_empty": true`` in the JSON).

    Parameters
    ----------
    slide_path : path-like
        The slide.
    out_dir : path-like
        Output folder (created).
    params : TissueParams
        Detector parameters.
    mpp : float, optional
        um/px to use when the file has none (or to override it).

    Returns
    -------
    dict of str to Path
        The written files (see :func:`save_tissue_mask`).

    """
    from napari_pathology.slide import open_slide

    ensure_writable_dir(out_dir)  # a read-only or full output disk is said before the work
    slide = open_slide(slide_path, mpp=mpp)
    try:
        mask = yield from detect_tissue(slide, params)
    finally:
        slide.close()
    return save_tissue_mask(mask, out_dir)
