"""CLAM training from a slide table alone: features extracted once per slide and reused; demo weights."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from napari_pathology.cohort import SlideEntry, write_slide_table
from napari_pathology.families.clam.extraction import h5_encoder
from napari_pathology.families.clam.train import ClamTraining, train_clam
from napari_pathology.models.registry import load_checkpoint
from napari_pathology.training.events import TrainingError

ENCODER = "tumor-normal-trunk"


@pytest.fixture(scope="module")
def tiny_slides(tmp_path_factory: pytest.TempPathFactory) -> list[SlideEntry]:
    """Four 1024 px synthetic slides at 0.5 um/px (four 256 px patches at 1 um/px): 2 normal, 2 tumour."""
    from napari_pathology.progress import run_to_completion
    from napari_pathology.slide.synthetic.writer import generate_synthetic_slide

    folder = tmp_path_factory.mktemp("clam-slides")
    entries = []
    for k, label in enumerate(["normal", "tumour", "normal", "tumour"]):
        path = folder / f"{label}-{k}.tif"
        run_to_completion(generate_synthetic_slide(path, 1024, 700 + k, negative=label == "normal"))
        entries.append(SlideEntry(path, label))
    return entries


def _table(folder: Path, entries: list[SlideEntry]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_slide_table(entries, folder / "slides.csv")


def _job(table: Path, out: Path, **kw) -> ClamTraining:
    settings = dict(
        encoder=ENCODER, epochs=2, min_epochs=0, val_fraction=0.5, threads=1, hidden=16, attention_dim=8,
        k_sample=2, lr=1e-3,
    )  # fmt: skip
    return ClamTraining(table, out, **{**settings, **kw})


def _run(job: ClamTraining, stop: threading.Event | None = None, on_event=None):
    events = []
    generator = train_clam(job, stop)
    while True:
        try:
            event = next(generator)
        except StopIteration as done:
            return done.value, events
        events.append(event)
        if on_event is not None:
            on_event(event)


def _extractions(events) -> list[str]:
    return [e.message for e in events if e.kind == "log" and e.message.startswith("features ")]


def test_training_extracts_missing_features_once_and_the_spec_names_the_encoder(tmp_path, tiny_slides):
    table = _table(tmp_path, tiny_slides)
    features = tmp_path / "features"
    result, events = _run(_job(table, tmp_path / "first.pt"))
    assert not result.stopped and result.best is not None
    said = _extractions(events)
    for k, entry in enumerate(tiny_slides):  # one line per slide as it starts, one when it is written
        assert f"features {k + 1}/4: {entry.path.name} ..." in said
        assert any(
            m.startswith(f"features {k + 1}/4: {entry.path.name}: ") and "patches ->" in m for m in said
        )
        name, attrs = h5_encoder(features / f"{entry.path.stem}.h5")
        assert name == ENCODER and attrs["trained"] and attrs["mpp"] == 1.0 and attrs["patch_size_px"] == 256
        assert attrs["slide"] == entry.path.name and attrs["provenance"]["weights"] == "tumor-normal"
    model = load_checkpoint(result.best)
    spec = model.spec
    assert spec.config["encoder"] == ENCODER and spec.config["encoder_weights"] == "tumor-normal"
    assert (spec.input_size, spec.mpp, spec.normalization) == (256, 1.0, "liu")
    assert spec.config["embed_dim"] == 256 and model.net.hidden == 16  # the trunk's width; L from settings
    assert model.provenance["encoder"]["name"] == ENCODER
    assert len(model.provenance["features_extracted"]) == 4
    stamps = {p: p.stat().st_mtime_ns for p in features.glob("*.h5")}
    again, events = _run(_job(table, tmp_path / "second.pt"))
    assert again.best is not None and _extractions(events) == []  # every file reused, none written
    assert {p: p.stat().st_mtime_ns for p in features.glob("*.h5")} == stamps
    second = load_checkpoint(again.last).state_dict()  # extracting or not, the same seed trains the same
    assert all(torch.equal(t, second[k]) for k, t in load_checkpoint(result.last).state_dict().items())
    reused = load_checkpoint(again.best).spec
    assert reused.config["encoder"] == ENCODER and (reused.input_size, reused.mpp) == (256, 1.0)
    assert reused.config["encoder_weights"] == "tumor-normal"  # from the files' own record


def test_stop_during_extraction_keeps_what_is_done_and_resume_continues(tmp_path, tiny_slides):
    table = _table(tmp_path, tiny_slides)
    features = tmp_path / "features"
    job = _job(table, tmp_path / "m.pt")
    stop = threading.Event()

    def stop_at_first_slide(event) -> None:
        if event.message.startswith("features 1/4"):
            stop.set()  # the slide's batch finishes and is written; the job stops before the next slide

    result, events = _run(job, stop, stop_at_first_slide)
    assert result.stopped and result.best is None and result.step == 0
    assert events[-1].kind == "done" and "stopped before features 2/4" in events[-1].message
    assert "Resume" in events[-1].message
    assert [p.name for p in features.glob("*.h5")] == [f"{tiny_slides[0].path.stem}.h5"]
    result, events = _run(replace(job, resume=True))
    assert not result.stopped and result.best is not None
    assert any(m.startswith("3 of 4 slides have no features") for m in (e.message for e in events))
    assert not any(tiny_slides[0].path.name in m for m in _extractions(events))
    extracted = load_checkpoint(result.best).provenance["features_extracted"]
    assert extracted == [e.path.name for e in tiny_slides[1:]]


def _one_line(info: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(info.value)
    return str(info.value)


def test_features_of_another_encoder_or_other_weights_are_refused(tmp_path):
    folder = tmp_path / "bags"
    (folder / "features").mkdir(parents=True)
    rows = ["slide,label"]
    for k, label in enumerate(["normal", "tumour"] * 2):
        (folder / f"s{k}.svs").write_bytes(b"never opened: its features exist")
        with h5py.File(folder / "features" / f"s{k}.h5", "w") as h5:
            h5["features"] = np.random.default_rng(k).normal(size=(6, 8)).astype(np.float32)
            h5["coords"] = np.zeros((6, 2), np.int64)
            h5.attrs["encoder"] = "resnet50-trunc" if k == 2 else ENCODER
            h5.attrs["provenance"] = '{"digest": "%s"}' % ("b" if k == 3 else "a")
        rows.append(f"s{k}.svs,{label}")
    (folder / "slides.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(
        TrainingError, match=r"s2\.h5: features from another encoder \(resnet50-trunc; these"
    ) as info:
        _run(_job(folder / "slides.csv", tmp_path / "a.pt"))
    _one_line(info)
    with h5py.File(folder / "features" / "s2.h5", "a") as h5:
        h5.attrs["encoder"] = ENCODER
    with pytest.raises(
        TrainingError, match=r"s0\.h5 and s3\.h5 hold features of .* with different weights"
    ) as info:
        _run(_job(folder / "slides.csv", tmp_path / "b.pt"))
    _one_line(info)


def test_a_slide_without_tissue_or_that_cannot_be_read_is_named(tmp_path, tiny_slides):
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((600, 600, 3), 245, np.uint8)).save(blank)
    table = _table(tmp_path, [SlideEntry(blank, "normal", mpp=0.5), *tiny_slides[1:2]])
    with pytest.raises(TrainingError, match=r"blank\.png: No tissue found in blank\.png") as info:
        _run(_job(table, tmp_path / "a.pt"))
    _one_line(info)
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"not a slide")
    table = _table(tmp_path / "t2", [SlideEntry(broken, "normal"), *tiny_slides[1:2]])
    with pytest.raises(
        TrainingError, match=r"broken\.tif: cannot extract its features \(no broken\.h5 yet\)"
    ):
        _run(_job(table, tmp_path / "b.pt"))


def test_an_encoder_without_trained_weights_is_refused_before_extraction(tmp_path, tiny_slides, monkeypatch):
    import napari_pathology.features as features
    from napari_pathology.features import Encoder

    def untrained(name, weights=None, device="cpu"):
        import torch

        net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        return Encoder(name, net, 3, 256, 1.0, "imagenet", trained=False)

    monkeypatch.setattr(features, "get_encoder", untrained)
    table = _table(tmp_path, tiny_slides)
    with pytest.raises(TrainingError, match="encoder resnet50-trunc has no trained weights on this machine"):
        _run(_job(table, tmp_path / "a.pt", encoder="resnet50-trunc"))
    assert not (tmp_path / "features").exists() or not any((tmp_path / "features").glob("*.h5"))


def test_encoder_settings_are_checked():
    with pytest.raises(TrainingError, match="encoder must be an encoder name"):
        ClamTraining(Path("t.csv"), Path("m.pt"), encoder=" ")
    with pytest.raises(TrainingError, match="hidden must be a whole number >= 1"):
        ClamTraining(Path("t.csv"), Path("m.pt"), hidden=0)
    job = ClamTraining(Path("t.csv"), Path("m.pt"), encoder_weights=Path("w.pth"))
    assert job.encoder == "resnet50-trunc" and job.encoder_weights == "w.pth"


@pytest.mark.parametrize(
    ("name", "kind", "classes"),
    [
        ("clam-demo", "sb", ("normal", "tumour")),
        ("clam-subtype-demo", "mb", ("normal", "tumour_a", "tumour_b")),
    ],
)
def test_the_demo_models_load_by_name_and_carry_their_encoder(name, kind, classes):
    from napari_pathology.families.clam import FAMILY
    from napari_pathology.models import create_model
    from napari_pathology.models.pretrained import shipped_weights

    assert name in FAMILY.demo_weights
    path = shipped_weights()[name]
    assert path.is_file() and path.stat().st_size < 600_000
    model = create_model(name)
    spec = model.spec
    assert (spec.family, spec.classes, model.net.model_type) == ("clam", classes, kind)
    assert spec.config["encoder"] == ENCODER and spec.config["encoder_weights"] == "tumor-normal"
    assert (spec.input_size, spec.mpp, spec.normalization) == (256, 1.0, "liu")
    assert "synthetic demo, not for diagnostic use" in spec.description
    assert model.provenance["trained_by"] == "scripts/train_clam_demo.py"
    assert {"seed", "per_class", "size_px"} <= set(model.provenance["script"])
    out = model.net.eval().run(torch.zeros(5, spec.config["embed_dim"]))
    assert out.probabilities.shape == (1, len(classes))
