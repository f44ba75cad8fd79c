"""The tumour/normal tile classifier: frozen trunk, feature cache, slide-label training, TPF."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_pathology.cohort import SlideEntry, read_slide_table
from napari_pathology.families.tumor_normal.encoder import trunk_encoder
from napari_pathology.families.tumor_normal.train import (
    TumorNormalTraining,
    _balanced_batches,
    _epoch_counts,
    slide_classes,
    train_tumor_normal,
)
from napari_pathology.features import extract_features, get_encoder, list_encoders
from napari_pathology.models import create_model, load_checkpoint, resolve_model, save_checkpoint
from napari_pathology.progress import run_to_completion
from napari_pathology.slide import open_slide
from napari_pathology.tiles import read_tile, to_tensor
from napari_pathology.tissue import detect_tissue
from napari_pathology.training import TrainingError


def test_trunk_stays_frozen_in_training_mode() -> None:
    model = create_model("tumor-normal-small-10x")
    model.train()
    assert not model.net.trunk.training and model.net.head.training
    assert not any(p.requires_grad for p in model.net.trunk.parameters())
    assert all(p.requires_grad for p in model.net.head.parameters())
    logits = model(torch.rand(2, 3, 256, 256))
    logits.sum().backward()
    assert all(p.grad is None for p in model.net.trunk.parameters())
    assert model.spec.aggregator == "fraction" and model.spec.positive_class == "tumour"


def test_classes_come_from_slide_labels(tmp_path) -> None:
    entries = [
        SlideEntry(tmp_path / f"{k}.tif", label) for k, label in enumerate(["Tumor", "normal", "tumour"])
    ]
    assert slide_classes(entries) == ("normal", "tumour")
    assert slide_classes([SlideEntry(tmp_path / "a", "LUSC"), SlideEntry(tmp_path / "b", "LUAD"),
                          SlideEntry(tmp_path / "c", "normal")]) == ("normal", "LUAD", "LUSC")  # fmt: skip
    with pytest.raises(TrainingError, match="one class"):
        slide_classes([SlideEntry(tmp_path / "a", "normal"), SlideEntry(tmp_path / "b", "normal")])
    with pytest.raises(TrainingError, match="without a label"):
        slide_classes([SlideEntry(tmp_path / "a", None), SlideEntry(tmp_path / "b", "normal")])


def test_features_are_cached_and_keyed_by_the_trunk(tiny_cohort, tmp_path) -> None:
    entry = read_slide_table(tiny_cohort)[0]
    slide = open_slide(entry.path)
    tissue = run_to_completion(detect_tissue(slide))
    torch.manual_seed(0)
    model = create_model("tumor-normal-small-10x")
    encoder = trunk_encoder(model, trained=False)
    first = run_to_completion(extract_features(slide, encoder, tissue=tissue, cache_dir=tmp_path))
    assert first.path is not None and first.path.exists()
    assert first.features.shape == (len(first.cells), 256) and len(first) > 10
    again = run_to_completion(extract_features(slide, encoder, tissue=tissue, cache_dir=tmp_path))
    assert again.path == first.path and np.array_equal(again.features, first.features)
    tiles = np.stack([read_tile(slide, first.grid, i) for i in (0, len(first) - 1)])
    expected = model.net.features(to_tensor(tiles, model.spec.normalization)).numpy()  # the model's own
    np.testing.assert_allclose(first.features[[0, -1]], expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        next(model.net.trunk.parameters()).mul_(1.5)
    changed = run_to_completion(extract_features(slide, encoder, tissue=tissue, cache_dir=tmp_path))
    assert changed.path != first.path


def test_the_family_registers_its_trunk_as_an_encoder(tmp_path) -> None:
    assert "tumor-normal-trunk" in [entry.name for entry in list_encoders()]
    shipped = get_encoder("tumor-normal-trunk")  # the shipped demo model's trunk by default
    demo = resolve_model("tumor-normal")
    assert shipped.trained and shipped.provenance["weights"] == "tumor-normal"
    assert (shipped.dim, shipped.patch_size, shipped.mpp) == (
        demo.net.n_features, demo.spec.input_size, demo.spec.mpp,
    )  # fmt: skip
    donor = create_model("metastasis-small-10x")
    save_checkpoint(donor, tmp_path / "donor.pt")
    encoder = get_encoder("tumor-normal-trunk", weights=tmp_path / "donor.pt")
    assert encoder.dim == donor.net.n_features and encoder.provenance["model_family"] == "metastasis"
    with pytest.raises(ValueError, match="no Inception trunk"):
        trunk_encoder(_trunkless(donor))


def _trunkless(model):
    model.net = torch.nn.Linear(2, 2)  # a model of another kind: no trunk to take
    return model


def test_training_from_slide_labels_writes_a_tpf_model(tiny_cohort, tmp_path) -> None:
    donor = create_model("metastasis-small-10x")
    save_checkpoint(donor, tmp_path / "donor.pt")
    job = TumorNormalTraining(
        data=tiny_cohort, out=tmp_path / "tn.pt", start="tumor-normal-small-10x",
        trunk_from=str(tmp_path / "donor.pt"), epochs=3, batch_size=64, val_fraction=0.5, lr=1e-3,
    )  # fmt: skip
    result = run_to_completion(train_tumor_normal(job))
    model = load_checkpoint(result.best)
    assert model.spec.family == "tumor-normal" and model.spec.aggregator == "fraction"
    assert model.spec.classes == ("normal", "tumour")
    assert "trunk from donor.pt" in model.provenance["initialisation"]
    assert {"slide_auc", "tile_accuracy", "mean_tpf_tumour"} <= set(result.metrics)
    # the trunk is the donor's, untouched by training
    for a, b in zip(
        model.net.trunk.state_dict().values(), donor.net.trunk.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    assert (tmp_path / "features").is_dir()


def test_a_trunk_of_another_width_is_refused(tiny_cohort, tmp_path) -> None:
    job = TumorNormalTraining(data=tiny_cohort, out=tmp_path / "tn.pt", start="tumor-normal-small-10x",
                              trunk_from="metastasis-small")  # fmt: skip
    save_checkpoint(create_model("metastasis-inception-v3-10x"), tmp_path / "wide.pt")
    job = TumorNormalTraining(**{**job.__dict__, "trunk_from": str(tmp_path / "wide.pt")})
    with pytest.raises(TrainingError, match="does not fit"):
        run_to_completion(train_tumor_normal(job))


def test_normal_weight_sets_the_share_of_normal_tiles_per_epoch() -> None:
    assert _epoch_counts(np.array([100, 300]), np.array([1.0, 1.0])).tolist() == [100, 100]
    assert _epoch_counts(np.array([100, 300]), np.array([3.0, 1.0])).tolist() == [100, 33]
    assert _epoch_counts(np.array([900, 300]), np.array([2.0, 1.0])).tolist() == [600, 300]
    assert _epoch_counts(np.array([90, 0, 30]), np.array([3.0, 1.0, 1.0])).tolist() == [90, 0, 30]
    y = np.repeat([0, 1], [120, 360])
    x = np.arange(len(y), dtype=np.float32)[:, None]
    batches = _balanced_batches(x, y, 16, torch.Generator().manual_seed(0), np.array([3.0, 1.0]))
    epoch = [next(batches) for _ in range(10)]  # 120 normal + 40 tumour = 160 tiles = 10 batches
    labels = torch.cat([b[1] for b in epoch])
    assert labels.bincount().tolist() == [120, 40]
    rows = torch.cat([b[0] for b in epoch])[:, 0].long()
    assert len(set(rows.tolist())) == 160 and bool((y[rows.numpy()] == labels.numpy()).all())


@pytest.mark.parametrize("weight", [0.0, -2.0, float("nan")])
def test_a_bad_normal_weight_is_refused(tiny_cohort, tmp_path, weight) -> None:
    with pytest.raises(TrainingError, match=r"normal_weight must be (a finite number|in)"):
        TumorNormalTraining(data=tiny_cohort, out=tmp_path / "tn.pt", normal_weight=weight)


def test_normal_weight_needs_a_normal_class(tmp_path) -> None:
    rows = ["slide,label"]
    for k, label in enumerate(["LUAD", "LUSC"]):
        (tmp_path / f"{k}.tif").write_bytes(b"")
        rows.append(f"{k}.tif,{label}")
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    job = TumorNormalTraining(
        data=tmp_path / "t.csv", out=tmp_path / "tn.pt", normal_weight=3, classes=("LUAD", "LUSC")
    )
    with pytest.raises(TrainingError, match="needs a 'normal' class"):
        run_to_completion(train_tumor_normal(job))


def test_shipped_tpf_model_separates_tumour_from_normal(unseen_slides) -> None:
    from napari_pathology.analysis import RunSettings, run_analysis

    model = resolve_model("tumor-normal")
    assert "not for diagnostic use" in model.spec.description
    scores = {}
    for kind, truth in unseen_slides.items():
        slide = open_slide(truth.slide_path)
        tissue = run_to_completion(detect_tissue(slide))
        result = run_to_completion(
            run_analysis(slide, model, tissue=tissue, settings=RunSettings(batch_size=16))
        )
        scores[kind] = result.slide_score
        assert result.scores["tumour"] == pytest.approx(result.slide_score)
    assert scores["tumour"] > 0.05
    assert scores["negative"] < 0.02  # trained with normal_weight 3: no tumour tiles on a clean negative
