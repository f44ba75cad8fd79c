"""The ``clam`` family: Lu et al. 2021's attention MIL on bags of patch features (bag input).

Networks and registered specs in :mod:`.model`, its losses in
:mod:`.losses`, two-way interop with CLAM's own checkpoints in
:mod:`.interop`, feature files in :mod:`.bags` (read) and :mod:`.extraction`
(written), the trainer and its settings in :mod:`.train`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from napari_pathology.families.base import Family

__all__ = ["FAMILY", "ClamFamily"]


class ClamFamily(Family):
    """Slide classes from slide labels: attention pooling of patch features (CLAM-SB / CLAM-MB)."""

    name = "clam"
    input_kind = "bag"
    title = "CLAM attention MIL from slide labels (Lu et al. 2021)"
    data_sources = ("slide_table",)
    best_metric = "val_loss"
    best_mode = "min"
    #: Trained on synthetic slides by ``scripts/train_clam_demo.py`` (synthetic demo, not for diagnostic use).
    demo_weights: ClassVar[dict[str, str]] = {
        "clam-demo": "clam-demo.pt",
        "clam-subtype-demo": "clam-subtype-demo.pt",
    }

    def register_models(self) -> None:
        """Import the model module: its builder and specs register."""
        from napari_pathology.families.clam import model  # noqa: F401  (registers the specs)

    @property
    def settings(self) -> type:  # type: ignore[override]
        """The training settings dataclass."""
        from napari_pathology.families.clam.train import ClamTraining

        return ClamTraining

    def check_table(self, entries: list[Any]) -> dict[str, Any]:
        """Refuse a slide table CLAM cannot learn from (unlabelled slides, one class); its classes."""
        from napari_pathology.families.clam.train import slide_classes

        return {"classes": slide_classes(entries)}

    def train(
        self, settings: Any, data: Any, out: str | os.PathLike[str], stop: threading.Event | None = None
    ) -> Any:
        """The family's trainer behind the one signature (see :meth:`Family.train`)."""
        from napari_pathology.families.clam.train import train_from_family

        return train_from_family(settings, data, out, stop)

    def import_checkpoint(self, path: str | os.PathLike[str], classes: Any = None) -> Any:
        """A checkpoint written by CLAM's own training code (a bare state dict), else None."""
        from napari_pathology.families.clam.interop import recognise_clam_checkpoint

        return recognise_clam_checkpoint(path, classes)

    def export_formats(self) -> dict[str, Callable[[Any, Path], Path]]:
        """``clam``: a bare state dict that CLAM's ``CLAM_SB``/``CLAM_MB`` load strictly."""
        from napari_pathology.families.clam.interop import export_clam_checkpoint

        return {"clam": export_clam_checkpoint}

    def loss(self) -> Callable[..., Any]:
        """CLAM's total loss with the paper's weights: 0.7 x slide cross-entropy + 0.3 x instance loss."""
        from napari_pathology.families.clam.losses import clam_loss

        return clam_loss(0.7)


FAMILY = ClamFamily()
