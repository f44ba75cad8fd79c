"""The command line's common layer: every numeric option validated, one-line errors, outputs checked first."""

from __future__ import annotations

import errno
import subprocess
import sys

import numpy as np
import pytest

from napari_pathology import cli
from napari_pathology.cli import build_parser, main, parse_roi

SLIDE = "missing-slide.svs"  # never opened: every refusal below comes before any work

BAD_OPTIONS = [
    ("run", ["--batch-size", "0"]),
    ("run", ["--batch-size", "-3"]),
    ("run", ["--batch-size", "1.5"]),
    ("run", ["--stride", "0"]),
    ("run", ["--stride", "1000000000"]),
    ("run", ["--min-tissue", "1.5"]),
    ("run", ["--min-tissue", "nan"]),
    ("run", ["--nms-threshold", "nan"]),
    ("run", ["--nms-threshold", "-0.1"]),
    ("run", ["--nms-radius", "-1"]),
    ("run", ["--nms-radius", "0"]),
    ("run", ["--nms-radius", "inf"]),
    ("run", ["--mpp", "1e-6"]),
    ("run", ["--mpp", "1e9"]),
    ("run", ["--mpp", "abc"]),
    ("info", ["--mpp", "0"]),
    ("tissue", ["--mask-mpp", "0"]),
    ("tissue", ["--mask-mpp", "nan"]),
    ("tissue", ["--mpp", "-0.5"]),
    ("nuclei", ["--chunk-px", "0"]),
    ("nuclei", ["--chunk-px", "16"]),
    ("nuclei", ["--mpp", "inf"]),
    ("synth", ["--size", "0"]),
    ("synth", ["--size", "10"]),
    ("synth", ["--mpp", "1e-6"]),
    ("synth", ["--seed", "-1"]),
    ("demo", ["--size", "0"]),
    ("demo", ["--seed", "-5"]),
    ("train", ["--steps", "0"]),
    ("train", ["--epochs", "0"]),
    ("train", ["--batch-size", "0"]),
    ("train", ["--eval-every", "0"]),
    ("train", ["--lr", "0"]),
    ("train", ["--lr", "nan"]),
    ("train", ["--val-fraction", "1"]),
    ("train", ["--val-fraction", "-0.1"]),
    ("train", ["--normal-weight", "0"]),
    ("train", ["--seed", "-1"]),
    ("evaluate", ["--batch-size", "0"]),
]

REQUIRED = {
    "run": [SLIDE, "--model", "nuclear-density", "--out", "out"],
    "info": [SLIDE],
    "tissue": [SLIDE, "--out", "out"],
    "nuclei": [SLIDE, "--out", "out.csv"],
    "synth": ["out.tif"],
    "demo": ["--headless"],
    "train": ["metastasis", "--data", "table.csv", "--out", "x.pt"],
    "evaluate": ["--model", "nuclear-density", "--data", "table.csv", "--out", "out"],
}


@pytest.mark.parametrize(
    ("command", "option"), BAD_OPTIONS, ids=[f"{c} {' '.join(o)}" for c, o in BAD_OPTIONS]
)
def test_bad_numeric_options_are_refused_in_one_line_before_any_work(capsys, command, option) -> None:
    assert main([command, *REQUIRED[command], *option]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"napari-pathology {command}: error: argument {option[0]}"), err[0]
    assert repr(option[1]) in err[0] and captured.out == ""


def test_good_options_still_parse() -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["run", SLIDE, "--model", "m", "--out", "o", "--batch-size", "8", "--stride", "128",
         "--min-tissue", "0", "--nms-threshold", "1", "--nms-radius", "2.5", "--mpp", "0.25"]
    )  # fmt: skip
    assert (args.batch_size, args.stride, args.min_tissue, args.nms_threshold) == (8, 128, 0.0, 1.0)
    assert (args.nms_radius, args.mpp, args.device) == (2.5, 0.25, "cpu")
    args = parser.parse_args(["train", "tumor-normal", "--data", "d", "--out", "o", "--val-fraction", "0",
                              "--lr", "1e-4", "--epochs", "3", "--device", "auto"])  # fmt: skip
    assert (args.val_fraction, args.lr, args.epochs, args.device, args.steps) == (0.0, 1e-4, 3, "auto", None)
    assert parser.parse_args(["synth", "o.tif"]).size == 20_000


def test_a_device_this_build_lacks_is_refused_before_any_work(capsys, monkeypatch) -> None:
    from napari_pathology import devices

    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    assert main(["run", *REQUIRED["run"], "--device", "mps"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device" in err[0] and "mps" in err[0] and "available: cpu" in err[0]


def test_missing_arguments_are_one_line_too(capsys) -> None:
    assert main(["run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "required" in err[0] and "--help" in err[0]


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (RecursionError("maximum recursion depth exceeded"), "nested too deeply"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), "utf-8"),
        (
            PermissionError(errno.EACCES, "Permission denied", "/data/slide.svs"),
            "/data/slide.svs: Permission denied",
        ),
        (OSError(errno.ENOSPC, "No space left on device", "/out/x"), "/out/x: No space left on device"),
        (MemoryError(), "not enough memory"),
        (ValueError("line one\nline two"), "line one line two"),
    ],
    ids=["recursion", "unicode", "permission", "full-disk", "memory", "multi-line"],
)
def test_user_fixable_errors_are_one_line_exit_2(capsys, monkeypatch, error, expected) -> None:
    def fail(args):
        raise error

    monkeypatch.setattr(cli.slides, "_cmd_info", fail)
    assert main(["info", SLIDE]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("napari-pathology: error:") and expected in err[0], err


def test_output_error_names_the_folder_in_one_line(capsys, monkeypatch, tmp_path) -> None:
    from napari_pathology.fileio import output_error

    def fail(args):
        raise output_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path)

    monkeypatch.setattr(cli.slides, "_cmd_info", fail)
    assert main(["info", SLIDE]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"napari-pathology: error: cannot write to {tmp_path}: the disk is full"
    )


def test_an_unexpected_bug_still_tracebacks(monkeypatch) -> None:
    def fail(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli.slides, "_cmd_info", fail)
    with pytest.raises(ZeroDivisionError):
        main(["info", SLIDE])


def test_info_into_a_closed_pipe_exits_quietly(tmp_path) -> None:
    import tifffile

    slide = tmp_path / "small.tif"
    tifffile.imwrite(slide, np.full((64, 64, 3), 200, np.uint8))
    command = [sys.executable, "-m", "napari_pathology.cli", "info", str(slide), "--json"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # like `| head -0`: the reader is gone before anything is written
    _, err = process.communicate(timeout=120)
    assert b"Traceback" not in err and b"BrokenPipe" not in err and b"Exception ignored" not in err, err
    assert process.returncode == 1


@pytest.mark.parametrize(
    ("command", "args"),
    [
        ("tissue", [SLIDE, "--out", "{blocker}/sub"]),
        ("nuclei", [SLIDE, "--out", "{blocker}/sub/points.csv"]),
        ("nuclei", [SLIDE, "--out", "ok.csv", "--geojson", "{blocker}/points.geojson"]),
        ("synth", ["{blocker}/slide.tif", "--size", "256"]),
    ],
)
def test_outputs_are_checked_writable_before_the_input_is_read(
    tmp_path, capsys, monkeypatch, command, args
) -> None:
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    assert main([command, *(a.format(blocker=blocker) for a in args), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write to" in err[0] and str(blocker) in err[0], err
    assert SLIDE not in err[0]  # the slide (which does not exist) was never looked at


def test_nuclei_out_that_is_a_folder_is_refused(tmp_path, capsys) -> None:
    assert main(["nuclei", SLIDE, "--out", str(tmp_path), "--quiet"]) == 2
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text", ["nan,0,10,10", "0,0,inf,10", "0,0,0,10", "-5,0,10,10", "0,0,10,-1", "1,2,3"]
)
def test_parse_roi_refuses_non_finite_empty_and_negative_regions(text) -> None:
    with pytest.raises(cli.CommandError, match="--roi"):
        parse_roi(text, (0.5, 0.5))


def test_parse_roi_refuses_a_region_off_the_slide() -> None:
    assert parse_roi("0,0,2048,2048px", (0.5, 0.5), (1000.0, 1000.0)) == (0.0, 0.0, 1024.0, 1024.0)
    with pytest.raises(cli.CommandError, match="outside the slide"):
        parse_roi("5000,10,10,10", (0.5, 0.5), (1000.0, 1000.0))


def test_evaluate_with_a_label_typo_is_refused_instead_of_dropping_the_slide(tmp_path, capsys) -> None:
    for name in ("a.tif", "b.tif", "c.tif"):
        (tmp_path / name).write_bytes(b"")
    table = tmp_path / "slides.csv"
    table.write_text("slide,label\na.tif,tumour\nb.tif,normal\nc.tif,tumuor\n")
    assert main(["evaluate", "--model", "nuclear-density", "--data", str(table), "--out", str(tmp_path / "o"),
                 "--quiet"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 4" in err[0] and "tumuor" in err[0] and "'tumour'" in err[0], err
    assert not list((tmp_path / "o").rglob("*.json")) if (tmp_path / "o").exists() else True
