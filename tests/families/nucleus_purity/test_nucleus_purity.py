"""The nucleus purity classifier: patches, classification, training, shipped demo weights."""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest
import torch
from skimage.exposure import equalize_hist

from napari_pathology.analysis.metrics import roc_auc
from napari_pathology.families.nucleus_purity.train import (
    LabelledNuclei,
    NucleusPurityTraining,
    split_by_region,
    synthetic_labelled_nuclei,
    train_nucleus_purity,
)
from napari_pathology.models import create_model, load_checkpoint, pretrained_path, save_checkpoint
from napari_pathology.nuclei.classify import (
    NucleusClassifyError,
    classify_nuclei,
    equalize_patches,
    nucleus_patches,
    nucleus_patches_from_image,
    predicted_purity,
)
from napari_pathology.progress import run_to_completion
from napari_pathology.slide import InMemoryBackend, Slide, open_slide
from napari_pathology.tiles import read_patch
from napari_pathology.training.events import TrainingError


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: small convolutions on shared cores are faster without a thread pool."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def unseen(tmp_path_factory) -> LabelledNuclei:
    """Labelled nuclei of a synthetic slide no model saw (2048 px, seed 4242: 2681 nuclei, 533 tumour)."""
    from napari_pathology.slide.synthetic import write_synthetic_slide

    truth = write_synthetic_slide(tmp_path_factory.mktemp("unseen-nuclei") / "u.tif", size=2048, seed=4242)
    return synthetic_labelled_nuclei(truth.slide_path)


@pytest.fixture(scope="module")
def trained(synthetic_slide, tmp_path_factory):
    """A classifier trained for 3 epochs on every nucleus of the 3072 px synthetic slide (seed 11)."""
    out = tmp_path_factory.mktemp("nucleus-training") / "nuclei.pt"
    data = [synthetic_labelled_nuclei(synthetic_slide.slide_path)]
    result = run_to_completion(train_nucleus_purity(data, out, NucleusPurityTraining(epochs=3, seed=2)))
    return result, load_checkpoint(result.best)


def _box_purity(data: LabelledNuclei, probs: np.ndarray, box_um: float = 250.0) -> tuple[float, float, int]:
    """True and predicted purity of the most populated mixed box (true purity in [0.25, 0.75])."""
    cells = np.floor(data.xy_um / box_um).astype(int)
    keys = cells[:, 0] * 10_000 + cells[:, 1]
    best = None
    for key in np.unique(keys):
        inside = keys == key
        truth = data.is_tumour[inside].mean()
        if 0.25 <= truth <= 0.75 and (best is None or inside.sum() > best.sum()):
            best = inside
    assert best is not None, "the unseen slide has no mixed box"
    return float(data.is_tumour[best].mean()), predicted_purity(probs[best]), int(best.sum())


def _check_targets(model, data: LabelledNuclei) -> None:
    slide = open_slide(data.slide_path)
    events = []
    probs = run_to_completion(classify_nuclei(slide, data.xy_um, model, batch_size=300), events.append)
    assert probs.dtype == np.float32 and probs.shape == (len(data),)
    assert [e.done for e in events] == [0, *range(300, len(data), 300), len(data)]
    assert roc_auc(data.is_tumour, probs) >= 0.9
    truth, predicted, n = _box_purity(data, probs)
    assert n >= 30 and abs(predicted - truth) <= 0.1, (truth, predicted, n)
    assert abs(predicted_purity(probs) - data.is_tumour.mean()) <= 0.1


# --------------------------------------------------------------------------- patches


def test_patches_are_read_around_centroids_and_equalised_per_channel(synthetic_slide) -> None:
    slide = open_slide(synthetic_slide.slide_path)
    xy = synthetic_labelled_nuclei(synthetic_slide.slide_path).xy_um[::97]
    raw = nucleus_patches(slide, xy, context_um=16.0, equalize="none")
    assert raw.shape == (len(xy), 32, 32, 3) and raw.dtype == np.uint8
    # 16 um at 32 px is the slide's 0.5 um/px: the same pixels as the project's patch reader
    np.testing.assert_array_equal(raw, np.stack([read_patch(slide, tuple(p), 32, 0.5) for p in xy]))
    eq = nucleus_patches(slide, xy, context_um=16.0)
    assert eq.shape == raw.shape and eq.dtype == np.uint8
    reference = np.stack(
        [np.stack([np.round(equalize_hist(p[..., c]) * 255) for c in range(3)], -1) for p in raw[:10]]
    )
    np.testing.assert_array_equal(eq[:10], reference)
    assert (eq.max(axis=(1, 2)) == 255).all()  # every channel of every patch stretched to full range
    assert abs(eq.mean() - 127.5) < 12 < abs(raw.mean() - 127.5)
    coarse = nucleus_patches(slide, xy[:5], context_um=48.0, equalize="none")  # 1.5 um/px: level 1, resampled
    assert coarse.shape == (5, 32, 32, 3)
    fine = nucleus_patches(slide, xy[:5], context_um=8.0, equalize="none")  # 0.25 um/px: enlarged
    assert fine.shape == (5, 32, 32, 3) and fine.std() > 0


def test_points_at_and_past_the_edge_are_padded_white_not_dropped() -> None:
    image = np.full((100, 120, 3), 60, np.uint8)
    xy = np.array([[0.0, 0.0], [30.0, 25.0], [200.0, 10.0]])  # corner, centre, beyond the right edge
    patches = nucleus_patches_from_image(image, 0.5, xy, context_um=16.0, equalize="none")
    assert patches.shape == (3, 32, 32, 3)
    assert (patches[0, :16, :16] == 255).all() and (patches[0, 16:, 16:] == 60).all()
    assert (patches[1] == 60).all() and (patches[2] == 255).all()
    slide = Slide(InMemoryBackend([image], mpp=0.5))
    np.testing.assert_array_equal(patches, nucleus_patches(slide, xy, 16.0, equalize="none"))
    with pytest.raises(NucleusClassifyError, match="um/px"):
        nucleus_patches(Slide(InMemoryBackend([image])), xy, 16.0)
    with pytest.raises(NucleusClassifyError, match=r"\(N, 2\)"):
        nucleus_patches(slide, np.zeros((3, 3)), 16.0)
    with pytest.raises(NucleusClassifyError, match="context_um"):
        nucleus_patches(slide, xy, 0.0)


def test_luminance_equalisation_keeps_the_colour_order() -> None:
    rng = np.random.default_rng(0)
    patches = rng.integers(40, 140, (4, 32, 32, 3)).astype(np.uint8)
    out = equalize_patches(patches, "luminance")
    assert out.max() > 200  # brightened
    order_in = np.argsort(patches.astype(int), axis=-1, kind="stable")[..., -1]
    order_out = np.argsort(out.astype(int), axis=-1, kind="stable")[..., -1]
    assert (order_in == order_out).mean() > 0.95  # the brightest channel stays the brightest
    with pytest.raises(NucleusClassifyError, match="equalize"):
        equalize_patches(patches, "lab")


def test_predicted_purity_is_the_mean_probability() -> None:
    assert predicted_purity(np.array([0.1, 0.9, 0.5, 0.5])) == pytest.approx(0.5)
    assert predicted_purity(np.zeros(0)) is None
    with pytest.raises(NucleusClassifyError, match=r"\[0, 1\]"):
        predicted_purity(np.array([0.2, 1.5]))


def test_a_model_of_another_family_is_refused(synthetic_slide) -> None:
    slide = open_slide(synthetic_slide.slide_path)
    model = create_model("nuclear-density")
    with pytest.raises(NucleusClassifyError, match="'nucleus-purity' model"):
        next(classify_nuclei(slide, np.array([[100.0, 100.0]]), model))


# --------------------------------------------------------------------------- training


def test_split_keeps_regions_whole_and_both_classes_on_both_sides() -> None:
    rng = np.random.default_rng(3)
    groups = rng.integers(0, 40, 2000)
    labels = groups % 3 == 0  # whole regions of one class
    train, val = split_by_region(groups, labels, 0.25, seed=5)
    assert not set(groups[train]) & set(groups[val])
    assert 0.2 < val.mean() < 0.3
    assert labels[val].any() and (~labels[val]).any() and labels[train].any()
    with pytest.raises(TrainingError, match="one region"):
        split_by_region(np.zeros(50, int), np.arange(50) % 2 == 0, 0.2, seed=0)


def test_drawn_regions_drive_the_split_with_blocks_as_fallback(synthetic_slide, tmp_path) -> None:
    data = synthetic_labelled_nuclei(synthetic_slide.slide_path)
    quarters = (data.xy_um[:, 0] > 768).astype(int) + 2 * (data.xy_um[:, 1] > 768)  # 4 mixed regions
    drawn = LabelledNuclei(data.slide_path, data.xy_um, data.is_tumour, region_ids=quarters)
    first = next(train_nucleus_purity([drawn], tmp_path / "m.pt"))
    assert f"{len(data)} nuclei in drawn regions" in first.message
    assert re.search(r"\b[23] training and [12] validation regions", first.message), first.message
    pure = LabelledNuclei(data.slide_path, data.xy_um, data.is_tumour, region_ids=data.is_tumour.astype(int))
    first = next(train_nucleus_purity([pure], tmp_path / "m.pt"))  # one tumour, one normal region
    assert "split by 150 um blocks" in first.message


def test_training_refuses_one_class_too_few_nuclei_and_missing_um_per_px(synthetic_slide, tmp_path) -> None:
    data = synthetic_labelled_nuclei(synthetic_slide.slide_path)
    normal = LabelledNuclei(data.slide_path, data.xy_um[~data.is_tumour], data.is_tumour[~data.is_tumour])
    with pytest.raises(TrainingError, match=r"all \d+ labelled nuclei are normal"):
        next(train_nucleus_purity([normal], tmp_path / "m.pt"))
    few = LabelledNuclei(data.slide_path, data.xy_um[:30], np.arange(30) < 5)
    with pytest.raises(TrainingError, match="at least 20 of each class"):
        next(train_nucleus_purity([few], tmp_path / "m.pt"))
    png = tmp_path / "tile.png"
    from PIL import Image

    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(png)
    no_mpp = LabelledNuclei(png, np.tile([[10.0, 10.0], [40.0, 40.0]], (30, 1)), np.arange(60) % 2 == 0)
    settings = NucleusPurityTraining(validation_fraction=0)
    with pytest.raises(TrainingError, match="no um/px"):
        run_to_completion(train_nucleus_purity([no_mpp], tmp_path / "m.pt", settings))
    with pytest.raises(TrainingError, match="not a nucleus purity classifier"):
        next(train_nucleus_purity([data], tmp_path / "m.pt", start="nuclear-density"))
    trained = save_checkpoint(create_model("nucleus-purity-cnn"), tmp_path / "trained.pt")  # 16 um patches
    with pytest.raises(TrainingError, match="keeps its context"):
        next(train_nucleus_purity([data], tmp_path / "m.pt", NucleusPurityTraining(context_um=20), trained))
    with pytest.raises(TrainingError, match="one value per nucleus"):
        LabelledNuclei(data.slide_path, data.xy_um, data.is_tumour[:-1])


def test_trained_classifier_meets_the_targets_on_an_unseen_slide(trained, unseen) -> None:
    result, model = trained
    assert result.step == result.history[-1]["step"] and not result.stopped
    assert result.metrics["auc"] >= 0.9 and result.metrics["purity_rmse"] <= 0.1
    spec = model.spec
    assert (spec.family, spec.output, spec.input_size, spec.mpp) == ("nucleus-purity", "nuclei", 32, 0.5)
    assert spec.config["context_um"] == 16.0 and spec.classes == ("normal", "tumour")
    assert model.provenance["split"] == "0 nuclei in drawn regions, the rest in 150 um blocks"
    assert model.provenance["val_nuclei"] > 500
    _check_targets(model, unseen)


def test_shipped_demo_checkpoint_meets_the_targets_on_a_fresh_slide(unseen) -> None:
    assert pretrained_path("nucleus-purity") is not None
    model = create_model("nucleus-purity")
    assert model.spec.family == "nucleus-purity" and model.provenance["label"].startswith("synthetic demo")
    _check_targets(model, unseen)
    job = classify_nuclei(open_slide(unseen.slide_path), unseen.xy_um, model, batch_size=100)
    assert [next(job).done, next(job).done] == [0, 100]
    job.close()  # stops after the batch in hand
    with pytest.raises(StopIteration):
        next(job)


def test_stop_saves_and_resume_continues_with_a_new_context(synthetic_slide, tmp_path) -> None:
    data = synthetic_labelled_nuclei(synthetic_slide.slide_path)
    keep = np.random.default_rng(0).permutation(len(data))[:480]
    small = LabelledNuclei(data.slide_path, data.xy_um[keep], data.is_tumour[keep])
    settings = NucleusPurityTraining(
        context_um=20.0, epochs=2, batch_size=32, validation_fraction=0.0, log_every=1
    )  # 2 epochs of 15 steps
    out, stop = tmp_path / "np.pt", threading.Event()
    for event in train_nucleus_purity([small], out, settings, stop=stop):
        if event.kind == "step" and event.step == 4:
            stop.set()
    last = load_checkpoint(tmp_path / "np.last.pt")
    assert last.provenance["stopped"] is True and last.provenance["step"] == 4
    assert last.spec.mpp == pytest.approx(20.0 / 32) and last.spec.config["context_um"] == 20.0
    resumed = run_to_completion(
        train_nucleus_purity([small], out, NucleusPurityTraining(**{**settings.to_dict(), "resume": True}))
    )
    assert resumed.step == 30 and not resumed.stopped
    assert [h["step"] for h in resumed.history if "loss" in h] == list(range(1, 31))
