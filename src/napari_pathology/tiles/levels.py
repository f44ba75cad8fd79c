"""Which pyramid level to read a slide from at a target um/px (the one rule every reader follows).

:func:`level_for_mpp` picks the coarsest level that is not coarser than the
target (within a tolerance); :func:`reads_directly` says whether that level
can be read as it is, without resampling. Tile grids, patches anywhere,
nucleus patches and whole-slide reads (tissue detection) all choose their
level here; :func:`napari_pathology.tiles.read.read_box` then reads the box.
No Qt, no napari.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["MPP_TOLERANCE", "level_for_mpp", "reads_directly"]

#: Relative um/px difference read without resampling (and by which a level may be coarser).
MPP_TOLERANCE = 0.05


def level_for_mpp(
    slide: Any,
    target_mpp: float,
    *,
    mpp: Sequence[float] | None = None,
    tolerance: float = MPP_TOLERANCE,
    enlarge: bool = False,
) -> int:
    """The coarsest pyramid level whose um/px is at most ``target_mpp * (1 + tolerance)``.

    Parameters
    ----------
    slide : Slide
        An opened slide (``level_downsamples``, ``require_mpp()``, ``name``).
    target_mpp : float
        The um/px the caller wants.
    mpp : (float, float), optional
        The slide's level-0 ``(mpp_x, mpp_y)`` (default ``slide.require_mpp()``).
    tolerance : float
        Relative amount by which the level may be coarser than the target.
    enlarge : bool
        When no level is fine enough, return level 0 (the caller enlarges it)
        instead of refusing.

    Raises
    ------
    ValueError
        When no level is fine enough and ``enlarge`` is False: one line
        saying that the slide was scanned coarser than the target.
    SlideOpenError
        When ``mpp`` is not given and the slide has no um/px.

    """
    coarsest = max(float(v) for v in (slide.require_mpp() if mpp is None else mpp))
    downsamples = [float(d) for d in slide.level_downsamples]
    limit = float(target_mpp) * (1.0 + tolerance)
    best: int | None = None
    for level, ds in enumerate(downsamples):
        if coarsest * ds <= limit and (best is None or ds > downsamples[best]):
            best = level
    if best is not None:
        return best
    if enlarge:
        return 0
    finest = coarsest * min(downsamples)
    raise ValueError(
        f"The slide {slide.name} ({finest:.4g} um/px at full resolution) cannot reach the model's "
        f"{target_mpp:.4g} um/px: it was scanned at a lower magnification than the model needs "
        f"(tolerance {tolerance:.0%}). Use a model for a coarser um/px, or check the slide's um/px."
    )


def reads_directly(level_mpp: Sequence[float], target_mpp: float, tolerance: float = MPP_TOLERANCE) -> bool:
    """Whether a level of ``level_mpp = (x, y)`` um/px is read as it is at ``target_mpp`` (no resampling)."""
    return all(abs(float(m) / float(target_mpp) - 1.0) <= tolerance for m in level_mpp)
