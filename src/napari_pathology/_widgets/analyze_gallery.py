"""The Analyze panel's patch gallery: thumbnails of a result's most attended patches.

An attention result (CLAM) keeps the 8 most attended patch centres as its
``detections`` (``x_um, y_um, weight``). :class:`PatchGallery` reads each
patch from the slide at the model's patch size and um/px
(``spec["input_size"]`` px at ``spec["mpp"]``) in a worker thread, shows them
as buttons with their attention weight, and centres the viewer on a patch
when its thumbnail is clicked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QSize, Qt
from qtpy.QtGui import QIcon, QImage, QPixmap
from qtpy.QtWidgets import QGridLayout, QLabel, QToolButton, QVBoxLayout, QWidget

from napari_pathology._widgets._workers import run_in_thread
from napari_pathology.world import world_from_um

if TYPE_CHECKING:
    import napari

    from napari_pathology.analysis import AnalysisResult

#: Side of a thumbnail on screen (px).
THUMB_PX = 72
#: Thumbnails per row.
COLUMNS = 4


def read_thumbnails(slide: Any, centres_um: np.ndarray, size: int, mpp: float) -> list[np.ndarray]:
    """RGB uint8 patches of ``size`` px at ``mpp`` um/px centred on each ``(x, y)`` in ``centres_um``."""
    from napari_pathology.tiles.read import read_patch

    return [read_patch(slide, (float(x), float(y)), size, mpp) for x, y in np.asarray(centres_um)[:, :2]]


def _pixmap(rgb: np.ndarray) -> QPixmap:
    rgb = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)
    height, width = rgb.shape[:2]
    image = QImage(rgb.data, width, height, 3 * width, QImage.Format.Format_RGB888).copy()
    return QPixmap.fromImage(image)


class PatchGallery(QWidget):
    """Thumbnails of a result's top attended patches; a click centres the viewer on the patch.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer to centre.
    """

    def __init__(self, viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = viewer
        self.title = QLabel("")
        self.title.setWordWrap(True)
        self.grid = QGridLayout()
        self.grid.setContentsMargins(0, 0, 0, 0)
        self.buttons: list[QToolButton] = []
        self.centres_world = np.zeros((0, 2))
        self.worker: Any = None
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.title)
        layout.addLayout(self.grid)
        self.setVisible(False)

    def clear(self) -> None:
        """No gallery (a result without attended patches, or none)."""
        for button in self.buttons:
            self.grid.removeWidget(button)
            button.deleteLater()
        self.buttons = []
        self.centres_world = np.zeros((0, 2))
        self.title.setText("")
        self.setVisible(False)

    def show_result(
        self, result: AnalysisResult, slide: Any, placed_factor: tuple[float, float] = (1, 1)
    ) -> None:
        """Show the patches of an attention result (cleared for any other kind).

        Parameters
        ----------
        result : AnalysisResult
            Its ``detections`` are the patch centres (um at the run's um/px) and weights.
        slide : Slide
            The slide to read the thumbnails from.
        placed_factor : (float, float)
            ``(y, x)`` factor from the run's um/px to the slide layer's current one.
        """
        self.clear()
        if result.heatmap_kind != "attention" or not len(result.detections) or slide is None:
            return
        size = int(result.spec.get("input_size") or 256)
        mpp = float(result.spec.get("mpp") or result.slide_mpp[0])
        detections = np.asarray(result.detections, dtype=np.float64)
        world = world_from_um(detections[:, :2], result.slide_mpp)
        self.centres_world = world * np.asarray(placed_factor, dtype=np.float64)
        self.title.setText(
            f"Top {len(detections)} attended patches ({size} px at {mpp:g} um/px; attention weight, "
            "softmax over the slide's patches); click one to go there"
        )
        for index, (_x, _y, weight) in enumerate(detections):
            button = QToolButton()
            button.setText(f"{weight:.3f}")
            button.setToolTip(f"patch {index + 1}: attention weight {weight:.4f}")
            button.setIconSize(QSize(THUMB_PX, THUMB_PX))
            button.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextUnderIcon)
            button.clicked.connect(lambda _=False, i=index: self.go_to(i))
            self.grid.addWidget(button, index // COLUMNS, index % COLUMNS)
            self.buttons.append(button)
        self.setVisible(True)
        self.worker = run_in_thread(
            read_thumbnails, slide, detections, size, mpp, on_done=self._set_thumbnails, on_error=self._failed
        )

    def _set_thumbnails(self, patches: list[np.ndarray]) -> None:
        for button, patch in zip(self.buttons, patches, strict=False):
            button.setIcon(QIcon(_pixmap(patch)))

    def _failed(self, error: BaseException) -> None:
        self.title.setText(f"{self.title.text()} (thumbnails not read: {error})")

    def go_to(self, index: int) -> None:
        """Centre the viewer on patch ``index`` (its world ``(y, x)``)."""
        from napari_pathology._widgets.analyze_layers import _camera

        _camera(self.viewer).center = tuple(float(v) for v in self.centres_world[index])
