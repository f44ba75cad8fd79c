"""``napari-pathology train``: resume, existing models and settings refused in one line before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from napari_pathology.cli import main
from napari_pathology.models import create_model, save_checkpoint
from napari_pathology.training.loop import checkpoint_paths


class Hostile:
    def __reduce__(self):
        return (os.system, ("touch hostile-state-ran",))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("napari-pathology: error: ") or err[0].startswith(
        "napari-pathology train: error:"
    )
    return err[0]


def trained(tmp_path: Path) -> Path:
    """``out`` with a last checkpoint written (as a stopped job leaves it), no optimiser state."""
    out = tmp_path / "met.pt"
    save_checkpoint(create_model("metastasis-small-10x"), checkpoint_paths(out)[1])
    return out


def train_args(out: Path, *extra: str) -> list[str]:
    # The table is never read: everything here is refused before the data.
    return [
        "train",
        "metastasis",
        "--data",
        str(out.parent / "missing.csv"),
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


def test_resume_with_a_torn_state_exits_2_in_one_line_without_aborting(tmp_path: Path, tiny_cohort) -> None:
    out = trained(tmp_path)
    state = checkpoint_paths(out)[2]
    torch.save({"optimizer": {"state": {}, "param_groups": []}, "step": 3}, state)
    state.write_bytes(state.read_bytes()[:300])  # torn mid-write
    args = train_args(out, "--resume", "--steps", "4", "--batch-size", "2", "--val-fraction", "0")
    args[args.index("--data") + 1] = str(tiny_cohort)  # real slides: the old code started its readers
    done = subprocess.run(
        [sys.executable, "-m", "napari_pathology.cli", *args],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])  # -6 was SIGABRT
    assert len(lines) == 1 and "corrupt or truncated" in lines[0] and state.name in lines[0], lines


def test_resume_with_a_hostile_state_is_code(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = trained(tmp_path)
    torch.save({"optimizer": Hostile(), "step": 3}, checkpoint_paths(out)[2])
    assert main(train_args(out, "--resume")) == 2
    line = one_error_line(capsys)
    assert "holds code (pickled objects) that napari-pathology will not run" in line
    assert not (tmp_path / "hostile-state-ran").exists()


def test_resume_without_state_or_checkpoint_is_refused(tmp_path: Path, capsys) -> None:
    out = trained(tmp_path)
    assert main(train_args(out, "--resume")) == 2
    line = one_error_line(capsys)
    assert "optimiser state" in line and "is missing" in line and "start without --resume" in line

    fresh = tmp_path / "fresh" / "m.pt"
    assert main(train_args(fresh, "--resume")) == 2
    line = one_error_line(capsys)
    assert "cannot resume" in line and "m.last.pt does not exist" in line


def test_an_existing_model_is_not_overwritten(tmp_path: Path, capsys) -> None:
    out = tmp_path / "met.pt"
    save_checkpoint(create_model("metastasis-small-10x"), out)
    before = out.read_bytes()
    assert main(train_args(out)) == 2
    line = one_error_line(capsys)
    assert f"{out} exists; use --resume to continue it or choose another --out, or --overwrite" in line
    assert out.read_bytes() == before
    # --overwrite passes that check (and stops at the missing table)
    assert main(train_args(out, "--overwrite")) == 2
    assert "missing.csv" in one_error_line(capsys)


@pytest.mark.parametrize(
    ("option", "value"),
    [("--eval-every", "0"), ("--steps", "0"), ("--epochs", "0"), ("--batch-size", "0"), ("--threads", "0")],
)
def test_zero_is_refused_not_replaced_by_a_default(tmp_path: Path, capsys, option: str, value: str) -> None:
    out = tmp_path / "m.pt"
    family = "tumor-normal" if option == "--epochs" else "metastasis"
    args = train_args(out, option, value)
    args[1] = family
    assert main(args) == 2
    assert option in one_error_line(capsys) or "must be" in capsys.readouterr().err
    assert not out.exists()


def test_an_unwritable_output_folder_is_refused_before_work(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(train_args(blocker / "m.pt")) == 2
    assert "cannot write to" in one_error_line(capsys)


def test_a_subtype_table_trains_clam_with_its_classes_normal_first(tmp_path: Path, monkeypatch) -> None:
    """Labels other than tumour/normal are read as the family's classes (as the Train panel does)."""
    from napari_pathology.families import get_family

    for name in ("a.tif", "b.tif", "c.tif", "d.tif"):
        (tmp_path / name).write_bytes(b"")  # the table is read, not the slides
    table = tmp_path / "slides.csv"
    table.write_text("slide,label\na.tif,tumour_b\nb.tif,normal\nc.tif,tumour_a\nd.tif,normal\n")
    family = get_family("clam")
    seen = {}

    def capture(settings, data, out, stop=None):
        seen["classes"] = settings.classes
        raise KeyboardInterrupt

    monkeypatch.setattr(type(family), "train", lambda self, *a, **k: capture(*a, **k))
    status = main(["train", "clam", "--data", str(table), "--out", str(tmp_path / "m.pt")])
    assert status == 130
    assert seen["classes"] == ("normal", "tumour_a", "tumour_b")
