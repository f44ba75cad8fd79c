"""Checks shared by every reader: finite, on-slide centroids and sane measurements."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

#: Largest coordinate accepted anywhere, in micrometres (10 m: far beyond any slide; catches 1e12).
MAX_COORDINATE_UM = 1e7


class NucleusFileError(ValueError):
    """A nucleus annotation file that cannot be read (the message names the file and the fix)."""


def check_centroids(
    x_um: np.ndarray,
    y_um: np.ndarray,
    extent_um: tuple[float, float] | None = None,
    where: Callable[[int], str] = lambda i: f"row {i + 1}",
) -> None:
    """Refuse non-finite, negative, absurd or (given the slide's extent) out-of-slide centroids.

    Parameters
    ----------
    x_um, y_um : ndarray
        Centroids in slide micrometres (origin at the slide's top-left corner).
    extent_um : (width_um, height_um), optional
        The slide's size; centroids beyond it are refused.
    where : callable
        Names entry ``i`` in the message (``"row 7"``, ``"feature 3"``).

    Raises
    ------
    ValueError
        Naming the first bad entry, its values and the likely cause.

    """
    x = np.asarray(x_um, np.float64).reshape(-1)
    y = np.asarray(y_um, np.float64).reshape(-1)
    finite = np.isfinite(x) & np.isfinite(y)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        raise ValueError(
            f"{where(i)}: centroid ({float(x[i])!r}, {float(y[i])!r}) is not a pair of finite numbers; "
            "every nucleus needs a finite x and y"
        )
    limit_x, limit_y = (MAX_COORDINATE_UM, MAX_COORDINATE_UM) if extent_um is None else extent_um
    slack_x, slack_y = 1e-9 * (1 + abs(limit_x)), 1e-9 * (1 + abs(limit_y))  # float rounding at the edge
    outside = (x < -slack_x) | (y < -slack_y) | (x > limit_x + slack_x) | (y > limit_y + slack_y)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        size = (
            f"the slide ({limit_x:.1f} x {limit_y:.1f} um)"
            if extent_um is not None
            else f"any slide (0 to {MAX_COORDINATE_UM:g} um)"
        )
        raise ValueError(
            f"{where(i)}: centroid ({x[i]:.6g}, {y[i]:.6g}) um lies outside {size}; "
            f"{int(outside.sum())} of {len(x)} nuclei do: wrong slide, or pixels read as micrometres?"
        )


def _check_measurements(probability: np.ndarray, area: np.ndarray, where: Callable[[int], str]) -> None:
    """Probabilities in [0, 1] and areas >= 0 (finite), or NaN for unknown."""
    p = np.asarray(probability, np.float64)
    bad = ~np.isnan(p) & ~((p >= 0) & (p <= 1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{where(i)}: probability {p[i]!r} is not in [0, 1] (leave it empty when unknown)")
    a = np.asarray(area, np.float64)
    bad = ~np.isnan(a) & ~(np.isfinite(a) & (a >= 0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{where(i)}: area {a[i]!r} um^2 is not a finite number >= 0 (leave it empty)")
