"""Result folders: unique per slide, sanitised names, umask, verified on reload, atomic on a full disk."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from napari_pathology.analysis import (
    ResultMismatchError,
    ResultOwnerError,
    RunSettings,
    load_result,
    result_folder,
    run_analysis,
    save_result,
)
from napari_pathology.fileio import OutputError
from napari_pathology.models import ModelSpec, PathologyModel
from napari_pathology.progress import run_to_completion
from napari_pathology.slide import open_slide


class DarkFraction(nn.Module):
    """Tumour probability = share of dark pixels; counts the tiles it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.tiles_seen = 0
        self.register_buffer("dark_level", torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.tiles_seen += len(x)
        frac = (x.mean(1) < self.dark_level).float().mean((1, 2)).clamp(1e-6, 1 - 1e-6)
        return torch.stack([torch.log(1 - frac), torch.log(frac)], 1)


def dark_model(name: str = "test-dark") -> PathologyModel:
    spec = ModelSpec(
        name=name, family="test", task="test", classes=("normal", "tumour"), input_size=32, mpp=2.0,
        stride=32, normalization="unit", aggregator="max", tta=False,
    )  # fmt: skip
    return PathologyModel(DarkFraction(), spec)


def write_slide(path: Path, dark: tuple[int, int, int, int] = (256, 256, 512, 512)) -> Path:
    """A 768 px PNG (pink, with a dark square) read at 1 um/px: 12 x 12 tiles of the test model."""
    image = np.full((768, 768, 3), (230, 180, 200), np.uint8)
    x0, y0, x1, y1 = dark
    image[y0:y1, x0:x1] = (60, 30, 90)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def run(slide, model, out_dir, **kwargs):
    return run_to_completion(
        run_analysis(slide, model, settings=RunSettings(batch_size=16, **kwargs), out_dir=out_dir)
    )


def test_two_slides_with_the_same_name_get_their_own_result_folders(tmp_path) -> None:
    first = write_slide(tmp_path / "a" / "slide.png")
    second = write_slide(tmp_path / "b" / "slide.png", dark=(0, 0, 128, 128))
    out = tmp_path / "out"
    with open_slide(first, mpp=1.0) as one, open_slide(second, mpp=1.0) as two:
        folder_one = result_folder(out, one, "test-dark")
        run(one, dark_model(), folder_one)
        folder_two = result_folder(out, two, "test-dark")
        assert folder_two != folder_one and folder_two.parent.name.startswith("slide-")
        run(two, dark_model(), folder_two)
        # both results survive, each records its slide; the same slide finds its folder again
        assert load_result(folder_one).slide_path == str(first)
        assert load_result(folder_two).slide_path == str(second)
        assert result_folder(out, one, "test-dark") == folder_one
        assert result_folder(out, two, "test-dark") == folder_two
        assert not np.array_equal(load_result(folder_one).heatmap, load_result(folder_two).heatmap)
        # a result of another slide is never replaced silently, even when asked to write there
        with pytest.raises(ResultOwnerError, match="another slide"):
            run(two, dark_model(), folder_one)
        assert load_result(folder_one).slide_path == str(first)


@pytest.mark.parametrize("name", ["..", "../../escape", "a/b", "/abs", ".", ""])
def test_model_names_that_would_be_paths_stay_inside_the_slide_folder(tmp_path, name: str) -> None:
    slide_path = write_slide(tmp_path / "slide.png")
    out = tmp_path / "out"
    with open_slide(slide_path, mpp=1.0) as slide:
        folder = result_folder(out, slide, name)  # a checkpoint's spec name, whatever it holds
        assert folder.parent == out / "slide" and folder.name not in ("", ".", "..")
        assert "/" not in folder.name
        result = run(slide, dark_model(), folder)
    assert result.out_dir == folder and load_result(folder).tiles_done == 144
    assert sorted(p.name for p in out.iterdir()) == ["slide"]


def test_result_folders_and_files_respect_the_umask(tmp_path) -> None:
    slide_path = write_slide(tmp_path / "slide.png")
    old = os.umask(0o022)
    try:
        with open_slide(slide_path, mpp=1.0) as slide:
            folder = result_folder(tmp_path / "out", slide, "test-dark")
            run(slide, dark_model(), folder)
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o755
    for path in folder.rglob("*"):
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path


def test_a_complete_result_with_lost_heatmap_chunks_is_not_reloaded_as_complete(tmp_path) -> None:
    slide_path = write_slide(tmp_path / "slide.png")
    with open_slide(slide_path, mpp=1.0) as slide:
        folder = result_folder(tmp_path / "out", slide, "test-dark")
        first = run(slide, dark_model(), folder)
        assert not first.partial and first.slide_score > 0.99
        chunks = [p for p in (folder / "heatmap.zarr").rglob("*") if p.is_file() and p.name != "zarr.json"]
        assert chunks
        for chunk in chunks:  # the heatmap's data is lost; result.json still says "complete"
            chunk.unlink()
        with pytest.raises(ResultMismatchError, match="damaged"):
            load_result(folder)
        model = dark_model()
        again = run(slide, model, folder)
    assert model.net.tiles_seen == 144  # recomputed, not "reloaded saved result"
    assert not again.partial and again.slide_score == pytest.approx(first.slide_score)
    np.testing.assert_array_equal(load_result(folder).heatmap, first.heatmap)
    assert any("damaged" in note for note in again.provenance["notes"])


def test_a_changed_heatmap_value_or_missing_detection_row_is_refused(tmp_path) -> None:
    slide_path = write_slide(tmp_path / "slide.png")
    with open_slide(slide_path, mpp=1.0) as slide:
        folder = result_folder(tmp_path / "out", slide, "test-dark")
        result = run(slide, dark_model(), folder)
    import zarr

    store = zarr.open_array(str(folder / "heatmap.zarr"), mode="r+")
    store[0, 0] = 0.5
    with pytest.raises(ResultMismatchError):
        load_result(folder)
    save_result(result, folder)
    lines = (folder / "detections.csv").read_text().splitlines()
    assert len(lines) > 1
    (folder / "detections.csv").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ResultMismatchError, match="detections"):
        load_result(folder)
    assert load_result(folder, verify=False).tiles_done == 144


def test_a_full_disk_while_saving_is_one_line_naming_the_folder_and_tears_nothing(
    tmp_path, monkeypatch
) -> None:
    import napari_pathology.analysis.result as result_module

    slide_path = write_slide(tmp_path / "slide.png")
    with open_slide(slide_path, mpp=1.0) as slide:
        folder = result_folder(tmp_path / "out", slide, "test-dark")
        before = run(slide, dark_model(), folder)

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(result_module, "_write_detections", full)
        with pytest.raises(OutputError) as caught:
            run(slide, dark_model(), folder, stride=16)  # other settings: recomputed, then saved
    message = str(caught.value)
    assert "\n" not in message and str(folder.parent) in message and "disk is full" in message
    kept = load_result(folder)  # the previous result, whole
    assert kept.key == before.key and not kept.partial
    assert sorted(p.name for p in folder.parent.iterdir()) == ["test-dark"]  # no staging left


def test_output_folder_that_cannot_be_written_is_refused_before_work(tmp_path) -> None:
    slide_path = write_slide(tmp_path / "slide.png")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    model = dark_model()
    with open_slide(slide_path, mpp=1.0) as slide, pytest.raises(OutputError, match=r"write to .*file"):
        run(slide, model, blocker / "slide" / "test-dark")
    assert model.net.tiles_seen == 0


def test_a_folder_replacement_killed_between_its_renames_is_recovered(tmp_path) -> None:
    slide_path = write_slide(tmp_path / "slide.png")
    with open_slide(slide_path, mpp=1.0) as slide:
        folder = result_folder(tmp_path / "out", slide, "test-dark")
        result = run(slide, dark_model(), folder)
    # what a kill -9 between "old aside" and "new in place" leaves: no folder, the old one hidden
    dead_pid = 2**22 + 12345
    aside = folder.with_name(f".{folder.name}.{dead_pid}.0123abcd.old")
    os.replace(folder, aside)
    stale = folder.with_name(f".{folder.name}.{dead_pid}.89abcdef.tmp")
    shutil.copytree(aside, stale)
    assert load_result(folder).key == result.key
    assert sorted(p.name for p in folder.parent.iterdir()) == ["test-dark"]


V2_FOLDER = Path(__file__).parent / "data" / "results-v2" / "s" / "old-model"  # saved by format 2's code


def test_a_result_folder_of_the_previous_format_still_loads_and_is_still_verified(tmp_path) -> None:
    import json

    import zarr

    from napari_pathology.analysis.result import RESULT_VERSION

    folder = tmp_path / "s" / "old-model"
    shutil.copytree(V2_FOLDER, folder)
    assert json.loads((folder / "result.json").read_text())["version"] == 2 < RESULT_VERSION
    result = load_result(folder)
    assert (result.heatmap_kind, result.kind.title, result.unit, result.points) == (
        "probability", "heatmap", "tiles", None,
    )  # fmt: skip
    assert result.score_title == "slide score (max)" and result.slide_score == pytest.approx(0.95)
    np.testing.assert_allclose(result.heatmap, [[0.1, np.nan, 0.3], [0.7, 0.95, np.nan]], rtol=1e-6)
    assert result.class_heatmaps.shape == (2, 2, 3) and result.detections.tolist() == [[96.0, 96.0, 0.95]]
    assert (result.key, result.tiles_done, result.scores["tumour"]) == ("v2key", 4, 0.95)
    assert "s.tif: old-model slide score (max) 0.950, 1 detections, 4 tiles, complete" == result.summary()
    # saved again, it is written in the current format and reads back the same
    again = load_result(save_result(result, tmp_path / "again" / "old-model"))
    assert (
        json.loads((tmp_path / "again" / "old-model" / "result.json").read_text())["version"]
        == RESULT_VERSION
    )
    np.testing.assert_array_equal(again.heatmap, result.heatmap)
    assert (again.key, again.heatmap_kind, again.scores) == (result.key, "probability", result.scores)
    # an old folder is verified against its digests as before
    zarr.open_array(str(folder / "heatmap.zarr"), mode="r+")[0, 0] = 0.5
    with pytest.raises(ResultMismatchError, match="heatmap"):
        load_result(folder)


def test_folders_this_version_cannot_read_are_named_in_one_line(tmp_path) -> None:
    import json

    folder = tmp_path / "newer"
    shutil.copytree(V2_FOLDER, folder)
    meta = json.loads((folder / "result.json").read_text())
    (folder / "result.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ValueError, match="format version 99") as caught:
        load_result(folder)
    assert "\n" not in str(caught.value)
    old_nuclei = tmp_path / "nuclei"  # what the nucleus runner wrote before results were one type
    old_nuclei.mkdir()
    (old_nuclei / "result.json").write_text(json.dumps({"slide": "s.tif", "predicted_purity": 0.4}))
    with pytest.raises(ValueError, match=r"older version.*run the model again"):
        load_result(old_nuclei)


def test_a_result_refuses_an_unknown_heatmap_kind_and_misshapen_arrays() -> None:
    from napari_pathology.analysis import AnalysisResult

    fields = dict(
        slide_path=None, slide_name="s", spec={"name": "m"}, heatmap=np.zeros((2, 3)), class_heatmaps=None,
        cell_um=1.0, first_centre_um=(0.5, 0.5), slide_mpp=(1.0, 1.0), detections=np.zeros((0, 3)),
        slide_score=0.5, scores={}, partial=False, tiles_done=6, tiles_total=6,
    )  # fmt: skip
    assert AnalysisResult(**fields, heatmap_kind="attention").kind.bounded is False
    with pytest.raises(ValueError, match=r"unknown heatmap kind 'saliency'.*attention"):
        AnalysisResult(**fields, heatmap_kind="saliency")
    with pytest.raises(ValueError, match="class heatmaps"):
        AnalysisResult(**{**fields, "class_heatmaps": np.zeros((2, 3, 3))})
    with pytest.raises(ValueError, match="detections"):
        AnalysisResult(**{**fields, "detections": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="points must be NucleusPoints"):
        AnalysisResult(**fields, points=np.zeros((3, 2)))
    from napari_pathology.analysis import HeatmapBlock

    with pytest.raises(ValueError, match="unknown heatmap kind 'saliency'"):
        HeatmapBlock(np.zeros((1, 2), int), np.zeros(1), kind="saliency")
