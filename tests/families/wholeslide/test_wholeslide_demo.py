"""The shipped whole-slide CNN demo (``wholeslide-demo``): registered, labelled, tells tumour from normal."""

from __future__ import annotations

import numpy as np
import pytest

from napari_pathology.models.pretrained import shipped_weights


def test_demo_is_registered_and_labelled() -> None:
    from napari_pathology.models import resolve_model
    from napari_pathology.models.registry import list_models

    assert "wholeslide-demo" in [spec.name for spec in list_models()]
    model = resolve_model("wholeslide-demo")
    spec = model.spec
    assert spec.family == "wholeslide" and tuple(spec.classes) == ("normal", "tumour_a", "tumour_b")
    assert "synthetic demo" in spec.description and "Chen et al. 2021" in spec.description
    assert spec.config["arch"] == "resnet18" and spec.mpp >= 2.5
    path = shipped_weights()["wholeslide-demo"]
    assert path.stat().st_size < 5e6  # a few MB at most
    assert model.provenance.get("trained_by") == "scripts/train_wholeslide_demo.py"


@pytest.mark.slow
@pytest.mark.parametrize(("tumour_type", "seed"), [("A", 1016), ("B", 1017)])
def test_demo_tells_each_tumour_type_from_normal_and_its_cam_peaks_in_the_tumour(
    tmp_path, tumour_type, seed
) -> None:
    from PIL import Image

    from napari_pathology.analysis.jobs import tissue_or_detect
    from napari_pathology.analysis.runners import run
    from napari_pathology.models import resolve_model
    from napari_pathology.progress import run_to_completion
    from napari_pathology.slide import open_slide
    from napari_pathology.slide.synthetic import load_truth, truth_paths, write_synthetic_slide

    model = resolve_model("wholeslide-demo")
    classes = list(model.spec.classes)
    results = {}
    # slides normal-005 and tumour_<type>-005 of the evaluation cohort (seed 1): never seen in training
    for name, slide_seed, options in (
        ("tumour", seed, {"tumour_type": tumour_type}),
        ("normal", 1015, {"negative": True}),
    ):
        path = tmp_path / f"{name}.tif"
        write_synthetic_slide(path, 4096, slide_seed, **options)
        with open_slide(path) as slide:
            tissue = run_to_completion(tissue_or_detect(slide))
            results[name] = run_to_completion(run(slide, model, tissue=tissue))
    tumour, normal = results["tumour"], results["normal"]
    assert tumour.scores["normal"] < 0.5 < normal.scores["normal"]
    expected = f"tumour_{tumour_type.lower()}"
    assert max(classes, key=tumour.scores.get) == expected  # the subtype too
    assert tumour.slide_score > normal.slide_score  # P(not normal)
    # the predicted class's activation map peaks in the planted tumour (within one CAM cell)
    cam = np.asarray(tumour.class_heatmaps[classes.index(expected)], float)
    np.testing.assert_array_equal(np.nan_to_num(cam), np.nan_to_num(tumour.heatmap))
    r, c = np.unravel_index(np.nanargmax(cam), cam.shape)
    cell = tumour.cell_um
    y, x = tumour.first_centre_um[0] + r * cell, tumour.first_centre_um[1] + c * cell
    truth = load_truth(tmp_path / "tumour.tif")
    mask = np.asarray(Image.open(truth_paths(tmp_path / "tumour.tif")["tumour_png"])) > 127
    mpp = float(truth["mask_mpp"])
    rows = slice(max(0, int((y - 1.5 * cell) / mpp)), int((y + 1.5 * cell) / mpp) + 1)
    cols = slice(max(0, int((x - 1.5 * cell) / mpp)), int((x + 1.5 * cell) / mpp) + 1)
    assert mask[rows, cols].any()
    assert 0 < mask.mean() < 0.25  # a small target: a peak anywhere on the tissue would mostly miss it
