"""Qt event-loop stalls while the Train panel fine-tunes a model in the background.

Run under a (virtual) screen, from the repository root::

    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/train_stall.py [--steps 40]

A 5 ms ``QTimer`` heartbeat records the gaps between its ticks, first with
the viewer idle (baseline), then while a CPU fine-tune of the shipped
``metastasis`` model runs from a tumour region drawn on a synthetic slide.
Prints the longest gap and the 99th percentile of each (target: <= 50 ms).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import napari_pathology.models  # noqa: F401  registry before any OpenGL context (see _native.py)
from napari_pathology.geometry import geojson_to_polygons
from napari_pathology.slide.synthetic import write_synthetic_slide

OUT = Path(__file__).parent / "out"


def main(argv: list[str] | None = None) -> int:
    """Measure and print the stall table."""
    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle baseline")
    args = parser.parse_args(argv)
    slide = OUT / "train-stall-3072.tif"
    if not slide.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        write_synthetic_slide(slide, size=3072, seed=11)
    truth = slide.with_name(slide.stem + ".tumour.geojson")
    [polygon] = geojson_to_polygons(json.loads(truth.read_text()))

    viewer = napari.Viewer(show=True)
    [layer] = viewer.open(str(slide), plugin="napari-pathology")
    mpp = layer.metadata["mpp_x"]
    viewer.add_shapes([np.asarray(polygon[0])[:, ::-1] * mpp], shape_type="polygon",
                      features={"label": ["tumour"]}, name="regions", units=layer.units)  # fmt: skip
    _dock, panel = viewer.window.add_plugin_dock_widget("napari-pathology", "Train")
    panel.select_family("metastasis")
    panel.select_start("metastasis")
    panel.set_source("viewer")
    panel.shapes_combo.setCurrentText("regions")
    panel.setting_widget("val_fraction").value = 0.0
    panel.setting_widget("steps").value = args.steps
    panel.setting_widget("batch_size").value = 16
    panel.device_combo.setCurrentIndex(panel.device_combo.findData("cpu"))
    panel.out_edit.setText(tempfile.mkdtemp(prefix="train-stall-"))

    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(5)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()

    def spin(until: float, done=lambda: False) -> None:
        while time.perf_counter() < until and not done():
            QApplication.processEvents()
            time.sleep(0.001)

    def gaps(start: float, stop: float) -> np.ndarray:
        t = np.array([x for x in ticks if start <= x <= stop])
        return np.diff(t) * 1000 if len(t) > 2 else np.zeros(1)

    spin(time.perf_counter() + 1.0)
    idle_start = time.perf_counter()
    spin(idle_start + args.idle)
    idle = gaps(idle_start, time.perf_counter())
    run_start = time.perf_counter()
    panel.start_button.click()
    job = panel.current_job
    spin(run_start + 600, lambda: job is None or job.done)
    run = gaps(run_start, time.perf_counter())
    seconds = time.perf_counter() - run_start
    timer.stop()
    print(f"\nfine-tune of `metastasis`, {args.steps} steps of 16 patches on CPU, {seconds:.0f} s; "
          f"job state: {job.state if job else 'not started'}\n")  # fmt: skip
    print("| measure | idle viewer (baseline) | while training | ratio |")
    print("|---|---:|---:|---:|")
    for name, f in (("longest stall (ms)", np.max), ("p99 stall (ms)", lambda g: np.percentile(g, 99))):
        a, b = float(f(idle)), float(f(run))
        print(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f} |")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
