"""The bag runner: patch features through the spec's encoder, live attention, one result (no Qt)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from napari_pathology.analysis import RunSettings, load_result
from napari_pathology.analysis.bag import TOP_K, run_bag_analysis, slide_score_of
from napari_pathology.analysis.engine import HeatmapBlock
from napari_pathology.families.clam.model import ClamNet, clam_spec
from napari_pathology.features import Encoder, register_encoder
from napari_pathology.models.registry import PathologyModel
from napari_pathology.progress import Progress
from napari_pathology.slide import open_slide

ENCODER = "test-colour-stats"


class ColourStats(nn.Module):
    """Mean and spread of each channel: 6 numbers per patch."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)
        return torch.cat([flat.mean(2), flat.std(2)], 1) * self.scale


def _build(weights=None) -> Encoder:
    return Encoder(
        ENCODER, ColourStats(), 6, 64, 2.0, "imagenet", trained=True, provenance={"weights": "test"}
    )


register_encoder(ENCODER, _build, dim=6, patch_size=64, mpp=2.0, description="test encoder")


def _model(model_type: str = "sb", classes=("normal", "tumour"), embed_dim: int = 6) -> PathologyModel:
    spec = clam_spec(
        f"test-clam-{model_type}", model_type=model_type, classes=classes, embed_dim=embed_dim,
        encoder=ENCODER, input_size=64, mpp=2.0,
    )  # fmt: skip
    torch.manual_seed(0)
    net = ClamNet(len(classes), model_type, embed_dim=embed_dim).eval()
    return PathologyModel(net, spec)


def _drain(gen):
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as done:
            return events, done.value


@pytest.mark.parametrize(
    ("model_type", "classes"), [("sb", ("normal", "tumour")), ("mb", ("normal", "a", "b"))]
)
def test_live_attention_matches_the_whole_bag(synthetic_slide, tmp_path, model_type, classes) -> None:
    slide = open_slide(synthetic_slide.slide_path)
    model = _model(model_type, classes)
    events, result = _drain(
        run_bag_analysis(slide, model, settings=RunSettings(batch_size=16), out_dir=tmp_path / "r",
                         cache_dir=tmp_path / "cache")
    )  # fmt: skip
    blocks = [e.payload for e in events if isinstance(e.payload, HeatmapBlock)]
    assert blocks and all(b.kind == "attention" for b in blocks)
    live = np.full(result.heatmap.shape, np.nan, np.float32)
    for block in blocks[:-1]:  # batches as features arrive
        live[block.cells[:, 0], block.cells[:, 1]] = block.values
    done = np.isfinite(result.heatmap)
    assert np.isfinite(live).sum() == done.sum() == result.tiles_total
    assert result.heatmap_kind == "attention" and not result.partial and result.unit == "patches"
    assert sum(result.scores.values()) == pytest.approx(1.0, abs=1e-5)
    # the whole bag through the network gives the same raw attention as the batches did
    branch = result.spec["classes"].index(result.provenance["attention_branch"]) if model_type == "mb" else 0
    if model_type == "mb":
        assert result.class_heatmaps.shape == (len(classes), *result.heatmap.shape)
        np.testing.assert_allclose(result.class_heatmaps[branch][done], result.heatmap[done], rtol=1e-6)
        shown_live = {"mb": classes.index("a")}[model_type]  # first non-normal class while streaming
        np.testing.assert_allclose(live[done], result.class_heatmaps[shown_live][done], rtol=1e-4, atol=1e-5)
    else:
        assert result.class_heatmaps is None
        np.testing.assert_allclose(live[done], result.heatmap[done], rtol=1e-4, atol=1e-5)
    # detections: the TOP_K most attended patches, weights of a softmax over the bag
    assert result.detections.shape == (TOP_K, 3)
    order = np.sort(result.heatmap[done])[::-1][:TOP_K]
    weights = np.exp(order - order.max()) / np.exp(result.heatmap[done] - order.max()).sum()
    np.testing.assert_allclose(result.detections[:, 2], weights, rtol=1e-4)
    # saved, reloaded, and a rerun reloads instead of recomputing
    again = load_result(tmp_path / "r")
    np.testing.assert_array_equal(again.heatmap, result.heatmap)
    rerun = run_bag_analysis(
        slide,
        model,
        settings=RunSettings(batch_size=16),
        out_dir=tmp_path / "r",
        cache_dir=tmp_path / "cache",
    )
    events, _ = _drain(rerun)
    assert any(e.message == "reloaded saved result" for e in events)


def test_cancel_keeps_the_patches_done_and_the_next_run_resumes(synthetic_slide, tmp_path) -> None:
    slide = open_slide(synthetic_slide.slide_path)
    model = _model()
    cancel = threading.Event()
    gen = run_bag_analysis(slide, model, settings=RunSettings(batch_size=8), out_dir=tmp_path / "r",
                           cancel=cancel, cache_dir=tmp_path / "cache")  # fmt: skip
    seen = 0
    while True:
        try:
            event = next(gen)
        except StopIteration as done:
            partial = done.value
            break
        if isinstance(event.payload, HeatmapBlock):
            seen += 1
            if seen == 2:
                cancel.set()
    assert partial.partial and np.isnan(partial.slide_score)
    assert 0 < partial.tiles_done < partial.tiles_total
    assert load_result(tmp_path / "r").partial
    rerun = run_bag_analysis(
        slide, model, settings=RunSettings(batch_size=8), out_dir=tmp_path / "r", cache_dir=tmp_path / "cache"
    )
    events, result = _drain(rerun)
    assert not result.partial
    cached = [e for e in events if isinstance(e, Progress) and "from the cache" in e.message]
    assert cached and cached[0].done >= partial.tiles_done


def test_an_encoder_of_another_size_is_refused_in_one_line(synthetic_slide, tmp_path) -> None:
    slide = open_slide(synthetic_slide.slide_path)
    with pytest.raises(ValueError, match=r"takes 1024-d patch features, but its encoder .* gives 6-d"):
        _drain(run_bag_analysis(slide, _model(embed_dim=1024), cache_dir=tmp_path / "cache"))


def test_slide_score_names() -> None:
    p = np.array([0.2, 0.5, 0.3])
    assert slide_score_of(["normal", "a", "b"], p, None) == (pytest.approx(0.8), "P(not normal)")
    assert slide_score_of(["normal", "tumour"], p[:2], 1) == (0.5, "P(tumour)")
    assert slide_score_of(["x", "y", "z"], p, None)[1].startswith("P(y)")


def test_overlapping_patches_make_a_finer_map_of_the_same_scores(synthetic_slide, tmp_path) -> None:
    slide = open_slide(synthetic_slide.slide_path)
    model = _model()
    _, coarse = _drain(run_bag_analysis(slide, model, cache_dir=tmp_path / "cache"))
    _, fine = _drain(
        run_bag_analysis(slide, model, settings=RunSettings(stride=32), cache_dir=tmp_path / "cache")
    )
    assert fine.cell_um == pytest.approx(coarse.cell_um / 2)
    assert fine.tiles_total > 3 * coarse.tiles_total
    # a patch's raw attention depends on that patch alone: every other fine cell is a coarse cell
    shared = fine.heatmap[::2, ::2][: coarse.heatmap.shape[0], : coarse.heatmap.shape[1]]
    both = np.isfinite(shared) & np.isfinite(coarse.heatmap[: shared.shape[0], : shared.shape[1]])
    assert both.sum() > 10
    np.testing.assert_allclose(
        shared[both], coarse.heatmap[: shared.shape[0], : shared.shape[1]][both], rtol=1e-4
    )
