"""Where pixels come from: slide backends, lazy pyramids and synthetic slides.

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
from napari_pathology.slide.slide import (
    SUPPORTED_SUFFIXES,
    NotBrightfieldError,
    Slide,
    SlideInfo,
    is_supported_path,
    judge_brightfield,
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
