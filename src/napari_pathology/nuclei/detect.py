"""Default nucleus detector: haematoxylin colour deconvolution, blob seeds and a watershed.

Foreground is the smoothed haematoxylin optical density above a threshold (Otsu x factor per
image, or one absolute threshold shared by all chunks of a slide, see :func:`estimate_threshold`).
Touching nuclei are split by seeds at the maxima of a landscape that adds a scale-normalised,
multi-scale Laplacian-of-Gaussian (blob) response of the haematoxylin to a capped distance to the
background: dense lymphocyte aggregates and tumour nests, which merge into one foreground blob,
still get one seed per nucleus, and the distance term keeps a big textured nucleus in one piece.

Pure numpy / scipy / scikit-image; no Qt and no napari.  All parameters are expressed in
micrometres so the same :class:`NucleusParams` works across scanning resolutions.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import IO, Any, Protocol

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
    """Parameters of the haematoxylin blob-watershed detector, in micrometres.

    Defaults are for H&E scanned at 0.25-0.5 um/px. They were chosen by small grid searches on
    the 15 MICCAI 2015 training tiles together with the synthetic seed-11 slide (see
    ``benchmarks/nuclei_detection.py``), so scores on those images are not held-out estimates.

    Attributes
    ----------
    sigma_um : float
        Gaussian smoothing of the haematoxylin channel before thresholding.
    threshold_factor : float
        Multiplier applied to the Otsu threshold of the smoothed channel (< 1 is more permissive).
    min_area_um2 : float
        Foreground objects smaller than this are removed, and so are final nuclei.
    min_distance_um : float
        Minimum distance between two watershed seeds (about a small nucleus' radius).
    seed_sigmas_um : tuple of float
        Scales of the Laplacian-of-Gaussian blob response used for seeds (about radius / sqrt 2
        of the nuclei to separate); empty for distance-transform seeds only.
    distance_weight : float
        Weight, per micrometre, of the distance to the background added to the blob response
        (which is measured in units of the threshold).
    distance_cap_um : float
        The distance to the background is capped at this value before weighting.
    threshold : float or None
        Absolute threshold on the smoothed haematoxylin optical density. None (default) takes
        ``threshold_factor`` x the image's own Otsu level; give one value (e.g. from
        :func:`estimate_threshold`) to treat every tile of a slide alike.
    """

    sigma_um: float = 1.0
    threshold_factor: float = 0.85
    min_area_um2: float = 10.0
    min_distance_um: float = 2.0
    seed_sigmas_um: tuple[float, ...] = (2.0, 3.0)
    distance_weight: float = 0.5
    distance_cap_um: float = 3.0
    threshold: float | None = None

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
        sigmas = tuple(float(v) for v in self.seed_sigmas_um)
        if not all(math.isfinite(v) and v > 0 for v in sigmas):
            raise ValueError(f"seed_sigmas_um must be positive scales in um, got {self.seed_sigmas_um!r}")
        object.__setattr__(self, "seed_sigmas_um", sigmas)
        if not (math.isfinite(self.distance_weight) and self.distance_weight >= 0):
            raise ValueError(f"distance_weight must be >= 0, got {self.distance_weight}")
        if not (math.isfinite(self.distance_cap_um) and self.distance_cap_um > 0):
            raise ValueError(f"distance_cap_um must be > 0 um, got {self.distance_cap_um}")
        if self.threshold is not None and not (math.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(
                f"threshold must be a positive haematoxylin optical density or None (per-image Otsu), "
                f"got {self.threshold}"
            )


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

    def to_csv(self, path: str | PathLike[str]) -> Path:
        """Write the table to ``path`` (``x_um,y_um,area_um2,hematoxylin,eccentricity``), atomically.

        Written through :func:`napari_pathology.fileio.atomic_write`: a full or
        read-only disk leaves the previous file (or none), never a CSV cut mid-row.

        Raises
        ------
        ValueError
            When a centroid is not finite (nothing is written).
        OutputError
            When the file system refuses the write (one line naming the folder).

        """
        from napari_pathology.fileio import atomic_write

        finite = np.isfinite(self.x_um) & np.isfinite(self.y_um)
        if not finite.all():
            i = int(np.flatnonzero(~finite)[0])
            raise ValueError(
                f"nucleus {i} has no finite centroid ({float(self.x_um[i])!r}, {float(self.y_um[i])!r}); "
                "not written"
            )
        columns = [getattr(self, name) for name in CSV_COLUMNS]

        def write(fh: IO[Any]) -> None:
            writer = csv.writer(fh)
            writer.writerow(CSV_COLUMNS)
            writer.writerows([f"{v:.6g}" for v in row] for row in zip(*columns, strict=True))

        return atomic_write(path, write, text=True)


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


def smoothed_hematoxylin(rgb: np.ndarray, mpp: float, sigma_um: float = 1.0) -> np.ndarray:
    """Haematoxylin optical density of ``rgb`` (colour deconvolution), Gaussian-smoothed.

    Parameters
    ----------
    rgb : np.ndarray
        ``(H, W, 3)`` RGB image (uint8/uint16 or float in [0, 1]); an alpha channel is dropped.
    mpp : float
        Resolution in micrometres per pixel.
    sigma_um : float
        Gaussian sigma in micrometres (0 for none).

    Returns
    -------
    np.ndarray
        ``(H, W)`` float image.
    """
    hema = rgb2hed(_check_inputs(rgb, mpp))[..., 0]
    return gaussian(hema, sigma=sigma_um / mpp) if sigma_um > 0 else hema


def estimate_threshold(
    images: Iterable[np.ndarray], mpp: float, params: NucleusParams | None = None
) -> float | None:
    """One absolute haematoxylin threshold for several tiles: Otsu over all of them x factor.

    Parameters
    ----------
    images : iterable of np.ndarray
        RGB sample tiles of one slide (e.g. a few tissue chunks), all at ``mpp``.
    mpp : float
        Resolution in micrometres per pixel.
    params : NucleusParams, optional
        Supplies ``sigma_um`` and ``threshold_factor``; defaults to ``NucleusParams()``.

    Returns
    -------
    float or None
        ``threshold_factor`` x Otsu of the pooled smoothed haematoxylin, for
        ``NucleusParams.threshold``; None when the samples hold no contrast (blank tiles).
    """
    p = params if params is not None else NucleusParams()
    values = [smoothed_hematoxylin(img, mpp, p.sigma_um).ravel() for img in images]
    if not values:
        raise ValueError("estimate_threshold needs at least one sample image")
    pooled = np.concatenate(values)
    if float(pooled.max()) - float(pooled.min()) < 1e-9:
        return None
    return float(threshold_otsu(pooled)) * p.threshold_factor


def _seed_landscape(
    hema: np.ndarray, dist: np.ndarray, thresh: float, mpp: float, p: NucleusParams
) -> np.ndarray:
    """Multi-scale normalised LoG blob response (in threshold units) + capped distance (um)."""
    land = p.distance_weight * np.minimum(dist * mpp, p.distance_cap_um)
    if p.seed_sigmas_um:
        blob = np.max(
            [-ndi.gaussian_laplace(hema, s / mpp) * (s / mpp) ** 2 for s in p.seed_sigmas_um], axis=0
        )
        land = land + blob / thresh
    return land


def detect_nuclei(rgb: np.ndarray, mpp: float, params: NucleusParams | None = None) -> NucleusTable:
    """Detect nuclei with haematoxylin deconvolution, a threshold and a blob-seeded watershed.

    Parameters
    ----------
    rgb : np.ndarray
        ``(H, W, 3)`` RGB image (uint8/uint16 or float in [0, 1]); an alpha channel is dropped.
    mpp : float
        Resolution in micrometres per pixel.
    params : NucleusParams, optional
        Detector parameters in micrometres; defaults to ``NucleusParams()``. Without an absolute
        ``threshold`` the image is thresholded at ``threshold_factor`` x its own Otsu level.

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
    if p.threshold is not None:
        thresh = float(p.threshold)
    elif float(smooth.max()) - float(smooth.min()) < 1e-9:
        return NucleusTable()
    else:
        thresh = float(threshold_otsu(smooth)) * p.threshold_factor
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
    land = _seed_landscape(hema, dist, max(thresh, 1e-6), mpp, p)
    min_dist_px = max(1, round(p.min_distance_um / mpp))
    peaks = peak_local_max(land, min_distance=min_dist_px, labels=comp, exclude_border=False)
    markers = np.zeros(fg.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-land, markers, mask=fg)
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
