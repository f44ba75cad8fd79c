"""Brightfield (H&E-like) or fluorescence (dark-field): judged from a small low-resolution read."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from napari_pathology.slide.backends import SlideOpenError, SlideReadError

if TYPE_CHECKING:
    from napari_pathology.slide.slide import Slide


class NotBrightfieldError(SlideOpenError):
    """A fluorescence (dark-field) slide was given to a step made for brightfield H&E."""


def judge_brightfield(rgb: np.ndarray, border: np.ndarray | None = None) -> tuple[bool | None, str]:
    """Whether a low-resolution view of a slide looks brightfield (light glass) or dark-field.

    A fluorescence slide is mostly black with a few bright spots (nuclei);
    an H&E slide is light glass around pink and purple tissue.

    Parameters
    ----------
    rgb : ndarray
        ``(..., 3)`` uint8 pixels of the slide (a thumbnail or samples of one).
        Pure white pixels (outside the scanned area) are ignored.
    border : ndarray, optional
        Pixels of the slide's border (background); by default not used.

    Returns
    -------
    tuple
        ``(True | False | None, reason)``; None when the view is blank.

    """
    lowest, brightest = _extremes(rgb)
    seen = lowest < 255
    if np.count_nonzero(seen) < max(16, 0.01 * len(lowest)):
        return None, "the slide is blank"
    if border is not None and len(border):
        b_low, b_high = _extremes(border)
        b_high = b_high[b_low < 255]
        if len(b_high) and _percentile_u8(np.cumsum(np.bincount(b_high, minlength=256)), 50.0) >= 50:
            return True, "light background"
    brightest = brightest[seen]
    dark = float((brightest < 50).mean())
    glass = float((lowest[seen] > 200).mean())
    counts = np.cumsum(np.bincount(brightest, minlength=256))  # percentiles of uint8 from a histogram
    signal = _percentile_u8(counts, 99.5) - _percentile_u8(counts, 50.0)
    if dark >= 0.5 and glass < 0.1:
        if signal < 30:
            return None, f"{dark:.0%} of a low-resolution view is black, with no signal"
        return False, f"{dark:.0%} of a low-resolution view is black background"
    return True, "light background"


def _extremes(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Darkest and brightest channel of each pixel, flat (channel by channel: faster than axis=1)."""
    px = np.asarray(rgb, np.uint8).reshape(-1, 3)
    r, g, b = px[:, 0], px[:, 1], px[:, 2]
    return np.minimum(np.minimum(r, g), b), np.maximum(np.maximum(r, g), b)


def _percentile_u8(cumulative: np.ndarray, q: float) -> float:
    """``np.percentile`` (linear) of uint8 values from their cumulative histogram."""
    position = q / 100.0 * (int(cumulative[-1]) - 1)
    below = int(position)
    a, b = (float(np.searchsorted(cumulative, k, side="right")) for k in (below, below + 1))
    t = position - below
    return a + (b - a) * t if t < 0.5 else b - (b - a) * (1 - t)


def _slide_brightfield(slide: Slide, coarsest: np.ndarray | None = None) -> tuple[bool | None, str]:
    """:func:`judge_brightfield` on a small sample of the coarsest level (and OME metadata).

    ``coarsest``: that whole level as RGB when the caller has it already (not read again).
    """
    description = str(slide.backend.properties.get("tiff.ImageDescription", ""))
    if "Epifluorescence" in description or 'IlluminationType="Fluorescence"' in description:
        return False, "its OME metadata says epifluorescence"
    level = slide.level_count - 1
    width, height = slide.level_dimensions[level]
    if coarsest is not None and coarsest.shape[:2] != (height, width):
        coarsest = None
    try:
        if width * height <= 2**21:
            image = slide.read_region(level, 0, 0, width, height) if coarsest is None else coarsest
            edge = max(1, min(width, height) // 20)
            border = np.concatenate(
                [image[:edge].reshape(-1, 3), image[-edge:].reshape(-1, 3),
                 image[:, :edge].reshape(-1, 3), image[:, -edge:].reshape(-1, 3)]
            )  # fmt: skip
            return judge_brightfield(image, border)
        side = 64
        xs = np.linspace(0, max(0, width - side), 8).astype(int)
        ys = np.linspace(0, max(0, height - side), 8).astype(int)
        w, h = min(side, width), min(side, height)
        patches = [
            slide.read_region(level, int(x), int(y), w, h)
            if coarsest is None
            else coarsest[y : y + h, x : x + w]
            for y in ys
            for x in xs
        ]
        return judge_brightfield(np.concatenate([p.reshape(-1, 3) for p in patches]))
    except (SlideReadError, ValueError):
        return None, "its pixels could not be read"
