"""Input checks shared by the metrics."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


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
