"""Lesion-level free-response ROC with the Camelyon16 rules (Liu et al. 2017)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from skimage.measure import points_in_poly

__all__ = ["FROCResult", "SlideDetections", "froc"]


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
