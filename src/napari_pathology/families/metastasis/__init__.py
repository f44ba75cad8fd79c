"""The ``metastasis`` family: Liu et al. 2017's Inception v3 metastasis detector (tile input).

Networks and registered specs in :mod:`.model`, patch sampling in
:mod:`.patches`, the trainer and its settings in :mod:`.train`.
"""

from __future__ import annotations

import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from napari_pathology.families.base import Family

__all__ = ["FAMILY", "MetastasisFamily"]


class MetastasisFamily(Family):
    """Tumour-vs-normal patches at 299 px, trained from tumour polygons (drawn or in a slide table)."""

    name = "metastasis"
    input_kind = "tile"
    title = "metastasis detector (Liu et al. 2017, Inception v3)"
    data_sources = ("regions", "slide_table")
    best_metric = "val_loss"
    best_mode = "min"
    demo_weights: ClassVar[dict[str, str]] = {"metastasis": "metastasis-demo.pt"}

    def register_models(self) -> None:
        """Import the model module: its builders and specs register."""
        from napari_pathology.families.metastasis import model  # noqa: F401  (registers the specs)

    @property
    def settings(self) -> type:  # type: ignore[override]
        """The training settings dataclass."""
        from napari_pathology.families.metastasis.train import MetastasisTraining

        return MetastasisTraining

    def check_table(self, entries: list[Any]) -> dict[str, Any]:
        """Refuse a slide table this family cannot train from."""
        from napari_pathology.training.events import TrainingError

        if not any(e.annotations for e in entries):
            raise TrainingError(
                "the slide table has no tumour annotations: a metastasis detector needs tumour polygons "
                "(an 'annotations' column of GeoJSON files)"
            )
        return {}

    def train(
        self, settings: Any, data: Any, out: str | os.PathLike[str], stop: threading.Event | None = None
    ) -> Any:
        """The family's trainer behind the one signature (see :meth:`Family.train`)."""
        from napari_pathology.families.metastasis.train import train_metastasis

        return train_metastasis(replace(settings, data=Path(data), out=Path(out)), stop)


FAMILY = MetastasisFamily()
