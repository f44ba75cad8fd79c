"""Tissue masks: find the tissue on a slide, save it, load it, measure it.

Three detectors work on a low-resolution RGB image of the slide resampled to
exactly ``mask_mpp`` micrometres per pixel (8 um/px by default):

``"saturation"`` (CLAM, Lu et al. 2021)
    HSV saturation, median blur, a fixed threshold (8 on 0-255) or Otsu,
    morphological closing, then connected components filtered by area
    (tissue pieces and holes).
``"otsu"``
    Otsu's threshold on grayscale (tissue darker than the glass). Optical
    density was tried too: Otsu then splits dense tumour from pale stroma.
``"gray"`` (Liu et al. 2017)
    Background is where the gray value exceeds 0.8.

Every size is physical: kernels are given in micrometres and area filters in
square millimetres, so a mask computed at 4 or 16 um/px means the same thing.
With ``exclude_pen`` green, blue and red marker ink is removed (HSV hue and
saturation rules in the spirit of HistoQC / histolab, with hysteresis so the
faint rim of a stroke goes with its core).

A :class:`TissueMask` knows where it lies on the slide: mask pixel ``(r, c)``
covers the physical square ``[c * mpp, (c + 1) * mpp) x [r * mpp, (r + 1) * mpp)``
micrometres from the slide's top-left corner. It answers "how much of this
rectangle is tissue" for many rectangles at once (:meth:`TissueMask.fractions`,
an integral image), and converts to polygons in level-0 pixels and GeoJSON.

Layout: :mod:`~napari_pathology.tissue.mask` (:class:`TissueParams`,
:class:`TissueMask`), :mod:`~napari_pathology.tissue.resample` (:func:`read_at_mpp`),
:mod:`~napari_pathology.tissue.detect` (the detectors), :mod:`~napari_pathology.tissue.filters`
(their uint8 / binary filters, each equal to its plain scikit-image / SciPy counterpart, run
only in boxes around candidate tissue), :mod:`~napari_pathology.tissue.pen` (marker ink) and
:mod:`~napari_pathology.tissue.io` (files); every public name is importable from
``napari_pathology.tissue``.

Nothing here imports Qt or napari.

Examples
--------
>>> import numpy as np
>>> from napari_pathology.tissue import TissueParams, tissue_mask_from_rgb
>>> rgb = np.full((64, 64, 3), 245, np.uint8)
>>> rgb[16:48, 16:48] = (200, 120, 180)  # a pink square of "tissue"
>>> mask = tissue_mask_from_rgb(rgb, mpp=8.0, params=TissueParams(min_tissue_area_mm2=0.01))
>>> bool(mask.mask[20:44, 20:44].all()), round(mask.area_mm2, 3)
(True, 0.064)

"""

from napari_pathology.tissue.detect import detect_tissue, tissue_mask_from_rgb
from napari_pathology.tissue.io import (
    MAX_MASK_IMAGE_BYTES,
    MAX_MASK_SIDE,
    load_tissue_mask,
    read_tissue_file,
    save_tissue_mask,
    tissue_mask_from_geojson,
    tissue_mask_from_image,
    write_tissue_outputs,
)
from napari_pathology.tissue.mask import (
    DEFAULT_PARAMS,
    METHODS,
    TISSUE_CLASS,
    TISSUE_COLOR,
    TissueMask,
    TissueParams,
)
from napari_pathology.tissue.pen import pen_mask
from napari_pathology.tissue.resample import MAX_MASK_PIXELS, READ_BLOCK, read_at_mpp

__all__ = [
    "DEFAULT_PARAMS",
    "MAX_MASK_IMAGE_BYTES",
    "MAX_MASK_PIXELS",
    "MAX_MASK_SIDE",
    "METHODS",
    "READ_BLOCK",
    "TISSUE_CLASS",
    "TISSUE_COLOR",
    "TissueMask",
    "TissueParams",
    "detect_tissue",
    "load_tissue_mask",
    "pen_mask",
    "read_at_mpp",
    "read_tissue_file",
    "save_tissue_mask",
    "tissue_mask_from_geojson",
    "tissue_mask_from_image",
    "tissue_mask_from_rgb",
    "write_tissue_outputs",
]
