"""Evaluation metrics for slide classification and lesion detection (no Qt).

Implements the measures of Liu et al. 2017 (Camelyon16: slide-level ROC AUC
and lesion-level FROC) and Noorbakhsh et al. 2020 (AUC with bootstrap and
DeLong confidence intervals, confusion-matrix metrics, Pearson correlation).

Labels are boolean or 0/1 (``1`` / ``True`` = positive, e.g. tumour); scores
are any real numbers where higher means "more positive".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats
from skimage.measure import points_in_poly

__all__ = [
    "AUCResult",
    "FROCResult",
    "SlideDetections",
    "binary_metrics",
    "bootstrap_auc_ci",
    "bootstrap_ci",
    "delong_ci",
    "delong_variance",
    "froc",
    "pearson_r",
    "roc_auc",
    "roc_curve",
    "slide_auc",
]

#: Number of array cells a bootstrap block may hold (resamples x samples).
_BLOCK_CELLS = 4_000_000


# --------------------------------------------------------------------------- input checks


def _as_labels(labels: ArrayLike, name: str = "labels") -> np.ndarray:
    """Labels as a 1-D bool array; only bool or 0/1 values are accepted."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if arr.size and not (np.issubdtype(arr.dtype, np.number) and np.isin(arr, (0, 1)).all()):
        raise ValueError(f"{name} must be bool or 0/1, got values {np.unique(arr)[:5].tolist()}")
    return arr.astype(bool)


def _check_binary(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(labels, scores)`` for the AUC functions."""
    y = _as_labels(labels)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    if len(y) != len(s):
        raise ValueError(f"labels and scores differ in length: {len(y)} vs {len(s)}")
    if np.isnan(s).any():
        raise ValueError(f"scores contain {int(np.isnan(s).sum())} NaN value(s)")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        only = "positive" if n_pos else "negative"
        raise ValueError(f"AUC needs both classes, but all {len(y)} labels are {only}")
    return y, s


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1 (exclusive), got {confidence}")


# --------------------------------------------------------------------------- ROC


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
        As for :func:`roc_auc`.
    n_resamples : int
        Number of bootstrap resamples.
    confidence : float
        Coverage of the interval.
    seed : int or None
        Seed of the random generator.

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
        As for :func:`roc_auc`.

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
        As for :func:`roc_auc`.
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
        One entry per slide, as for :func:`roc_auc`.
    n_resamples : int
        Bootstrap resamples.
    seed : int or None
        Bootstrap seed.
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


# --------------------------------------------------------------------------- FROC


@dataclass(frozen=True, eq=False)
class SlideDetections:
    """Detections and ground-truth lesions of one slide, in micrometres.

    Attributes
    ----------
    name : str
        Slide name (for messages).
    detections : (N, 3) float array
        ``x_um, y_um, score`` per detection; an empty array means none.
    lesions : list of (M, 2) float arrays
        Outer ring of each annotated lesion as ``(x_um, y_um)`` vertices
        (M >= 3; holes are not modelled). No lesions = tumour-negative slide.
    """

    name: str
    detections: np.ndarray
    lesions: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        det = np.asarray(self.detections, dtype=np.float64)
        if det.size == 0:
            det = det.reshape(0, 3)
        if det.ndim != 2 or det.shape[1] != 3:
            raise ValueError(
                f"slide {self.name!r}: detections must be (N, 3) x_um, y_um, score; got shape {det.shape}"
            )
        if not np.isfinite(det).all():
            raise ValueError(f"slide {self.name!r}: detections contain NaN or infinite values")
        lesions = []
        for i, polygon in enumerate(self.lesions):
            poly = np.asarray(polygon, dtype=np.float64)
            if poly.ndim != 2 or poly.shape[1] != 2 or len(poly) < 3:
                raise ValueError(
                    f"slide {self.name!r}: lesion {i} must be an (M, 2) array of at least 3 (x_um, y_um) "
                    f"vertices; got shape {poly.shape}"
                )
            lesions.append(poly)
        object.__setattr__(self, "detections", det)
        object.__setattr__(self, "lesions", lesions)

    @property
    def is_negative(self) -> bool:
        """True for a tumour-negative slide (no lesions)."""
        return not self.lesions


@dataclass(frozen=True, eq=False)
class FROCResult:
    """Free-response ROC: lesion sensitivity against average false positives per slide.

    Attributes
    ----------
    score : float
        Mean of ``sensitivities`` (the Camelyon16 FROC score).
    sensitivities : dict
        Sensitivity at each requested false-positive rate.
    curve_fps, curve_sensitivity, curve_thresholds : 1-D float arrays
        One point per distinct detection score, descending: average false
        positives and sensitivity counting detections ``>= threshold``.
    n_lesions : int
        Lesions to be found (isolated tumour cells excluded).
    n_negative_slides, n_slides : int
        Tumour-negative slides and all slides.
    fp_per : {"negative", "all"}
        Which slides the false positives were counted and averaged over.
    n_ignored_lesions : int
        Lesions excluded as isolated tumour cells (``min_lesion_um``).
    """

    score: float
    sensitivities: dict[float, float]
    curve_fps: np.ndarray
    curve_sensitivity: np.ndarray
    curve_thresholds: np.ndarray
    n_lesions: int
    n_negative_slides: int
    n_slides: int = 0
    fp_per: str = "negative"
    n_ignored_lesions: int = 0

    def sensitivity_at(self, fp: float) -> float:
        """Highest sensitivity on the curve with average false positives <= ``fp`` (0 if none)."""
        return _sensitivity_at(self.curve_fps, self.curve_sensitivity, fp)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dictionary; sensitivities keyed by the rate written with ``%g``."""
        return {
            "score": float(self.score),
            "sensitivities": {f"{rate:g}": float(sens) for rate, sens in self.sensitivities.items()},
            "curve_fps": [float(v) for v in self.curve_fps],
            "curve_sensitivity": [float(v) for v in self.curve_sensitivity],
            "curve_thresholds": [float(v) for v in self.curve_thresholds],
            "n_lesions": int(self.n_lesions),
            "n_negative_slides": int(self.n_negative_slides),
            "n_slides": int(self.n_slides),
            "fp_per": self.fp_per,
            "n_ignored_lesions": int(self.n_ignored_lesions),
        }

    def __str__(self) -> str:
        per = "negative slide" if self.fp_per == "negative" else "slide"
        points = ", ".join(f"{rate:g}: {sens:.3f}" for rate, sens in self.sensitivities.items())
        return (
            f"FROC {self.score:.3f} ({self.n_lesions} lesions, {self.n_negative_slides} negative of "
            f"{self.n_slides} slides; sensitivity at FP per {per} {points})"
        )


def _sensitivity_at(fps: np.ndarray, sensitivity: np.ndarray, rate: float) -> float:
    # a small tolerance so that e.g. 3 FPs / 12 slides counts as <= 0.25
    reached = sensitivity[fps <= rate + 1e-9]
    return float(reached.max()) if reached.size else 0.0


def _longest_side(polygon: np.ndarray) -> float:
    return float((polygon.max(axis=0) - polygon.min(axis=0)).max())


def froc(
    slides: Sequence[SlideDetections],
    fp_rates: Sequence[float] = (0.25, 0.5, 1, 2, 4, 8),
    fp_per: Literal["negative", "all"] = "negative",
    min_lesion_um: float | None = None,
) -> FROCResult:
    """Lesion-level FROC with the Camelyon16 rules (Liu et al. 2017).

    Rules, for the detections at or above a threshold:

    - a detection inside a lesion polygon hits that lesion; inside several
      overlapping lesions it hits all of them;
    - a lesion counts once, found by its best-scoring hit; further hits on it
      are neither true nor false positives;
    - a detection outside every lesion is a false positive;
    - with ``min_lesion_um``, a lesion whose bounding box's longest side is
      below it is an isolated-tumour-cell lesion: it need not be found (not
      in the sensitivity) and detections on it are not false positives.

    The threshold sweeps every distinct detection score, descending. The
    sensitivity at a false-positive rate is the highest sensitivity reached
    with average false positives ``<=`` that rate: step-wise, no
    interpolation, 0 if even the highest threshold has more.

    Parameters
    ----------
    slides : sequence of SlideDetections
        Tumour and tumour-negative slides.
    fp_rates : sequence of float
        Average false positives per slide at which to read the sensitivity.
    fp_per : {"negative", "all"}
        ``"negative"``: false positives on tumour-negative slides divided by
        their number (FP per negative slide). ``"all"``: false positives on
        all slides divided by the number of slides (the official Camelyon16
        evaluation script).
    min_lesion_um : float, optional
        Size below which lesions are isolated tumour cells.

    Returns
    -------
    FROCResult
        Score (mean sensitivity over ``fp_rates``), the sensitivities and the curve.

    Raises
    ------
    ValueError
        No slides or no lesions to find, ``fp_per="negative"`` without
        negative slides, an unknown ``fp_per`` or a bad rate.
    """
    if fp_per not in ("negative", "all"):
        raise ValueError(f"fp_per must be 'negative' or 'all', got {fp_per!r}")
    rates = [float(r) for r in fp_rates]
    if not rates or any(not math.isfinite(r) or r < 0 for r in rates):
        raise ValueError(f"fp_rates must be non-empty, finite and >= 0, got {list(fp_rates)}")
    if not slides:
        raise ValueError("froc needs at least one slide")
    for slide in slides:
        if not isinstance(slide, SlideDetections):
            raise TypeError(f"slides must be SlideDetections, got {type(slide).__name__}")
    n_negative = sum(slide.is_negative for slide in slides)
    if fp_per == "negative" and n_negative == 0:
        raise ValueError("fp_per='negative' needs at least one tumour-negative slide (one without lesions)")

    lesion_best: list[float] = []  # best hit score per counted lesion (-inf: never hit)
    fp_scores: list[np.ndarray] = []
    all_scores: list[np.ndarray] = []
    n_ignored = 0
    for slide in slides:
        points, scores = slide.detections[:, :2], slide.detections[:, 2]
        all_scores.append(scores)
        inside_any = np.zeros(len(scores), dtype=bool)
        for polygon in slide.lesions:
            inside = points_in_poly(points, polygon) if len(points) else inside_any.copy()
            inside_any |= inside
            if min_lesion_um is not None and _longest_side(polygon) < min_lesion_um:
                n_ignored += 1
                continue
            lesion_best.append(float(scores[inside].max()) if inside.any() else -math.inf)
        if fp_per == "all" or slide.is_negative:
            fp_scores.append(scores[~inside_any])

    n_lesions = len(lesion_best)
    if n_lesions == 0:
        why = f" ({n_ignored} smaller than min_lesion_um={min_lesion_um})" if n_ignored else ""
        raise ValueError(f"no lesions to find in {len(slides)} slides{why}; FROC needs at least one")
    n_denominator = n_negative if fp_per == "negative" else len(slides)

    thresholds = np.unique(np.concatenate(all_scores))[::-1]
    best = np.sort(np.asarray(lesion_best))
    false = np.sort(np.concatenate(fp_scores)) if fp_scores else np.empty(0)
    # count of values >= t in an ascending array = len - (number of values < t)
    hits = len(best) - np.searchsorted(best, thresholds, side="left")
    fps = len(false) - np.searchsorted(false, thresholds, side="left")
    curve_fps = fps / n_denominator
    curve_sensitivity = hits / n_lesions

    sensitivities = {rate: _sensitivity_at(curve_fps, curve_sensitivity, rate) for rate in rates}
    return FROCResult(
        score=float(np.mean(list(sensitivities.values()))),
        sensitivities=sensitivities,
        curve_fps=curve_fps.astype(np.float64),
        curve_sensitivity=curve_sensitivity.astype(np.float64),
        curve_thresholds=thresholds.astype(np.float64),
        n_lesions=n_lesions,
        n_negative_slides=n_negative,
        n_slides=len(slides),
        fp_per=fp_per,
        n_ignored_lesions=n_ignored,
    )


# --------------------------------------------------------------------------- other metrics


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
