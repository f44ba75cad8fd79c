"""Set up a napari viewer with a slide and the plugin's panels (GUI only)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import napari

PLUGIN = "napari-pathology"
#: Panels docked by the demo, in order (display names from napari.yaml).
#: Each group shares one dock area as tabs; the last of a group is docked last and shown.
TAB_GROUPS = (("Slide", "Tissue", "Nuclei", "Train", "Analyze"),)
DEMO_PANELS = ("Slide", "Tissue", "Analyze", "Train", "Nuclei")
#: Width of the plugin's dock area (px): the slide keeps most of a laptop screen.
DOCK_WIDTH = 340


def scale_bar(viewer: napari.Viewer):
    """The viewer's scale-bar overlay (its home moved in napari 0.9)."""
    canvas = getattr(viewer, "canvas", None)
    if canvas is not None and hasattr(canvas, "overlays"):
        return canvas.overlays.scale_bar
    return viewer.scale_bar


def show_scale_bar(viewer: napari.Viewer) -> None:
    """Show napari's scale bar (it reads the layers' micrometre units)."""
    scale_bar(viewer).visible = True


def show_slide(viewer: napari.Viewer, path: str | Path) -> list[napari.layers.Layer]:
    """Open a slide with this plugin's reader, show the scale bar and fit the view."""
    layers = viewer.open(str(path), plugin=PLUGIN)
    show_scale_bar(viewer)
    viewer.reset_view()
    return layers


def dock_panels(viewer: napari.Viewer, panels: tuple[str, ...] = DEMO_PANELS) -> list:
    """Dock the plugin's panels as tabs of one narrow column on the right; return the dock widgets.

    napari's layer list moves to the top of that column and its layer controls (at least
    271 px wide) become one more tab, so the left side is free and the canvas keeps most
    of a laptop screen. Stacked panels would not fit; as tabs each scrolls in the full
    height. A tabified dock becomes the visible tab, so Analyze goes last and is shown.
    """
    from qtpy.QtCore import Qt

    window = viewer.window._qt_window
    qt_viewer = viewer.window._qt_viewer
    window.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, qt_viewer.dockLayerList)
    docks = []
    for group in TAB_GROUPS:
        present = [p for p in group if p in panels]
        for position, panel in enumerate(present):
            dock, _widget = viewer.window.add_plugin_dock_widget(PLUGIN, panel, tabify=position > 0)
            dock.setWindowTitle(panel)  # the tab's text: the plugin's name does not fit a narrow column
            docks.append(dock)
    grouped = {p for group in TAB_GROUPS for p in group}
    for panel in panels:
        if panel not in grouped:
            docks.append(viewer.window.add_plugin_dock_widget(PLUGIN, panel)[0])
    if docks:
        window.tabifyDockWidget(docks[0], qt_viewer.dockLayerControls)
        qt_viewer.dockLayerControls.setWindowTitle("Layer")
        docks[-1].raise_()
    fit_docks(viewer, docks)
    return docks


def fit_docks(viewer: napari.Viewer, docks: list | None = None) -> None:
    """Make the right dock column :data:`DOCK_WIDTH` wide, the layer list a third of its height.

    Call again after the window is resized.
    """
    from qtpy.QtCore import Qt

    window = viewer.window._qt_window
    layer_list = viewer.window._qt_viewer.dockLayerList
    ours = list(docks) if docks is not None else list(viewer.window._dock_widgets.values())
    if not ours:
        return
    window.resizeDocks([layer_list, *ours], [DOCK_WIDTH] * (1 + len(ours)), Qt.Orientation.Horizontal)
    height = max(window.height(), 400)
    window.resizeDocks([layer_list, ours[-1]], [height // 3, 2 * height // 3], Qt.Orientation.Vertical)


def open_demo_viewer(path: str | Path) -> None:
    """Open napari with a slide and the plugin's panels, and run the event loop."""
    import napari

    viewer = napari.Viewer(title=f"napari-pathology: {Path(path).name}")
    dock_panels(viewer)  # dock first so the slide is fitted to the final canvas size
    show_slide(viewer, path)
    napari.run()
