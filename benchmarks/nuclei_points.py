"""Frames per second with 10^5 and 10^6 predicted nuclei: one napari Points layer vs the overlay.

Run under a (virtual) screen, from the repository root::

    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/nuclei_points.py [--sizes 100000 1000000]

For each size, nuclei are scattered over 1 cm^2 of "tissue" (clustered, with random
tumour probabilities). The baseline puts them all in one napari Points layer, as a
plain whole-slide run would; the plugin shows them with
:class:`~napari_pathology._widgets.nuclei_layers.PredictionOverlay` (a density image,
plus the points in view when there are few enough). Both are panned in steps, at the
whole-slide view and zoomed to a 400 um wide field, each step drawn synchronously.
Prints seconds to show the layer(s), median frames per second while panning, and the
time the overlay takes to refresh its in-view points after the camera stops.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import napari_pathology.models  # noqa: F401  registry before any OpenGL context (see _native.py)
from napari_pathology.nuclei.points import NucleusPoints

EXTENT_UM = 10_000.0
MPP = 0.25


def scattered_nuclei(n: int, seed: int = 0) -> NucleusPoints:
    """``n`` nuclei in blobs over ``EXTENT_UM`` squared, with tumour probabilities."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0.1, 0.9, (200, 2)) * EXTENT_UM
    which = rng.integers(0, len(centres), n)
    xy = np.clip(centres[which] + rng.normal(0, 350, (n, 2)), 0, EXTENT_UM - 1)
    return NucleusPoints(
        x_um=xy[:, 0],
        y_um=xy[:, 1],
        probability=rng.uniform(0, 1, n).astype(np.float32),
        area_um2=rng.uniform(15, 60, n).astype(np.float32),
    )


def draw(viewer) -> None:
    """Render one frame now."""
    from qtpy.QtWidgets import QApplication

    viewer.window._qt_viewer.canvas._scene_canvas.native.repaint()
    QApplication.processEvents()


def pan_fps(viewer, frames: int, step_um: float) -> float:
    """Median frames per second over ``frames`` synchronous pan steps."""
    times = []
    for _ in range(frames):
        start = time.perf_counter()
        y, x = viewer.camera.center[-2:]
        viewer.camera.center = (y, x + step_um)
        draw(viewer)
        times.append(time.perf_counter() - start)
    return 1.0 / float(np.median(times))


def fake_slide_layer(viewer):
    """An image layer carrying a slide's metadata (all the overlay reads)."""
    side = int(EXTENT_UM / MPP)
    meta = {"mpp_x": MPP, "mpp_y": MPP, "width": side, "height": side, "path": "benchmark"}
    return viewer.add_image(
        np.full((64, 64, 3), 230, np.uint8), rgb=True, scale=(EXTENT_UM / 64,) * 2,
        units=("micrometer", "micrometer"), metadata=meta, name="slide",
    )  # fmt: skip


def zoom_to(viewer, width_um: float) -> None:
    """Centre the camera on the tissue, ``width_um`` across."""
    viewer.camera.center = (EXTENT_UM / 2, EXTENT_UM / 2)
    viewer.camera.zoom = max(viewer.canvas.size) / width_um


def measure(n: int, frames: int) -> list[dict[str, float | str]]:
    """Baseline and overlay rows for ``n`` nuclei."""
    import napari

    from napari_pathology._widgets.nuclei_layers import PredictionOverlay, probability_rgba, world_from_um

    points = scattered_nuclei(n)
    rows = []
    for kind in ("points layer", "overlay"):
        viewer = napari.Viewer(show=True)
        slide = fake_slide_layer(viewer)
        draw(viewer)
        start = time.perf_counter()
        if kind == "points layer":
            viewer.add_points(
                world_from_um(points.xy_um(), (MPP, MPP)), size=7, border_width=0,
                face_color=probability_rgba(points.probability), features={"probability": points.probability},
            )  # fmt: skip
            overlay = None
        else:
            overlay = PredictionOverlay(viewer, slide, points, "predicted")
        viewer.reset_view()
        draw(viewer)
        shown = time.perf_counter() - start
        row: dict[str, float | str] = {"n": n, "kind": kind, "show_s": shown}
        row["fps_slide"] = pan_fps(viewer, frames, EXTENT_UM / 50)
        zoom_to(viewer, 400.0)
        if overlay is not None:
            start = time.perf_counter()
            overlay.update()
            draw(viewer)
            row["settle_s"] = time.perf_counter() - start
            row["in_view"] = len(overlay.points_layer.data)
        draw(viewer)
        row["fps_zoomed"] = pan_fps(viewer, frames, 20.0)
        rows.append(row)
        viewer.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--frames", type=int, default=8)
    args = parser.parse_args(argv)
    print(
        "| nuclei | shown as | time to show (s) | fps, whole slide | fps, 400 um field | overlay settle (s) |"
    )
    print("|---|---|---|---|---|---|")
    for n in args.sizes:
        rows = measure(n, args.frames)
        base = rows[0]
        for row in rows:
            gains = (row["fps_slide"] / base["fps_slide"], row["fps_zoomed"] / base["fps_zoomed"])
            ratio = "" if row is base else f" ({gains[0]:.0f}x / {gains[1]:.0f}x)"
            settle = f"{row['settle_s']:.3f} ({row['in_view']} in view)" if "settle_s" in row else "-"
            print(
                f"| {n:,} | {row['kind']}{ratio} | {row['show_s']:.2f} | {row['fps_slide']:.1f} | "
                f"{row['fps_zoomed']:.1f} | {settle} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
