"""The tissue mask type: :class:`TissueParams` (how to find tissue) and :class:`TissueMask`.

A :class:`TissueMask` knows where it lies on the slide: mask pixel ``(r, c)``
covers the physical square ``[c * mpp, (c + 1) * mpp) x [r * mpp, (r + 1) * mpp)``
micrometres from the slide's top-left corner. It answers "how much of this
rectangle is tissue" for many rectangles at once (:meth:`TissueMask.fractions`,
an integral image), and converts to polygons in level-0 pixels and GeoJSON.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathology.geometry import (
    area_below,
    mask_to_polygons,
    polygons_to_geojson,
    summed_area_table,
)

__all__ = ["DEFAULT_PARAMS", "METHODS", "TISSUE_CLASS", "TISSUE_COLOR", "TissueMask", "TissueParams"]

#: The tissue detectors :class:`TissueParams` accepts.
METHODS = ("saturation", "otsu", "gray")

#: GeoJSON class name and colour of tissue polygons (QuPath style).
TISSUE_CLASS = "Tissue"
TISSUE_COLOR = (80, 160, 80)

_FORMAT = "napari-pathology tissue mask v1"


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


#: The default parameters (frozen, so one instance serves as every default argument).
DEFAULT_PARAMS = TissueParams()


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

    def bounding_box(
        self, mpp: float, shape: tuple[int, int], snap: int = 1
    ) -> tuple[int, int, int, int] | None:
        """``(r0, r1, c0, c1)``: the tissue's bounding box in px of an image of the slide at ``mpp``.

        ``shape`` is that image's ``(rows, cols)``; the starts are snapped down
        to multiples of ``snap`` (e.g. a network's stride, so its output cells
        stay on the slide's grid). None when the mask has no tissue inside the image.
        """
        found = np.asarray(self.mask, bool)
        rows_any, cols_any = np.nonzero(found.any(1))[0], np.nonzero(found.any(0))[0]
        if len(rows_any) == 0:
            return None
        scale = self.mpp / float(mpp)
        r0 = int(rows_any[0] * scale) // snap * snap
        c0 = int(cols_any[0] * scale) // snap * snap
        r1 = min(shape[0], math.ceil((rows_any[-1] + 1) * scale))
        c1 = min(shape[1], math.ceil((cols_any[-1] + 1) * scale))
        return (r0, r1, c0, c1) if r0 < r1 and c0 < c1 else None

    @property
    def area_mm2(self) -> float:
        """Tissue area in square millimetres (inside the slide's bounds)."""
        rows, cols = self.shape
        width_um, height_um = self.slide_size_um
        x, y = min(width_um / self.mpp, cols), min(height_um / self.mpp, rows)  # the slide, in mask pixels
        fx, fy = math.floor(x), math.floor(y)
        ex, ey = x - fx, y - fy  # parts of the pixels on the slide's right and bottom edges
        pixels = float(np.count_nonzero(self.mask[:fy, :fx]))
        if ex > 0:
            pixels += ex * np.count_nonzero(self.mask[:fy, fx])
        if ey > 0:
            pixels += ey * np.count_nonzero(self.mask[fy, :fx])
        if ex > 0 and ey > 0:
            pixels += ex * ey * bool(self.mask[fy, fx])
        return pixels * self.mpp**2 / 1e6

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
