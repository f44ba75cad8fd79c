"""napari-pathology: interactive digital pathology in napari."""

from napari_pathology.slide import Slide, SlideOpenError, open_slide

__version__ = "0.1.0"

__all__ = ["Slide", "SlideOpenError", "__version__", "open_slide"]
