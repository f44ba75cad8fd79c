"""Training settings are checked when made; the loop's messages, saves and threads tell the truth."""

from __future__ import annotations

import errno
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from napari_pathology.families.metastasis.train import MetastasisTraining
from napari_pathology.families.nucleus_purity.train import NucleusPurityTraining
from napari_pathology.families.tumor_normal.train import TumorNormalTraining
from napari_pathology.fileio import OutputError
from napari_pathology.models import create_model
from napari_pathology.training import (
    LoopSettings,
    TrainingError,
    check_resume,
    checkpoint_paths,
    fit,
    torch_threads,
)

BAD = {
    MetastasisTraining: [
        ("steps", 0), ("steps", 2.5), ("steps", True), ("batch_size", 0), ("eval_every", 0),
        ("lr", 0.0), ("lr", float("nan")), ("lr", -1e-3), ("val_fraction", 1.0), ("val_fraction", -0.1),
        ("threads", 0), ("workers", 0), ("log_every", 0), ("hard_negative_fraction", 1.5), ("seed", -1),
    ],
    TumorNormalTraining: [
        ("epochs", 0), ("batch_size", 0), ("lr", float("inf")), ("normal_weight", 0.0),
        ("normal_weight", float("nan")), ("val_fraction", float("nan")), ("min_tissue_fraction", 2.0),
        ("threads", -1), ("classes", ("tumour",)),
    ],
}  # fmt: skip


@pytest.mark.parametrize(
    ("cls", "name", "value"), [(cls, name, value) for cls, cases in BAD.items() for name, value in cases]
)
def test_bad_settings_are_refused_naming_them(tmp_path: Path, cls: type, name: str, value: object) -> None:
    with pytest.raises(TrainingError, match=name) as caught:
        cls(data=tmp_path / "t.csv", out=tmp_path / "m.pt", **{name: value})
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [("epochs", 0), ("batch_size", 0), ("eval_every", 0), ("lr", math.nan), ("validation_fraction", 1.0),
     ("threads", 0), ("block_um", -5.0), ("context_um", math.inf)],
)  # fmt: skip
def test_bad_nucleus_purity_settings_are_refused(name: str, value: object) -> None:
    with pytest.raises(TrainingError, match=name):
        NucleusPurityTraining(**{name: value})


def test_good_settings_keep_their_values(tmp_path: Path) -> None:
    job = MetastasisTraining(data=str(tmp_path), out=str(tmp_path / "m.pt"), steps=1, eval_every=1, lr=None)
    assert job.steps == 1 and job.eval_every == 1 and isinstance(job.out, Path) and job.lr is None
    assert NucleusPurityTraining(eval_every=None, threads=1).threads == 1


def batches(n: int = 2) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    while True:
        yield torch.rand(n, 3, 64, 64, generator=g), torch.randint(0, 2, (n,), generator=g)


def run(job):
    events = []
    try:
        while True:
            events.append(next(job))
    except StopIteration as stop:
        return stop.value, events


def tiny_fit(out: Path, steps: int = 4, forward=None, **kw):
    model = create_model("nuclear-density").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    settings = LoopSettings(steps, out, eval_every=1, log_every=1, precise_bn_batches=0)
    return fit(model, batches(), optimizer, settings, forward=forward, **kw)


def test_a_nan_loss_says_kept_only_when_a_checkpoint_exists(tmp_path: Path) -> None:
    nan = lambda m, x: m(x) * math.nan  # noqa: E731
    with pytest.raises(TrainingError) as caught:
        run(tiny_fit(tmp_path / "a.pt", forward=nan))
    assert "no checkpoint was written yet" in str(caught.value) and "last good" not in str(caught.value)
    assert not checkpoint_paths(tmp_path / "a.pt")[1].exists()

    calls = {"n": 0}

    def nan_at_step_3(m, x):
        calls["n"] += 1
        return m(x) * (math.nan if calls["n"] >= 3 else 1.0)

    with pytest.raises(TrainingError, match=r"the last good checkpoint .*b\.last\.pt is intact"):
        run(tiny_fit(tmp_path / "b.pt", forward=nan_at_step_3))
    assert checkpoint_paths(tmp_path / "b.pt")[1].is_file()


def test_a_full_disk_during_a_save_names_the_folder_and_what_is_intact(tmp_path: Path, monkeypatch) -> None:
    import napari_pathology.fileio as fileio

    job = tiny_fit(tmp_path / "m.pt", steps=10)
    real_fsync, saves = fileio.os.fsync, []

    def fsync(fd: int) -> None:
        saves.append(fd)
        if len(saves) > 6:  # the first validation's three files (and their folder) are written
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    with pytest.raises(OutputError) as caught:
        run(job)
    monkeypatch.undo()
    last = checkpoint_paths(tmp_path / "m.pt")[1]
    assert str(caught.value).startswith(f"cannot write to {tmp_path}: the disk is full; ")
    assert f"the last good checkpoint {last} is intact" in str(caught.value)
    assert check_resume(tmp_path / "m.pt")[1]["step"] >= 1  # what is there still resumes
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_closing_before_the_first_step_writes_nothing(tmp_path: Path) -> None:
    job = tiny_fit(tmp_path / "m.pt")
    assert next(job).kind == "start"
    job.close()
    assert list(tmp_path.iterdir()) == []


def test_a_state_whose_tensors_changed_is_refused(tmp_path: Path) -> None:
    result, _ = run(tiny_fit(tmp_path / "m.pt", steps=2))
    assert result.step == 2
    state_path = checkpoint_paths(tmp_path / "m.pt")[2]
    state = torch.load(state_path, weights_only=True)
    first = next(iter(state["optimizer"]["state"].values()), None)
    if first is None:  # plain SGD keeps no buffers: add one as momentum would
        state["optimizer"]["state"][0] = {"momentum_buffer": torch.ones(3)}
    else:
        next(iter(first.values())).add_(1)
    torch.save(state, state_path)
    with pytest.raises(TrainingError, match="damaged"):
        check_resume(tmp_path / "m.pt")


def test_threads_are_set_for_the_job_and_restored() -> None:
    before = torch.get_num_threads()
    with torch_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(TrainingError, match="threads"), torch_threads(0):
        pass


def test_loop_settings_are_checked(tmp_path: Path) -> None:
    for name, value in (("steps", 0), ("eval_every", 0), ("log_every", 0), ("precise_bn_batches", -1)):
        with pytest.raises(TrainingError, match=name):
            LoopSettings(**{"steps": 1, "out": tmp_path / "m.pt", name: value})


@pytest.mark.parametrize(
    ("row", "line"), [("nan,3,tumour", "line 3: x_um"), ("1,abc,normal", "line 3: y_um")]
)
def test_a_bad_row_of_a_synthetic_nucleus_table_is_named(tmp_path: Path, row: str, line: str) -> None:
    from napari_pathology.families.nucleus_purity.train import synthetic_labelled_nuclei

    (tmp_path / "s.nuclei.csv").write_text(f"x_um,y_um,kind\n1,2,tumour\n{row}\n")
    with pytest.raises(TrainingError, match=f"s.nuclei.csv, {line}"):
        synthetic_labelled_nuclei(tmp_path / "s.tif")
