"""Run with the shipped CLAM demo models: the slide's class, and attention on the planted tumour."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_pathology.analysis import run
from napari_pathology.analysis.jobs import tissue_or_detect
from napari_pathology.geometry import geojson_to_polygons, points_in_polygons
from napari_pathology.models import create_model
from napari_pathology.progress import run_to_completion
from napari_pathology.slide import open_slide
from napari_pathology.slide.synthetic import write_synthetic_slide


def _run(path, name):
    slide = open_slide(path)
    return run_to_completion(
        run(slide, create_model(name), tissue=run_to_completion(tissue_or_detect(slide)))
    )


@pytest.mark.slow
def test_the_binary_demo_finds_the_tumour_and_attends_to_it(synthetic_slide, tmp_path) -> None:
    result = _run(synthetic_slide.slide_path, "clam-demo")
    assert result.heatmap_kind == "attention" and result.score_name == "P(tumour)"
    assert result.slide_score > 0.9
    polygons = geojson_to_polygons(json.loads(synthetic_slide.tumour_geojson.read_text()))
    mpp = np.asarray(result.slide_mpp)
    inside = points_in_polygons(result.detections[:, :2] / mpp, polygons) >= 0  # polygons in level-0 px
    assert inside[0], result.detections  # the most attended patch lies in the tumour
    assert result.detections[inside, 2].sum() > 0.9  # and so does most of the attention
    negative = write_synthetic_slide(tmp_path / "normal.tif", 3072, 12, negative=True)
    assert _run(negative.slide_path, "clam-demo").slide_score < 0.1


@pytest.mark.slow
def test_the_subtype_demo_names_type_b(tmp_path) -> None:
    truth = write_synthetic_slide(tmp_path / "b.tif", 3072, 11, tumour_type="B")
    result = _run(truth.slide_path, "clam-subtype-demo")
    assert max(result.scores, key=result.scores.get) == "tumour_b", result.scores
    assert result.class_heatmaps is not None and result.class_heatmaps.shape[0] == 3
    assert result.provenance["attention_branch"] == "tumour_b"
