"""Slides held in memory: numpy levels or any array-like (tests, procedural slides)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from napari_pathology.slide.backends.base import BaseBackend, to_rgb_uint8


class InMemoryBackend(BaseBackend):
    """Levels held as numpy arrays or any array-like with ``shape`` and slicing.

    Parameters
    ----------
    levels : sequence of array-like
        ``(height, width, 3)`` (or gray / RGBA) arrays, level 0 first. Objects
        that compute pixels on demand (a procedural slide) are fine: only the
        requested region is sliced.
    mpp : float or (float, float), optional
        Micrometres per pixel at level 0.
    tile_size : int
        The tile grid reported for chunking.
    objective_power : float, optional
        Nominal objective magnification.
    associated_images : mapping, optional
        Extra named images (label, macro, thumbnail).
    vendor : str
        Shown in slide facts.

    """

    name = "memory"

    def __init__(
        self,
        levels: Sequence[Any],
        mpp: float | tuple[float, float] | None = None,
        *,
        tile_size: int = 256,
        objective_power: float | None = None,
        associated_images: Mapping[str, np.ndarray] | None = None,
        vendor: str = "memory",
        path: str | None = None,
    ) -> None:
        super().__init__()
        if not levels:
            raise ValueError("an in-memory slide needs at least one level")
        self._levels = list(levels)
        self.path = path
        self.vendor = vendor
        self.level_dimensions = tuple((int(a.shape[1]), int(a.shape[0])) for a in self._levels)
        w0 = self.level_dimensions[0][0]
        self.level_downsamples = tuple(w0 / w for w, _ in self.level_dimensions)
        self.tile_sizes = tuple((tile_size, tile_size) for _ in self._levels)
        if mpp is None:
            self.mpp, self.mpp_note = None, "no um/px was given"
        else:
            mx, my = (mpp, mpp) if np.isscalar(mpp) else mpp  # type: ignore[misc]
            self.mpp, self.mpp_note = (float(mx), float(my)), "given"
        self.objective_power = objective_power
        self._associated = dict(associated_images or {})
        self.associated_image_names = tuple(self._associated)
        self.properties = {}

    def _read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        return to_rgb_uint8(np.asarray(self._levels[level][y : y + height, x : x + width]))

    def read_associated_image(self, name: str) -> np.ndarray:
        """Return a stored associated image."""
        if name in self._associated:
            return to_rgb_uint8(self._associated[name])
        return super().read_associated_image(name)
