"""Closing the viewer while the Analyze panel runs: the run stops and keeps a partial result."""

from __future__ import annotations

import json
import threading
import time

import numpy as np

# Import the model registry before any viewer exists: the registry's torchvision models pull in
# triton, whose native library crashes (SIGSEGV) when first loaded after napari has set up OpenGL.
import napari_pathology.models  # noqa: F401  isort: skip
from napari_pathology._widgets.analyze_panel import AnalyzePanel
from napari_pathology.analysis import HeatmapBlock, engine, result_folder
from napari_pathology.analysis.result import load_result
from napari_pathology.progress import Progress
from napari_pathology.slide import open_slide

PLUGIN = "napari-pathology"
MODEL = "nuclear-density"
#: Seconds each batch is held back, so the 70-tile run (batch size 1) lasts several seconds.
THROTTLE = 0.05
#: How long the worker may take to stop once the viewer is closed (seconds).
STOP_WITHIN = 5.0


def test_closing_the_viewer_mid_run_stops_the_worker_and_saves_a_partial_result(
    make_napari_viewer, qtbot, synthetic_slide, tmp_path, monkeypatch
) -> None:
    batches: list[int] = []
    to_batch = engine._to_batch

    def slow_to_batch(tiles: np.ndarray, normalization: str):
        batches.append(len(tiles))
        time.sleep(THROTTLE)
        return to_batch(tiles, normalization)

    monkeypatch.setattr(engine, "_to_batch", slow_to_batch)
    errors: list[str] = []
    monkeypatch.setattr("napari.utils.notifications.show_error", errors.append)

    viewer = make_napari_viewer()
    viewer.open(str(synthetic_slide.slide_path), plugin=PLUGIN)
    panel = AnalyzePanel(viewer)
    viewer.window.add_dock_widget(panel, name="Analyze")
    panel.select_model(MODEL)
    panel.batch_spin.setValue(1)
    panel.tta_check.setChecked(False)
    panel.out_edit.setText(str(tmp_path))

    blocks: list[HeatmapBlock] = []
    stopped = threading.Event()

    def on_yielded(event: Progress) -> None:
        if isinstance(event.payload, HeatmapBlock):
            blocks.append(event.payload)

    panel.run_button.click()
    worker = panel.worker
    assert worker is not None
    worker.yielded.connect(on_yielded)
    worker.finished.connect(stopped.set)
    worker.errored.connect(lambda error: errors.append(repr(error)))
    cancel = panel._cancel  # this run's cancel event, to clean up should the test fail
    try:
        qtbot.waitUntil(lambda: len(blocks) >= 1, timeout=60_000)
        assert not stopped.is_set(), "the run ended before the viewer could be closed mid-run"

        with qtbot.capture_exceptions() as exceptions:
            viewer.close()
            closed_at = time.perf_counter()
            qtbot.waitUntil(stopped.is_set, timeout=int(STOP_WITHIN * 1000))
            stop_seconds = time.perf_counter() - closed_at
            qtbot.wait(100)  # deliver the signals still queued from the worker
        assert not exceptions, [f"{kind.__name__}: {value}" for kind, value, _ in exceptions]
        assert not errors
        assert stop_seconds < STOP_WITHIN

        folder = result_folder(tmp_path, open_slide(synthetic_slide.slide_path), MODEL)
        meta = json.loads((folder / "result.json").read_text())
        assert meta["partial"] is True
        result = load_result(folder)
        assert result.partial
        assert 0 < result.tiles_done < result.tiles_total
        assert np.isfinite(result.heatmap).sum() == result.tiles_done
        assert len(batches) < result.tiles_total  # stopped early rather than running to the end
    finally:
        if not stopped.is_set():  # never leave a worker running into the next test
            cancel.set()
            worker.quit()
            qtbot.waitUntil(stopped.is_set, timeout=30_000)
        generator = getattr(worker, "_gen", None)  # an aborted worker leaves its job suspended:
        if generator is not None:  # close it now (keeping the loader's threads from lingering)
            generator.close()
        qtbot.wait(50)
