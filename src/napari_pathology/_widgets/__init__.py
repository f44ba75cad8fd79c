"""Qt panels: thin wiring over the compute modules, no algorithms here."""

from napari_pathology._widgets.analyze_panel import AnalyzePanel
from napari_pathology._widgets.slide_panel import SlidePanel
from napari_pathology._widgets.tissue_panel import TissuePanel

__all__ = ["AnalyzePanel", "SlidePanel", "TissuePanel"]
