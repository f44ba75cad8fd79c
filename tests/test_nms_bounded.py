"""NMS terminates by construction and refuses settings that made it loop forever."""

from __future__ import annotations

import time

import numpy as np
import pytest

from napari_pathology.analysis import RunSettings, RunSettingsError, non_maximum_suppression


def reference_nms(heatmap: np.ndarray, threshold: float, radius: float) -> list[list[float]]:
    """The greedy definition: take the maximum, clear its disk, repeat (valid settings only)."""
    work = np.nan_to_num(heatmap.astype(np.float64), nan=0.0).copy()
    rows, cols = np.indices(work.shape)
    found = []
    for _ in range(work.size):
        r, c = divmod(int(np.argmax(work)), work.shape[1])
        if work[r, c] <= threshold:
            break
        found.append([float(r), float(c), float(work[r, c])])
        work[(rows - r) ** 2 + (cols - c) ** 2 <= radius**2] = 0.0
    return found


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("radius", [0.0, 1.0, 2.5, 7.0])
def test_nms_matches_the_greedy_definition(seed: int, radius: float) -> None:
    rng = np.random.default_rng(seed)
    heatmap = rng.random((30, 40)).astype(np.float32)
    heatmap[rng.random(heatmap.shape) < 0.2] = np.nan
    assert non_maximum_suppression(heatmap, 0.3, radius).tolist() == reference_nms(heatmap, 0.3, radius)


@pytest.mark.parametrize(
    ("threshold", "radius", "match"),
    [(float("nan"), 5.0, "threshold"), (float("inf"), 5.0, "threshold"), (0.5, -1.0, "radius"),
     (0.5, float("nan"), "radius")],
)  # fmt: skip
def test_nms_refuses_settings_that_looped_forever(threshold: float, radius: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        non_maximum_suppression(np.full((8, 8), 0.9), threshold, radius)


def test_nms_is_bounded_on_a_flat_heatmap_and_a_huge_radius() -> None:
    flat = np.full((300, 300), 0.7, np.float32)
    started = time.perf_counter()
    everything = non_maximum_suppression(flat, 0.0, 0.0)  # every cell is its own maximum
    assert len(everything) == flat.size
    one = non_maximum_suppression(flat, 0.5, 1e300)  # one detection suppresses the whole map
    assert one.tolist() == [[0.0, 0.0, pytest.approx(0.7)]]
    assert non_maximum_suppression(np.full((5, 5), np.inf), 0.5, 1.0).shape == (0, 3)
    assert time.perf_counter() - started < 20


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"nms_threshold": float("nan")}, "nms_threshold"), ({"nms_threshold": 1.5}, "nms_threshold"),
     ({"nms_radius": -1.0}, "nms_radius"), ({"nms_radius": float("inf")}, "nms_radius"),
     ({"stride": 0}, "stride"), ({"stride": 10**9}, "stride"), ({"stride": True}, "stride"),
     ({"stride": 2.5}, "stride"), ({"batch_size": 0}, "batch_size"), ({"workers": -1}, "workers"),
     ({"min_tissue_fraction": 1.01}, "min_tissue_fraction"),
     ({"min_tissue_fraction": float("nan")}, "min_tissue_fraction"), ({"save_every_s": -1}, "save_every_s"),
     ({"device": ""}, "device"), ({"tta": "yes"}, "tta")],
)  # fmt: skip
def test_run_settings_are_validated_at_construction(kwargs: dict, field: str) -> None:
    with pytest.raises(RunSettingsError) as caught:
        RunSettings(**kwargs)
    assert caught.value.field == field
    assert "\n" not in str(caught.value) and repr(next(iter(kwargs.values())))[:6] in str(caught.value)


def test_valid_run_settings_pass() -> None:
    settings = RunSettings(stride=64, batch_size=1, nms_threshold=0.0, nms_radius=0.0, min_tissue_fraction=1)
    assert settings.stride == 64
    assert RunSettings(stride=None, tta=None).stride is None
