"""The cohort runner: results equal sequential runs, done markers, reruns, failures, killed workers."""

from __future__ import annotations

import csv
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from napari_pathology.analysis import RunSettings, load_result, result_folder, run, tissue_or_detect
from napari_pathology.batch import SlideReport, cohort_tasks, process_slide, read_marker, run_cohort
from napari_pathology.batch import runner as runner_module
from napari_pathology.cohort import SlideEntry, read_slide_table
from napari_pathology.models import resolve_model
from napari_pathology.progress import run_to_completion
from napari_pathology.slide import open_slide

MODEL = "nuclear-density"


def rows(table: Path) -> dict[str, dict[str, str]]:
    with open(table, newline="", encoding="utf-8") as handle:
        return {row["slide"]: row for row in csv.DictReader(handle)}


def sequential(path: Path, out: Path):
    """The slide's result as ``napari-pathology run`` computes it."""
    slide = open_slide(path)
    model = resolve_model(MODEL)
    tissue = run_to_completion(tissue_or_detect(slide))
    return run_to_completion(run(slide, model, tissue=tissue, out_dir=result_folder(out, slide, MODEL)))


def assert_same(result, expected) -> None:
    assert not result.partial
    assert result.slide_score == pytest.approx(expected.slide_score, abs=1e-6)
    np.testing.assert_allclose(result.heatmap, expected.heatmap, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(result.detections, expected.detections, atol=1e-6)


def test_a_rerun_skips_done_slides_and_force_recomputes(small_cohort, tmp_path, monkeypatch) -> None:
    entries = read_slide_table(small_cohort)[:2]
    first = run_to_completion(run_cohort(entries, MODEL, tmp_path, in_process=True))
    assert [r.status for r in first.reports] == ["done", "done"]
    assert {row["status"] for row in rows(first.table).values()} == {"done"}
    assert first.evaluation is not None  # labels known: scored as evaluate scores
    assert (tmp_path / f"evaluation-{MODEL}.json").is_file()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a done slide ran again")

    monkeypatch.setattr(runner_module, "process_slide", must_not_run)
    again = run_to_completion(run_cohort(entries, MODEL, tmp_path, in_process=True))
    assert [r.status for r in again.reports] == ["skipped", "skipped"]
    assert again.complete
    assert [r.slide_score for r in again.reports] == [r.slide_score for r in first.reports]
    with pytest.raises(AssertionError, match="ran again"):
        run_to_completion(run_cohort(entries, MODEL, tmp_path, in_process=True, force=True))
    monkeypatch.undo()
    # a result folder that was removed is computed again, whatever its marker says
    shutil.rmtree(first.reports[0].output)
    third = run_to_completion(run_cohort(entries, MODEL, tmp_path, in_process=True))
    assert [r.status for r in third.reports] == ["done", "skipped"]


def test_a_broken_slide_fails_alone_with_its_message(small_cohort, tmp_path) -> None:
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"not a tiff at all" * 100)
    good = read_slide_table(small_cohort)[0]
    entries = [SlideEntry(broken, "tumour"), good]
    cohort = run_to_completion(run_cohort(entries, MODEL, tmp_path / "out", in_process=True))
    failed, done = cohort.reports
    assert (failed.status, done.status) == ("failed", "done")
    assert "broken.tif" in failed.error and "\n" not in failed.error
    task = cohort_tasks([entries[0]], MODEL, MODEL, tmp_path / "out", RunSettings())[0]
    assert read_marker(task) is None
    table = rows(cohort.table)
    assert table["broken.tif"]["status"] == "failed" and table["broken.tif"]["error"] == failed.error
    assert not cohort.complete
    assert any("broken.tif" in name for name in cohort.evaluation.failed)


def test_a_slide_stopped_midway_is_kept_partial_and_not_marked_done(small_cohort, tmp_path) -> None:
    entry = read_slide_table(small_cohort)[0]
    task = cohort_tasks([entry], MODEL, MODEL, tmp_path, RunSettings(batch_size=4))[0]
    cancel = threading.Event()

    def stop_after_a_batch(step) -> None:
        if "/" in step.message:
            cancel.set()

    report = process_slide(task, cancel=cancel, on_progress=stop_after_a_batch)
    assert report.status == "cancelled"
    assert load_result(report.output).partial
    assert read_marker(task) is None
    finished = process_slide(task)  # resumes as run does, then marks it done
    assert finished.status == "done" and not load_result(finished.output).partial
    assert read_marker(task).status == "skipped"


@pytest.mark.slow
def test_dask_results_equal_sequential_runs(small_cohort, tmp_path, dask_scheduler) -> None:
    entries = read_slide_table(small_cohort)
    cohort = run_to_completion(run_cohort(entries, MODEL, tmp_path / "dask", scheduler=dask_scheduler))
    assert cohort.complete, [r.error for r in cohort.reports]
    assert len({r.worker for r in cohort.reports}) >= 1
    for entry, report in zip(entries, cohort.reports, strict=True):
        assert_same(load_result(report.output), sequential(entry.path, tmp_path / "sequential"))
    table = rows(cohort.table)
    assert [row["status"] for row in table.values()] == ["done"] * len(entries)
    assert all(float(row["seconds"]) > 0 and row["worker"] for row in table.values())


@pytest.mark.slow
def test_a_worker_killed_mid_slide_is_retried(small_cohort, tmp_path, dask_scheduler, crash_flag) -> None:

    source = read_slide_table(small_cohort)[1].path
    crashing = tmp_path / "slides" / "crash-once.tif"  # the stem the dask_scheduler fixture names
    crashing.parent.mkdir()
    shutil.copy(source, crashing)
    entries = [SlideEntry(crashing, "tumour"), read_slide_table(small_cohort)[0]]
    cohort = run_to_completion(run_cohort(entries, MODEL, tmp_path / "out", scheduler=dask_scheduler))
    assert crash_flag.exists(), "the test hook did not kill a worker"
    assert [r.status for r in cohort.reports] == ["done", "done"], [r.error for r in cohort.reports]
    result = load_result(cohort.reports[0].output)  # verified: the whole result, never half of one
    assert_same(result, sequential(crashing, tmp_path / "sequential"))
    leftovers = [p for p in (tmp_path / "out").rglob(".*") if p.name.endswith((".tmp", ".old"))]
    assert leftovers == []


def test_features_of_two_same_named_slides_are_refused(tmp_path) -> None:
    entries = [SlideEntry(tmp_path / "a" / "s.tif"), SlideEntry(tmp_path / "b" / "s.tif")]
    with pytest.raises(ValueError, match=r"would both be written to s\.h5"):
        run_to_completion(run_cohort(entries, None, tmp_path / "out", encoder="resnet50-trunc"))


def test_a_model_built_in_code_is_refused_on_a_cluster(tmp_path) -> None:
    model = resolve_model(MODEL)
    with pytest.raises(ValueError, match="runs in this process only"):
        run_to_completion(run_cohort([SlideEntry(tmp_path / "s.tif")], model, tmp_path))


def test_a_report_round_trips_through_its_marker_dict() -> None:
    report = SlideReport("/x/s.tif", "s.tif", "tumour", "done", 0.5, "slide score (max)", {"tumour": 0.5}, 3)
    assert SlideReport.from_dict(report.to_dict() | {"unknown": 1}) == report
