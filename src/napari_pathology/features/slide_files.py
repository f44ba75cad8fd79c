"""A slide's features as a file: CLAM's h5 layout with what made them (no Qt, no napari).

:func:`write_features_h5` is the one writer of a slide's feature file (what
``napari-pathology features``, the cohort runner and CLAM's trainer write:
CLAM's ``features`` and ``coords`` plus, on the root, the encoder, whether
it is trained, its provenance, the patch geometry and the slide).
:func:`extract_to_h5` finds the tissue as Run does, extracts (cached and
resumable: :func:`napari_pathology.features.extract_features`) and writes the
file; :func:`h5_encoder` reads back which encoder made a file.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Generator
from pathlib import Path
from typing import Any

from napari_pathology.progress import Progress

__all__ = ["extract_to_h5", "feature_attrs", "h5_encoder", "write_features_h5"]


def feature_attrs(encoder: Any, feats: Any, slide_name: str) -> dict[str, Any]:
    """Root attributes of a feature file: encoder, trained, provenance, um/px, patch and stride px, slide."""
    grid = feats.grid
    return {
        "encoder": encoder.name, "trained": bool(encoder.trained), "provenance": feats.encoder,
        "mpp": float(grid.target_mpp), "patch_size_px": int(grid.tile_size), "stride_px": int(grid.stride),
        "slide": slide_name,
    }  # fmt: skip


def write_features_h5(target: str | os.PathLike[str], feats: Any, encoder: Any, slide_name: str) -> Path:
    """Write a slide's features (:class:`~napari_pathology.features.SlideFeatures`) as CLAM's h5, atomically.

    Raises
    ------
    OutputError
        When the file system refuses the write.
    """
    from napari_pathology.features import write_clam_h5

    patch_size, patch_level = feats.clam_patch()
    return write_clam_h5(
        target, feats.features, feats.coords, patch_size, patch_level,
        attrs=feature_attrs(encoder, feats, slide_name),
    )  # fmt: skip


def extract_to_h5(
    slide: Any,
    encoder: Any,
    target: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None,
    tissue: Any = None,
    min_tissue_fraction: float = 0.5,
    batch_size: int = 64,
    stop: threading.Event | None = None,
) -> Generator[Progress, None, Any]:
    """Find the tissue (as Run finds it, unless given), extract the slide's features and write ``target``.

    Yields the extraction's :class:`~napari_pathology.progress.Progress`;
    returns the :class:`~napari_pathology.features.SlideFeatures`.

    Raises
    ------
    NoTissueError
        When no tissue is found, or no patch holds ``min_tissue_fraction`` tissue (nothing written).
    InterruptedError
        When ``stop`` is set before the last batch (the cache keeps the batches done).
    """
    from napari_pathology.analysis.jobs import tissue_or_detect
    from napari_pathology.analysis.settings import NoTissueError
    from napari_pathology.features import extract_features

    tissue = yield from tissue_or_detect(slide, tissue)
    feats = yield from extract_features(
        slide, encoder, tissue=tissue, min_tissue_fraction=min_tissue_fraction, cache_dir=cache_dir,
        batch_size=batch_size, stop=stop,
    )  # fmt: skip
    if len(feats) == 0:
        raise NoTissueError(
            f"{slide.name}: no {feats.grid.tile_size} px patch at {feats.grid.target_mpp:g} um/px holds "
            f"{min_tissue_fraction:.0%} tissue; nothing written"
        )
    write_features_h5(target, feats, encoder, slide.name)
    return feats


def h5_encoder(path: str | os.PathLike[str]) -> tuple[str | None, dict[str, Any]]:
    """The encoder name and root attributes of a feature file, without reading its features.

    A file without an ``encoder`` attribute (CLAM's own) gives None; a file
    that is not HDF5 gives ``(None, {})`` (reading its features says why).
    """
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in h5.attrs.items()}
    except OSError:
        return None, {}
    if isinstance(attrs.get("provenance"), str):
        try:
            attrs["provenance"] = json.loads(attrs["provenance"])
        except ValueError:
            attrs["provenance"] = {}
    encoder = attrs.get("encoder")
    return (str(encoder) if encoder is not None else None), attrs
