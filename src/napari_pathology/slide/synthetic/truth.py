"""Ground-truth sidecar files of a synthetic slide: paths, reading and writing."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from napari_pathology.fileio import atomic_path, atomic_write, read_json_file
from napari_pathology.geometry import field_to_polygons, polygon_area, polygons_to_geojson
from napari_pathology.slide.synthetic.fields import _F_TISSUE, _F_TUMOUR
from napari_pathology.slide.synthetic.nuclei import _TUMOUR_CODES, NUCLEUS_KINDS
from napari_pathology.slide.synthetic.scene import _Scene

GENERATOR = "napari-pathology synthetic v1"

#: Tumour types: ``A`` crowded hyperchromatic nuclei in nests between desmoplastic septa (the
#: generator's original tumour); ``B`` solid sheets of large pleomorphic vesicular nuclei with
#: prominent nucleoli and abundant eosinophilic cytoplasm, at about half of A's nuclear density.
TUMOUR_TYPES = ("A", "B")
#: Slide labels of the subtyping task, in class order: no tumour, tumour type A, tumour type B.
SUBTYPE_LABELS = ("normal", "tumour_a", "tumour_b")
#: Slide labels of the binary task (the truth's ``label``), in class order.
BINARY_LABELS = ("normal", "tumour")

_SUFFIXES = {
    "truth_json": ".truth.json",
    "tumour_geojson": ".tumour.geojson",
    "tissue_png": ".tissue.png",
    "tumour_png": ".tumour.png",
    "nuclei_csv": ".nuclei.csv",
}


@dataclass(frozen=True)
class SyntheticTruth:
    """Paths and facts of a written synthetic slide.

    Attributes
    ----------
    slide_path, truth_json, tumour_geojson, tissue_png, tumour_png, nuclei_csv : Path
        The slide and its sidecar files.
    label : str
        ``"tumour"`` or ``"normal"``.
    mpp : float
        Level-0 micrometres per pixel.
    width, height : int
        Level-0 size in pixels.
    tumour_area_um2 : float
        Area of the tumour polygons in square micrometres.
    mask_mpp : float
        Micrometres per pixel of the PNG masks.
    n_nuclei : int
        Number of rendered nuclei (rows of the CSV).
    tumour_type : str or None
        ``"A"`` or ``"B"`` (see :data:`TUMOUR_TYPES`); None on a normal slide.

    """

    slide_path: Path
    truth_json: Path
    tumour_geojson: Path
    tissue_png: Path
    tumour_png: Path
    nuclei_csv: Path
    label: str
    mpp: float
    width: int
    height: int
    tumour_area_um2: float
    mask_mpp: float
    n_nuclei: int
    tumour_type: str | None = None


def truth_paths(slide_path: str | os.PathLike[str]) -> dict[str, Path]:
    """Sidecar ground-truth paths for a slide (same stem, same folder).

    Parameters
    ----------
    slide_path : path-like
        The slide, e.g. ``OUT.tif``.

    Returns
    -------
    dict of str to Path
        ``slide_path`` (the slide itself) and the sidecars ``truth_json``,
        ``tumour_geojson``, ``tissue_png``, ``tumour_png`` and ``nuclei_csv``
        (e.g. ``OUT.truth.json``); the keys match :class:`SyntheticTruth`.

    """
    slide = Path(slide_path)
    stem = slide.with_suffix("")
    paths = {"slide_path": slide}
    paths.update({key: stem.with_name(stem.name + suffix) for key, suffix in _SUFFIXES.items()})
    return paths


def load_truth(slide_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the ``OUT.truth.json`` written beside a synthetic slide.

    Parameters
    ----------
    slide_path : path-like
        The slide (or the truth JSON itself).

    Returns
    -------
    dict
        The parsed JSON.

    """
    path = Path(slide_path)
    if not path.name.endswith(_SUFFIXES["truth_json"]):
        path = truth_paths(path)["truth_json"]
    return read_json_file(path, "synthetic truth file")


def check_tumour_type(tumour_type: str | None, negative: bool) -> str | None:
    """The tumour type in canonical spelling (``"A"``/``"B"``), None for a normal slide.

    Parameters
    ----------
    tumour_type : str or None
        ``"A"``, ``"B"`` (either case) or None (``"A"`` on a slide with tumour).
    negative : bool
        The slide is normal (no tumour).

    Raises
    ------
    ValueError
        An unknown type, or a type given for a normal slide.
    """
    if tumour_type is None:
        return None if negative else "A"
    value = str(tumour_type).strip().upper()
    if value not in TUMOUR_TYPES:
        raise ValueError(f"tumour_type must be one of {', '.join(TUMOUR_TYPES)}, got {tumour_type!r}")
    if negative:
        raise ValueError(f"a normal (negative) slide has no tumour, so no tumour type; got {tumour_type!r}")
    return value


def slide_label(truth: dict[str, Any] | str | os.PathLike[str], subtypes: bool = True) -> str:
    """A slide-table label from a synthetic slide's truth.

    Parameters
    ----------
    truth : dict or path-like
        The parsed truth JSON (:func:`load_truth`), or the slide / truth JSON path.
    subtypes : bool
        One of :data:`SUBTYPE_LABELS` (``normal``, ``tumour_a``, ``tumour_b``);
        else one of :data:`BINARY_LABELS` (``normal``, ``tumour``).

    Returns
    -------
    str
        The label. Truth written before tumour types existed is type A.

    Raises
    ------
    ValueError
        The truth has no usable ``label`` or ``tumour_type``.
    """
    data = truth if isinstance(truth, dict) else load_truth(truth)
    label = data.get("label")
    if label not in BINARY_LABELS:
        raise ValueError(f"synthetic truth has label {label!r}; expected one of {', '.join(BINARY_LABELS)}")
    if label == "normal" or not subtypes:
        return str(label)
    kind = data.get("tumour_type") or "A"
    if kind not in TUMOUR_TYPES:
        expected = ", ".join(TUMOUR_TYPES)
        raise ValueError(f"synthetic truth has tumour_type {kind!r}; expected one of {expected}")
    return SUBTYPE_LABELS[1 + TUMOUR_TYPES.index(kind)]


def _write_truth(
    scene: _Scene,
    slide_path: Path,
    seed: int,
    options: dict[str, Any],
    levels: list[tuple[int, int]],
) -> SyntheticTruth:
    paths = truth_paths(slide_path)
    del paths["slide_path"]
    grid = scene.grid
    tissue = scene.fields[_F_TISSUE] > 0
    tumour_field = scene.fields[_F_TUMOUR]
    tumour = tumour_field > 0
    for key, array in (("tissue_png", tissue), ("tumour_png", tumour)):
        with atomic_path(paths[key], suffix=".png") as tmp:
            Image.fromarray(array.astype(np.uint8) * 255).save(tmp, format="PNG")

    polygons = field_to_polygons(tumour_field, 0.0, scale=float(grid.d))
    clipped = []
    for polygon in polygons:
        rings = []
        for ring in polygon:
            ring = ring.copy()
            np.clip(ring[:, 0], 0, scene.width, out=ring[:, 0])
            np.clip(ring[:, 1], 0, scene.height, out=ring[:, 1])
            rings.append(np.round(ring, 2))
        clipped.append(rings)
    geojson = polygons_to_geojson(clipped, classification="Tumor", color=(200, 0, 0))
    atomic_write(paths["tumour_geojson"], json.dumps(geojson))
    tumour_area_um2 = float(sum(polygon_area(p) for p in clipped)) * scene.mpp**2

    n = scene.nuclei
    is_tumour = np.isin(n.kind, _TUMOUR_CODES)
    labels = np.where(is_tumour, "tumour", "normal")
    kinds = np.asarray(NUCLEUS_KINDS)[n.kind]
    lines = ["x_um,y_um,label,radius_um,kind"]
    lines += [
        f"{x:.2f},{y:.2f},{lab},{r:.2f},{k}"
        for x, y, lab, r, k in zip(
            n.x_um.tolist(),
            n.y_um.tolist(),
            labels.tolist(),
            n.r_um.tolist(),
            kinds.tolist(),
            strict=True,
        )
    ]
    atomic_write(paths["nuclei_csv"], "\n".join(lines) + "\n")

    n_tumour_nuclei = int(is_tumour.sum())
    label = "tumour" if tumour.any() else "normal"
    tumour_type = scene.tumour_type if label == "tumour" else None
    mask_mpp = grid.d * scene.mpp
    info = dict(scene.info)
    lesions = [dict(lesion, tumour_type=tumour_type) for lesion in info.pop("lesions", [])]
    truth = {
        "label": label,
        "tumour_type": tumour_type,
        "mpp": scene.mpp,
        "width": scene.width,
        "height": scene.height,
        "seed": int(seed),
        "tumour_area_um2": tumour_area_um2,
        "tumour_area_mm2": tumour_area_um2 / 1e6,
        "tissue_area_mm2": float(tissue.sum()) * mask_mpp**2 / 1e6,
        "mask_mpp": mask_mpp,
        "mask_downsample": grid.d,
        "mask_shape": [grid.gh, grid.gw],
        "n_nuclei": len(n),
        "n_tumour_nuclei": n_tumour_nuclei,
        "n_nuclei_by_kind": info.pop("n_nuclei_by_kind"),
        "n_lesions": len(lesions),
        "lesions": lesions,
        "levels": [list(d) for d in levels],
        "artefacts": {k: info.pop(k) for k in ("pen_mark", "blurred_patch") if k in info},
        "stain": info.pop("stain"),
        "files": {k: p.name for k, p in paths.items()} | {"slide": slide_path.name},
        "generator": GENERATOR,
        "options": options,
    }
    atomic_write(paths["truth_json"], json.dumps(truth, indent=2))
    return SyntheticTruth(
        slide_path=slide_path,
        label=label,
        mpp=scene.mpp,
        width=scene.width,
        height=scene.height,
        tumour_area_um2=tumour_area_um2,
        mask_mpp=mask_mpp,
        n_nuclei=len(n),
        tumour_type=tumour_type,
        **paths,
    )
