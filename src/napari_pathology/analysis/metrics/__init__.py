"""Evaluation metrics for slide classification and lesion detection (no Qt).

Implements the measures of Liu et al. 2017 (Camelyon16: slide-level ROC AUC
and lesion-level FROC) and Noorbakhsh et al. 2020 (AUC with bootstrap and
DeLong confidence intervals, confusion-matrix metrics, Pearson correlation).

Labels are boolean or 0/1 (``1`` / ``True`` = positive, e.g. tumour); scores
are any real numbers where higher means "more positive".

Layout: :mod:`~napari_pathology.analysis.metrics.roc` (ROC curve, AUC),
:mod:`~napari_pathology.analysis.metrics.intervals` (bootstrap and DeLong
intervals, :func:`slide_auc`), :mod:`~napari_pathology.analysis.metrics.froc`
(lesion FROC) and :mod:`~napari_pathology.analysis.metrics.binary`
(confusion-matrix metrics, Pearson r); every name is importable from here.
"""

from napari_pathology.analysis.metrics.binary import binary_metrics, pearson_r
from napari_pathology.analysis.metrics.froc import FROCResult, SlideDetections, froc
from napari_pathology.analysis.metrics.intervals import (
    AUCResult,
    bootstrap_auc_ci,
    bootstrap_ci,
    delong_ci,
    delong_variance,
    slide_auc,
)
from napari_pathology.analysis.metrics.roc import roc_auc, roc_curve

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
