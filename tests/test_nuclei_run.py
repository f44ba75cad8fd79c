"""Chunked whole-slide nucleus detection (truth, borders, ROI, tissue, stop); the nucleus runner's result."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.spatial import cKDTree
from skimage.draw import disk

from napari_pathology.nuclei import (
    NucleusParams,
    NucleusTable,
    count_chunks,
    detect_in_slide,
    detection_scores,
    plan_chunks,
)
from napari_pathology.progress import Progress, run_to_completion
from napari_pathology.slide import InMemoryBackend, Slide, SlideOpenError

MPP = 0.5


def _disc_slide(size: int = 1024, seed: int = 0, spacing_um: float = 14.0) -> tuple[Slide, np.ndarray]:
    """Dark discs on pink on a jittered lattice, so that many straddle every chunk border."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.float64)
    img[:] = (235, 180, 210)
    step = spacing_um / MPP
    grid = np.arange(step / 2, size - step / 2, step)
    cy, cx = (
        a.ravel() + rng.uniform(-0.2, 0.2, a.size) * step for a in np.meshgrid(grid, grid, indexing="ij")
    )
    truth = []
    for y, x in zip(cy, cx, strict=True):
        rr, cc = disk((y, x), rng.uniform(3.0, 4.5) / MPP, shape=img.shape[:2])
        img[rr, cc] = (90, 50, 140)
        truth.append(((cc.mean() + 0.5) * MPP, (rr.mean() + 0.5) * MPP))
    img += rng.normal(0, 6, img.shape)
    slide = Slide(InMemoryBackend([np.clip(img, 0, 255).astype(np.uint8)], mpp=MPP))
    return slide, np.asarray(truth)


@pytest.fixture(scope="module")
def discs() -> SimpleNamespace:
    slide, truth = _disc_slide()
    whole = run_to_completion(detect_in_slide(slide, chunk_px=1024))  # one chunk
    return SimpleNamespace(slide=slide, truth=truth, whole=whole)


def test_chunked_detection_finds_the_truth_and_equals_one_chunk(discs) -> None:
    events: list[Progress] = []
    table = run_to_completion(detect_in_slide(discs.slide, chunk_px=256), events.append)
    assert isinstance(table, NucleusTable)
    assert len(discs.truth) == 36 * 36
    scores = detection_scores(table.xy_um(), discs.truth, radius_um=3.0)
    assert scores["f1"] >= 0.99, scores
    # same nuclei as one chunk over the slide: same count, each within half a pixel (no duplicates)
    assert len(discs.whole) == len(table) == scores["tp"]
    dist, index = cKDTree(discs.whole.xy_um()).query(table.xy_um())
    assert dist.max() < 0.5 * MPP and len(np.unique(index)) == len(table)
    # 16 chunks: a first event, then one per chunk carrying the chunk's nuclei
    assert count_chunks(discs.slide, chunk_px=256) == 16
    assert [e.done for e in events] == list(range(17)) and {e.total for e in events} == {16}
    assert sum(len(e.payload) for e in events[1:]) == len(table)
    assert table.area_um2.min() > 20 and np.all(table.hematoxylin > 0)


def test_roi_returns_only_nuclei_inside_it(discs) -> None:
    roi = (100.0, 150.0, 230.5, 170.0)  # um; crosses chunk borders at 128 um
    table = run_to_completion(detect_in_slide(discs.slide, region_um=roi, chunk_px=256))
    x, y = table.x_um, table.y_um
    assert np.all((x >= 100) & (x < 330.5) & (y >= 150) & (y < 320))
    whole = discs.whole
    inside = (whole.x_um >= 100) & (whole.x_um < 330.5) & (whole.y_um >= 150) & (whole.y_um < 320)
    assert len(table) == int(inside.sum()) > 150
    np.testing.assert_allclose(np.sort(table.x_um), np.sort(whole.x_um[inside]), atol=0.5 * MPP)
    # a region partly off the slide is clipped; one fully off it is an error that says um
    clipped = run_to_completion(detect_in_slide(discs.slide, region_um=(400, 400, 500, 500)))
    assert len(clipped) == int(((whole.x_um >= 400) & (whole.y_um >= 400)).sum())
    with pytest.raises(ValueError, match="outside"):
        detect_in_slide(discs.slide, region_um=(600, 0, 10, 10))
    with pytest.raises(ValueError, match="positive"):
        detect_in_slide(discs.slide, region_um=(0, 0, 0, 10))
    with pytest.raises(ValueError, match="x, y, w, h"):
        detect_in_slide(discs.slide, region_um=(0, 0, 10))


def test_tissue_mask_skips_chunks_without_tissue(discs) -> None:
    mask = np.zeros((64, 64), bool)  # 8 um/px over the 512 um slide
    mask[:, :10] = True  # tissue in x < 80 um only: the left column of 128 um chunks
    tissue = SimpleNamespace(mask=mask, mpp=8.0)
    chunks = plan_chunks(discs.slide, tissue=tissue, chunk_px=256)
    assert len(chunks) == 4 and {c.col for c in chunks} == {0}
    assert count_chunks(discs.slide, tissue=SimpleNamespace(mask=np.zeros_like(mask), mpp=8.0)) == 0
    table = run_to_completion(detect_in_slide(discs.slide, tissue=tissue, chunk_px=256))
    left = discs.whole.x_um < 128
    assert len(table) == int(left.sum()) and table.x_um.max() < 128
    empty = detect_in_slide(discs.slide, tissue=SimpleNamespace(mask=np.zeros_like(mask), mpp=8.0))
    assert len(run_to_completion(empty)) == 0


def test_cancel_and_close_stop_the_job(discs) -> None:
    cancel = threading.Event()
    job = detect_in_slide(discs.slide, chunk_px=256, cancel=cancel)
    first, second = next(job), next(job)
    assert (first.done, second.done) == (0, 1) and len(second.payload) > 0
    cancel.set()
    events = []
    partial = run_to_completion(job, events.append)
    assert "cancelled" in events[-1].message and len(partial) == len(second.payload)
    job = detect_in_slide(discs.slide, chunk_px=256)
    next(job)
    next(job)
    job.close()  # the consumer went away: no error, nothing more
    with pytest.raises(StopIteration):
        next(job)


def test_bad_input_gets_clear_errors(discs) -> None:
    no_mpp = Slide(InMemoryBackend([np.zeros((64, 64, 3), np.uint8)]))
    with pytest.raises(SlideOpenError, match="--mpp"):
        detect_in_slide(no_mpp)
    with pytest.raises(ValueError, match="hematoxylin-watershed"):
        detect_in_slide(discs.slide, detector="nope")
    with pytest.raises(ValueError, match="chunk_px"):
        detect_in_slide(discs.slide, chunk_px=10)
    with pytest.raises(ValueError, match="overlap_um"):
        detect_in_slide(discs.slide, overlap_um=-1)


def test_params_and_custom_detectors(discs) -> None:
    roi = (0.0, 0.0, 128.0, 128.0)
    strict = run_to_completion(
        detect_in_slide(discs.slide, region_um=roi, params=NucleusParams(min_area_um2=40.0))
    )
    default = run_to_completion(detect_in_slide(discs.slide, region_um=roi))
    assert 0 < len(strict) < len(default)
    assert strict.area_um2.min() >= 40.0

    def centre_only(rgb: np.ndarray, mpp: float) -> NucleusTable:
        h, w = rgb.shape[:2]
        return NucleusTable(x_um=[w * mpp / 2], y_um=[h * mpp / 2], area_um2=[1.0], hematoxylin=[0.0],
                            eccentricity=[0.0])  # fmt: skip

    table = run_to_completion(detect_in_slide(discs.slide, detector=centre_only, chunk_px=512, overlap_um=0))
    np.testing.assert_allclose(table.xy_um(), [[128, 128], [384, 128], [128, 384], [384, 384]])


def test_no_duplicates_at_chunk_borders_on_the_synthetic_slide(synthetic_slide) -> None:
    from napari_pathology.slide import open_slide

    slide = open_slide(synthetic_slide.slide_path)
    roi = (600.0, 600.0, 256.0, 256.0)  # in the tumour: packed nuclei, chunk borders every 64 um
    table = run_to_completion(detect_in_slide(slide, region_um=roi, chunk_px=128))
    assert len(table) > 100
    nearest = cKDTree(table.xy_um()).query(table.xy_um(), 2)[0][:, 1]
    assert nearest.min() >= 3.0  # the merge radius: no nucleus is counted twice


def test_one_shared_threshold_makes_chunking_irrelevant_on_the_synthetic_slide(synthetic_slide) -> None:
    from napari_pathology.nuclei.run import estimate_run_threshold
    from napari_pathology.slide import open_slide

    slide = open_slide(synthetic_slide.slide_path)
    roi = (400.0, 400.0, 384.0, 384.0)  # tumour, epithelium and lymphocytes
    events: dict[int, list[Progress]] = {256: [], 768: []}
    tables = {c: run_to_completion(detect_in_slide(slide, region_um=roi, chunk_px=c), events[c].append)
              for c in events}  # fmt: skip
    threshold = estimate_run_threshold(slide, roi)
    assert threshold is not None and 0.01 < threshold < 0.2
    for c in events:  # the first event reports the one threshold every chunk used
        assert f"threshold {threshold:.3f} OD" in events[c][0].message
    one, many = len(tables[768]), len(tables[256])
    assert one > 500 and abs(many - one) <= 0.03 * one, (one, many)  # measured: within ~1.5%
    # an absolute threshold in the params is used as is: a higher one finds fewer nuclei
    strict = run_to_completion(
        detect_in_slide(slide, region_um=roi, chunk_px=768, params=NucleusParams(threshold=2 * threshold))
    )
    assert len(strict) < 0.9 * one


@pytest.fixture(scope="module")
def purity_model():
    from napari_pathology.models import ModelError, resolve_model

    try:
        return resolve_model("nucleus-purity")  # the shipped demo weights (no download)
    except ModelError as error:
        pytest.skip(f"shipped nucleus-purity weights not available: {error}")


def test_a_nucleus_run_returns_the_one_result_type_saved_and_verified_like_any(
    tmp_path, purity_model
) -> None:
    import json

    from napari_pathology.analysis import ResultMismatchError, RunSettings, load_result, run

    slide, truth = _disc_slide(size=384, seed=3)
    out = tmp_path / "s" / "nucleus-purity"
    saved = []
    result = run_to_completion(
        run(slide, purity_model, settings=RunSettings(batch_size=256), out_dir=out, on_saved=saved.append)
    )
    assert saved == [result] and result.out_dir == out
    # the nuclei are the points, the purity grid the heatmap, the predicted purity the slide score
    nuclei = result.points
    assert len(nuclei) == len(truth) and result.detections.shape == (0, 3)
    assert np.isfinite(nuclei.probability).all() and not result.partial
    assert (result.heatmap_kind, result.kind.title, result.unit) == ("purity", "purity", "nuclei")
    assert (result.tiles_done, result.tiles_total) == (len(nuclei), len(nuclei))
    assert result.slide_score == pytest.approx(float(np.mean(nuclei.probability)), abs=1e-6)
    assert result.scores["tumour"] == pytest.approx(result.slide_score)
    assert result.scores["normal"] == pytest.approx(1 - result.slide_score)
    assert result.score_title.startswith("predicted purity") and "predicted purity" in result.summary()
    # each cell holds the mean probability of its nuclei, NaN where there are none
    cell = result.cell_um
    col, row = (nuclei.xy_um() // cell).astype(int).T
    first = (row == row[0]) & (col == col[0])
    assert result.heatmap[row[0], col[0]] == pytest.approx(nuclei.probability[first].mean(), abs=1e-6)
    assert result.heatmap.shape == (3, 3) and result.first_centre_um == (cell / 2, cell / 2)

    # the same run again reloads it (no detection); asked to, it computes it again
    events: list[Progress] = []
    again = run_to_completion(run(slide, purity_model, settings=RunSettings(batch_size=256), out_dir=out),
                              events.append)  # fmt: skip
    assert [e.message for e in events] == ["reloaded saved result"] and again.key == result.key
    events.clear()
    settings = RunSettings(batch_size=256)
    run_to_completion(run(slide, purity_model, settings=settings, out_dir=out, reuse=False), events.append)
    assert len(events) > 2 and "reloaded saved result" not in [e.message for e in events]

    loaded = load_result(out)
    assert sorted(p.name for p in out.iterdir()) == [
        "detections.csv", "detections.geojson", "heatmap.zarr", "nuclei.csv", "result.json",
    ]  # fmt: skip
    np.testing.assert_array_equal(loaded.heatmap, result.heatmap)
    np.testing.assert_array_equal(loaded.points.xy_um(), nuclei.xy_um())
    np.testing.assert_array_equal(loaded.points.probability, nuclei.probability)
    assert (loaded.heatmap_kind, loaded.unit, loaded.slide_score) == ("purity", "nuclei", result.slide_score)
    assert json.loads((out / "result.json").read_text())["n_points"] == len(nuclei)
    # a changed probability or a lost nucleus is refused, as lost heatmap cells are
    text = (out / "nuclei.csv").read_text()
    lines = text.splitlines()
    (out / "nuclei.csv").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ResultMismatchError, match=r"nuclei\.csv has"):
        load_result(out)
    x, y, label, p, *rest = lines[1].split(",")
    changed = ",".join([x, y, label, "0.25" if p != "0.25" else "0.75", *rest])
    (out / "nuclei.csv").write_text("\n".join([lines[0], changed, *lines[2:]]) + "\n")
    with pytest.raises(ResultMismatchError, match="digest"):
        load_result(out)
    (out / "nuclei.csv").unlink()
    with pytest.raises(ValueError, match="not a complete result folder"):
        load_result(out)


def test_a_cancelled_nucleus_run_keeps_the_nuclei_found_unclassified(purity_model) -> None:
    from napari_pathology.analysis import run

    slide, _ = _disc_slide(size=256, seed=4)
    cancel = threading.Event()
    job = run(slide, purity_model, cancel=cancel)
    next(job)
    next(job)  # one chunk of nuclei found
    cancel.set()
    result = run_to_completion(job)
    assert result.partial and result.tiles_done == 0 and result.tiles_total == len(result.points) > 0
    assert np.isnan(result.slide_score) and np.isnan(result.heatmap).all()
    assert result.progress_text() == f"PARTIAL (0/{len(result.points)} nuclei)"
