"""Training CLAM on synthetic bags: it learns, attention finds the planted patches, bad data is refused."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from napari_pathology.analysis.metrics import roc_auc
from napari_pathology.families.clam import FAMILY as CLAM
from napari_pathology.families.clam.bags import read_bag
from napari_pathology.families.clam.train import (
    ClamTraining,
    _early_stopping,
    _EitherStop,
    bag_metrics,
    train_clam,
)
from napari_pathology.models.registry import load_checkpoint
from napari_pathology.training.events import TrainingError

DIM = 16
PLANTED = 4
SHIFT = 8.0


def _direction() -> np.ndarray:
    v = np.random.default_rng(123).normal(size=DIM)
    return v / np.linalg.norm(v)


def _write_bag(path: Path, features: np.ndarray) -> None:
    with h5py.File(path, "w") as h5:
        h5["features"] = features.astype(np.float32)
        h5["coords"] = np.arange(2 * len(features)).reshape(-1, 2) * 256


def _bag(rng: np.random.Generator, tumour: bool, n: int | None = None) -> np.ndarray:
    """Normal patches ~ N(0, I); a tumour bag has its first PLANTED patches shifted along one direction."""
    n = n or int(rng.integers(20, 50))
    features = rng.normal(size=(n, DIM))
    if tumour:
        features[:PLANTED] += SHIFT * _direction()
    return features


def _cohort(root: Path, n: int = 24, seed: int = 0, labels: list[str] | None = None, sizes=None) -> Path:
    """``root/table.csv`` naming n slides (placeholder files) and ``root/features/<stem>.h5``."""
    rng = np.random.default_rng(seed)
    (root / "features").mkdir(parents=True, exist_ok=True)
    rows = ["slide,label"]
    for k in range(n):
        label = labels[k] if labels else ("tumour" if k % 2 else "normal")
        (root / f"s{k}.svs").write_bytes(b"placeholder")
        size = sizes[k] if sizes else None
        _write_bag(root / "features" / f"s{k}.h5", _bag(rng, label == "tumour", size))
        rows.append(f"s{k}.svs,{label}")
    (root / "table.csv").write_text("\n".join(rows) + "\n")
    return root / "table.csv"


def _run(job: ClamTraining, stop: threading.Event | None = None):
    events = []
    generator = train_clam(job, stop)
    while True:
        try:
            events.append(next(generator))
        except StopIteration as done:
            return done.value, events


def _fast(table: Path, out: Path, **kw) -> ClamTraining:
    settings = dict(epochs=6, lr=1e-3, val_fraction=0.25, threads=1, min_epochs=0, patience=50)
    return ClamTraining(table, out, **{**settings, **kw})


@pytest.mark.slow
def test_short_training_separates_held_out_bags_and_attends_to_the_planted_patches(tmp_path):
    table = _cohort(tmp_path / "train", 24)
    result, events = _run(_fast(table, tmp_path / "clam.pt"))
    assert result.best == tmp_path / "clam.pt" and not result.stopped
    assert {"validation", "checkpoint", "done"} <= {e.kind for e in events}
    assert {"val_loss", "auc", "accuracy"} <= set(result.metrics)
    model = load_checkpoint(result.best)
    assert model.spec.classes == ("normal", "tumour") and model.spec.family == "clam"
    rng = np.random.default_rng(99)  # bags no model saw
    labels, scores, top_hits, ranking = [], [], [], []
    with torch.no_grad():
        for k in range(20):
            tumour = bool(k % 2)
            bag = _bag(rng, tumour)
            out = model.net.run(torch.from_numpy(bag.astype(np.float32)))
            labels.append(tumour)
            scores.append(float(out.probabilities[0, 1]))
            if tumour:
                attention = out.attention[0].numpy()
                top_hits.append(float(np.isin(np.argsort(-attention)[:PLANTED], np.arange(PLANTED)).mean()))
                ranking.append(roc_auc(np.arange(len(bag)) < PLANTED, attention))
    metrics = bag_metrics(np.array(labels, int), np.stack([1 - np.array(scores), np.array(scores)], 1))
    assert metrics["auc"] >= 0.9
    assert np.mean(top_hits) >= 0.9  # the most attended patches are the planted ones
    assert np.mean(ranking) >= 0.97  # and the planted ones rank above (almost) every other patch


def test_three_class_mb_trains_and_resumes(tmp_path):
    labels = ["normal", "A", "B"] * 4
    table = _cohort(tmp_path, 12, labels=labels)
    job = _fast(
        table, tmp_path / "mb.pt", model_type="mb", classes=("normal", "A", "B"), epochs=2, val_fraction=0.34
    )
    stop = threading.Event()
    generator = train_clam(job, stop)
    for event in generator:
        if event.kind == "step":  # the first comes after 9 steps (one epoch of 9 training slides)
            stop.set()
    model = load_checkpoint(tmp_path / "mb.last.pt")
    assert model.spec.classes == ("normal", "A", "B") and model.net.model_type == "mb" and model.net.subtyping
    result, events = _run(replace(job, resume=True))
    assert not result.stopped and result.step == 2 * 9
    assert [e.message for e in events if e.kind == "start"] == ["training mb on cpu from step 9 to 18"]


def test_early_stopping_follows_clams_rule():
    job = ClamTraining(Path("t.csv"), Path("m.pt"), patience=2, min_epochs=3)
    losses: list[float] = []
    halt = _EitherStop(None)
    check = _early_stopping(job, losses, 10, halt)
    for epoch, value in enumerate([1.0, 0.9, 0.95, 0.9, 0.97, 0.99], start=1):
        losses.append(value)
        message = check(None, epoch * 10)
        assert (message is not None) == (epoch == 6), epoch  # equal to the best resets; not before epoch 4
    assert halt.is_set() and "not improved for 2 epochs (best 0.9000)" in halt.reason
    user = threading.Event()
    either = _EitherStop(user)
    assert not either.is_set()
    user.set()
    assert either.is_set()


def test_early_stopping_ends_a_job_that_overfits_noise(tmp_path):
    rng = np.random.default_rng(5)
    labels = list(rng.permutation(["tumour", "normal"] * 8))
    table = _cohort(tmp_path, 16, labels=labels, seed=3)
    for k in range(16):  # no signal: every bag is noise, so the validation loss rises as it memorises
        _write_bag(tmp_path / "features" / f"s{k}.h5", rng.normal(size=(12, DIM)))
    job = _fast(table, tmp_path / "m.pt", epochs=60, patience=3, lr=3e-3)
    result, events = _run(job)
    done = events[-1]
    assert result.step < 60 * 12 and not result.stopped
    assert done.kind == "done" and done.message.startswith("early stopping after epoch")
    assert result.best is not None and result.best.exists()


def test_small_bags_train_and_are_reported(tmp_path):
    table = _cohort(tmp_path, 8, sizes=[3, 1, 5, 40, 2, 30, 7, 9])
    result, events = _run(_fast(table, tmp_path / "m.pt", epochs=1, val_fraction=0.0))
    assert result.last is not None
    assert any("6 bag(s) hold fewer than 2B = 16 patches" in e.message for e in events)


def _one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def test_bad_data_is_refused_in_one_line(tmp_path):
    table = _cohort(tmp_path, 6)
    with pytest.raises(TrainingError, match="all 6 slides are labelled 'tumour'") as info:
        _run(_fast(_cohort(tmp_path / "one", 6, labels=["tumour"] * 6), tmp_path / "a.pt"))
    _one_line(info)
    (tmp_path / "features" / "s2.h5").unlink()  # extracted from the slide first: a placeholder, unreadable
    with pytest.raises(TrainingError, match=r"s2\.svs: cannot extract its features \(no s2\.h5") as info:
        _run(_fast(table, tmp_path / "b.pt", encoder="tumor-normal-trunk"))
    _one_line(info)
    with h5py.File(tmp_path / "features" / "s2.h5", "w") as h5:
        h5["coords"] = np.zeros((3, 2))
    with pytest.raises(TrainingError, match=r"s2\.h5 has no 'features' dataset") as info:
        _run(_fast(table, tmp_path / "c.pt"))
    _one_line(info)
    _write_bag(tmp_path / "features" / "s2.h5", np.zeros((5, DIM + 1)))
    with pytest.raises(TrainingError, match=r"have different sizes \(16 in s0\.h5, 17 in s2\.h5\)") as info:
        _run(_fast(table, tmp_path / "d.pt"))
    (tmp_path / "features" / "s2.h5").write_text("not hdf5")
    with pytest.raises(TrainingError, match=r"s2\.h5 is not an HDF5 feature file") as info:
        _run(_fast(table, tmp_path / "e.pt"))
    _write_bag(tmp_path / "features" / "s2.h5", np.zeros((0, DIM)))
    with pytest.raises(TrainingError, match="the bag holds no patches"):
        _run(_fast(table, tmp_path / "f.pt"))
    _write_bag(tmp_path / "features" / "s2.h5", np.full((4, DIM), np.nan))
    with pytest.raises(TrainingError, match="NaN or infinite"):
        read_bag(tmp_path / "features" / "s2.h5")
    with pytest.raises(TrainingError, match="features of dimension 16, the model takes 1024"):
        read_bag(tmp_path / "features" / "s0.h5", 1024)
    with pytest.raises(TrainingError, match=r"model_type must be one of sb, mb, got 'xx'"):
        ClamTraining(table, tmp_path / "g.pt", model_type="xx")
    with pytest.raises(TrainingError, match="bag_weight"):
        ClamTraining(table, tmp_path / "g.pt", bag_weight=1.5)


def test_the_family_trains_from_its_settings(tmp_path):
    table = _cohort(tmp_path, 8)
    settings = CLAM.make_settings(table, tmp_path / "x.pt", epochs=1, threads=1, val_fraction=0.25)
    result = None
    generator = CLAM.train(settings, table, tmp_path / "fam.pt")
    while True:
        try:
            next(generator)
        except StopIteration as done:
            result = done.value
            break
    assert result.best == tmp_path / "fam.pt"
    assert load_checkpoint(result.best).provenance["job"]["epochs"] == 1


def test_fine_tuning_starts_from_a_clam_checkpoint(tmp_path):
    from napari_pathology.families.clam.interop import export_clam_checkpoint
    from napari_pathology.families.clam.model import ClamNet

    table = _cohort(tmp_path, 8)
    torch.manual_seed(1)
    export_clam_checkpoint(ClamNet(2, "mb", gate=False, embed_dim=DIM), tmp_path / "s_0_checkpoint.pt")
    job = _fast(table, tmp_path / "tuned.pt", epochs=1, start=str(tmp_path / "s_0_checkpoint.pt"))
    result, events = _run(job)
    assert any(f"fine-tuning {tmp_path / 's_0_checkpoint.pt'}" in e.message for e in events)
    tuned = load_checkpoint(result.best)
    assert (tuned.net.model_type, tuned.net.gate, tuned.spec.classes) == ("mb", False, ("normal", "tumour"))
    export_clam_checkpoint(ClamNet(3, embed_dim=DIM), tmp_path / "three.pt")
    with pytest.raises(TrainingError, match=r"three.pt' has 3 classes on 16-d features; the table has 2"):
        _run(_fast(table, tmp_path / "bad.pt", start=str(tmp_path / "three.pt")))
    export_clam_checkpoint(ClamNet(2, embed_dim=DIM + 2), tmp_path / "wide.pt")
    with pytest.raises(
        TrainingError, match=r"has 2 classes on 18-d features; the table has 2 classes and the"
    ):
        _run(_fast(table, tmp_path / "bad2.pt", start=str(tmp_path / "wide.pt")))


def test_a_registered_untrained_name_starts_afresh_and_sampling_is_class_balanced(tmp_path):
    from napari_pathology.families.clam.train import _batches

    table = _cohort(tmp_path, 8)
    result, events = _run(_fast(table, tmp_path / "m.pt", epochs=1, start="clam-sb", size="big"))
    assert any("random initialisation" in e.message for e in events)
    assert load_checkpoint(result.best).net.attention_dim == 384  # the settings' network, not the name's
    items = [(Path(f"{k}.h5"), int(k == 0)) for k in range(4)]  # one slide of class 1, three of class 0
    draws = _batches(items, lambda p: np.zeros((2, DIM), np.float32), True, 0, 2)
    labels = [int(next(draws)[1]) for _ in range(4000)]
    assert abs(np.mean(labels) - 0.5) < 0.03
    plain = _batches(items, lambda p: np.zeros((2, DIM), np.float32), False, 0, 2)
    assert sorted(int(next(plain)[1]) for _ in range(4)) == [0, 0, 0, 1]  # one epoch: each slide once
