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
from napari_pathology.slide.synthetic.nuclei import _TUMOUR, NUCLEUS_KINDS
from napari_pathology.slide.synthetic.scene import _Scene

GENERATOR = "napari-pathology synthetic v1"

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
    labels = np.where(n.kind == _TUMOUR, "tumour", "normal")
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

    n_tumour_nuclei = int((n.kind == _TUMOUR).sum())
    label = "tumour" if tumour.any() else "normal"
    mask_mpp = grid.d * scene.mpp
    info = dict(scene.info)
    truth = {
        "label": label,
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
        "n_lesions": len(info.get("lesions", [])),
        "lesions": info.pop("lesions", []),
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
        **paths,
    )
