"""ROC curve and its area (Mann-Whitney U)."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from napari_pathology.analysis.metrics._checks import _check_binary

__all__ = ["roc_auc", "roc_curve"]


def roc_auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic.

    The fraction of (positive, negative) pairs in which the positive scores
    higher, a tie counting 1/2.

    Parameters
    ----------
    labels : (N,) array of bool or 0/1
        True class; both classes must be present.
    scores : (N,) array of float
        Higher means more likely positive; no NaN.

    Returns
    -------
    float
        AUC in [0, 1].

    Raises
    ------
    ValueError
        If only one class is present, the lengths differ or a score is NaN.

    Examples
    --------
    >>> roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    """
    y, s = _check_binary(labels, scores)
    m, n = int(y.sum()), int((~y).sum())
    ranks = stats.rankdata(s)  # midranks: ties share the mean rank
    return float((ranks[y].sum() - m * (m + 1) / 2) / (m * n))


def roc_curve(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve: one point per distinct score, starting at (0, 0).

    Parameters
    ----------
    labels, scores : (N,) arrays
        As for :func:`roc_auc`.

    Returns
    -------
    fpr, tpr, thresholds : 1-D float arrays
        Point ``i`` calls positive every score ``>= thresholds[i]``;
        ``thresholds[0]`` is ``inf`` (nothing positive), the rest are the
        distinct scores in descending order, so the curve ends at (1, 1).
        The trapezoidal area under it equals :func:`roc_auc`.
    """
    y, s = _check_binary(labels, scores)
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    # last index of each run of equal scores
    last = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), len(s_sorted) - 1]
    tps = np.cumsum(y_sorted)[last]
    fps = (last + 1) - tps
    tpr = np.r_[0.0, tps / y.sum()]
    fpr = np.r_[0.0, fps / (~y).sum()]
    thresholds = np.r_[np.inf, s_sorted[last]]
    return fpr, tpr, thresholds
