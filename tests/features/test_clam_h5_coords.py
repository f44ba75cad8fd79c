"""CLAM-layout feature files: coords that do not fit the features or the slide are refused in one line."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from napari_pathology.features.clam_h5 import check_coords, read_clam_h5, write_clam_h5


def _file(path, coords, n_features=None):
    coords = np.asarray(coords)
    with h5py.File(path, "w") as h5:
        h5["features"] = np.ones((len(coords) if n_features is None else n_features, 4), np.float32)
        h5["coords"] = coords
    return path


def test_coords_inside_the_slide_are_read(tmp_path):
    path = write_clam_h5(tmp_path / "a.h5", np.ones((3, 4)), [[0, 0], [256, 0], [3839, 1999]], 256, 0)
    feats = read_clam_h5(path, slide_size=(3840, 2000))
    assert feats.coords.tolist() == [[0, 0], [256, 0], [3839, 1999]]
    assert len(read_clam_h5(path)) == 3  # size unknown: read as before


def test_coords_outside_the_slide_name_the_file_and_the_first_bad_corner(tmp_path):
    # level-0 corners of a 4096 px slide, checked against a slide of half the size (another slide or level)
    path = _file(tmp_path / "other.h5", [[0, 0], [1024, 512], [2048, 0], [3072, 3072]])
    with pytest.raises(ValueError) as info:
        read_clam_h5(path, slide_size=(2048, 2048))
    text = str(info.value)
    assert "\n" not in text and str(path) in text
    assert "patch 2 at (2048, 0) lies outside the slide of 2048 x 2048 px (2 of 4 patches do)" in text
    with pytest.raises(ValueError, match=r"patch 1 at \(5, -256\) lies outside the slide \(1 of 2"):
        read_clam_h5(_file(tmp_path / "neg.h5", [[0, 0], [5, -256]]))  # negative: refused even without a size


def test_coords_that_do_not_match_the_features_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"few\.h5: 2 coords for 3 feature rows"):
        read_clam_h5(_file(tmp_path / "few.h5", [[0, 0], [256, 0]], n_features=3))
    with pytest.raises(ValueError, match=r"flat\.h5: 'coords' must be \(N, 2\)"):
        read_clam_h5(_file(tmp_path / "flat.h5", np.zeros((3, 3), np.int64), n_features=3))
    with pytest.raises(ValueError, match=r"half\.h5: 'coords' must be whole level-0 pixel positions"):
        read_clam_h5(_file(tmp_path / "half.h5", [[0.5, 0.0]]))
    with pytest.raises(ValueError, match="coords must be"):
        write_clam_h5(tmp_path / "w.h5", np.ones((2, 4)), [[0, 0]], 256, 0)


def test_check_coords_accepts_an_empty_bag_and_the_last_pixel():
    check_coords(np.zeros((0, 2), np.int64), (10, 10))
    check_coords(np.array([[9, 9]]), (10, 10))
    with pytest.raises(ValueError, match=r"f\.h5: patch 0 at \(10, 0\)"):
        check_coords(np.array([[10, 0]]), (10, 10), "f.h5")
