"""Confusion-matrix metrics and Pearson correlation."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from napari_pathology.analysis.metrics._checks import _as_labels

__all__ = ["binary_metrics", "pearson_r"]


def binary_metrics(labels: ArrayLike, predicted: ArrayLike) -> dict[str, float]:
    """Confusion-matrix counts and the metrics derived from them.

    Parameters
    ----------
    labels, predicted : (N,) arrays of bool or 0/1
        True and predicted class.

    Returns
    -------
    dict
        ``tp, fp, tn, fn`` (ints) and ``accuracy, precision, recall``
        (= sensitivity), ``specificity, f1``; a ratio whose denominator is 0
        is NaN. ``f1`` is ``2 tp / (2 tp + fp + fn)``, which equals the
        harmonic mean of precision and recall wherever both are defined.
    """
    y = _as_labels(labels)
    p = _as_labels(predicted, "predicted")
    if len(y) != len(p):
        raise ValueError(f"labels and predicted differ in length: {len(y)} vs {len(p)}")
    tp = int(np.sum(y & p))
    fp = int(np.sum(~y & p))
    tn = int(np.sum(~y & ~p))
    fn = int(np.sum(y & ~p))

    def ratio(num: int, den: int) -> float:
        return num / den if den else math.nan

    return {
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "accuracy": ratio(tp + tn, len(y)),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
    }


def pearson_r(x: ArrayLike, y: ArrayLike) -> tuple[float, float]:
    """Pearson correlation and its two-sided p-value, dropping pairs with NaN.

    Parameters
    ----------
    x, y : (N,) arrays of float
        Paired values; a pair with NaN in either is left out.

    Returns
    -------
    r, p : float
        From :func:`scipy.stats.pearsonr`; both NaN when either side is constant.

    Raises
    ------
    ValueError
        Different lengths, or fewer than 3 complete pairs.
    """
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    if a.ndim != 1 or b.ndim != 1 or len(a) != len(b):
        raise ValueError(f"x and y must be 1-D of equal length, got shapes {a.shape} and {b.shape}")
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    if len(a) < 3:
        raise ValueError(f"pearson_r needs at least 3 pairs without NaN, got {len(a)}")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan, math.nan
    result = stats.pearsonr(a, b)
    return float(result.statistic), float(result.pvalue)
