"""Save the README's Nuclei screenshot: nuclei detected in a region, labelled, classified.

A 250 um box straddling the planted tumour's edge on the demo slide is the region; the
nuclei found there are labelled from the slide's ground truth (as a pathologist would with
``t`` and ``n``), then the shipped ``nucleus-purity`` classifier colours them by tumour
probability, and the panel shows true and predicted purity side by side. Run under a
(virtual) screen::

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/nuclei_screenshot.py [OUT.png]
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

import napari_pathology.models  # noqa: F401  registry before any OpenGL context (see _native.py)


def settle(app, seconds: float = 1.0) -> None:
    """Let Qt paint for a moment."""
    for _ in range(int(seconds / 0.05)):
        app.processEvents()
        time.sleep(0.05)


def wait_for(app, button) -> None:
    """Process events until a panel's button is enabled again (its worker finished)."""
    while not button.isEnabled():
        app.processEvents()
        time.sleep(0.02)


def main() -> None:
    """Build the scene and save the screenshot."""
    import napari
    from qtpy.QtWidgets import QApplication
    from scipy.spatial import cKDTree

    from napari_pathology._viewer import dock_panels, show_slide
    from napari_pathology._widgets.nuclei_layers import points_from_layer
    from napari_pathology.demo import demo_slide
    from napari_pathology.geometry import geojson_to_polygons

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/images/nuclei.png")
    viewer = napari.Viewer(title="napari-pathology: nuclei")
    app = QApplication.instance()
    viewer.window._qt_window.resize(1500, 900)
    dock_panels(viewer)
    settle(app)
    slide_path = Path(demo_slide())
    [slide_layer] = show_slide(viewer, slide_path)
    mpp = slide_layer.metadata["mpp_x"]
    stem = slide_path.with_suffix("")
    [polygon] = geojson_to_polygons(json.loads(Path(f"{stem}.tumour.geojson").read_text()))
    ring = np.asarray(polygon[0]) * mpp  # level-0 px -> um
    edge = ring[np.argmin(ring[:, 0])]  # the tumour's leftmost point: half tumour, half normal
    x0, y0, side = edge[0] - 125, edge[1] - 125, 250.0
    box = np.array([[y0, x0], [y0, x0 + side], [y0 + side, x0 + side], [y0 + side, x0]])
    viewer.add_shapes([box], shape_type="rectangle", name="regions", edge_color="yellow",
                      face_color="transparent", edge_width=3, units=slide_layer.units)  # fmt: skip

    panel = viewer.window.dock_widgets["Nuclei (napari-pathology)"]
    panel.parent().raise_()
    panel.where_combo.setCurrentIndex(panel.where_combo.findData("regions"))
    panel.regions_combo.setCurrentText("regions")
    panel.detect()
    wait_for(app, panel.detect_button)
    layer = panel.nuclei_layer()

    with open(f"{stem}.nuclei.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    xy_true = np.array([[float(r["x_um"]), float(r["y_um"])] for r in rows])
    tumour_true = np.array([r["kind"] == "tumour" for r in rows])
    distance, nearest = cKDTree(xy_true).query(points_from_layer(layer, panel.mpp).xy_um())
    for label, chosen in (("tumour", tumour_true[nearest]), ("normal", ~tumour_true[nearest])):
        layer.selected_data = set(np.flatnonzero(chosen & (distance < 3.0)).tolist())
        panel.label_selected(label)
    layer.selected_data = set()

    panel.select_model("nucleus-purity")
    panel.classify()
    wait_for(app, panel.classify_button)
    viewer.camera.center = (y0 + side / 2, x0 + side / 2)
    viewer.camera.zoom = 600 / (side * 1.3)
    viewer.layers.selection.active = layer
    settle(app, 1.5)
    print(panel.counts_label.text())
    for summary in panel.summaries:
        print(summary)
    viewer.screenshot(str(out), canvas_only=False, flash=False)
    print(f"saved {out}")
    viewer.close()


if __name__ == "__main__":
    main()
