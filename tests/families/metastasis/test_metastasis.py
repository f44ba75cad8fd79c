"""The metastasis Inception detector: architecture, centre-label geometry, TTA, training, shipped weights."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from napari_pathology.cohort import read_slide_table
from napari_pathology.families.metastasis.patches import TUMOUR, PatchSampler, prepare_regions
from napari_pathology.families.metastasis.train import MetastasisTraining, train_metastasis
from napari_pathology.models import create_model, get_spec, load_checkpoint, resolve_model
from napari_pathology.models.inception import InceptionClassifier
from napari_pathology.progress import run_to_completion
from napari_pathology.slide import open_slide
from napari_pathology.tiles import dihedral, make_tile_grid, tta_mean
from napari_pathology.training import TrainingError
from napari_pathology.training.augment import Augmentation


def test_small_inception_has_a_few_percent_of_the_parameters() -> None:
    full = InceptionClassifier(2, depth_multiplier=1.0)
    small = InceptionClassifier(2, depth_multiplier=0.125)
    n_full = sum(p.numel() for p in full.parameters())
    n_small = sum(p.numel() for p in small.parameters())
    assert 0.005 < n_small / n_full < 0.05
    assert small.n_features == 256 and full.n_features == 2048
    with torch.inference_mode():
        assert small.eval()(torch.zeros(3, 3, 299, 299)).shape == (3, 2)
        assert small.features(torch.zeros(1, 3, 299, 299)).shape == (1, 256)


def test_width_must_divide_every_layer() -> None:
    with pytest.raises(ValueError, match="depth_multiplier"):
        InceptionClassifier(2, depth_multiplier=0.3)


def test_registered_specs_follow_the_paper() -> None:
    for name, mpp in (
        ("metastasis-inception-v3", 0.25),
        ("metastasis-small-20x", 0.5),
        ("metastasis-small-10x", 1.0),
    ):
        spec = get_spec(name)
        assert (spec.input_size, spec.centre_size, spec.stride) == (299, 128, 128)
        assert spec.mpp == mpp and spec.tta and spec.aggregator == "max" and spec.normalization == "liu"


def test_centre_regions_tile_the_slide_without_gaps(synthetic_slide) -> None:
    """Each heatmap cell stands for its tile's centre 128 px; neighbouring centres abut exactly."""
    slide = open_slide(synthetic_slide.slide_path)
    spec = get_spec("metastasis-small-10x")
    grid = make_tile_grid(slide, spec.mpp, spec.input_size, spec.stride)
    centres = grid.centres_um
    assert np.allclose(centres - grid.origins_um, spec.input_size * spec.mpp / 2)
    half = spec.centre_size * spec.mpp / 2
    right = grid.cells[:, 1] == 1
    left = grid.cells[:, 1] == 0
    # the right edge of column 0's centre region is the left edge of column 1's
    assert np.allclose(centres[left, 0] + half, centres[right, 0][: left.sum()] - half)
    assert grid.cell_um == pytest.approx(spec.centre_size * spec.mpp)


def test_tta_is_the_mean_of_the_eight_orientations() -> None:
    torch.manual_seed(0)
    # train-mode batch norm (no dropout): an untrained net is otherwise nearly constant
    model = create_model("metastasis-small-10x", dropout=0.0).train()
    x = torch.rand(2, 3, 299, 299) * 2 - 1
    expected = torch.stack([model.predict_proba(dihedral(x, k)) for k in range(8)]).mean(0)
    assert torch.allclose(tta_mean(model.predict_proba, x), expected, atol=1e-6)
    assert not torch.allclose(model.predict_proba(dihedral(x, 1)), model.predict_proba(x), atol=1e-6)


def test_tumour_patches_have_tumour_in_their_centre(tiny_cohort) -> None:
    from napari_pathology.geometry import rasterize_polygons

    entries = read_slide_table(tiny_cohort)
    spec = get_spec("metastasis-small-10x")
    regions = run_to_completion(prepare_regions(entries, spec))
    sampler = PatchSampler(regions, spec, margin=0, seed=1)
    try:
        draws = sampler.positions(40)
    finally:
        sampler.close()
    labels = [d[2] for d in draws]
    assert 10 < sum(labels) < 30  # classes drawn with equal probability
    half = spec.centre_size * spec.mpp / 2
    for region, (x, y), label in draws:
        polygons = region.entry.tumour_polygons_um(region.slide.mpp)
        size = int(4 * half)
        mask = (
            rasterize_polygons(polygons, (size, size), offset=(x - 2 * half, y - 2 * half))
            if polygons
            else None
        )
        centre = mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] if mask is not None else None
        if label == TUMOUR:
            assert centre is not None and centre.any()
        else:
            assert centre is None or not centre.any()


def _fixed_loss(model, x, y) -> float:
    model.train()
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(x), y))


@pytest.mark.slow
def test_short_training_lowers_the_loss_and_writes_a_loadable_checkpoint(tiny_cohort, tmp_path) -> None:
    out = tmp_path / "met.pt"
    job = MetastasisTraining(
        data=tiny_cohort, out=out, steps=30, batch_size=12, val_fraction=0.0, eval_every=15, seed=3,
        augmentation=Augmentation.none(),
    )  # fmt: skip
    losses = []
    generator = train_metastasis(job)
    try:
        while True:
            event = next(generator)
            if event.kind == "step":
                losses.append(event.loss)
    except StopIteration as stop:
        result = stop.value
    assert result.step == 30 and not result.stopped
    assert np.mean(losses[-2:]) < losses[0] - 0.05, losses
    model = load_checkpoint(out)
    assert model.spec.family == "metastasis" and model.spec.name == "met"
    assert model.provenance["step"] == 30
    assert model.provenance["initialisation"].startswith("random initialisation")
    assert load_checkpoint(result.last).provenance["step"] == 30


def test_stop_saves_and_resume_continues(tiny_cohort, tmp_path) -> None:
    out = tmp_path / "met.pt"
    stop = threading.Event()
    job = MetastasisTraining(
        data=tiny_cohort, out=out, steps=8, batch_size=4, val_fraction=0.0, eval_every=100
    )
    generator = train_metastasis(job, stop)
    for event in generator:
        if event.kind == "step":  # after 5 steps
            stop.set()
        if event.kind == "done":
            break
    last = load_checkpoint(tmp_path / "met.last.pt")
    assert last.provenance["stopped"] is True and last.provenance["step"] == 5
    resumed = run_to_completion(train_metastasis(MetastasisTraining(**{**job.__dict__, "resume": True})))
    assert resumed.step == 8 and not resumed.stopped
    assert [h["step"] for h in resumed.history if "loss" in h] == list(range(1, 9))


def _reader_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("batch-stream", "patches"))]


def test_every_reader_thread_ends_with_the_job_however_it_ends(tiny_cohort, tmp_path) -> None:
    job = MetastasisTraining(
        data=tiny_cohort, out=tmp_path / "met.pt", steps=50, batch_size=2, val_fraction=0.0,
        eval_every=100, log_every=1, threads=1,
    )  # fmt: skip
    generator = train_metastasis(job)
    for event in generator:  # closed by its consumer mid-training (Ctrl-C, viewer closed)
        if event.kind == "step":
            assert _reader_threads() and torch.get_num_threads() == 1
            break
    generator.close()
    assert _reader_threads() == []
    # a resume state that does not fit the model fails inside the loop: the readers still end
    state = torch.load(tmp_path / "met.last.state.pt", weights_only=True)
    state["optimizer"]["param_groups"] = []
    torch.save(state, tmp_path / "met.last.state.pt")
    with pytest.raises(TrainingError, match="optimiser state does not fit"):
        run_to_completion(train_metastasis(MetastasisTraining(**{**job.__dict__, "resume": True})))
    assert _reader_threads() == []


def test_tumour_slide_without_annotations_is_refused(tiny_cohort, tmp_path) -> None:
    table = tmp_path / "table.csv"
    tumour = next(e for e in read_slide_table(tiny_cohort) if e.is_tumour)
    table.write_text(f"slide,label\n{tumour.path},tumour\n")
    job = MetastasisTraining(data=table, out=tmp_path / "m.pt", steps=1, val_fraction=0.0)
    with pytest.raises(TrainingError, match="no tumour annotations"):
        run_to_completion(train_metastasis(job))


def test_too_few_slides_for_a_validation_split(tiny_cohort, tmp_path) -> None:
    entries = read_slide_table(tiny_cohort)
    table = tmp_path / "table.csv"
    rows = [f"{e.path},{e.label},{e.annotations}" for e in entries if e.is_tumour][:1]
    rows += [f"{e.path},{e.label}," for e in entries if not e.is_tumour]
    table.write_text("slide,label,annotations\n" + "\n".join(rows) + "\n")
    with pytest.raises(TrainingError, match="too few slides for a validation split"):
        run_to_completion(train_metastasis(MetastasisTraining(data=table, out=tmp_path / "m.pt", steps=1)))


def test_shipped_metastasis_model_finds_the_planted_tumour(unseen_slides) -> None:
    from napari_pathology.analysis import RunSettings, run_analysis
    from napari_pathology.cohort import SlideEntry
    from napari_pathology.geometry import rasterize_polygons
    from napari_pathology.tissue import detect_tissue

    model = resolve_model("metastasis")
    assert "not for diagnostic use" in model.spec.description
    assert model.spec.family == "metastasis" and model.spec.mpp == 1.0
    truth = unseen_slides["tumour"]
    slide = open_slide(truth.slide_path)
    tissue = run_to_completion(detect_tissue(slide))
    result = run_to_completion(run_analysis(slide, model, tissue=tissue, settings=RunSettings(batch_size=16)))
    polygons = SlideEntry(truth.slide_path, "tumour", truth.tumour_geojson).tumour_polygons_um(slide.mpp)
    # the heatmap maximum lies in a cell whose centre region touches the tumour
    r, c = np.unravel_index(np.nanargmax(result.heatmap), result.heatmap.shape)
    y0, x0 = result.first_centre_um
    cx, cy, half = x0 + c * result.cell_um, y0 + r * result.cell_um, result.cell_um / 2
    region = rasterize_polygons(polygons, (int(2 * half), int(2 * half)), offset=(cx - half, cy - half))
    assert region.any()
    assert result.slide_score > 0.5
    assert len(result.detections)
    inside = [
        rasterize_polygons(polygons, (1, 1), offset=(x - 0.5, y - 0.5))[0, 0] for x, y, _ in result.detections
    ]
    assert any(inside)


def test_shipped_metastasis_model_is_quiet_on_a_negative_slide(unseen_slides) -> None:
    from napari_pathology.analysis import RunSettings, run_analysis
    from napari_pathology.tissue import detect_tissue

    truth = unseen_slides["negative"]
    slide = open_slide(truth.slide_path)
    tissue = run_to_completion(detect_tissue(slide))
    settings = RunSettings(batch_size=16, tta=False)
    result = run_to_completion(
        run_analysis(slide, resolve_model("metastasis"), tissue=tissue, settings=settings)
    )
    assert result.slide_score < 0.5
    assert len(result.detections) == 0


class _ConstantNet(torch.nn.Module):
    """Calls every patch tumour (or normal)."""

    def __init__(self, tumour: bool) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor([0.0, 5.0] if tumour else [5.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(len(x), 2)


def test_hard_negative_mining_feeds_the_sampler(tiny_cohort) -> None:
    from napari_pathology.families.metastasis.patches import NORMAL, mine_hard_negatives

    spec = get_spec("metastasis-small-10x")
    regions = run_to_completion(prepare_regions(read_slide_table(tiny_cohort), spec))
    sampler = PatchSampler(regions, spec, margin=8, seed=2)
    try:
        none, scored = mine_hard_negatives(_ConstantNet(tumour=False), sampler, 16)
        assert none == [] and scored == 16
        hard, _ = mine_hard_negatives(_ConstantNet(tumour=True), sampler, 16)
        assert len(hard) == 16 and all(d[2] == NORMAL for d in hard)
        sampler.set_hard_negatives(hard[:1], fraction=1.0)
        normals = sampler.positions(20, NORMAL)
        assert all(d is hard[0] for d in normals)
        assert not all(d is hard[0] for d in sampler.positions(20, NORMAL, uniform=True))
    finally:
        sampler.close()
