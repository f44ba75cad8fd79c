"""Nucleus annotation files at the boundary: nothing lost, nothing non-finite or off the slide, no doubles."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest

from napari_pathology.fileio import OutputError
from napari_pathology.nuclei import (
    LABELS,
    AutosaveRefused,
    NucleusFileError,
    NucleusPoints,
    NucleusTable,
    export_path,
    from_geojson,
    load_sidecar,
    merge_points,
    read_csv,
    read_geojson,
    restore_sidecar,
    save_atomic,
    sidecar_path,
    write_csv,
    write_geojson,
)
from napari_pathology.nuclei.points import free_path, refused_export_reason, sidecar_context

T, N, U = LABELS.index("tumour"), LABELS.index("normal"), LABELS.index("unlabeled")
EXTENT = (100.0, 80.0)


def _points() -> NucleusPoints:
    return NucleusPoints([10.0, 20.0, 30.0], [5.0, 6.0, 7.0], label=[T, N, U], source=[1, 1, 0])


# --------------------------------------------------------------------------- 1. a refused autosave is kept


@pytest.mark.parametrize(
    "content",
    [
        b"x_um,y_um,label\n1.0,2.0,tumour\n3.0,4",  # torn last row
        b"x_nm,y_nm\n1,2\n",  # bad header
        b"x_um,y_um,label\n1.0,2.0,tumour\n,,normal\n",  # empty centroid (what a NaN used to become)
        b"x_um,y_um,label\nnan,2.0,tumour\n",
        b"\xff\xfe\x00garbage",  # not UTF-8
        b"x_um,y_um,label\n500.0,2.0,tumour\n",  # off the slide
    ],
)
def test_refused_autosave_is_kept_aside_and_never_overwritten(tmp_path: Path, content: bytes) -> None:
    path = sidecar_path(tmp_path / "slide.tif")
    path.write_bytes(content)
    with pytest.raises(AutosaveRefused) as info:
        restore_sidecar(path, EXTENT)
    kept = info.value.kept_as
    message = str(info.value)
    assert kept is not None and str(kept) in message and str(path) in message and "\n" not in message
    assert kept.parent == tmp_path and kept.name.startswith("slide.tif.nuclei.refused-")
    assert kept.suffix == ".csv" and not path.exists()
    save_atomic(_points(), path, (0.5, 0.5), EXTENT)  # the next edit's autosave
    assert kept.read_bytes() == content  # the original bytes are still there
    assert len(load_sidecar(path, EXTENT)) == 3


def test_autosave_records_the_slide_and_warns_when_its_um_per_px_changed(tmp_path: Path) -> None:
    path = tmp_path / "slide.tif.nuclei.csv"
    save_atomic(_points(), path, (0.5, 0.5), EXTENT)
    assert path.read_text().startswith("# napari-pathology nuclei autosave")
    assert sidecar_context(path) == {"mpp": (0.5, 0.5), "extent_um": EXTENT}
    back = read_csv(path)  # the comment line is no row
    np.testing.assert_array_equal(back.xy_um(), _points().xy_um())
    same = restore_sidecar(path, EXTENT, (0.5, 0.5))
    assert same.note == "" and len(same.points) == 3
    # the slide's um/px was set to 0.25 since: the extent is now half, the nuclei are kept, with a warning
    moved = restore_sidecar(path, (50.0, 40.0), (0.25, 0.25))
    assert len(moved.points) == 3 and "0.5 um/px" in moved.note and path.exists()
    assert restore_sidecar(tmp_path / "none.csv").points is None


def test_autosave_on_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "slide.tif.nuclei.csv"
    save_atomic(_points(), path)
    before = path.read_bytes()
    import napari_pathology.fileio as fileio

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", full)
    for write in (
        lambda: save_atomic(NucleusPoints.concat(_points(), _points()), path),
        lambda: write_csv(_points(), path),
        lambda: write_geojson(_points(), path, 0.5),
    ):
        with pytest.raises(OutputError, match="disk is full") as info:
            write()
        assert str(tmp_path) in str(info.value)
        assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


# --------------------------------------------------------------------------- 2. finite, on-slide centroids


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("1,2\nnan,3\n", "row 3"),
        ("1,2\n4,inf\n", "row 3"),
        ("1,2\n-inf,1\n", "row 3"),
        ("1,2\n3,\n", "row 3"),
        ("1,2\n1e12,3\n", "row 3"),
        ("1,2\n-5,3\n", "row 3"),
    ],
)
def test_csv_refuses_non_finite_and_absurd_centroids_naming_the_row(
    tmp_path: Path, body: str, match: str
) -> None:
    path = tmp_path / "in.csv"
    path.write_text("x_um,y_um\n" + body)
    with pytest.raises(NucleusFileError, match=match) as info:
        read_csv(path)
    assert "in.csv" in str(info.value) and "\n" not in str(info.value)


def test_csv_refuses_points_off_the_slide_and_bad_measurements(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("x_um,y_um\n1,2\n\n150,3\n")  # a blank line: the row is the file's line 4
    assert len(read_csv(path)) == 2
    with pytest.raises(NucleusFileError, match=r"row 4.*outside the slide \(100\.0 x 80\.0 um\)"):
        read_csv(path, extent_um=EXTENT)
    path.write_text("x,y\n10,10\n300,10\n")  # pixels: 300 px * 0.5 = 150 um
    with pytest.raises(NucleusFileError, match="row 3"):
        read_csv(path, mpp=0.5, extent_um=EXTENT)
    path.write_text("x_um,y_um,probability,area_um2\n1,2,0.5,30\n1,2,inf,30\n")
    with pytest.raises(NucleusFileError, match="row 3: probability"):
        read_csv(path)
    path.write_text("x_um,y_um,probability,area_um2\n1,2,0.5,-3\n")
    with pytest.raises(NucleusFileError, match="row 2: area"):
        read_csv(path)
    path.write_text("x_um,y_um,label\n1,2,tumour\n1,2,tumuor\n")
    with pytest.raises(NucleusFileError, match=r"row 3.*tumuor"):
        read_csv(path)


def test_geojson_refuses_nan_text_null_huge_and_off_slide_points_naming_the_feature(tmp_path: Path) -> None:
    def collection(*coords):
        point = {"type": "Feature", "geometry": {"type": "Point"}, "properties": {}}
        return {"type": "FeatureCollection", "features": [
            {**point, "geometry": {"type": "Point", "coordinates": c}} for c in coords
        ]}  # fmt: skip

    assert len(from_geojson(collection([1, 2], [3, 4]), 0.5, EXTENT)) == 2
    for bad in ([float("nan"), float("nan")], ["1", "2"], [None, 2], [True, 2], [float("inf"), 1]):
        with pytest.raises(ValueError, match="feature 2"):
            from_geojson(collection([1, 2], bad), 0.5)
    with pytest.raises(ValueError, match=r"feature 3.*outside the slide"):
        from_geojson(collection([1, 2], [3, 4], [1000, 4]), 0.5, EXTENT)
    with pytest.raises(ValueError, match="feature 1"):
        from_geojson({"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": 5}}, 0.5)
    with pytest.raises(ValueError, match="feature 1: properties"):
        from_geojson(
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}, "properties": 3}, 1
        )
    with pytest.raises(ValueError, match="'features' must be a list"):
        from_geojson({"type": "FeatureCollection", "features": 7}, 0.5)

    path = tmp_path / "nuclei.geojson"
    path.write_text('{"type": "Feature", "geometry": {"type": "Point", "coordinates": [NaN, NaN]}}')
    with pytest.raises(NucleusFileError, match="NaN") as info:
        read_geojson(path, 0.5)
    assert "nuclei.geojson" in str(info.value)
    path.write_text('{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1e999, 2]}}')
    with pytest.raises(NucleusFileError, match=r"nuclei\.geojson.*feature 1"):
        read_geojson(path, 0.5)
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(NucleusFileError, match="nested too deeply"):
        read_geojson(path, 0.5)


def test_a_table_cannot_hold_so_no_writer_can_write_an_empty_centroid(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"nucleus 1.*not finite"):
        NucleusPoints([1.0, np.nan], [2.0, 3.0])
    with pytest.raises(ValueError, match="finite"):
        NucleusPoints.concat(_points(), NucleusPoints([1.0], [np.inf]))
    with pytest.raises(ValueError, match="nucleus 0"):
        NucleusTable([np.nan], [1.0], [1.0], [1.0], [1.0]).to_csv(tmp_path / "t.csv")
    assert not (tmp_path / "t.csv").exists()


# --------------------------------------------------------------------------- 3. import merges


def test_importing_the_same_nuclei_twice_adds_nothing() -> None:
    existing = NucleusPoints([10.0, 20.0, 30.0, 40.0], [10.0, 20.0, 30.0, 40.0], label=[U, T, N, T])
    incoming = NucleusPoints(
        [10.3, 20.0, 30.2, 40.0, 70.0], [10.0, 20.4, 30.0, 40.0, 70.0], label=[T, T, U, N, N], source=[2] * 5
    )
    first = merge_points(existing, incoming)
    # 10: unlabeled gets the imported tumour label; 20: same; 30: imported unlabeled adds nothing;
    # 40: tumour vs normal are two nuclei; 70: new
    assert (first.added, first.merged, first.relabelled) == (2, 3, 1)
    assert first.points.label.tolist()[:4] == [T, T, N, T]
    assert "2 added, 3 already there (1 given the imported label)" == first.summary()
    again = merge_points(first.points, incoming)
    assert (again.added, again.merged) == (0, 5) and len(again.points) == len(first.points)
    assert merge_points(NucleusPoints.empty(), incoming).added == 5
    far = NucleusPoints([10.0 + 1.5], [10.0], label=[T])  # 1.5 um away: another nucleus
    assert merge_points(existing, far).added == 1


# --------------------------------------------------------------------------- 4. export names


def test_export_name_is_never_the_autosave_the_truth_or_an_existing_file(tmp_path: Path) -> None:
    slide = tmp_path / "case1.tif"
    truth = tmp_path / "case1.nuclei.csv"
    autosave = sidecar_path(slide)
    for suffix in (".csv", ".geojson"):
        proposed = export_path(slide, suffix)
        assert proposed.parent == tmp_path and proposed.suffix == suffix
        assert proposed not in (truth, autosave) and not proposed.exists()
    taken = export_path(slide, ".csv")
    taken.write_text("mine")
    assert export_path(slide, "csv") == taken.with_name("case1.annotations-2.csv")
    assert free_path(taken) == taken.with_name("case1.annotations-2.csv")
    assert "ground truth" in refused_export_reason(truth, slide)
    assert refused_export_reason(autosave, slide) == "the autosave"
    assert refused_export_reason(slide, slide) == "the slide itself"
    assert refused_export_reason(tmp_path / "other.csv", slide) is None


# --------------------------------------------------------------------------- 5. nucleus training tables


@pytest.fixture
def small_image(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "tile.png"
    Image.fromarray(np.full((160, 200, 3), 200, np.uint8)).save(path)  # 100 x 80 um at 0.5 um/px
    return path


def test_training_table_errors_name_the_file_and_the_row(tmp_path: Path, small_image: Path) -> None:
    from napari_pathology.families.nucleus_purity.data import read_nucleus_training_data
    from napari_pathology.training import TrainingError

    labels = tmp_path / "labels.csv"
    labels.write_text("x_um,y_um,label\n10,10,tumour\n20,20,normal\n")
    table = tmp_path / "slides.csv"
    table.write_text("slide,nuclei,mpp\ntile.png,labels.csv,0.5\n")
    [data] = read_nucleus_training_data(table)
    assert data.is_tumour.tolist() == [True, False] and data.mpp == 0.5

    for mpp in ("abc", "nan", "-1", "0"):
        table.write_text(f"slide,nuclei,mpp\ntile.png,labels.csv,{mpp}\n")
        with pytest.raises(TrainingError, match=r"slides\.csv row 2: mpp") as info:
            read_nucleus_training_data(table)
        assert "\n" not in str(info.value)
    table.write_bytes(b"slide,nuclei,mpp\n\xe9t\xe9.png,labels.csv,0.5\n")  # Latin-1
    with pytest.raises(TrainingError, match=r"slides\.csv is not UTF-8"):
        read_nucleus_training_data(table)
    table.write_text("slide,nuclei,mpp\ntile.png,labels.csv,0.5\n./tile.png,labels.csv,0.5\n")
    with pytest.raises(TrainingError, match=r"row 3: tile\.png is already listed in row 2"):
        read_nucleus_training_data(table)
    table.write_text("slide,nuclei,mpp\ntile.png,labels.csv,0.5\n")
    labels.write_text("x_um,y_um,label\n10,10,tumour\n20,200,normal\n")  # 200 um: below the 80 um slide
    with pytest.raises(TrainingError, match=r"slides\.csv row 2: .*labels\.csv: row 3.*outside the slide"):
        read_nucleus_training_data(table)
    labels.write_text("x_um,y_um,label\n10,10,tumour\nnan,20,normal\n")
    with pytest.raises(TrainingError, match="row 3"):
        read_nucleus_training_data(table)
    geojson = tmp_path / "labels.geojson"
    geojson.write_text(
        json.dumps({"type": "Feature", "geometry": {"type": "Point", "coordinates": [999, 1]}})
    )
    table.write_text("slide,nuclei,mpp\ntile.png,labels.geojson,0.5\n")
    with pytest.raises(TrainingError, match=r"feature 1.*outside the slide"):
        read_nucleus_training_data(table)


# --------------------------------------------------------------------------- 6. detector CSV, atomically


def test_nuclei_table_csv_is_atomic_and_a_full_disk_names_the_folder(tmp_path: Path, monkeypatch) -> None:
    table = NucleusTable([1.0, 2.0], [3.0, 4.0], [30.0, 31.0], [0.5, 0.6], [0.1, 0.2])
    out = tmp_path / "out" / "nuclei.csv"
    table.to_csv(out)
    assert out.read_text().splitlines()[0] == "x_um,y_um,area_um2,hematoxylin,eccentricity"
    back = read_csv(out)
    np.testing.assert_allclose(back.xy_um(), table.xy_um())
    before = out.read_bytes()
    import napari_pathology.fileio as fileio

    real_write = fileio.os.fdopen

    def fdopen_full(fd, *args, **kwargs):
        fh = real_write(fd, *args, **kwargs)

        class Full:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                fh.close()

            def write(self, text):
                raise OSError(errno.ENOSPC, "No space left on device")

        return Full()

    monkeypatch.setattr(fileio.os, "fdopen", fdopen_full)
    with pytest.raises(OutputError, match=rf"cannot write to {tmp_path / 'out'}: the disk is full"):
        NucleusTable(*[np.arange(1000.0)] * 5).to_csv(out)
    assert out.read_bytes() == before
    assert [p.name for p in out.parent.iterdir()] == ["nuclei.csv"]
