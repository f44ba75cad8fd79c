"""Where slide pixels come from: one protocol, several libraries behind it.

Every backend exposes the same small surface (:class:`SlideBackend`): level
geometry, the file's tile grid, um/px, objective power, associated images, and
``read_region(level, x, y, width, height)`` in *level* pixel coordinates that
returns RGB ``uint8`` with out-of-slide and transparent pixels painted white.
Tiling, pyramids and models never need to know which library decoded the
pixels.

Implementations
---------------
- :class:`OpenSlideBackend`: SVS, NDPI, MRXS, SCN, VMS/VMU, BIF, generic tiled
  TIFF, DICOM WSI (everything OpenSlide reads).
- :class:`TiffBackend`: OME-TIFF and other (pyramidal) TIFF via tifffile.
- :class:`ImageBackend`: plain PNG/JPEG/TIFF tiles, one level, decoded on
  first use.
- :class:`InMemoryBackend`: numpy (or any array-like) levels; used by tests
  and synthetic data.

Modules
-------
``base``      the :class:`SlideBackend` protocol, :class:`BaseBackend` and RGB conversion
``errors``    :class:`SlideOpenError` and its kinds
``limits``    what is refused: implausible um/px, oversized reads and decodes
``damage``    truncated TIFF files (pages whose data lies past the end)
``openslide`` / ``tiff`` / ``image`` / ``memory``  one module per library
"""

from napari_pathology.slide.backends.base import (
    WHITE,
    BaseBackend,
    SlideBackend,
    rgba_to_rgb_on_white,
    to_rgb_uint8,
)
from napari_pathology.slide.backends.damage import quiet_tifffile, tiff_damage
from napari_pathology.slide.backends.errors import (
    RegionTooLargeError,
    SlideOpenError,
    SlideReadError,
    UnsupportedFormatError,
)
from napari_pathology.slide.backends.image import ImageBackend
from napari_pathology.slide.backends.limits import (
    MAX_DECODE_PIXELS,
    MAX_REGION_PIXELS,
    PLAUSIBLE_MPP,
    checked_mpp,
    megapixels,
    open_image_checked,
)
from napari_pathology.slide.backends.memory import InMemoryBackend
from napari_pathology.slide.backends.openslide import OpenSlideBackend
from napari_pathology.slide.backends.tiff import TiffBackend

__all__ = [
    "MAX_DECODE_PIXELS",
    "MAX_REGION_PIXELS",
    "PLAUSIBLE_MPP",
    "WHITE",
    "BaseBackend",
    "ImageBackend",
    "InMemoryBackend",
    "OpenSlideBackend",
    "RegionTooLargeError",
    "SlideBackend",
    "SlideOpenError",
    "SlideReadError",
    "TiffBackend",
    "UnsupportedFormatError",
    "checked_mpp",
    "megapixels",
    "open_image_checked",
    "quiet_tifffile",
    "rgba_to_rgb_on_white",
    "tiff_damage",
    "to_rgb_uint8",
]
