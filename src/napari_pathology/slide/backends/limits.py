"""What a slide reader refuses: implausible um/px, oversized reads and decodes."""

from __future__ import annotations

import math
import os
import threading
from typing import Any

#: um/px outside this range is treated as missing: such values come from
#: default screen resolutions (72 or 96 dpi) written by generic software.
PLAUSIBLE_MPP = (0.01, 50.0)

#: The most pixels one :meth:`BaseBackend.read_region` call returns (768 MiB of RGB).
MAX_REGION_PIXELS = 2**28

#: The most pixels decoded at once from a file that cannot be read in parts
#: (a PNG/JPEG slide, a mask image, an associated image, one TIFF strip).
MAX_DECODE_PIXELS = 2**28

_PIL_LOCK = threading.Lock()


def megapixels(pixels: float) -> str:
    """``"40,000 Mpx"``-style text for messages."""
    return f"{pixels / 1e6:,.0f} Mpx" if pixels >= 1e7 else f"{pixels / 1e6:,.1f} Mpx"


def open_image_checked(
    path: str | os.PathLike[str],
    what: str,
    max_bytes: int = 3 * MAX_DECODE_PIXELS,
    bytes_per_pixel: int | None = None,
) -> Any:
    """Open an image with PIL after checking its decoded size; the caller closes it.

    PIL's own decompression-bomb check raises with a traceback-like message at a
    fixed size; here the size is checked against ``max_bytes`` of decoded
    pixels (a 1-bit or gray mask may be larger in pixels than an RGB image)
    and refused with one line that names the file. ``bytes_per_pixel`` counts
    what the caller converts the image to (by default, the image's bands).

    Raises
    ------
    ValueError
        When the image would decode to more than ``max_bytes``, PIL cannot
        read its header, or it is not a regular file.
    FileNotFoundError
        When nothing is there.

    """
    from PIL import Image, UnidentifiedImageError

    from napari_pathology.fileio import require_regular_file

    path = require_regular_file(path, what)  # a FIFO would block PIL forever
    with _PIL_LOCK:  # only the header is parsed while PIL's global limit is lifted
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            image = Image.open(path)
        except FileNotFoundError:
            raise
        except UnidentifiedImageError:
            raise ValueError(f"Cannot open {what} {path.name}: not an image file PIL reads") from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise ValueError(f"Cannot open {what} {path.name}: {exc}") from None
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    width, height = image.size
    bands = max(1, len(image.getbands()))
    decoded = width * height * (bytes_per_pixel or bands)
    if width <= 0 or height <= 0 or decoded > max_bytes:
        image.close()
        raise ValueError(
            f"{what} {path.name} is {width} x {height} px ({megapixels(width * height)}): more than the "
            f"{megapixels(max_bytes // (bytes_per_pixel or bands))} of this kind read at once; "
            "save it smaller (or as a tiled pyramidal TIFF)"
        )
    return image


def checked_mpp(value: float | None, source: str) -> tuple[float | None, str]:
    """Return ``(mpp, note)``, dropping values no slide scanner would write.

    Parameters
    ----------
    value : float or None
        Micrometres per pixel as read from a file.
    source : str
        Where the value came from, for the note.

    Returns
    -------
    tuple
        The value (or None) and a human-readable note on where it came from
        or why it was rejected.

    """
    if value is None or not math.isfinite(value) or value <= 0:
        return None, "the file records no um/px"
    low, high = PLAUSIBLE_MPP
    if not low <= value <= high:
        return None, (
            f"the file's {source} gives {value:.4g} um/px, which no slide scanner writes "
            "(probably a default screen resolution)"
        )
    return float(value), source
