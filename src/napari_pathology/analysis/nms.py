"""Non-maximum suppression on heatmaps (Liu et al. 2017, for FROC detections)."""

from __future__ import annotations

import numpy as np


def non_maximum_suppression(heatmap: np.ndarray, threshold: float = 0.5, radius: float = 5.0) -> np.ndarray:
    """Repeatedly take the heatmap's maximum and clear a disk around it.

    Until no value is above ``threshold``: report the maximum and its cell,
    then set every cell within ``radius`` cells of it to zero. NaN (outside
    tissue) never counts.

    Parameters
    ----------
    heatmap : (rows, cols) array
        Probabilities per grid cell.
    threshold : float
        Only maxima strictly above this are reported.
    radius : float
        Suppression radius in cells.

    Returns
    -------
    (N, 3) float array
        ``row, col, score`` per detection, highest score first.

    Examples
    --------
    >>> h = np.zeros((10, 10)); h[2, 2] = 0.9; h[2, 3] = 0.8; h[8, 8] = 0.7
    >>> non_maximum_suppression(h, 0.5, 2).tolist()
    [[2.0, 2.0, 0.9], [8.0, 8.0, 0.7]]
    """
    work = np.nan_to_num(np.asarray(heatmap, dtype=np.float64), nan=0.0).copy()
    if work.ndim != 2:
        raise ValueError(f"heatmap must be 2-D, got shape {work.shape}")
    rows, cols = np.indices(work.shape)
    found: list[tuple[float, float, float]] = []
    while work.size:
        flat = int(np.argmax(work))
        r, c = divmod(flat, work.shape[1])
        score = work[r, c]
        if score <= threshold:
            break
        found.append((float(r), float(c), float(score)))
        r0, r1 = max(0, int(r - radius)), int(r + radius) + 1
        c0, c1 = max(0, int(c - radius)), int(c + radius) + 1
        near = (rows[r0:r1, c0:c1] - r) ** 2 + (cols[r0:r1, c0:c1] - c) ** 2 <= radius**2
        work[r0:r1, c0:c1][near] = 0.0
    return np.array(found, dtype=np.float64).reshape(-1, 3)
