"""Nucleus detection (no Qt, no napari)."""

from .detect import (
    DETECTORS,
    NucleusDetector,
    NucleusParams,
    NucleusTable,
    detect_nuclei,
    detection_scores,
    match_points,
)

__all__ = [
    "DETECTORS",
    "NucleusDetector",
    "NucleusParams",
    "NucleusTable",
    "detect_nuclei",
    "detection_scores",
    "match_points",
]
