"""Benchmark the default nucleus detector on the MICCAI 2015 tiles and a synthetic H&E slide.

Prints a Markdown table of precision, recall and F1 per tile (matching radius 3 um) plus the
mean, and the detection time per megapixel; then whole-slide scores of the chunked run
(``detect_in_slide``, one shared threshold) on the synthetic seed-11 slide (3072 px, 0.5 um/px),
with recall per nucleus kind, at several chunk sizes.

The default parameters were tuned on both sets, so neither score is a held-out estimate.

Usage: ``python benchmarks/nuclei_detection.py [DATA_DIR]``
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from skimage.io import imread
from skimage.measure import regionprops_table

from napari_pathology.nuclei import (
    NucleusParams,
    detect_in_slide,
    detect_nuclei,
    detection_scores,
    match_points,
)
from napari_pathology.progress import run_to_completion

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


def synthetic(
    size: int = 3072, seed: int = 11, chunks: tuple[int, ...] = (3072, 1024, 256)
) -> dict[int, dict[str, float]]:
    """Whole-slide scores on a synthetic slide; recall per kind matches each kind on its own."""
    import pandas as pd

    from napari_pathology.slide import open_slide
    from napari_pathology.slide.synthetic import write_synthetic_slide

    out: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        truth_files = write_synthetic_slide(Path(tmp) / "synthetic.tif", size=size, seed=seed)
        truth = pd.read_csv(truth_files.nuclei_csv)
        slide = open_slide(truth_files.slide_path)
        kinds = sorted(truth.kind.unique())
        print(f"\nSynthetic slide seed {seed}, {size} px, {len(truth)} nuclei (radius {RADIUS_UM} um)")
        print(
            "| chunk px | pred | precision | recall | F1 | " + " | ".join(f"recall {k}" for k in kinds) + " |"
        )
        print("|---" * (5 + len(kinds)) + "|")
        for chunk in chunks:
            events: list = []
            table = run_to_completion(detect_in_slide(slide, chunk_px=chunk), events.append)
            s = detection_scores(table.xy_um(), truth[["x_um", "y_um"]].to_numpy(), RADIUS_UM)
            for k in kinds:
                true_k = truth[truth.kind == k][["x_um", "y_um"]].to_numpy()
                s[f"recall_{k}"] = match_points(table.xy_um(), true_k, RADIUS_UM)[0] / len(true_k)
            out[chunk] = s
            print(
                f"| {chunk} | {len(table)} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} | "
                + " | ".join(f"{s[f'recall_{k}']:.3f}" for k in kinds)
                + " |"
            )
        slide.close()
        print(events[0].message)
    return out


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DATA)
    synthetic()
