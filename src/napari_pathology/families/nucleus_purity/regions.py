"""Regions of labelled nuclei: the train/validation split by region and the purity error per region.

Neighbouring nuclei have overlapping patches, so they never straddle the
split: nuclei are grouped by the region a person drew, else by square blocks
of ``block_um`` micrometres, and whole groups are held out. No Qt, no napari.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from napari_pathology.families.nucleus_purity.data import LabelledNuclei
from napari_pathology.training.events import TrainingError

__all__ = ["group_ids", "region_keys", "region_purity_rmse", "split_by_region"]


def region_keys(data: LabelledNuclei, block_um: float, drawn_regions: bool = True) -> list[tuple[Any, ...]]:
    """One hashable region key per nucleus: the drawn region (if used), else the ``block_um`` block."""
    blocks = np.floor(data.xy_um / block_um).astype(np.int64)
    drawn = np.full(len(data), -1, np.int64)
    if drawn_regions and data.region_ids is not None:
        drawn = data.region_ids
    return [
        ("region", int(r)) if r >= 0 else ("block", int(bx), int(by))
        for r, (bx, by) in zip(drawn.tolist(), blocks.tolist(), strict=True)
    ]


def group_ids(keys: list[tuple[Any, ...]]) -> np.ndarray:
    """``(N,)`` int64 group index of each region key."""
    if not keys:
        return np.zeros(0, np.int64)
    return np.unique(np.array([repr(k) for k in keys]), return_inverse=True)[1].astype(np.int64)


def split_by_region(
    groups: np.ndarray, labels: np.ndarray, fraction: float, seed: int, tries: int = 200
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean ``(train, validation)`` masks holding out whole groups (regions), about ``fraction`` of nuclei.

    Groups are drawn in a random order until the validation side reaches the
    share; up to ``tries`` orders are drawn until both sides hold both classes.

    Raises
    ------
    TrainingError
        When no split keeps both classes on both sides (too few regions of one class).

    """
    n = len(groups)
    if fraction == 0:
        return np.ones(n, bool), np.zeros(n, bool)
    unique, inverse = np.unique(groups, return_inverse=True)
    if len(unique) < 2:
        raise TrainingError(
            "all labelled nuclei are in one region: draw more regions (or label nuclei in more places), "
            "or set the validation fraction to 0"
        )
    sizes = np.bincount(inverse, minlength=len(unique))
    rng = np.random.default_rng(seed)
    target = fraction * n
    for _ in range(tries):
        order = rng.permutation(len(unique))
        count = np.cumsum(sizes[order])
        k = int(np.searchsorted(count, target)) + 1
        k = min(max(k, 1), len(unique) - 1)
        val = np.isin(inverse, order[:k])
        if 0 < labels[val].sum() < val.sum() and 0 < labels[~val].sum() < (~val).sum():
            return ~val, val
    raise TrainingError(
        "cannot hold out regions with both tumour and normal nuclei while keeping both in training: "
        "label both classes in more regions, or set the validation fraction to 0"
    )


def region_purity_rmse(
    is_tumour: np.ndarray, probabilities: np.ndarray, groups: np.ndarray, min_nuclei: int = 10
) -> tuple[float, int]:
    """RMSE of predicted (mean probability) vs true (tumour share) purity over groups with ``min_nuclei``.

    Returns ``(rmse, regions)``; the RMSE is NaN when no group is large enough.
    """
    unique, inverse = np.unique(groups, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(unique))
    truth = np.bincount(inverse, weights=np.asarray(is_tumour, np.float64), minlength=len(unique))
    predicted = np.bincount(inverse, weights=np.asarray(probabilities, np.float64), minlength=len(unique))
    keep = counts >= min_nuclei
    if not keep.any():
        return math.nan, 0
    error = (predicted[keep] - truth[keep]) / counts[keep]
    return float(np.sqrt(np.mean(error**2))), int(keep.sum())
