"""The Cohort panel: its table fills in from a cohort run, sorts, plots, and opens a slide with its result."""

from __future__ import annotations

import functools
import math

import pytest

import napari_pathology.batch as batch
from napari_pathology._widgets.cohort_panel import COLUMNS, CohortPanel

TIMEOUT_MS = 120_000


@pytest.fixture
def labelled_cohort(tmp_path_factory):
    """3 synthetic 2048 px slides (1 negative, 2 macro-metastasis) and their table."""
    from napari_pathology.cohort import write_synthetic_cohort
    from napari_pathology.progress import run_to_completion

    folder = tmp_path_factory.mktemp("panel-cohort")
    job = write_synthetic_cohort(folder, 3, 7, size=2048, negative_fraction=0.34, micro_fraction=0)
    return run_to_completion(job)


@pytest.mark.slow
def test_the_table_fills_in_from_a_run_and_a_double_click_opens_the_result(
    make_napari_viewer, qtbot, labelled_cohort, tmp_path, monkeypatch
) -> None:
    # the runner in this process (its dask path is tested in tests/batch): the panel's wiring is the same
    monkeypatch.setattr(batch, "run_cohort", functools.partial(batch.run_cohort, in_process=True))
    viewer = make_napari_viewer()
    panel = CohortPanel(viewer)
    qtbot.addWidget(panel)
    panel.table_edit.setText(str(labelled_cohort))
    panel.model_combo.setCurrentText("nuclear-density")
    panel.out_edit.setText(str(tmp_path / "out"))
    seen: list[str] = []
    handler = panel._on_event  # wrapped before Start connects it: no event comes before the test sees it
    monkeypatch.setattr(panel, "_on_event", lambda event: (seen.append(event.message), handler(event)))
    panel.start()
    qtbot.waitUntil(lambda: panel.result is not None, timeout=TIMEOUT_MS)
    assert seen[0] == "3 slides in cohort.csv"  # read in the worker: the rows came in as pending
    assert any("slide score" in message for message in seen)  # slides reported as they finished
    rows = panel.row_texts()
    assert [row[2] for row in rows] == ["done"] * 3
    assert all(math.isfinite(float(row[3])) and float(row[4]) >= 0 for row in rows)
    assert "AUC" in panel.status.text() and "3 done" in panel.status.text()
    assert panel.plots.labels == ["normal", "tumour"]

    panel.table.sortItems(COLUMNS.index("score"))  # numeric sort: the lowest score first
    scores = [float(row[3]) for row in panel.row_texts()]
    assert scores == sorted(scores) and panel.row_texts()[0][1] == "normal"

    panel._open_row(0)
    names = [layer.name for layer in viewer.layers]
    assert names[0].startswith("synthetic-") and any("nuclear-density" in name for name in names)

    panel.start()  # a rerun skips every slide
    qtbot.waitUntil(lambda: panel.start_button.isEnabled(), timeout=TIMEOUT_MS)
    assert [row[2] for row in panel.row_texts()] == ["skipped"] * 3


def test_start_without_a_table_says_why(make_napari_viewer, qtbot) -> None:
    panel = CohortPanel(make_napari_viewer())
    qtbot.addWidget(panel)
    panel.table_edit.setText("")
    panel.start()
    assert panel.running is None and "choose a slide table" in panel.status.text()


def test_a_missing_table_is_said_in_the_status_line(make_napari_viewer, qtbot, tmp_path) -> None:
    panel = CohortPanel(make_napari_viewer())
    qtbot.addWidget(panel)
    panel.table_edit.setText(str(tmp_path / "nope.csv"))
    panel.out_edit.setText(str(tmp_path / "out"))
    panel.start()
    qtbot.waitUntil(lambda: not panel.running.running, timeout=TIMEOUT_MS)
    assert "failed:" in panel.status.text() and "nope.csv" in panel.status.text()
    assert panel.table.rowCount() == 0
