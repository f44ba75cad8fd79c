"""Confidence intervals of the AUC: percentile bootstrap, DeLong, and the slide-level summary."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from napari_pathology.analysis.metrics._checks import _check_binary, _check_confidence

__all__ = [
    "AUCResult",
    "bootstrap_auc_ci",
    "bootstrap_ci",
    "delong_ci",
    "delong_variance",
    "slide_auc",
]

#: Number of array cells a bootstrap block may hold (resamples x samples).
_BLOCK_CELLS = 4_000_000


# --------------------------------------------------------------------------- bootstrap


def _resample_blocks(strata: np.ndarray, n_resamples: int, seed: int | None) -> Iterator[np.ndarray]:
    """Blocks of bootstrap index rows, each row resampling every stratum separately.

    Strata are taken in ``np.unique`` order; within a row, each stratum's
    members are drawn with replacement from that stratum and keep its size.
    """
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(strata == value) for value in np.unique(strata)]
    n = len(strata)
    rows = max(1, _BLOCK_CELLS // max(n, 1))
    done = 0
    while done < n_resamples:
        size = min(rows, n_resamples - done)
        parts = [group[rng.integers(0, len(group), size=(size, len(group)))] for group in groups]
        yield np.concatenate(parts, axis=1) if parts else np.empty((size, 0), dtype=np.intp)
        done += size


def _percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (math.nan, math.nan)
    alpha = 1.0 - confidence
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_ci(
    statistic: Callable[..., float],
    *arrays: ArrayLike,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int | None = 0,
    strata: ArrayLike | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of any statistic.

    Parameters
    ----------
    statistic : callable
        Called as ``statistic(*resampled_arrays)``; returns a float.
    *arrays : array_like
        Equal-length arrays, resampled together (the same rows from each).
    n_resamples : int
        Number of bootstrap resamples.
    confidence : float
        Coverage of the interval, e.g. 0.95.
    seed : int or None
        Seed of the random generator; the same seed gives the same interval.
    strata : array_like, optional
        Group of each row; when given every group is resampled separately and
        keeps its size (stratified bootstrap).

    Returns
    -------
    low, high : float
        Percentiles ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` of
        the resampled statistic. Non-finite statistics are left out; NaN if
        none is finite.
    """
    _check_confidence(confidence)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array")
    data = [np.asarray(a) for a in arrays]
    n = len(data[0])
    if any(len(a) != n for a in data):
        raise ValueError(f"arrays differ in length: {[len(a) for a in data]}")
    groups = np.zeros(n, dtype=np.intp) if strata is None else np.asarray(strata)
    if len(groups) != n:
        raise ValueError(f"strata has length {len(groups)}, arrays have {n}")
    values = [
        float(statistic(*(a[row] for a in data)))
        for block in _resample_blocks(groups, n_resamples, seed)
        for row in block
    ]
    return _percentile_interval(np.asarray(values, dtype=np.float64), confidence)


def bootstrap_auc_ci(
    labels: ArrayLike,
    scores: ArrayLike,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int | None = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the AUC, resampling slides stratified by class.

    Positives and negatives are resampled separately (with replacement, each
    keeping its count), so every resample has both classes. Gives the same
    interval as ``bootstrap_ci(roc_auc, labels, scores, strata=labels)``,
    computed vectorised.

    Parameters
    ----------
    labels, scores : (N,) arrays
        As for :func:`~napari_pathology.analysis.metrics.roc_auc`.
    n_resamples, confidence, seed
        As for :func:`bootstrap_ci`.

    Returns
    -------
    low, high : float
        The interval.
    """
    y, s = _check_binary(labels, scores)
    _check_confidence(confidence)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    m, n = int(y.sum()), int((~y).sum())
    aucs = []
    for block in _resample_blocks(y, n_resamples, seed):
        # np.unique order puts the negatives (False) first, then the positives
        ranks = stats.rankdata(s[block], axis=1)
        aucs.append((ranks[:, n:].sum(axis=1) - m * (m + 1) / 2) / (m * n))
    return _percentile_interval(np.concatenate(aucs), confidence)


# --------------------------------------------------------------------------- DeLong


def delong_variance(labels: ArrayLike, scores: ArrayLike) -> tuple[float, float]:
    """AUC and its DeLong variance (the fast midrank algorithm of Sun & Xu 2014).

    With ``m`` positives ``X`` and ``n`` negatives ``Y`` the structural
    components are ``V10(x) = mean_y psi(x, y)`` and ``V01(y) = mean_x psi(x, y)``
    (``psi`` = 1, 1/2 or 0 as ``x`` is above, tied with or below ``y``), and
    ``var = var(V10) / m + var(V01) / n`` with sample (``ddof=1``) variances.

    Parameters
    ----------
    labels, scores : (N,) arrays
        As for :func:`~napari_pathology.analysis.metrics.roc_auc`.

    Returns
    -------
    auc, variance : float
        The variance is NaN when a class has a single member.
    """
    y, s = _check_binary(labels, scores)
    x_pos, y_neg = s[y], s[~y]
    m, n = len(x_pos), len(y_neg)
    tx = stats.rankdata(x_pos)
    ty = stats.rankdata(y_neg)
    tz = stats.rankdata(np.concatenate([x_pos, y_neg]))
    auc = (tz[:m].sum() - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:m] - tx) / n
    v01 = 1.0 - (tz[m:] - ty) / m
    if m < 2 or n < 2:
        return float(auc), math.nan
    variance = np.var(v10, ddof=1) / m + np.var(v01, ddof=1) / n
    return float(auc), float(variance)


def delong_ci(labels: ArrayLike, scores: ArrayLike, confidence: float = 0.95) -> tuple[float, float, float]:
    """AUC with a normal-approximation confidence interval from DeLong's variance.

    Parameters
    ----------
    labels, scores : (N,) arrays
        As for :func:`~napari_pathology.analysis.metrics.roc_auc`.
    confidence : float
        Coverage of the interval.

    Returns
    -------
    auc, low, high : float
        ``auc -/+ z * sqrt(variance)`` clipped to [0, 1]. When the variance is
        0 (e.g. perfect separation) the interval is ``(auc, auc)``; when a class
        has a single member it is ``(nan, nan)``.
    """
    _check_confidence(confidence)
    auc, variance = delong_variance(labels, scores)
    if math.isnan(variance):
        return auc, math.nan, math.nan
    if variance <= 0.0:
        return auc, auc, auc
    half = float(stats.norm.ppf(0.5 + confidence / 2)) * math.sqrt(variance)
    return auc, max(0.0, auc - half), min(1.0, auc + half)


# --------------------------------------------------------------------------- slide AUC summary


def _json_float(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class AUCResult:
    """Slide-level AUC with bootstrap and DeLong confidence intervals."""

    auc: float
    bootstrap_ci: tuple[float, float]
    delong_ci: tuple[float, float]
    n_positive: int
    n_negative: int
    confidence: float = 0.95

    def __str__(self) -> str:
        b_low, b_high = self.bootstrap_ci
        d_low, d_high = self.delong_ci
        return (
            f"AUC {self.auc:.3f} ({self.confidence * 100:g}% CI {b_low:.2f}-{b_high:.2f} bootstrap, "
            f"{d_low:.2f}-{d_high:.2f} DeLong; {self.n_positive} positive, {self.n_negative} negative)"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dictionary (NaN becomes None)."""
        return {
            "auc": _json_float(self.auc),
            "bootstrap_ci": [_json_float(v) for v in self.bootstrap_ci],
            "delong_ci": [_json_float(v) for v in self.delong_ci],
            "n_positive": int(self.n_positive),
            "n_negative": int(self.n_negative),
            "confidence": float(self.confidence),
        }


def slide_auc(
    labels: ArrayLike,
    scores: ArrayLike,
    n_resamples: int = 2000,
    seed: int | None = 0,
    confidence: float = 0.95,
) -> AUCResult:
    """Slide-level AUC with stratified bootstrap and DeLong confidence intervals.

    Parameters
    ----------
    labels, scores : (N,) arrays
        One entry per slide, as for :func:`~napari_pathology.analysis.metrics.roc_auc`.
    n_resamples, seed
        As for :func:`bootstrap_ci`.
    confidence : float
        Coverage of both intervals.

    Returns
    -------
    AUCResult
        The AUC, both intervals and the class counts.
    """
    y, s = _check_binary(labels, scores)
    auc, d_low, d_high = delong_ci(y, s, confidence)
    b_ci = bootstrap_auc_ci(y, s, n_resamples=n_resamples, confidence=confidence, seed=seed)
    return AUCResult(
        auc=auc,
        bootstrap_ci=b_ci,
        delong_ci=(d_low, d_high),
        n_positive=int(y.sum()),
        n_negative=int((~y).sum()),
        confidence=confidence,
    )
