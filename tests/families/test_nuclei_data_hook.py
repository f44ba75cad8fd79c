"""Family.nuclei_data: the Nuclei panel's labelled nuclei reach any family through its read_data."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np

from napari_pathology.families.base import Family
from napari_pathology.nuclei.points import LABELS, NucleusPoints, read_csv


@dataclasses.dataclass(frozen=True, eq=False)
class Slide:
    path: str
    mpp: str
    xy_um: np.ndarray
    region_ids: np.ndarray | None = None


class TableFamily(Family):
    name = "table-toy"
    data_sources = ("nuclei",)

    def read_data(self, path):
        rows = list(csv.DictReader(Path(path).open(encoding="utf-8")))
        return [Slide(row["slide"], row["mpp"], read_csv(row["nuclei"]).xy_um()) for row in rows]


def test_default_hook_reads_the_points_through_read_data_and_adds_regions(tmp_path) -> None:
    xy = np.array([[10.0, 10.0], [50.0, 50.0], [90.0, 10.0]])
    label = np.array([LABELS.index("tumour"), LABELS.index("normal"), LABELS.index("normal")], np.int8)
    points = NucleusPoints(x_um=xy[:, 0], y_um=xy[:, 1], label=label)
    square = [np.array([[0.0, 0.0], [60.0, 0.0], [60.0, 60.0], [0.0, 60.0]])]
    [data] = TableFamily().nuclei_data(points, tmp_path / "slide.tif", 0.25, [square])
    assert data.path == str((tmp_path / "slide.tif").absolute()) and float(data.mpp) == 0.25
    assert np.array_equal(data.xy_um, xy)
    assert data.region_ids.tolist() == [0, 0, -1]
    [plain] = TableFamily().nuclei_data(points, tmp_path / "slide.tif")
    assert plain.mpp == "" and plain.region_ids is None
