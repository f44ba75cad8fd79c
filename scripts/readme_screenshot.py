"""Save the README screenshot: the demo slide after Run with the shipped ``metastasis`` model.

Run under a (virtual) screen::

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/readme_screenshot.py [OUT.png]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import napari
from qtpy.QtWidgets import QApplication

from napari_pathology._viewer import dock_panels, show_slide
from napari_pathology.demo import demo_slide

out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/images/demo.png")
viewer = napari.Viewer(title="napari-pathology demo")
viewer.window._qt_window.resize(1500, 900)
dock_panels(viewer)
for _ in range(20):  # let Qt lay out the docks before fitting the slide to the canvas
    QApplication.processEvents()
    time.sleep(0.05)
show_slide(viewer, demo_slide())
for _ in range(10):
    QApplication.processEvents()
    time.sleep(0.05)
analyze = viewer.window.dock_widgets["Analyze (napari-pathology)"]
analyze.model_combo.setCurrentIndex(analyze.model_combo.findData("metastasis"))
analyze.run()
while not analyze.run_button.isEnabled():  # the worker runs; the viewer keeps painting
    QApplication.processEvents()
    time.sleep(0.02)
for _ in range(20):
    QApplication.processEvents()
    time.sleep(0.05)
print(analyze.score_label.text(), "|", analyze.status.text())
viewer.screenshot(str(out), canvas_only=False, flash=False)
print(f"saved {out}")
viewer.close()
