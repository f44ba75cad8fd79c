"""A tissue mask as a labels layer's data, geometry and metadata, and back (no Qt, no napari).

The Tissue panel shows a :class:`~napari_pathology.tissue.mask.TissueMask` as a
labels layer laid exactly over its slide (label > 0 is tissue) and the user
paints corrections on it; every step after (tiling, analysis, nuclei) reads
the corrected mask back with :func:`mask_from_labels`. The layer's metadata
carries what the mask needs to know where it lies (its um/px, the slide's
size and um/px), under the marker :data:`TISSUE_MARKER`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from napari_pathology._layers import link_metadata, overlay_geometry
from napari_pathology.tissue.mask import TissueMask

__all__ = [
    "TISSUE_LAYER_COLORS",
    "TISSUE_MARKER",
    "format_area",
    "is_tissue_metadata",
    "labels_layer_args",
    "mask_from_labels",
]

#: Key present in the metadata of every tissue labels layer made by the Tissue panel.
TISSUE_MARKER = "napari_pathology_tissue"
#: Label colours (RGBA in [0, 1]) of a tissue layer: 0 transparent, any painted label green.
TISSUE_LAYER_COLORS: dict[int | None, tuple[float, float, float, float]] = {
    None: (0.15, 0.85, 0.35, 1.0),
    0: (0.0, 0.0, 0.0, 0.0),
    1: (0.15, 0.85, 0.35, 1.0),
}
#: Metadata a tissue layer needs to become a mask again.
_REQUIRED = ("mask_mpp", "slide_size", "slide_mpp")


def is_tissue_metadata(metadata: Mapping[str, Any] | None) -> bool:
    """Whether a labels layer's metadata marks it as a tissue mask made by the Tissue panel."""
    return bool((metadata or {}).get(TISSUE_MARKER))


def labels_layer_args(
    mask: TissueMask, slide_name: str, slide_units: Any, slide_path: str | None
) -> dict[str, Any]:
    """Keyword arguments of ``viewer.add_labels`` that lay ``mask`` over its slide layer.

    Parameters
    ----------
    mask : TissueMask
        The mask to show.
    slide_name : str
        The slide layer's name (the tissue layer is ``"<slide> tissue"``).
    slide_units : sequence of str
        The slide layer's ``units``.
    slide_path : str or None
        The slide's file (ties the layer to it; see :func:`~napari_pathology._layers.link_metadata`).

    Returns
    -------
    dict
        ``name``, ``scale``, ``translate``, ``units``, ``metadata``, ``opacity``; the
        caller adds the colormap (:data:`TISSUE_LAYER_COLORS`).
    """
    geometry = overlay_geometry(mask.mpp, (mask.mpp / 2, mask.mpp / 2), mask.slide_mpp)
    metadata = {
        **link_metadata({"path": slide_path}, (mask.slide_mpp[1], mask.slide_mpp[0])),
        TISSUE_MARKER: True,
        "slide_path": slide_path,
        "mask_mpp": mask.mpp,
        "slide_size": list(mask.slide_size),
        "slide_mpp": list(mask.slide_mpp),
        "method": mask.method,
        "params": dict(mask.params),
    }
    return {
        "name": f"{slide_name} tissue",
        "scale": geometry["scale"],
        "translate": geometry["translate"],
        "units": tuple(str(u) for u in slide_units),
        "metadata": metadata,
        "opacity": 0.35,
    }


def mask_from_labels(data: Any, metadata: Mapping[str, Any] | None, name: str = "layer") -> TissueMask:
    """A (possibly user-painted) tissue labels layer's data as a :class:`TissueMask`; label > 0 is tissue.

    Parameters
    ----------
    data : array-like
        The labels (2-D).
    metadata : mapping
        The layer's metadata, as :func:`labels_layer_args` made it.
    name : str
        The layer's name, for messages.

    Raises
    ------
    ValueError
        When the metadata is not a tissue layer's or the data is not 2-D.
    """
    meta = dict(metadata or {})
    missing = [key for key in _REQUIRED if meta.get(key) is None]
    if not meta.get(TISSUE_MARKER) or missing:
        raise ValueError(
            f"layer {name!r} is not a tissue mask made by the Tissue panel"
            + (f" (its metadata lacks {', '.join(missing)})" if missing else "")
        )
    data = np.asarray(data)
    if data.ndim != 2:
        raise ValueError(f"tissue layer {name!r} must be 2-D, got shape {data.shape}")
    return TissueMask(
        mask=data > 0,
        mpp=float(meta["mask_mpp"]),
        slide_size=tuple(int(v) for v in meta["slide_size"]),  # type: ignore[arg-type]
        slide_mpp=tuple(float(v) for v in meta["slide_mpp"]),  # type: ignore[arg-type]
        method=str(meta.get("method", "painted")),
        params=dict(meta.get("params") or {}),
    )


def format_area(mask: TissueMask) -> str:
    """The Tissue panel's area line for ``mask``."""
    if mask.is_empty:
        return "No tissue found"
    return f"Tissue: {mask.area_mm2:.2f} mm\N{SUPERSCRIPT TWO}"
