"""The shipped whole-slide CNN demo (``wholeslide-demo``): registered, labelled, tells tumour from normal."""

from __future__ import annotations

import numpy as np
import pytest

from napari_pathology.models.pretrained import shipped_weights

pytestmark = pytest.mark.skipif(
    not shipped_weights().get("wholeslide-demo", None) or not shipped_weights()["wholeslide-demo"].is_file(),
    reason="wholeslide-demo.pt not shipped (scripts/train_wholeslide_demo.py writes it)",
)


def test_demo_is_registered_and_labelled() -> None:
    from napari_pathology.models import resolve_model
    from napari_pathology.models.registry import list_models

    assert "wholeslide-demo" in [spec.name for spec in list_models()]
    model = resolve_model("wholeslide-demo")
    spec = model.spec
    assert spec.family == "wholeslide" and tuple(spec.classes) == ("normal", "tumour")
    assert "synthetic demo" in spec.description and "Chen et al. 2021" in spec.description
    assert spec.config["arch"] == "resnet18" and spec.mpp >= 2.5
    path = shipped_weights()["wholeslide-demo"]
    assert path.stat().st_size < 5e6  # a few MB at most
    assert model.provenance.get("trained_by") == "scripts/train_wholeslide_demo.py"


@pytest.mark.slow
def test_demo_ranks_a_tumour_slide_above_a_normal_one_and_its_cam_peaks_in_the_tumour(tmp_path) -> None:
    from PIL import Image

    from napari_pathology.analysis.jobs import tissue_or_detect
    from napari_pathology.analysis.runners import run
    from napari_pathology.models import resolve_model
    from napari_pathology.progress import run_to_completion
    from napari_pathology.slide import open_slide
    from napari_pathology.slide.synthetic import load_truth, truth_paths, write_synthetic_slide

    model = resolve_model("wholeslide-demo")
    tumour_index = list(model.spec.classes).index("tumour")
    results = {}
    for name, negative in (("tumour", False), ("normal", True)):
        path = tmp_path / f"{name}.tif"
        # slides normal-005 and tumour_a-005 of the evaluation cohort (seed 1), never seen in training; the
        # demo learned tumour type A (its CAM peaks in every macro type-A lesion there) but not type B
        write_synthetic_slide(path, 4096, 1016 if not negative else 1015, negative=negative, tumour_type="A"
                              if not negative else None)  # fmt: skip
        with open_slide(path) as slide:
            tissue = run_to_completion(tissue_or_detect(slide))
            results[name] = run_to_completion(run(slide, model, tissue=tissue))
    assert results["tumour"].scores["tumour"] > results["normal"].scores["tumour"]
    # the tumour class's activation map peaks in the planted tumour (within one CAM cell)
    result = results["tumour"]
    cam = np.asarray(result.class_heatmaps[tumour_index], float)
    r, c = np.unravel_index(np.nanargmax(cam), cam.shape)
    cell = result.cell_um
    y, x = result.first_centre_um[0] + r * cell, result.first_centre_um[1] + c * cell
    truth = load_truth(tmp_path / "tumour.tif")
    mask = np.asarray(Image.open(truth_paths(tmp_path / "tumour.tif")["tumour_png"])) > 127
    mpp = float(truth["mask_mpp"])
    rows = slice(max(0, int((y - 1.5 * cell) / mpp)), int((y + 1.5 * cell) / mpp) + 1)
    cols = slice(max(0, int((x - 1.5 * cell) / mpp)), int((x + 1.5 * cell) / mpp) + 1)
    assert mask[rows, cols].any()
    assert 0 < mask.mean() < 0.2  # a small target: a peak anywhere on the tissue would mostly miss it
