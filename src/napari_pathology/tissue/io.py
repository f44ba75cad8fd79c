"""Tissue masks to and from files: our PNG + JSON + GeoJSON set, QuPath GeoJSON, any mask image.

Also :func:`write_tissue_outputs`, the job ``napari-pathology tissue`` runs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathology.fileio import (
    atomic_path,
    atomic_write,
    ensure_writable_dir,
    read_json_file,
    require_regular_file,
)
from napari_pathology.geometry import MAX_COORDINATE, geojson_to_polygons, rasterize_polygons
from napari_pathology.progress import Progress
from napari_pathology.tissue.detect import detect_tissue
from napari_pathology.tissue.mask import DEFAULT_PARAMS, TissueMask, TissueParams, _mask_shape, _pair

__all__ = [
    "MAX_MASK_IMAGE_BYTES",
    "MAX_MASK_SIDE",
    "load_tissue_mask",
    "read_tissue_file",
    "save_tissue_mask",
    "tissue_mask_from_geojson",
    "tissue_mask_from_image",
    "write_tissue_outputs",
]

#: Largest mask image read (bytes of decoded pixels: a 1-bit or gray mask counts one per pixel).
MAX_MASK_IMAGE_BYTES = 2**28

#: A mask image larger than this on its longer side is averaged down before use.
MAX_MASK_SIDE = 8192


def save_tissue_mask(
    mask: TissueMask, out_dir: str | os.PathLike[str], stem: str = "tissue"
) -> dict[str, Path]:
    """Write ``STEM.png`` (0/255), ``STEM.json`` (facts) and ``STEM.geojson`` (level-0 px).

    Parameters
    ----------
    mask : TissueMask
        The mask to save.
    out_dir : path-like
        Folder (created if needed).
    stem : str
        File name stem.

    Returns
    -------
    dict of str to Path
        ``{"png": ..., "json": ..., "geojson": ...}``.

    """
    from PIL import Image

    out = ensure_writable_dir(out_dir)
    paths = {
        "png": out / f"{stem}.png",
        "json": out / f"{stem}.json",
        "geojson": out / f"{stem}.geojson",
    }
    info = mask.info()
    info["png"] = paths["png"].name
    info["geojson"] = paths["geojson"].name
    geojson = json.dumps(mask.to_geojson())  # everything is computed before the first byte is written
    with atomic_path(paths["png"], suffix=".png") as tmp:
        Image.fromarray(mask.mask.astype(np.uint8) * 255).save(tmp)
    atomic_write(paths["geojson"], geojson)
    atomic_write(paths["json"], json.dumps(info, indent=2))  # last: its presence means the set is whole
    return paths


def _max_mask_side() -> int:
    """:data:`MAX_MASK_SIDE` as the package has it, so ``napari_pathology.tissue.MAX_MASK_SIDE`` governs."""
    from napari_pathology import tissue

    return int(tissue.MAX_MASK_SIDE)


def _read_mask_image(path: Path, reduce: bool = True) -> np.ndarray:
    """A mask image as bool, size-checked before decoding; ``reduce``: averaged down to MAX_MASK_SIDE.

    Raises
    ------
    ValueError
        One line naming the file: unreadable, or more than
        :data:`MAX_MASK_IMAGE_BYTES` of decoded pixels.

    """
    from napari_pathology.slide.backends import open_image_checked

    image = open_image_checked(path, "tissue mask image", max_bytes=MAX_MASK_IMAGE_BYTES)
    try:
        with image:
            palette = image.mode in ("P", "PA")
            if palette and image.size[0] * image.size[1] * 4 > MAX_MASK_IMAGE_BYTES:
                raise ValueError(
                    f"tissue mask image {path.name} is a {image.size[0]} x {image.size[1]} px palette image: "
                    "too large to read; save it as a 1-bit or gray PNG"
                )
            image.load()
            array = np.asarray(image.convert("RGBA") if palette else image)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, SyntaxError, MemoryError) as exc:
        if isinstance(exc, ValueError) and path.name in str(exc):
            raise
        raise ValueError(f"Cannot read the mask image {path.name}: {exc}") from None
    mask = _binarise(array, path.name)
    del array
    side = _max_mask_side()
    if reduce and max(mask.shape) > side:
        mask = _reduce_mask(mask, math.ceil(max(mask.shape) / side))
    return mask


def _reduce_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """``factor`` x ``factor`` blocks of a bool mask to one pixel (tissue when at least half is)."""
    height, width = mask.shape
    rows, cols = math.ceil(height / factor), math.ceil(width / factor)
    out = np.empty((rows, cols), bool)
    col_starts = np.arange(0, width, factor)
    col_counts = np.diff(np.append(col_starts, width))
    step = max(1, 2**22 // (factor * width))  # output rows per strip: about 4 Mpx of the mask at once
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        block = mask[r0 * factor : r1 * factor]
        row_starts = np.arange(0, block.shape[0], factor)
        row_counts = np.diff(np.append(row_starts, block.shape[0]))
        sums = np.add.reduceat(
            np.add.reduceat(block.astype(np.uint32), row_starts, axis=0), col_starts, axis=1
        )
        out[r0:r1] = 2 * sums >= row_counts[:, None] * col_counts[None, :]
    return out


def _binarise(array: np.ndarray, name: str) -> np.ndarray:
    """Any mask image to bool: alpha when it is the only varying channel, else non-zero / bright."""
    array = np.asarray(array)
    if array.ndim == 3:
        if array.shape[-1] in (2, 4) and array[..., :-1].min() == array[..., :-1].max():
            array = array[..., -1]
        else:
            array = array[..., : min(3, array.shape[-1])].max(axis=-1)
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"{name} is not a 2-D mask image (shape {array.shape})")
    if array.dtype == bool:
        return array
    values = np.unique(array)
    if len(values) <= 2:
        return array > values.min() if len(values) == 2 else np.full(array.shape, bool(values[0] > 0))
    top = float(array.max())
    return array >= top / 2.0


def load_tissue_mask(path: str | os.PathLike[str]) -> TissueMask:
    """Load a mask written by :func:`save_tissue_mask` (give the PNG or the JSON).

    Raises
    ------
    FileNotFoundError
        When the PNG or its JSON is missing.
    ValueError
        When the JSON is corrupt or does not match the PNG.

    """
    path = Path(path)
    if path.suffix.lower() == ".png":
        png, meta = path, path.with_suffix(".json")
    elif path.suffix.lower() == ".json":
        png, meta = path.with_suffix(".png"), path
    elif path.suffix.lower() == ".geojson":
        raise ValueError(
            f"{path.name} is GeoJSON: use tissue_mask_from_geojson with the slide's size and um/px"
        )
    else:
        raise ValueError(f"{path.name}: expected the tissue mask's .png or .json")
    if not meta.exists():
        raise FileNotFoundError(
            f"{meta.name} not found beside {png.name}: a saved tissue mask needs its JSON "
            "(um/px and slide size); import a bare mask image with tissue_mask_from_image"
        )
    info = read_json_file(meta, "tissue mask description")
    try:
        if not isinstance(info, dict):
            raise ValueError("it is not a JSON object")
        mpp = float(info["mpp"])
        slide_size = tuple(int(v) for v in info["slide_size"])
        slide_mpp = tuple(float(v) for v in info["slide_mpp"])
        if len(slide_size) != 2 or len(slide_mpp) != 2:
            raise ValueError("slide_size and slide_mpp need two values")
        if not all(math.isfinite(v) and v > 0 for v in (mpp, *slide_mpp)) or min(slide_size) <= 0:
            raise ValueError("mpp, slide_size and slide_mpp must be positive finite numbers")
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"{meta.name} is not a valid tissue mask description: {exc}") from None
    if "png" in info and path.suffix.lower() == ".json":
        png = meta.with_name(Path(str(info["png"])).name)  # a name beside the JSON, never a path elsewhere
    if not png.exists():
        raise FileNotFoundError(f"tissue mask image {png} not found")
    mask = _read_mask_image(png, reduce=False)
    expected = info.get("shape") or list(_mask_shape(slide_size, slide_mpp, mpp))  # type: ignore[arg-type]
    if list(mask.shape) != [int(v) for v in expected]:
        raise ValueError(
            f"{png.name} is {mask.shape[1]}x{mask.shape[0]} px but {meta.name} describes a "
            f"{expected[1]}x{expected[0]} mask: the files do not belong together"
        )
    return TissueMask(
        mask=mask,
        mpp=mpp,
        slide_size=slide_size,  # type: ignore[arg-type]
        slide_mpp=slide_mpp,  # type: ignore[arg-type]
        method=str(info.get("method", "loaded")),
        params=dict(info.get("params") or {}),
    )


def tissue_mask_from_geojson(
    geojson: dict[str, Any] | list[Any] | str | os.PathLike[str],
    slide_size: tuple[int, int],
    slide_mpp: float | tuple[float, float],
    mask_mpp: float = 8.0,
    *,
    source: str | None = None,
) -> TissueMask:
    """Rasterise GeoJSON polygons (level-0 pixels, e.g. from QuPath) into a tissue mask.

    Parameters
    ----------
    geojson : dict, list, str or path
        A FeatureCollection / Feature / geometry, or a file holding one.
    slide_size : (int, int)
        Level-0 ``(width, height)`` of the slide.
    slide_mpp : float or (float, float)
        Level-0 um/px of the slide.
    mask_mpp : float
        Micrometres per pixel of the mask.
    source : str, optional
        Name of the file the parsed GeoJSON came from, for messages.

    Raises
    ------
    ValueError
        For unreadable GeoJSON, no polygons, a ring with non-finite or absurd
        coordinates or fewer than 3 vertices, or a polygon entirely off the
        slide; the file and the feature are named.

    """
    name = source or "GeoJSON"
    if isinstance(geojson, str | os.PathLike):
        path = Path(geojson)
        name = path.name
        geojson = read_json_file(path, "tissue GeoJSON")
    if not isinstance(geojson, dict | list):
        raise ValueError(f"{name} is not GeoJSON (expected an object or a list of features)")
    width, height = int(slide_size[0]), int(slide_size[1])
    try:  # every ring finite, >= 3 vertices, not absurd and not wholly off the slide; the feature is named
        polygons = geojson_to_polygons(geojson, max_coordinate=MAX_COORDINATE, extent=(width, height))
    except RecursionError:
        raise ValueError(f"{name} is nested too deeply to be GeoJSON") from None
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{name}: {exc}") from None
    if not polygons:
        raise ValueError(f"{name} has no Polygon or MultiPolygon geometry")
    mpp_x, mpp_y = _pair(slide_mpp)
    rows, cols = _mask_shape(slide_size, (mpp_x, mpp_y), mask_mpp)
    sx, sy = mask_mpp / mpp_x, mask_mpp / mpp_y  # level-0 px per mask px
    in_mask_units = [[np.asarray(ring, np.float64) / np.array([sx, sy]) for ring in p] for p in polygons]
    xs = np.concatenate([p[0][:, 0] for p in polygons if len(p) and len(p[0])])
    ys = np.concatenate([p[0][:, 1] for p in polygons if len(p) and len(p[0])])
    if xs.max() < 0 or ys.max() < 0 or xs.min() > width or ys.min() > height:
        raise ValueError(
            f"the polygons of {name} (x {xs.min():.0f}..{xs.max():.0f}, y {ys.min():.0f}..{ys.max():.0f}) "
            f"lie outside the {width}x{height} px slide: wrong slide, or not level-0 pixels?"
        )
    mask = rasterize_polygons(in_mask_units, (rows, cols))
    return TissueMask(mask, mask_mpp, (int(width), int(height)), (mpp_x, mpp_y), "geojson", {"source": name})


def tissue_mask_from_image(
    path_or_array: str | os.PathLike[str] | np.ndarray,
    slide_size: tuple[int, int],
    slide_mpp: float | tuple[float, float],
) -> TissueMask:
    """A mask image of any size (PNG, TIFF, array) stretched over the whole slide.

    The image's pixels are taken to tile the slide exactly; its um/px is the
    slide's width in um over the image width. Non-zero (or bright) pixels are
    tissue; a 2-valued image uses its larger value.

    Raises
    ------
    ValueError
        For an unreadable image, or one whose aspect ratio is far from the slide's.

    """
    if isinstance(path_or_array, str | os.PathLike):
        path = Path(path_or_array)
        mask = _read_mask_image(path)
        name = path.name
    else:
        mask = _binarise(np.asarray(path_or_array), "the mask array")
        side = _max_mask_side()
        if max(mask.shape) > side:
            mask = _reduce_mask(mask, math.ceil(max(mask.shape) / side))
        name = "array"
    mpp_x, mpp_y = _pair(slide_mpp)
    width_um = slide_size[0] * mpp_x
    height_um = slide_size[1] * mpp_y
    rows, cols = mask.shape
    mpp_cols, mpp_rows = width_um / cols, height_um / rows
    if abs(mpp_cols / mpp_rows - 1.0) > 0.05:
        raise ValueError(
            f"the {cols}x{rows} mask image {name} does not have the slide's aspect ratio "
            f"({slide_size[0]}x{slide_size[1]} px); is it the mask of another slide?"
        )
    mpp = max(mpp_cols, mpp_rows)
    return TissueMask(
        mask, mpp, (int(slide_size[0]), int(slide_size[1])), (mpp_x, mpp_y), "image", {"source": name}
    )


def read_tissue_file(
    path: str | os.PathLike[str],
    slide_size: tuple[int, int],
    slide_mpp: float | tuple[float, float],
    mask_mpp: float = 8.0,
) -> TissueMask:
    """Read any tissue mask file for a given slide (what the Import button and ``--tissue FILE`` take).

    * ``.geojson`` (or a ``.json`` holding GeoJSON): polygons in level-0
      pixels, rasterised at ``mask_mpp``;
    * a mask saved by :func:`save_tissue_mask` (its ``.png`` or ``.json``):
      loaded as is, after checking it was made for a slide of this size;
    * any other image (``.png``, ``.tif``, ``.jpg``...): stretched over the slide.

    Raises
    ------
    FileNotFoundError
        When the file does not exist.
    ValueError
        When the file is unreadable or belongs to another slide.

    """
    path = require_regular_file(path, "tissue mask file")  # a FIFO or folder is refused, never opened
    suffix = path.suffix.lower()
    slide_size = (int(slide_size[0]), int(slide_size[1]))
    if suffix in (".geojson", ".json"):
        data = read_json_file(path, "tissue mask file")
        if isinstance(data, list) or (isinstance(data, dict) and "type" in data):
            return tissue_mask_from_geojson(data, slide_size, slide_mpp, mask_mpp, source=path.name)
        mask = load_tissue_mask(path)
    elif suffix == ".png" and path.with_suffix(".json").exists():
        mask = load_tissue_mask(path)
    else:
        return tissue_mask_from_image(path, slide_size, slide_mpp)
    if tuple(mask.slide_size) != slide_size:
        raise ValueError(
            f"{path.name} was made for a {mask.slide_size[0]}x{mask.slide_size[1]} px slide, "
            f"not this {slide_size[0]}x{slide_size[1]} px one"
        )
    return mask


# --------------------------------------------------------------------------------------
# The command-line job
# --------------------------------------------------------------------------------------


def write_tissue_outputs(
    slide_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    params: TissueParams = DEFAULT_PARAMS,
    mpp: float | None = None,
) -> Generator[Progress, None, dict[str, Path]]:
    """Detect tissue on a slide file and save ``tissue.png``, ``tissue.json``, ``tissue.geojson``.

    What ``napari-pathology tissue SLIDE --out DIR`` runs. An empty result is
    saved too (``"is_empty": true`` in the JSON).

    Parameters
    ----------
    slide_path : path-like
        The slide.
    out_dir : path-like
        Output folder (created).
    params : TissueParams
        Detector parameters.
    mpp : float, optional
        um/px to use when the file has none (or to override it).

    Returns
    -------
    dict of str to Path
        The written files (see :func:`save_tissue_mask`).

    """
    from napari_pathology.slide import open_slide

    ensure_writable_dir(out_dir)  # a read-only or full output disk is said before the work
    slide = open_slide(slide_path, mpp=mpp)
    try:
        mask = yield from detect_tissue(slide, params)
    finally:
        slide.close()
    return save_tissue_mask(mask, out_dir)
