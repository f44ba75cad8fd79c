"""Small pieces shared by the panels: slide-layer picker, file choosers, drawn shapes in slide pixels."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import QComboBox, QFileDialog, QFrame, QLineEdit, QScrollArea, QVBoxLayout, QWidget

from napari_pathology._layers import adopt_pixel_shapes, is_slide_metadata
from napari_pathology._widgets._workers import passthrough, run_in_thread, show_failure

__all__ = [  # the worker helpers live in _workers (re-exported for the panels that import them here)
    "CHECKPOINT_FILTER",
    "SlideLayerCombo",
    "choose_checkpoint",
    "choose_folder_into",
    "compact_panel",
    "device_combo",
    "passthrough",
    "run_in_thread",
    "same_path",
    "select_or_add",
    "shape_rings_px",
    "show_failure",
    "watch_viewer",
]

#: Width a panel is laid out for (px): docks stay narrow so the slide keeps the window.
PANEL_WIDTH = 340
#: Characters a combo box needs at least (longer items are elided; the popup shows them whole).
COMBO_CHARS = 14

if TYPE_CHECKING:
    import napari


class SlideLayerCombo(QComboBox):
    """A combo box listing the viewer's slide layers, following the active layer.

    Emits :attr:`changed` when the chosen slide changes (including its metadata).
    """

    changed = Signal()

    def __init__(self, viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = viewer
        self.setToolTip("Slide layer")
        self.currentIndexChanged.connect(lambda _: self.changed.emit())
        viewer.layers.events.inserted.connect(self._sync)
        viewer.layers.events.removed.connect(self._sync)
        viewer.layers.events.changed.connect(self._sync)
        viewer.layers.selection.events.active.connect(self._follow_active)
        watch_viewer(viewer)
        self._sync()

    def slide_layers(self) -> list[napari.layers.Image]:
        """Image layers that hold slides opened by this plugin."""
        return [
            layer
            for layer in self.viewer.layers
            if layer._type_string == "image" and is_slide_metadata(layer.metadata)
        ]

    def current_layer(self) -> napari.layers.Image | None:
        """The chosen slide layer, or None."""
        name = self.currentText()
        for layer in self.slide_layers():
            if layer.name == name:
                return layer
        return None

    def _sync(self, event: Any = None) -> None:
        current = self.currentText()
        names = [layer.name for layer in self.slide_layers()]
        self.blockSignals(True)
        self.clear()
        self.addItems(names)
        if current in names:
            self.setCurrentText(current)
        self.blockSignals(False)
        for layer in self.slide_layers():
            layer.events.metadata.disconnect(self._on_metadata)
            layer.events.metadata.connect(self._on_metadata)
            layer.events.name.disconnect(self._sync)
            layer.events.name.connect(self._sync)
        if self.currentText() != current:
            self.changed.emit()
        elif event is not None:
            self.changed.emit()

    def _on_metadata(self, event: Any = None) -> None:
        self.changed.emit()

    def _follow_active(self, event: Any) -> None:
        layer = event.value
        if layer is not None and is_slide_metadata(getattr(layer, "metadata", {})):
            self.setCurrentText(layer.name)


#: File-dialog filter for model checkpoints.
CHECKPOINT_FILTER = "napari-pathology checkpoints (*.pt *.pth *.ckpt);;All files (*)"


def device_combo() -> QComboBox:
    """A combo of every usable device (CPU and each visible GPU by name); item data is the device id."""
    from napari_pathology.devices import available_devices

    combo = QComboBox()
    for device in available_devices():
        combo.addItem(device.label, device.id)
    return combo


def choose_folder_into(parent: QWidget, edit: QLineEdit, title: str) -> None:
    """Ask for a folder starting at ``edit``'s text and put the choice into ``edit``."""
    folder = QFileDialog.getExistingDirectory(parent, title, edit.text())
    if folder:
        edit.setText(folder)


def choose_checkpoint(parent: QWidget, title: str) -> str:
    """Ask for a checkpoint file; the path, or an empty string when cancelled."""
    path, _ = QFileDialog.getOpenFileName(parent, title, "", CHECKPOINT_FILTER)
    return path


def select_or_add(combo: QComboBox, data: str, label: str) -> None:
    """Select the item whose data is ``data``, adding it as ``label`` first when the combo lacks it."""
    index = combo.findData(data)
    if index < 0:
        combo.addItem(label, data)
        index = combo.count() - 1
    combo.setCurrentIndex(index)


def _ellipse_ring(corners: np.ndarray, n: int = 64) -> np.ndarray:
    """A polygon approximating the ellipse inscribed in napari's four bounding-box corners."""
    centre = corners.mean(0)
    a, b = (corners[1] - corners[0]) / 2, (corners[3] - corners[0]) / 2
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)[:, None]
    return centre + np.cos(t) * a + np.sin(t) * b


def shape_rings_px(shapes_layer: Any, slide_layer: Any) -> list[tuple[int, np.ndarray | None, str]]:
    """Every area shape of a Shapes layer as a ring in a slide's level-0 pixels ``(x, y)``.

    Polygons, rectangles and ellipses count; lines and paths do not. Each vertex
    goes from the shapes layer's data to world coordinates (micrometres), then to
    the slide layer's level-0 data coordinates, then half a pixel on: napari
    centres pixel ``i`` at ``i``, while GeoJSON (QuPath) pixel ``i`` covers ``[i, i + 1)``.

    Returns
    -------
    list of (int, np.ndarray or None, str)
        ``(shape index, ring (n, 2) in px or None, why it was skipped or "")`` per shape.
    """
    out: list[tuple[int, np.ndarray | None, str]] = []
    for index, (data, kind) in enumerate(zip(shapes_layer.data, shapes_layer.shape_type, strict=True)):
        if kind not in ("polygon", "rectangle", "ellipse"):
            out.append((index, None, f"shape {index} is a {kind}, not an area: skipped"))
            continue
        vertices = np.asarray(data, float)
        if kind == "ellipse":
            vertices = _ellipse_ring(vertices)
        world = [shapes_layer.data_to_world(v) for v in vertices]
        pixels = np.array([slide_layer.world_to_data(w)[-2:] for w in world], float) + 0.5
        if len(pixels) < 3:
            out.append((index, None, f"shape {index} has fewer than 3 vertices: skipped"))
            continue
        out.append((index, pixels[:, ::-1], ""))  # (row, col) -> (x, y)
    return out


def same_path(a: str | None, b: str | None) -> bool:
    """Whether two paths name the same file (both None counts as the same)."""
    if a is None or b is None:
        return a is None and b is None
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return str(a) == str(b)


_WATCHED: set[int] = set()


def watch_viewer(viewer: napari.Viewer) -> None:
    """Once per viewer: show the scale bar when a slide opens; adopt pixel-unit Shapes layers.

    napari's own new-shapes button makes a pixel-unit layer when no layer is selected;
    it is put on the slide's micrometres (:func:`napari_pathology._layers.adopt_pixel_shapes`)
    so the scale bar keeps its unit and napari stops warning about inconsistent units.
    """
    import weakref

    if id(viewer) in _WATCHED:
        return
    _WATCHED.add(id(viewer))
    weakref.finalize(viewer, _WATCHED.discard, id(viewer))
    threading.Thread(target=_warm_imports, name="napari-pathology imports", daemon=True).start()
    handler = _inserted_handler(viewer)
    viewer.layers.events.inserted.connect(handler)
    for layer in list(viewer.layers):  # slides opened before the first panel
        if is_slide_metadata(getattr(layer, "metadata", {})):
            handler(SimpleNamespace(value=layer))


def _warm_imports() -> None:
    """Import pandas in the background (~0.4 s).

    napari imports it on the Qt thread when the first points layer with features
    appears (a result's detections): imported beforehand, that moment does not freeze.
    """
    import pandas  # noqa: F401


def _inserted_handler(viewer: napari.Viewer) -> Any:
    """The ``layers.events.inserted`` handler of :func:`watch_viewer` (holds the viewer weakly)."""
    import weakref

    ref = weakref.ref(viewer)

    def inserted(event: Any) -> None:
        viewer = ref()
        layer = getattr(event, "value", None)
        if viewer is None or layer is None:
            return
        if is_slide_metadata(getattr(layer, "metadata", {})):
            from napari_pathology._viewer import show_scale_bar

            show_scale_bar(viewer)
        elif getattr(layer, "_type_string", "") == "shapes":
            slides = [x for x in viewer.layers if is_slide_metadata(getattr(x, "metadata", {}))]
            if slides:
                adopt_pixel_shapes(layer, slides[-1])

    return inserted


def compact_panel(panel: QWidget, scroll: bool = True) -> None:
    """Fit a panel to a narrow dock: combos elide long items, and the panel scrolls when short.

    Parameters
    ----------
    panel : QWidget
        A panel whose layout is set; it is moved into a frameless :class:`QScrollArea`
        (the panel keeps one layout holding the scroll area).
    scroll : bool
        False for panels that already scroll inside.
    """
    for combo in panel.findChildren(QComboBox):
        combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        combo.setMinimumContentsLength(COMBO_CHARS)
    if not scroll or panel.layout() is None:
        return
    content = QWidget()
    content.setLayout(panel.layout())  # Qt moves the layout and its widgets to ``content``
    area = QScrollArea()
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
    area.setWidget(content)
    outer = QVBoxLayout(panel)
    outer.setContentsMargins(0, 0, 0, 0)
    outer.addWidget(area)
