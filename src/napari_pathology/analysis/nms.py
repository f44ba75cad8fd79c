"""Non-maximum suppression on heatmaps (Liu et al. 2017, for FROC detections)."""

from __future__ import annotations

import numpy as np

from napari_pathology.fileio import require_finite


def non_maximum_suppression(heatmap: np.ndarray, threshold: float = 0.5, radius: float = 5.0) -> np.ndarray:
    """Greedily keep the highest cells and suppress a disk around each.

    Equivalent to "repeatedly take the maximum, report it and clear every cell
    within ``radius`` cells of it, until nothing is above ``threshold``", but
    terminating by construction: the cells above ``threshold`` are sorted once
    and visited once each, highest first (ties in row-major order); a cell is
    reported unless an earlier reported cell lies within ``radius``. NaN and
    infinite cells (outside tissue, unfinished) never count.

    Parameters
    ----------
    heatmap : (rows, cols) array
        Probabilities per grid cell.
    threshold : float
        Only cells strictly above this are reported; must be finite.
    radius : float
        Suppression radius in cells; finite and ``>= 0``.

    Returns
    -------
    (N, 3) float array
        ``row, col, score`` per detection, highest score first.

    Raises
    ------
    ValueError
        For a heatmap that is not 2-D, or a NaN/infinite threshold or a negative radius.

    Examples
    --------
    >>> h = np.zeros((10, 10)); h[2, 2] = 0.9; h[2, 3] = 0.8; h[8, 8] = 0.7
    >>> non_maximum_suppression(h, 0.5, 2).tolist()
    [[2.0, 2.0, 0.9], [8.0, 8.0, 0.7]]
    """
    threshold = require_finite(threshold, "NMS threshold")
    radius = require_finite(radius, "NMS radius", minimum=0.0)
    values = np.asarray(heatmap, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"heatmap must be 2-D, got shape {values.shape}")
    above = np.isfinite(values) & (values > threshold)
    flat = np.flatnonzero(above)
    if flat.size == 0:
        return np.zeros((0, 3), np.float64)
    scores = values.ravel()[flat]
    order = flat[np.argsort(-scores, kind="stable")]  # highest first; ties keep row-major order
    suppressed = np.zeros(values.shape, bool)
    width = values.shape[1]
    radius = min(radius, 2.0 * max(values.shape))  # a larger disk covers the same cells
    reach = int(np.floor(radius))
    dr, dc = np.mgrid[-reach : reach + 1, -reach : reach + 1]
    disk = dr**2 + dc**2 <= radius**2
    found: list[tuple[float, float, float]] = []
    for index in order:  # one visit per candidate: at most flat.size iterations
        r, c = divmod(int(index), width)
        if suppressed[r, c]:
            continue
        found.append((float(r), float(c), float(values[r, c])))
        r0, c0 = max(0, r - reach), max(0, c - reach)
        r1, c1 = min(values.shape[0], r + reach + 1), min(width, c + reach + 1)
        window = disk[r0 - (r - reach) : r1 - (r - reach), c0 - (c - reach) : c1 - (c - reach)]
        suppressed[r0:r1, c0:c1] |= window
    return np.array(found, dtype=np.float64).reshape(-1, 3)
