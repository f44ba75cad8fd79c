"""Make a synthetic H&E slide with planted tumour and look at it with its ground truth.

Usage::

    python examples/02_synthetic_slide_in_napari.py [OUT.tif] [--screenshot PNG]

Writes OUT.tif (default: synthetic.tif in the current folder) with its ground
truth, then opens napari with the slide, the tumour outlines (a shapes layer)
and every nucleus (points coloured tumour red / normal green), all in
micrometres. With --screenshot it saves a picture and exits instead.
"""

from __future__ import annotations

import argparse
import csv
import json

import napari
import numpy as np

from napari_pathology._viewer import show_slide
from napari_pathology.geometry import geojson_to_polygons
from napari_pathology.slide.synthetic import write_synthetic_slide

parser = argparse.ArgumentParser()
parser.add_argument("out", nargs="?", default="synthetic.tif")
parser.add_argument("--size", type=int, default=6000)
parser.add_argument("--seed", type=int, default=4)
parser.add_argument("--screenshot", default=None)
args = parser.parse_args()

truth = write_synthetic_slide(args.out, size=args.size, seed=args.seed)
print(f"{truth.slide_path}: label {truth.label}, tumour {truth.tumour_area_um2 / 1e6:.2f} mm^2")

viewer = napari.Viewer(show=args.screenshot is None)
show_slide(viewer, truth.slide_path)
mpp = truth.mpp

# Tumour polygons are stored in level-0 pixels (x, y); napari wants (y, x) in um.
outlines = [
    polygon[0][:, ::-1] * mpp for polygon in geojson_to_polygons(json.loads(truth.tumour_geojson.read_text()))
]
if outlines:
    viewer.add_shapes(outlines, shape_type="polygon", edge_color="yellow", edge_width=20,
                      face_color="transparent", name="tumour (truth)", units="micrometer")  # fmt: skip

with open(truth.nuclei_csv) as handle:
    rows = list(csv.DictReader(handle))
points = np.array([[float(r["y_um"]), float(r["x_um"])] for r in rows])
labels = np.array([r["label"] for r in rows])
viewer.add_points(points, features={"label": labels}, face_color="label",
                  face_color_cycle=["#e04040", "#40c040"], size=6, border_width=0,
                  name="nuclei (truth)", visible=False, units="micrometer")  # fmt: skip
viewer.reset_view()

if args.screenshot:
    viewer.screenshot(args.screenshot, canvas_only=False, flash=False)
    print(f"saved {args.screenshot}")
else:
    napari.run()
