"""Qt panels: thin wiring over the compute modules, no algorithms here."""

from napari_pathology._widgets.slide_panel import SlidePanel

__all__ = ["SlidePanel"]
