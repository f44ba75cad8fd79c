"""Set up a napari viewer with a slide and the plugin's panels (GUI only)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import napari

PLUGIN = "napari-pathology"
#: Panels docked by the demo, in order (display names from napari.yaml).
#: Each group shares one dock as tabs; the last of a group is docked last and shown.
TAB_GROUPS = (("Tissue", "Slide"), ("Nuclei", "Train", "Analyze"))
DEMO_PANELS = ("Slide", "Tissue", "Analyze", "Train", "Nuclei")


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


def dock_panels(viewer: napari.Viewer, panels: tuple[str, ...] = DEMO_PANELS) -> None:
    """Dock the plugin's panels on the right of the viewer."""
    # Slide shares a dock with Tissue, and Analyze with Train and Nuclei: five stacked panels do
    # not fit a laptop screen. A tabified dock becomes the visible tab, so Slide and Analyze go last.
    for group in TAB_GROUPS:
        present = [p for p in group if p in panels]
        for position, panel in enumerate(present):
            viewer.window.add_plugin_dock_widget(PLUGIN, panel, tabify=position > 0)
    grouped = {p for group in TAB_GROUPS for p in group}
    for panel in panels:
        if panel not in grouped:
            viewer.window.add_plugin_dock_widget(PLUGIN, panel)


def open_demo_viewer(path: str | Path) -> None:
    """Open napari with a slide and the plugin's panels, and run the event loop."""
    import napari

    viewer = napari.Viewer(title=f"napari-pathology: {Path(path).name}")
    dock_panels(viewer)  # dock first so the slide is fitted to the final canvas size
    show_slide(viewer, path)
    napari.run()
