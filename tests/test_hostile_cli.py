"""Hostile inputs through the command line: one clear line, exit status 2, nothing hangs.

A re-run of the kinds of cases that found data loss, hangs and tracebacks
(issue 11): each bad input must end in one line on stderr that names the
culprit, never a traceback, never an endless loop, never a silently wrong
result. Argument errors from argparse end in its own ``error:`` line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from napari_pathology.cli import main

CLI = [sys.executable, "-m", "napari_pathology.cli"]


def _run(slide: Path, model: str | Path, out: Path, *extra: str) -> list[str]:
    return ["run", str(slide), "--model", str(model), "--out", str(out), "--quiet", *extra]


def _refused(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; assert exit 2 with one error line and no traceback; return that line."""
    from_argparse = False
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse refusing an option value: usage, then its error line
        code, from_argparse = exit_.code, True
    err = capsys.readouterr().err
    assert code == 2, (argv, code, err)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert "error:" in lines[-1], err
    assert from_argparse or len(lines) == 1, err
    return lines[-1]


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory) -> Path:
    from napari_pathology.slide.synthetic import write_synthetic_slide

    folder = tmp_path_factory.mktemp("hostile")
    return write_synthetic_slide(folder / "small.tif", size=2048, seed=3).slide_path


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--nms-threshold", "nan"),
        ("--nms-radius", "-1"),
        ("--stride", "0"),
        ("--batch-size", "0"),
        ("--min-tissue", "inf"),
        ("--mpp", "1e-6"),
        ("--device", "mps"),
    ],
)
def test_run_refuses_bad_options_before_any_work(capsys, tmp_path, small_slide, option, value) -> None:
    line = _refused(
        capsys,
        _run(small_slide, "metastasis", tmp_path, option, value),
    )
    assert "no tissue" not in line.lower()
    assert not any(tmp_path.iterdir()), "nothing may be written for a refused run"


def test_run_with_a_stride_larger_than_the_slide_names_the_stride(capsys, tmp_path, small_slide) -> None:
    line = _refused(capsys, _run(small_slide, "metastasis", tmp_path, "--stride", "100000000"))
    assert "stride" in line.lower() and "no tissue" not in line.lower()


@pytest.mark.parametrize(("option", "value"), [("--steps", "0"), ("--eval-every", "0"), ("--epochs", "0"),
                                               ("--batch-size", "0"), ("--lr", "nan")])  # fmt: skip
def test_train_refuses_bad_numbers(capsys, tmp_path, small_slide, option, value) -> None:
    family = "tumor-normal" if option == "--epochs" else "metastasis"
    _refused(
        capsys, ["train", family, "--data", str(small_slide), "--out", str(tmp_path / "m.pt"), option, value]
    )
    assert not (tmp_path / "m.pt").exists()


def _table(tmp_path: Path, rows: list[str], encoding: str = "utf-8") -> Path:
    path = tmp_path / "table.csv"
    path.write_bytes(("slide,label\n" + "\n".join(rows) + "\n").encode(encoding))
    return path


def test_evaluate_refuses_a_label_typo_instead_of_dropping_the_slide(capsys, tmp_path, small_slide) -> None:
    table = _table(tmp_path, [f"{small_slide},tumuor"])
    line = _refused(
        capsys, ["evaluate", "--model", "metastasis", "--data", str(table), "--out", str(tmp_path / "o")]
    )
    assert "tumuor" in line


def test_tables_that_are_not_utf8_or_list_a_slide_twice_are_refused(capsys, tmp_path, small_slide) -> None:
    latin = _table(tmp_path, [f"{small_slide},tumour  # caf\xe9"], encoding="latin-1")
    assert "table.csv" in _refused(
        capsys, ["evaluate", "--model", "metastasis", "--data", str(latin), "--out", str(tmp_path / "o")]
    )
    twice = _table(tmp_path, [f"{small_slide},tumour", f"{small_slide},tumour", f"{small_slide},normal"])
    line = _refused(
        capsys, ["train", "metastasis", "--data", str(twice), "--out", str(tmp_path / "m.pt"), "--quiet"]
    )
    assert "small.tif" in line


def test_info_on_a_fifo_does_not_hang(tmp_path) -> None:
    fifo = tmp_path / "stuck.svs"
    os.mkfifo(fifo)
    done = subprocess.run([*CLI, "info", str(fifo)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "stuck.svs" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_info_json_into_a_closed_pipe_is_quiet(small_slide) -> None:
    shell = f"{' '.join(CLI)} info --json {small_slide} | head -1"
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "{" and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


def _saved_model(tmp_path: Path, name: str = "metastasis", mutate=None) -> Path:
    from napari_pathology.models import resolve_model, save_checkpoint

    model = resolve_model(name)
    if mutate is not None:
        mutate(model)
    return save_checkpoint(model, tmp_path / f"{name}-copy.pt")


def test_a_checkpoint_with_a_flipped_byte_is_refused(capsys, tmp_path, small_slide) -> None:
    path = _saved_model(tmp_path)
    with zipfile.ZipFile(path) as archive:
        biggest = max(archive.infolist(), key=lambda info: info.file_size)  # the largest weight tensor
    with open(path, "rb") as fh:  # its data follows a 30-byte local header, the name and the extra field
        fh.seek(biggest.header_offset + 26)
        name_len, extra_len = (int.from_bytes(fh.read(2), "little") for _ in range(2))
    start = biggest.header_offset + 30 + name_len + extra_len
    data = bytearray(path.read_bytes())
    data[start + biggest.file_size // 2] ^= 0x40
    path.write_bytes(bytes(data))
    line = _refused(capsys, _run(small_slide, path, tmp_path / "o"))
    assert path.name in line


def test_a_checkpoint_holding_code_is_refused_as_code(capsys, tmp_path, small_slide) -> None:
    path = tmp_path / "hostile.pt"
    torch.save({"format": "napari-pathology", "payload": subprocess.Popen}, path)
    line = _refused(capsys, _run(small_slide, path, tmp_path / "o"))
    assert "code" in line.lower() and "corrupt" not in line.lower()


def test_a_checkpoint_with_nan_weights_is_an_error_not_a_partial_result(
    capsys, tmp_path, small_slide
) -> None:
    def poison(model) -> None:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.fill_(float("nan"))

    path = _saved_model(tmp_path, mutate=poison)
    out = tmp_path / "o"
    line = _refused(capsys, _run(small_slide, path, out))
    assert "nan" in line.lower()
    assert not list(out.rglob("result.json")), "a broken model must not leave a result that reruns 'resume'"


def test_outputs_onto_a_file_are_refused_in_one_line(capsys, tmp_path, small_slide) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    assert "not-a-folder" in _refused(capsys, ["tissue", str(small_slide), "--out", str(blocker), "--quiet"])
    assert "not-a-folder" in _refused(
        capsys,
        ["nuclei", str(small_slide), "--out", str(blocker / "n.csv"), "--roi", "0,0,100,100", "--quiet"],
    )


def test_a_deeply_nested_tissue_geojson_is_one_line(capsys, tmp_path, small_slide) -> None:
    deep = tmp_path / "mask.geojson"
    deep.write_text("[" * 50_000 + "]" * 50_000)
    line = _refused(capsys, _run(small_slide, "metastasis", tmp_path / "o", "--tissue", str(deep)))
    assert "mask.geojson" in line


def test_info_and_tissue_say_what_a_truncated_or_dark_field_slide_is(capsys, tmp_path) -> None:
    import tifffile

    from test_inputs_slides import _dark_field, _pyramid_tiff

    whole = _pyramid_tiff(tmp_path / "whole.tif")
    with tifffile.TiffFile(whole) as tif:
        cut = int(tif.pages[1].dataoffsets[len(tif.pages[1].dataoffsets) // 2]) + 10
    (tmp_path / "cut.tif").write_bytes(whole.read_bytes()[:cut])
    assert main(["info", str(tmp_path / "cut.tif"), "--mpp", "0.5"]) == 0
    assert "warning:" in capsys.readouterr().out

    dark = tmp_path / "dapi.tif"
    tifffile.imwrite(dark, _dark_field(), photometric="rgb", tile=(256, 256))
    assert main(["info", str(dark), "--mpp", "0.5"]) == 0
    assert "fluorescence" in capsys.readouterr().out
    tissue = ["tissue", str(dark), "--out", str(tmp_path / "t")]
    nuclei = ["nuclei", str(dark), "--out", str(tmp_path / "n.csv"), "--roi", "0,0,200,200"]
    for argv in (tissue, nuclei):
        assert "fluorescence" in _refused(capsys, [*argv, "--mpp", "0.5", "--quiet"])


def test_outputs_that_exist_are_never_replaced_without_overwrite(capsys, tmp_path, small_slide) -> None:
    precious = tmp_path / "labels.csv"
    precious.write_text("hand-made\n")
    nuclei = ["nuclei", str(small_slide), "--out", str(precious), "--roi", "0,0,99,99", "--quiet"]
    assert "--overwrite" in _refused(capsys, nuclei)
    assert precious.read_text() == "hand-made\n"
    assert main([*nuclei, "--overwrite"]) == 0 and precious.read_text().startswith("x_um,")

    slide_copy = tmp_path / "mine.tif"
    slide_copy.write_bytes(small_slide.read_bytes())  # a user's slide that happens to have the name
    assert "mine.tif already exists" in _refused(
        capsys, ["synth", str(slide_copy), "--size", "512", "--quiet"]
    )
    assert slide_copy.read_bytes() == small_slide.read_bytes()

    out = tmp_path / "tissue"
    assert main(["tissue", str(small_slide), "--out", str(out), "--quiet"]) == 0
    before = (out / "tissue.json").read_bytes()
    assert "tissue.json already exists" in _refused(
        capsys, ["tissue", str(small_slide), "--out", str(out), "--quiet"]
    )
    assert (out / "tissue.json").read_bytes() == before
