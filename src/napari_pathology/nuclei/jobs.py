"""Panel jobs as generators of :class:`~napari_pathology.progress.Progress` (no Qt: run in any thread)."""

from __future__ import annotations

import threading
from collections.abc import Generator
from typing import Any

from napari_pathology._layers import slide_from_metadata
from napari_pathology.nuclei.points import NucleusPoints
from napari_pathology.progress import Progress


def detection_job(
    metadata: dict[str, Any],
    region: str,
    box_um: tuple[float, float, float, float] | None,
    params: Any,
    tissue: Any,
    cancel: threading.Event | None = None,
) -> Generator[Progress, None, NucleusPoints]:
    """Detect nuclei in a box (or over the tissue), off the Qt thread."""
    from napari_pathology.analysis import tissue_or_detect
    from napari_pathology.nuclei.run import detect_in_slide

    slide = slide_from_metadata(metadata)
    slide.require_mpp()
    if region == "tissue":
        tissue = yield from tissue_or_detect(slide, tissue)
    table = yield from detect_in_slide(slide, region_um=box_um, tissue=tissue, params=params, cancel=cancel)
    return NucleusPoints.from_table(table, source="detected")
