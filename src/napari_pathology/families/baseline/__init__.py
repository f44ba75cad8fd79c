"""The ``baseline`` family: the nuclear-density scorer, a fixed (untrained) tile baseline.

Its network and registered specs are in :mod:`.model`.
"""

from __future__ import annotations

from napari_pathology.families.base import Family

__all__ = ["FAMILY", "BaselineFamily"]


class BaselineFamily(Family):
    """Fraction of each tile covered by large haematoxylin-dense nuclei; usable without training."""

    name = "baseline"
    input_kind = "tile"
    title = "nuclear-density baseline (no training)"
    fixed = True

    def register_models(self) -> None:
        """Import the model module: its builders and specs register."""
        from napari_pathology.families.baseline import model  # noqa: F401  (registers the specs)


FAMILY = BaselineFamily()
