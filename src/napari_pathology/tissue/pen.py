"""Marker ink (green, blue, red pen) on an RGB image, and the colour helpers it shares with detection."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["pen_mask"]


def _as_rgb_uint8(rgb: np.ndarray) -> np.ndarray:
    from napari_pathology.slide.backends import to_rgb_uint8

    array = np.asarray(rgb)
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 3, 4)):
        return to_rgb_uint8(array)
    raise ValueError(f"expected an RGB(A) image of shape (H, W, 3|4), got shape {array.shape}")


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees [0, 360), saturation and value in [0, 1] (float32)."""
    from skimage.color import rgb2hsv

    hsv = rgb2hsv(rgb).astype(np.float32)
    return hsv[..., 0] * 360.0, hsv[..., 1], hsv[..., 2]


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Where marker ink (green, blue, red) lies on an RGB image.

    Hue/saturation rules (HSV, hue in degrees) in the spirit of HistoQC's
    pen-marking module and histolab's pen filters, tuned on TCGA thumbnails:
    H&E tissue has hues from violet to pink-red (about 240-345 degrees) with
    moderate saturation, so

    * green / blue ink is a *strong* pixel with hue 75-240 and saturation > 0.25,
    * red ink is a *strong* pixel with hue 345-25 and saturation > 0.75
      (eosin stays below ~0.7),

    and each colour grows by hysteresis into connected *weak* pixels (hue
    60-252 and saturation > 0.12; hue 338-30 and saturation > 0.5), which
    takes the faint rim and ink over dark nuclei without reaching plain tissue.
    Black ink is not detected (it looks like dense hematoxylin).

    Parameters
    ----------
    rgb : ndarray
        ``(H, W, 3)`` (or RGBA, composited on white) uint8 or float in [0, 1].

    Returns
    -------
    ndarray
        ``(H, W)`` bool, True on ink.

    """
    rgb = _as_rgb_uint8(rgb)
    hue, sat, val = _hsv(rgb)
    structure = np.ones((3, 3), bool)
    out = np.zeros(hue.shape, bool)
    rules = (
        ((hue >= 75) & (hue < 240) & (sat > 0.25) & (val > 0.15),
         (hue >= 60) & (hue < 252) & (sat > 0.12) & (val > 0.1)),
        (((hue >= 345) | (hue < 25)) & (sat > 0.75) & (val > 0.3),
         ((hue >= 338) | (hue < 30)) & (sat > 0.5) & (val > 0.2)),
    )  # fmt: skip
    for strong, weak in rules:
        if strong.any():
            out |= ndimage.binary_propagation(strong, mask=weak | strong, structure=structure)
    return out
