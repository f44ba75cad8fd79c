"""The errors a slide reader raises; their messages name the file and the cause."""

from __future__ import annotations


class SlideOpenError(RuntimeError):
    """A slide file could not be opened or decoded.

    The message names the file and the cause, ready to show to a user.
    """


class UnsupportedFormatError(SlideOpenError):
    """No backend can read this kind of file."""


class SlideReadError(SlideOpenError):
    """Pixels of an opened slide could not be read (corrupt or truncated tiles)."""


class RegionTooLargeError(ValueError):
    """A read asked for more pixels than :data:`MAX_REGION_PIXELS` at once."""
