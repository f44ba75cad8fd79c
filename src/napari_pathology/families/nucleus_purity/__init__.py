"""The ``nucleus-purity`` family: a small CNN on a patch around each nucleus (nucleus input).

Network and registered spec in :mod:`.model`, labelled nuclei (and from
files) in :mod:`.data`, the split and purity error by region in
:mod:`.regions`, patches and batches in :mod:`.patches`, validation and
evaluation in :mod:`.evaluate`, the trainer and its settings in :mod:`.train`.
"""

from __future__ import annotations

import os
import threading
from typing import Any, ClassVar

from napari_pathology.families.base import Family

__all__ = ["FAMILY", "NucleusPurityFamily"]


class NucleusPurityFamily(Family):
    """Tumour probability of every nucleus; purity is their mean. Trained from labelled nuclei."""

    name = "nucleus-purity"
    input_kind = "nucleus"
    title = "nucleus tumour/normal classifier (tumour purity)"
    data_sources = ("nuclei",)
    best_metric = "val_loss"
    best_mode = "min"
    demo_weights: ClassVar[dict[str, str]] = {"nucleus-purity": "nucleus-purity-demo.pt"}

    def register_models(self) -> None:
        """Import the model module: its builders and specs register."""
        from napari_pathology.families.nucleus_purity import model  # noqa: F401  (registers the spec)

    @property
    def settings(self) -> type:  # type: ignore[override]
        """The training settings dataclass."""
        from napari_pathology.families.nucleus_purity.train import NucleusPurityTraining

        return NucleusPurityTraining

    def read_data(self, path: str | os.PathLike[str]) -> Any:
        """Labelled nuclei from a slide (its autosave) or a CSV of slides."""
        from napari_pathology.families.nucleus_purity.data import read_nucleus_training_data

        return read_nucleus_training_data(path)

    def train(
        self, settings: Any, data: Any, out: str | os.PathLike[str], stop: threading.Event | None = None
    ) -> Any:
        """The family's trainer behind the one signature (see :meth:`Family.train`)."""
        from napari_pathology.families.nucleus_purity.train import train_nucleus_purity

        return train_nucleus_purity(data, out, settings, start=settings.start, stop=stop)


FAMILY = NucleusPurityFamily()
