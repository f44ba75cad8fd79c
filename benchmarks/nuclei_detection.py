"""Benchmark the default nucleus detector on the MICCAI 2015 segmentation tiles.

Prints a Markdown table of precision, recall and F1 per tile (matching radius 3 um) plus the
mean, and the detection time per megapixel.

Usage: ``python benchmarks/nuclei_detection.py [DATA_DIR]``
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from skimage.io import imread
from skimage.measure import regionprops_table

from napari_pathology.nuclei import NucleusParams, detect_nuclei, detection_scores

DATA = Path("/work/shared/data/nuclei/miccai2015")
RADIUS_UM = 3.0
# README_training.txt: images 01-07 at 20x, 08-15 at 40x -> nominal 0.5 / 0.25 um/px.
MPP = {f"image{i:02d}": (0.5 if i <= 7 else 0.25) for i in range(1, 16)}
# The masks of image04 and image05 are swapped in the release (their shapes only fit crosswise).
MASK_FOR = {"image04": "image05", "image05": "image04"}


def load_mask(path: Path) -> np.ndarray:
    """Read a MICCAI ASCII label mask (header ``width height``, then x-fastest labels)."""
    values = np.loadtxt(path, dtype=np.int64, max_rows=1)
    width, height = int(values[0]), int(values[1])
    labels = np.loadtxt(path, dtype=np.int32, skiprows=1)
    return labels.reshape(height, width)


def load_tile(data: Path, name: str) -> tuple[np.ndarray, np.ndarray, float]:
    """Return (rgb, true_xy_um, mpp) for one tile."""
    rgb = imread(data / f"{name}.png")[..., :3]
    mask = load_mask(data / f"{MASK_FOR.get(name, name)}_mask.txt")
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"{name}: mask shape {mask.shape} != image shape {rgb.shape[:2]}")
    mpp = MPP[name]
    props = regionprops_table(mask, properties=("centroid",))
    true_xy = np.column_stack([props["centroid-1"] + 0.5, props["centroid-0"] + 0.5]) * mpp
    return rgb, true_xy, mpp


def main(data: Path = DATA, params: NucleusParams | None = None) -> list[dict[str, float]]:
    """Run the benchmark and print a Markdown table."""
    names = sorted(p.stem for p in data.glob("image??.png"))
    rows = []
    total_s = 0.0
    total_mpx = 0.0
    print(f"| tile | mpp | true | pred | precision | recall | F1 |  (radius {RADIUS_UM} um)")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        rgb, true_xy, mpp = load_tile(data, name)
        t0 = time.perf_counter()
        table = detect_nuclei(rgb, mpp, params)
        total_s += time.perf_counter() - t0
        total_mpx += rgb.shape[0] * rgb.shape[1] / 1e6
        s = detection_scores(table.xy_um(), true_xy, RADIUS_UM)
        rows.append(s)
        print(
            f"| {name} | {mpp} | {len(true_xy)} | {len(table)} | {s['precision']:.3f} | "
            f"{s['recall']:.3f} | {s['f1']:.3f} |"
        )
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("precision", "recall", "f1")}
    print(f"| **mean** | | | | {mean['precision']:.3f} | {mean['recall']:.3f} | {mean['f1']:.3f} |")
    print(f"\nDetection time: {total_s / total_mpx:.2f} s per megapixel ({total_mpx:.2f} Mpx total)")
    return rows


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DATA)
