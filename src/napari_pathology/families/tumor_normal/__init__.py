"""The ``tumor-normal`` family: Coudray et al. 2018's tile classifier and tumour purity (tile input).

Networks and registered specs in :mod:`.model`, the trunk as a feature
encoder (``tumor-normal-trunk``) in :mod:`.encoder`, the trainer (a head on
cached trunk features) and its settings in :mod:`.train`.
"""

from __future__ import annotations

import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from napari_pathology.families.base import Family

__all__ = ["FAMILY", "TumorNormalFamily"]


class TumorNormalFamily(Family):
    """Tumour/normal (or multi-class) tiles, trained from slide labels in a slide table."""

    name = "tumor-normal"
    input_kind = "tile"
    title = "tumour/normal tile classifier (Coudray et al. 2018)"
    data_sources = ("slide_table",)
    #: The validation's ``score``: the slide AUC of the tumour-predicted fraction (tile accuracy when
    #: the held-out slides are of one class), ties broken by 0.01 x the gap between tumour and normal
    #: slides' mean fraction (see ``train._tpf_validation``).
    best_metric = "score"
    best_mode = "max"
    demo_weights: ClassVar[dict[str, str]] = {"tumor-normal": "tumor-normal-demo.pt"}

    def register_models(self) -> None:
        """Import the model and encoder modules: builders, specs and the trunk encoder register."""
        from napari_pathology.families.tumor_normal import encoder, model  # noqa: F401  (they register)

    @property
    def settings(self) -> type:  # type: ignore[override]
        """The training settings dataclass."""
        from napari_pathology.families.tumor_normal.train import TumorNormalTraining

        return TumorNormalTraining

    def check_table(self, entries: list[Any]) -> dict[str, Any]:
        """Refuse a slide table this family cannot train from."""
        from napari_pathology.families.tumor_normal.train import slide_classes

        slide_classes(entries)  # at least two classes
        return {}

    def train(
        self, settings: Any, data: Any, out: str | os.PathLike[str], stop: threading.Event | None = None
    ) -> Any:
        """The family's trainer behind the one signature (see :meth:`Family.train`)."""
        from napari_pathology.families.tumor_normal.train import train_tumor_normal

        return train_tumor_normal(replace(settings, data=Path(data), out=Path(out)), stop)


FAMILY = TumorNormalFamily()
