"""Default nucleus detector: haematoxylin colour deconvolution + distance-transform watershed.

Pure numpy / scipy / scikit-image; no Qt and no napari.  All parameters are expressed in
micrometres so the same :class:`NucleusParams` works across scanning resolutions.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from os import PathLike
from typing import Protocol

import numpy as np
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree
from skimage.color import rgb2hed
from skimage.feature import peak_local_max
from skimage.filters import gaussian, threshold_otsu
from skimage.measure import regionprops_table
from skimage.segmentation import watershed

CSV_COLUMNS = ("x_um", "y_um", "area_um2", "hematoxylin", "eccentricity")


@dataclass(frozen=True)
class NucleusParams:
    """Parameters of the haematoxylin watershed detector, in micrometres.

    Defaults are for H&E scanned at 0.25-0.5 um/px; ``threshold_factor`` and ``sigma_um`` were
    chosen by a small grid search on the 15 MICCAI 2015 training tiles (see
    ``benchmarks/nuclei_detection.py``), so scores on those tiles are not held-out estimates.

    Attributes
    ----------
    sigma_um : float
        Gaussian smoothing of the haematoxylin channel.
    threshold_factor : float
        Multiplier applied to the Otsu threshold of the smoothed channel (< 1 is more permissive).
    min_area_um2 : float
        Foreground objects smaller than this are removed, and so are final nuclei.
    min_distance_um : float
        Minimum distance between two watershed seeds (roughly a nucleus radius).
    """

    sigma_um: float = 1.0
    threshold_factor: float = 0.85
    min_area_um2: float = 10.0
    min_distance_um: float = 3.0

    def __post_init__(self) -> None:
        """Validate parameters."""
        if self.sigma_um < 0:
            raise ValueError(f"sigma_um must be >= 0, got {self.sigma_um}")
        if self.threshold_factor <= 0:
            raise ValueError(f"threshold_factor must be > 0, got {self.threshold_factor}")
        if self.min_area_um2 < 0:
            raise ValueError(f"min_area_um2 must be >= 0, got {self.min_area_um2}")
        if self.min_distance_um <= 0:
            raise ValueError(f"min_distance_um must be > 0, got {self.min_distance_um}")


def _empty() -> np.ndarray:
    return np.zeros(0, dtype=np.float64)


@dataclass(frozen=True)
class NucleusTable:
    """Detected nuclei, one row per nucleus, all coordinates in micrometres.

    Coordinates are in the image's own frame: pixel ``(row i, col j)`` has its centre at
    ``x = (j + 0.5) * mpp``, ``y = (i + 0.5) * mpp``.
    """

    x_um: np.ndarray = field(default_factory=_empty)
    y_um: np.ndarray = field(default_factory=_empty)
    area_um2: np.ndarray = field(default_factory=_empty)
    hematoxylin: np.ndarray = field(default_factory=_empty)
    eccentricity: np.ndarray = field(default_factory=_empty)

    def __post_init__(self) -> None:
        """Check that all columns are 1-D and of equal length."""
        n = None
        for name in CSV_COLUMNS:
            arr = np.asarray(getattr(self, name), dtype=np.float64)
            if arr.ndim != 1:
                raise ValueError(f"column {name!r} must be 1-D, got shape {arr.shape}")
            if n is not None and arr.shape[0] != n:
                raise ValueError(f"column {name!r} has length {arr.shape[0]}, expected {n}")
            n = arr.shape[0]
            object.__setattr__(self, name, arr)

    def __len__(self) -> int:
        """Number of nuclei."""
        return int(self.x_um.shape[0])

    def xy_um(self) -> np.ndarray:
        """Return centroids as an ``(N, 2)`` array of ``(x_um, y_um)``."""
        return np.column_stack([self.x_um, self.y_um]).reshape(-1, 2)

    def to_csv(self, path: str | PathLike[str]) -> None:
        """Write the table to ``path`` with columns ``x_um,y_um,area_um2,hematoxylin,eccentricity``."""
        cols = [getattr(self, name) for name in CSV_COLUMNS]
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(CSV_COLUMNS)
            for row in zip(*cols, strict=True):
                writer.writerow([f"{v:.6g}" for v in row])


class NucleusDetector(Protocol):
    """Anything that maps an RGB tile and its resolution to a :class:`NucleusTable`."""

    def __call__(self, rgb: np.ndarray, mpp: float) -> NucleusTable:
        """Detect nuclei in ``rgb`` (H, W, 3) scanned at ``mpp`` um/px."""
        ...


def _check_inputs(rgb: np.ndarray, mpp: float) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4):
        raise ValueError(f"rgb must be an (H, W, 3) RGB image (RGBA accepted), got shape {rgb.shape}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"rgb must be non-empty, got shape {rgb.shape}")
    if not np.isfinite(mpp) or mpp <= 0:
        raise ValueError(f"mpp (micrometres per pixel) must be a positive finite number, got {mpp}")
    rgb = rgb[..., :3]
    if np.issubdtype(rgb.dtype, np.integer):
        rgb = rgb.astype(np.float64) / float(np.iinfo(rgb.dtype).max)
    elif rgb.dtype == bool:
        raise ValueError("rgb must be a numeric image, got a boolean array")
    else:
        rgb = np.clip(rgb.astype(np.float64), 0.0, 1.0)
    return rgb


def detect_nuclei(rgb: np.ndarray, mpp: float, params: NucleusParams | None = None) -> NucleusTable:
    """Detect nuclei with haematoxylin deconvolution, Otsu threshold and watershed.

    Parameters
    ----------
    rgb : np.ndarray
        ``(H, W, 3)`` RGB image (uint8/uint16 or float in [0, 1]); an alpha channel is dropped.
    mpp : float
        Resolution in micrometres per pixel.
    params : NucleusParams, optional
        Detector parameters in micrometres; defaults to ``NucleusParams()``.

    Returns
    -------
    NucleusTable
        One row per nucleus: centroid (um, image frame), area (um^2), mean haematoxylin
        optical density and eccentricity.

    Raises
    ------
    ValueError
        If ``rgb`` is not an RGB image or ``mpp`` is not positive.
    """
    rgb = _check_inputs(rgb, mpp)
    p = params if params is not None else NucleusParams()
    hema = rgb2hed(rgb)[..., 0]
    smooth = gaussian(hema, sigma=p.sigma_um / mpp) if p.sigma_um > 0 else hema
    if float(smooth.max()) - float(smooth.min()) < 1e-9:
        return NucleusTable()
    thresh = threshold_otsu(smooth) * p.threshold_factor
    fg = smooth > thresh
    fg = ndi.binary_fill_holes(fg)
    min_px = max(1, round(p.min_area_um2 / mpp**2))
    comp, _ = ndi.label(fg)
    sizes = np.bincount(comp.ravel())
    small = sizes < min_px
    small[0] = True
    comp[small[comp]] = 0
    fg = comp > 0
    if not fg.any():
        return NucleusTable()
    dist = ndi.distance_transform_edt(fg)
    min_dist_px = max(1, round(p.min_distance_um / mpp))
    peaks = peak_local_max(dist, min_distance=min_dist_px, labels=comp, exclude_border=False)
    markers = np.zeros(fg.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-dist, markers, mask=fg)
    props = regionprops_table(
        labels, intensity_image=hema, properties=("centroid", "area", "intensity_mean", "eccentricity")
    )
    keep = props["area"] >= min_px
    return NucleusTable(
        x_um=(props["centroid-1"][keep] + 0.5) * mpp,
        y_um=(props["centroid-0"][keep] + 0.5) * mpp,
        area_um2=props["area"][keep] * mpp**2,
        hematoxylin=props["intensity_mean"][keep],
        eccentricity=props["eccentricity"][keep],
    )


def _detect_default(rgb: np.ndarray, mpp: float) -> NucleusTable:
    return detect_nuclei(rgb, mpp)


DETECTORS: dict[str, Callable[[np.ndarray, float], NucleusTable]] = {
    "hematoxylin-watershed": _detect_default,
}


def match_points(pred_xy: np.ndarray, true_xy: np.ndarray, radius_um: float) -> tuple[int, int, int]:
    """One-to-one match predicted and true points within a radius.

    Uses an optimal assignment (``scipy.optimize.linear_sum_assignment``) on the distance
    matrix restricted to pairs closer than ``radius_um`` (candidate pairs found with a KD-tree);
    pairs farther apart can never match. This maximises the number of matches, then minimises
    the total distance among maximal matchings.

    Parameters
    ----------
    pred_xy, true_xy : np.ndarray
        ``(N, 2)`` and ``(M, 2)`` point coordinates in micrometres.
    radius_um : float
        Maximum matching distance (inclusive).

    Returns
    -------
    tuple of int
        ``(tp, fp, fn)``.
    """
    pred = np.asarray(pred_xy, dtype=np.float64).reshape(-1, 2)
    true = np.asarray(true_xy, dtype=np.float64).reshape(-1, 2)
    if radius_um <= 0:
        raise ValueError(f"radius_um must be positive, got {radius_um}")
    if len(pred) == 0 or len(true) == 0:
        return 0, len(pred), len(true)
    sparse = cKDTree(pred).sparse_distance_matrix(cKDTree(true), radius_um, output_type="ndarray")
    if len(sparse) == 0:
        return 0, len(pred), len(true)
    # only rows/cols with a candidate take part; non-candidates get a prohibitive cost.
    rows = np.unique(sparse["i"])
    cols = np.unique(sparse["j"])
    ri = np.searchsorted(rows, sparse["i"])
    ci = np.searchsorted(cols, sparse["j"])
    big = 1e6 * (radius_um + 1.0)
    cost = np.full((len(rows), len(cols)), big)
    # cost = distance - large bonus so that the number of matches is maximised first
    cost[ri, ci] = sparse["v"] - (radius_um + 1.0) * len(rows)
    r, c = linear_sum_assignment(cost)
    tp = int(np.count_nonzero(cost[r, c] < big))
    return tp, len(pred) - tp, len(true) - tp


def detection_scores(pred_xy: np.ndarray, true_xy: np.ndarray, radius_um: float) -> dict[str, float]:
    """Precision, recall and F1 of point detections under :func:`match_points`.

    Parameters
    ----------
    pred_xy, true_xy : np.ndarray
        ``(N, 2)`` and ``(M, 2)`` point coordinates in micrometres.
    radius_um : float
        Matching radius in micrometres.

    Returns
    -------
    dict
        Keys ``precision``, ``recall``, ``f1``, ``tp``, ``fp``, ``fn``. Empty denominators give 0.
    """
    tp, fp, fn = match_points(pred_xy, true_xy, radius_um)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}
