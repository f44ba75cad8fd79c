"""``--features-only``: a cohort's patch features extracted once, as CLAM h5 files, reused by a CLAM run."""

from __future__ import annotations

import h5py
import torch
from torch import nn

from napari_pathology.batch import run_cohort
from napari_pathology.cohort import read_slide_table
from napari_pathology.families.clam.model import ClamNet, clam_spec
from napari_pathology.features import Encoder, register_encoder
from napari_pathology.models.registry import PathologyModel
from napari_pathology.progress import run_to_completion

ENCODER = "test-batch-colour"
CALLS = {"patches": 0}


class ColourStats(nn.Module):
    """Mean and spread of each channel: 6 numbers per patch (counts the patches it sees)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        CALLS["patches"] += len(x)
        flat = x.flatten(2)
        return torch.cat([flat.mean(2), flat.std(2)], 1)


def _build(weights=None) -> Encoder:
    return Encoder(ENCODER, ColourStats(), 6, 64, 2.0, "imagenet", trained=True, provenance={"weights": "t"})


register_encoder(ENCODER, _build, dim=6, patch_size=64, mpp=2.0, description="test encoder")


def test_features_once_then_a_clam_cohort_reads_them_from_the_cache(small_cohort, tmp_path) -> None:
    entries = read_slide_table(small_cohort)[:2]
    features = run_to_completion(run_cohort(entries, None, tmp_path, encoder=ENCODER, in_process=True))
    assert [r.status for r in features.reports] == ["done", "done"] and features.evaluation is None
    extracted = CALLS["patches"]
    for entry, report in zip(entries, features.reports, strict=True):
        assert report.output == str(tmp_path / f"features-{ENCODER}" / f"{entry.path.stem}.h5")
        with h5py.File(report.output, "r") as h5:
            assert h5["features"].shape == (report.tiles, 6) and h5.attrs["encoder"] == ENCODER
    again = run_to_completion(run_cohort(entries, None, tmp_path, encoder=ENCODER, in_process=True))
    assert [r.status for r in again.reports] == ["skipped", "skipped"] and CALLS["patches"] == extracted

    spec = clam_spec("test-batch-clam", model_type="sb", classes=("normal", "tumour"), embed_dim=6,
                     encoder=ENCODER, input_size=64, mpp=2.0)  # fmt: skip
    torch.manual_seed(0)
    model = PathologyModel(ClamNet(2, "sb", embed_dim=6).eval(), spec)
    cohort = run_to_completion(run_cohort(entries, model, tmp_path, in_process=True))
    assert [r.status for r in cohort.reports] == ["done", "done"], [r.error for r in cohort.reports]
    assert CALLS["patches"] == extracted  # the bag runner read the features the cohort extracted
    assert [r.tiles for r in cohort.reports] == [r.tiles for r in features.reports]
