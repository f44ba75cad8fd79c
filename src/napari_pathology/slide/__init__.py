"""Where pixels come from: slide backends, lazy pyramids and synthetic slides.

``backends/`` one reader per library; ``slide`` :class:`Slide` and :func:`open_slide`;
``pyramid`` the lazy dask levels; ``brightfield`` brightfield or fluorescence;
``synthetic/`` procedural H&E slides with ground truth; ``settings`` remembered um/px.

Nothing here imports Qt, napari or torch.
"""

from napari_pathology.slide.backends import (
    ImageBackend,
    InMemoryBackend,
    OpenSlideBackend,
    RegionTooLargeError,
    SlideBackend,
    SlideOpenError,
    SlideReadError,
    TiffBackend,
    UnsupportedFormatError,
)
from napari_pathology.slide.brightfield import NotBrightfieldError, judge_brightfield
from napari_pathology.slide.slide import (
    SUPPORTED_SUFFIXES,
    Slide,
    SlideInfo,
    is_supported_path,
    open_slide,
)

__all__ = [
    "SUPPORTED_SUFFIXES",
    "ImageBackend",
    "InMemoryBackend",
    "NotBrightfieldError",
    "OpenSlideBackend",
    "RegionTooLargeError",
    "Slide",
    "SlideBackend",
    "SlideInfo",
    "SlideOpenError",
    "SlideReadError",
    "TiffBackend",
    "UnsupportedFormatError",
    "is_supported_path",
    "judge_brightfield",
    "open_slide",
]
