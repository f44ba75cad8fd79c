"""``evaluate`` through the cohort runner: on dask workers it gives what it gives in this process."""

from __future__ import annotations

import json

import pytest

from napari_pathology.analysis.evaluate import evaluate_cohort
from napari_pathology.cli import main
from napari_pathology.cohort import read_slide_table
from napari_pathology.models import resolve_model
from napari_pathology.progress import run_to_completion


@pytest.mark.slow
def test_evaluate_on_dask_workers_equals_in_process(small_cohort, tmp_path, dask_scheduler, capsys) -> None:
    entries = read_slide_table(small_cohort)
    here = run_to_completion(evaluate_cohort(resolve_model("nuclear-density"), entries, tmp_path / "here"))
    assert here.auc is not None and not here.failed
    out = tmp_path / "dask"
    words = ["evaluate", "--model", "nuclear-density", "--data", str(small_cohort), "--out", str(out),
             "--scheduler", dask_scheduler, "--quiet"]  # fmt: skip
    assert main(words) == 0
    assert "slide AUC" in capsys.readouterr().out
    there = json.loads((out / "evaluation-nuclear-density.json").read_text())
    assert there["slide_auc"]["auc"] == pytest.approx(here.auc.auc)
    assert [row["slide_score"] for row in there["slides"]] == pytest.approx(
        [o.slide_score for o in here.outcomes]
    )
    assert (tmp_path / "dask" / "cohort.csv").is_file()
