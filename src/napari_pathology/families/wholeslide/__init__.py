"""The ``wholeslide`` family: Chen et al. 2021's whole-slide CNN, trained on slide labels (slide input).

The network (a ResNet with frozen BatchNorm, global max pooling and a
linear head) and its registered spec are in :mod:`.model`; which input crop
each tile needs (the layers' receptive spans, sizes, stride) in
:mod:`.tiling`; the exact tile-by-tile forward and backward passes that
bound the memory of a training step by the tile, the tile choosers from a
memory budget and the tile-by-tile class activation maps in
:mod:`.streaming`; the settings and the trainer on a slide table in
:mod:`.train`. It runs on a slide through the ``slide`` runner
(:mod:`napari_pathology.analysis.wholeslide`): class probabilities and the
class activation map. No Qt, no napari.
"""

from __future__ import annotations

import os
import threading
from typing import Any, ClassVar

from napari_pathology.families.base import Family

__all__ = ["FAMILY", "WholeSlideFamily"]


class WholeSlideFamily(Family):
    """Slide classes from slide labels: one CNN over the whole slide at low magnification, with its CAM."""

    name = "wholeslide"
    input_kind = "slide"
    title = "Whole-slide CNN with global max pooling and class activation maps (Chen et al. 2021)"
    data_sources = ("slide_table",)
    best_metric = "val_loss"
    best_mode = "min"
    #: Trained on synthetic slides by scripts/train_wholeslide_demo.py (registered once the file is there).
    demo_weights: ClassVar[dict[str, str]] = {"wholeslide-demo": "wholeslide-demo.pt"}

    def register_models(self) -> None:
        """Import the model module: its builder and spec register."""
        from napari_pathology.families.wholeslide import model  # noqa: F401  (registers the spec)

    @property
    def settings(self) -> type:  # type: ignore[override]
        """The training settings dataclass."""
        from napari_pathology.families.wholeslide.train import WholeSlideTraining

        return WholeSlideTraining

    def check_table(self, entries: list[Any]) -> dict[str, Any]:
        """Refuse a slide table the network cannot learn from (unlabelled slides, one class)."""
        from napari_pathology.families.wholeslide.train import table_classes

        table_classes(entries, None)
        return {}

    def train(
        self, settings: Any, data: Any, out: str | os.PathLike[str], stop: threading.Event | None = None
    ) -> Any:
        """The family's trainer behind the one signature (see :meth:`Family.train`)."""
        from napari_pathology.families.wholeslide.train import train_from_family

        return train_from_family(settings, data, out, stop)


FAMILY = WholeSlideFamily()
