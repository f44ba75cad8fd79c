"""Whole-slide nucleus predictions at scale: a spatial index and density grids.

A whole-slide run gives 10^5-10^6 nuclei; napari's points layer pans at a few
frames per second with 10^5 points under software OpenGL and well under one
with 10^6. The viewer therefore shows predictions as a density image when
zoomed out and, when zoomed in, only the points inside the view: this module
answers "which nuclei lie in this box" in milliseconds and builds the grids.
No Qt, no napari.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DensityGrid", "PointIndex", "density_grid"]


class PointIndex:
    """Bucket points on a square grid so box queries touch only nearby points.

    Parameters
    ----------
    xy_um : np.ndarray
        ``(N, 2)`` point coordinates ``(x, y)`` in micrometres.
    bucket_um : float
        Side of one bucket; a few hundred micrometres suits nuclei.

    Examples
    --------
    >>> index = PointIndex(np.array([[10.0, 10.0], [900.0, 50.0]]), bucket_um=256)
    >>> index.query((0, 0, 100, 100)).tolist()
    [0]
    """

    def __init__(self, xy_um: np.ndarray, bucket_um: float = 256.0) -> None:
        xy = np.asarray(xy_um, dtype=np.float64).reshape(-1, 2)
        if bucket_um <= 0:
            raise ValueError(f"bucket_um must be positive, got {bucket_um}")
        self.xy_um = xy
        self.bucket_um = float(bucket_um)
        if len(xy):
            self._origin = xy.min(axis=0)
            cells = np.floor((xy - self._origin) / bucket_um).astype(np.int64)
            self._n_cols = int(cells[:, 0].max()) + 1
            self._n_rows = int(cells[:, 1].max()) + 1
            keys = cells[:, 1] * self._n_cols + cells[:, 0]
        else:
            self._origin = np.zeros(2)
            self._n_cols = self._n_rows = 0
            keys = np.zeros(0, np.int64)
        self._order = np.argsort(keys, kind="stable")
        self._starts = np.searchsorted(keys[self._order], np.arange(self._n_rows * self._n_cols + 1))

    def __len__(self) -> int:
        """Number of indexed points."""
        return len(self.xy_um)

    def _bucket_span(self, box_um: tuple[float, float, float, float]) -> tuple[int, int, int, int] | None:
        x, y, w, h = box_um
        if not len(self) or w <= 0 or h <= 0:
            return None
        c0, r0 = np.floor((np.array([x, y]) - self._origin) / self.bucket_um).astype(int)
        c1, r1 = np.floor((np.array([x + w, y + h]) - self._origin) / self.bucket_um).astype(int)
        c0, r0 = max(c0, 0), max(r0, 0)
        c1, r1 = min(c1, self._n_cols - 1), min(r1, self._n_rows - 1)
        if c0 > c1 or r0 > r1:
            return None
        return c0, r0, c1, r1

    def _candidates(self, span: tuple[int, int, int, int]) -> np.ndarray:
        c0, r0, c1, r1 = span
        rows = np.arange(r0, r1 + 1)
        first = rows * self._n_cols + c0
        last = rows * self._n_cols + c1 + 1
        slices = [self._order[self._starts[a] : self._starts[b]] for a, b in zip(first, last, strict=True)]
        return np.concatenate(slices) if slices else np.zeros(0, np.int64)

    def count_upper_bound(self, box_um: tuple[float, float, float, float]) -> int:
        """Points in the buckets the box touches (>= the exact count); cheap."""
        span = self._bucket_span(box_um)
        if span is None:
            return 0
        c0, r0, c1, r1 = span
        rows = np.arange(r0, r1 + 1) * self._n_cols
        return int((self._starts[rows + c1 + 1] - self._starts[rows + c0]).sum())

    def query(self, box_um: tuple[float, float, float, float]) -> np.ndarray:
        """Indices of the points inside ``box_um = (x, y, width, height)``, ascending.

        Parameters
        ----------
        box_um : tuple of float
            The box in micrometres; its left and top edges are inclusive.

        Returns
        -------
        np.ndarray
            ``int64`` indices into ``xy_um``.
        """
        span = self._bucket_span(box_um)
        if span is None:
            return np.zeros(0, np.int64)
        candidates = self._candidates(span)
        x, y, w, h = box_um
        pts = self.xy_um[candidates]
        inside = (pts[:, 0] >= x) & (pts[:, 0] < x + w) & (pts[:, 1] >= y) & (pts[:, 1] < y + h)
        return np.sort(candidates[inside])


@dataclass(frozen=True)
class DensityGrid:
    """Nuclei per grid cell and, where classified, their mean tumour probability.

    Attributes
    ----------
    counts : np.ndarray
        ``(rows, cols)`` nuclei per cell.
    density_per_mm2 : np.ndarray
        ``counts`` divided by the cell area, in nuclei per mm^2.
    mean_probability : np.ndarray
        ``(rows, cols)`` mean tumour probability of the cell's classified nuclei; NaN
        where a cell has none (so it draws transparent).
    cell_um : float
        Cell side in micrometres.
    first_centre_um : tuple of float
        ``(y, x)`` centre of cell ``(0, 0)``, as :func:`napari_pathology._layers.overlay_geometry` wants.
    """

    counts: np.ndarray
    density_per_mm2: np.ndarray
    mean_probability: np.ndarray
    cell_um: float
    first_centre_um: tuple[float, float]


def density_grid(
    xy_um: np.ndarray,
    extent_um: tuple[float, float],
    cell_um: float = 50.0,
    probability: np.ndarray | None = None,
) -> DensityGrid:
    """Bin nuclei on a grid over the slide.

    Parameters
    ----------
    xy_um : np.ndarray
        ``(N, 2)`` nucleus centroids ``(x, y)`` in micrometres.
    extent_um : tuple of float
        Slide ``(width, height)`` in micrometres; the grid covers it.
    cell_um : float
        Cell side in micrometres.
    probability : np.ndarray, optional
        ``(N,)`` tumour probabilities; NaN entries are unclassified and ignored.

    Returns
    -------
    DensityGrid
    """
    if cell_um <= 0:
        raise ValueError(f"cell_um must be positive, got {cell_um}")
    width, height = extent_um
    cols = max(1, int(np.ceil(width / cell_um)))
    rows = max(1, int(np.ceil(height / cell_um)))
    xy = np.asarray(xy_um, dtype=np.float64).reshape(-1, 2)
    col = np.clip((xy[:, 0] // cell_um).astype(np.int64), 0, cols - 1)
    row = np.clip((xy[:, 1] // cell_um).astype(np.int64), 0, rows - 1)
    flat = row * cols + col
    counts = np.bincount(flat, minlength=rows * cols).reshape(rows, cols)
    mean = np.full((rows, cols), np.nan, np.float32)
    if probability is not None:
        prob = np.asarray(probability, dtype=np.float64).reshape(-1)
        if prob.shape[0] != xy.shape[0]:
            raise ValueError(f"probability has {prob.shape[0]} values for {xy.shape[0]} points")
        known = np.isfinite(prob)
        n = np.bincount(flat[known], minlength=rows * cols)
        total = np.bincount(flat[known], weights=prob[known], minlength=rows * cols)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, total / np.maximum(n, 1), np.nan).reshape(rows, cols).astype(np.float32)
    area_mm2 = (cell_um / 1000.0) ** 2
    return DensityGrid(
        counts=counts,
        density_per_mm2=(counts / area_mm2).astype(np.float32),
        mean_probability=mean,
        cell_um=float(cell_um),
        first_centre_um=(cell_um / 2.0, cell_um / 2.0),
    )
