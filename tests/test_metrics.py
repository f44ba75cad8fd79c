"""Evaluation metrics: AUC with CIs, FROC (Camelyon16 rules), binary metrics, Pearson (no Qt)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from scipy import stats

from napari_pathology.analysis.metrics import (
    AUCResult,
    SlideDetections,
    binary_metrics,
    bootstrap_auc_ci,
    bootstrap_ci,
    delong_ci,
    delong_variance,
    froc,
    pearson_r,
    roc_auc,
    roc_curve,
    slide_auc,
)

Z95 = 1.959963984540054


def brute_force_auc_parts(labels, scores):
    """AUC and DeLong structural components by the definition (double loop)."""
    pos = [s for s, label in zip(scores, labels, strict=True) if label]
    neg = [s for s, label in zip(scores, labels, strict=True) if not label]

    def psi(x, y):
        return 1.0 if x > y else 0.5 if x == y else 0.0

    v10 = [sum(psi(x, y) for y in neg) / len(neg) for x in pos]
    v01 = [sum(psi(x, y) for x in pos) / len(pos) for y in neg]
    auc = sum(v10) / len(pos)
    return auc, v10, v01


# --------------------------------------------------------------------------- AUC


def test_roc_auc_hand_worked() -> None:
    # pairs (pos, neg): (0.35, 0.1) win, (0.35, 0.4) loss, (0.8, 0.1) win, (0.8, 0.4) win -> 3/4
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # bool labels and reversed order give the same
    assert roc_auc(np.array([True, True, False, False]), [0.8, 0.35, 0.4, 0.1]) == pytest.approx(0.75)


def test_roc_auc_ties_count_half() -> None:
    # pos {0.5, 0.9}, neg {0.5, 0.2}: (0.5,0.5) tie=1/2, (0.5,0.2)=1, (0.9,*)=1+1 -> 3.5/4
    assert roc_auc([1, 1, 0, 0], [0.5, 0.9, 0.5, 0.2]) == pytest.approx(0.875)
    # everything tied -> 0.5
    assert roc_auc([1, 0, 1, 0, 0], [0.3] * 5) == pytest.approx(0.5)
    # perfectly wrong -> 0
    assert roc_auc([1, 1, 0], [0.1, 0.2, 0.3]) == pytest.approx(0.0)


def test_roc_auc_matches_brute_force_with_many_ties() -> None:
    rng = np.random.default_rng(3)
    labels = rng.random(60) < 0.4
    scores = rng.integers(0, 5, 60).astype(float) + labels  # heavy ties
    expected, _, _ = brute_force_auc_parts(labels, scores)
    assert roc_auc(labels, scores) == pytest.approx(expected)


def test_roc_auc_errors() -> None:
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="length"):
        roc_auc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([0, 1, 1], [0.1, np.nan, 0.3])
    with pytest.raises(ValueError, match="0/1"):
        roc_auc([0, 2, 1], [0.1, 0.2, 0.3])


def test_roc_curve_hand_worked_and_area() -> None:
    fpr, tpr, thresholds = roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert thresholds.tolist() == [np.inf, 0.8, 0.4, 0.35, 0.1]
    assert fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    # with ties the trapezoidal area still equals the Mann-Whitney AUC
    rng = np.random.default_rng(5)
    labels = rng.random(50) < 0.5
    scores = rng.integers(0, 4, 50) + 0.5 * labels
    fpr, tpr, thresholds = roc_curve(labels, scores)
    assert len(thresholds) == len(np.unique(scores)) + 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)
    area = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)
    assert area == pytest.approx(roc_auc(labels, scores))


# --------------------------------------------------------------------------- DeLong


def test_delong_hand_worked_small_example() -> None:
    # positives 0.35, 0.8; negatives 0.1, 0.4
    # V10: 0.35 -> (1 + 0)/2 = 0.5; 0.8 -> 1.   V01: 0.1 -> 1; 0.4 -> (0 + 1)/2 = 0.5
    # S10 = S01 = var([0.5, 1], ddof=1) = 0.125; var = 0.125/2 + 0.125/2 = 0.125
    auc, variance = delong_variance([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert auc == pytest.approx(0.75)
    assert variance == pytest.approx(0.125)
    auc, low, high = delong_ci([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert low == pytest.approx(0.75 - Z95 * math.sqrt(0.125))
    assert high == 1.0  # 0.75 + 0.69 clipped


def test_delong_variance_against_structural_components_with_ties() -> None:
    labels = [1, 1, 1, 1, 0, 0, 0, 1, 0]
    scores = [0.9, 0.7, 0.7, 0.4, 0.7, 0.3, 0.2, 0.25, 0.4]
    auc, v10, v01 = brute_force_auc_parts(labels, scores)
    m, n = len(v10), len(v01)
    s10 = sum((v - auc) ** 2 for v in v10) / (m - 1)
    s01 = sum((v - auc) ** 2 for v in v01) / (n - 1)
    expected_var = s10 / m + s01 / n
    got_auc, got_var = delong_variance(labels, scores)
    assert got_auc == pytest.approx(auc)
    assert got_var == pytest.approx(expected_var)
    _, low, high = delong_ci(labels, scores, confidence=0.9)
    half = stats.norm.ppf(0.95) * math.sqrt(expected_var)
    assert low == pytest.approx(max(0.0, auc - half))
    assert high == pytest.approx(min(1.0, auc + half))
    assert 0.0 <= low < auc < high <= 1.0


def test_perfect_separation() -> None:
    labels = [0, 0, 0, 1, 1, 1, 1]
    scores = [0.1, 0.2, 0.3, 0.6, 0.7, 0.8, 0.9]
    assert roc_auc(labels, scores) == 1.0
    assert delong_ci(labels, scores) == (1.0, 1.0, 1.0)
    assert bootstrap_auc_ci(labels, scores, n_resamples=200) == (1.0, 1.0)


def test_delong_single_member_class_gives_nan_interval() -> None:
    auc, low, high = delong_ci([1, 0, 0, 0], [0.5, 0.1, 0.7, 0.3])
    assert auc == pytest.approx(2 / 3)
    assert math.isnan(low) and math.isnan(high)


def test_confidence_must_be_a_fraction() -> None:
    with pytest.raises(ValueError, match="confidence"):
        delong_ci([0, 1], [0.1, 0.2], confidence=95)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_auc_ci([0, 1], [0.1, 0.2], confidence=0.0)


# --------------------------------------------------------------------------- bootstrap


@pytest.fixture
def noisy() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    labels = rng.random(40) < 0.35
    scores = rng.normal(size=40) + 1.2 * labels
    return labels, scores


def test_bootstrap_auc_ci_contains_auc_and_is_reproducible(noisy) -> None:
    labels, scores = noisy
    auc = roc_auc(labels, scores)
    low, high = bootstrap_auc_ci(labels, scores, n_resamples=500, seed=7)
    assert 0.0 <= low < auc < high <= 1.0
    assert bootstrap_auc_ci(labels, scores, n_resamples=500, seed=7) == (low, high)
    assert bootstrap_auc_ci(labels, scores, n_resamples=500, seed=8) != (low, high)
    # a narrower confidence gives a nested interval
    low90, high90 = bootstrap_auc_ci(labels, scores, n_resamples=500, seed=7, confidence=0.8)
    assert low <= low90 < high90 <= high


def test_bootstrap_auc_ci_equals_generic_stratified_bootstrap(noisy) -> None:
    labels, scores = noisy
    fast = bootstrap_auc_ci(labels, scores, n_resamples=300, seed=2)
    slow = bootstrap_ci(roc_auc, labels, scores, n_resamples=300, seed=2, strata=labels)
    assert fast == pytest.approx(slow)


def test_bootstrap_is_stratified() -> None:
    labels = np.array([1, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    # with strata every resample keeps exactly one positive; without, the count varies
    assert bootstrap_ci(np.sum, labels, n_resamples=300, strata=labels) == (1.0, 1.0)
    low, high = bootstrap_ci(np.sum, labels, n_resamples=300)
    assert low == 0.0 and high >= 2.0
    # and so the AUC bootstrap works even with a single positive slide
    low, high = bootstrap_auc_ci(labels, np.linspace(0, 1, 10), n_resamples=300)
    assert 0.0 <= low <= high <= 1.0


def test_bootstrap_ci_generic_mean() -> None:
    values = np.arange(100.0)
    low, high = bootstrap_ci(np.mean, values, n_resamples=1000, seed=1)
    # standard error of the mean is about 2.9 -> roughly 49.5 +/- 5.7
    assert 43.0 < low < 46.0 and 53.0 < high < 56.0
    with pytest.raises(ValueError, match="length"):
        bootstrap_ci(np.mean, values, values[:5])


# --------------------------------------------------------------------------- slide AUC


def test_slide_auc_summary() -> None:
    labels = [0, 0, 0, 1, 1, 1, 1, 0, 1]
    scores = [0.1, 0.5, 0.3, 0.6, 0.9, 0.4, 0.8, 0.2, 0.7]
    result = slide_auc(labels, scores, n_resamples=400, seed=3)
    assert isinstance(result, AUCResult)
    assert result.auc == pytest.approx(roc_auc(labels, scores))
    assert (result.n_positive, result.n_negative) == (5, 4)
    assert result.bootstrap_ci == bootstrap_auc_ci(labels, scores, n_resamples=400, seed=3)
    assert result.delong_ci == pytest.approx(delong_ci(labels, scores)[1:])
    text = str(result)
    assert re.fullmatch(
        r"AUC 0\.950 \(95% CI \d\.\d\d-1\.00 bootstrap, \d\.\d\d-1\.00 DeLong; 5 positive, 4 negative\)", text
    ), text
    as_dict = json.loads(json.dumps(result.to_dict()))
    assert as_dict["auc"] == pytest.approx(0.95)
    assert as_dict["n_positive"] == 5 and len(as_dict["delong_ci"]) == 2


def test_auc_result_str_format() -> None:
    result = AUCResult(0.9734, (0.912, 0.999), (0.931, 1.0), 12, 8)
    assert str(result) == "AUC 0.973 (95% CI 0.91-1.00 bootstrap, 0.93-1.00 DeLong; 12 positive, 8 negative)"
    nan_ci = AUCResult(0.5, (0.2, 0.8), (math.nan, math.nan), 1, 3).to_dict()
    assert nan_ci["delong_ci"] == [None, None]
    json.dumps(nan_ci, allow_nan=False)


# --------------------------------------------------------------------------- FROC


def square(x0: float, y0: float, side: float) -> np.ndarray:
    return np.array([[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side]])


def camelyon_example() -> list[SlideDetections]:
    """Two tumour slides with 3 lesions, two negative slides.

    Lesion A (T1, 100 um) best hit 0.9 (0.8 is a duplicate hit), lesion B (T1,
    100 um) hit 0.4, lesion C (T2, 40 um) hit 0.6. False positives: 0.7 (T1),
    0.3 (T2), 0.85 and 0.5 (N1), 0.2 (N2).
    """
    t1 = SlideDetections(
        "T1",
        np.array([[50, 50, 0.9], [60, 60, 0.8], [250, 250, 0.4], [500, 500, 0.7]]),
        [square(0, 0, 100), square(200, 200, 100)],
    )
    t2 = SlideDetections("T2", np.array([[1020, 1020, 0.6], [2000, 2000, 0.3]]), [square(1000, 1000, 40)])
    n1 = SlideDetections("N1", np.array([[10, 10, 0.85], [20, 20, 0.5]]))
    n2 = SlideDetections("N2", np.array([[30, 30, 0.2]]))
    return [t1, t2, n1, n2]


THRESHOLDS = [0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]


def test_froc_fp_per_negative_slide_hand_worked() -> None:
    result = froc(camelyon_example())
    assert result.n_lesions == 3 and result.n_negative_slides == 2 and result.n_slides == 4
    assert result.curve_thresholds.tolist() == pytest.approx(THRESHOLDS)
    # only FPs on N1/N2 count (0.85, 0.5, 0.2), divided by 2 negative slides;
    # the duplicate hit 0.8 on lesion A and the FP 0.7 on T1 change nothing
    assert result.curve_fps.tolist() == pytest.approx([0, 0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 1.5])
    third = 1 / 3
    expected_sens = [third, third, third, third, 2 * third, 2 * third, 1, 1, 1]
    assert result.curve_sensitivity.tolist() == pytest.approx(expected_sens)
    expected = {0.25: third, 0.5: 2 * third, 1.0: 1.0, 2.0: 1.0, 4.0: 1.0, 8.0: 1.0}
    assert result.sensitivities == pytest.approx(expected)
    assert list(result.sensitivities) == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
    assert result.score == pytest.approx(5 / 6)
    assert result.score == pytest.approx(np.mean(list(result.sensitivities.values())))
    # read-off between requested rates: step-wise, no interpolation
    assert result.sensitivity_at(0.75) == pytest.approx(2 * third)
    assert result.sensitivity_at(0.0) == pytest.approx(third)


def test_froc_fp_per_all_slides_counts_tumour_slide_fps() -> None:
    rates = (0.25, 0.5, 0.75)
    negative = froc(camelyon_example(), fp_rates=rates)
    everything = froc(camelyon_example(), fp_rates=rates, fp_per="all")
    # FPs on all 4 slides: 0.85, 0.7 (outside, on T1), 0.5, 0.3 (on T2), 0.2; the duplicate 0.8 is not one
    assert everything.curve_fps.tolist() == pytest.approx([0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 1.0, 1.25])
    assert everything.curve_sensitivity.tolist() == pytest.approx(negative.curve_sensitivity.tolist())
    assert negative.sensitivities == pytest.approx({0.25: 1 / 3, 0.5: 2 / 3, 0.75: 2 / 3})
    assert everything.sensitivities == pytest.approx({0.25: 1 / 3, 0.5: 2 / 3, 0.75: 1.0})
    assert everything.score == pytest.approx(2 / 3)
    assert negative.score == pytest.approx(5 / 9)
    assert everything.fp_per == "all"


def test_froc_isolated_tumour_cells_are_excluded() -> None:
    # lesion C (40 um) is below 50 um: not to be found, and its hit 0.6 is no FP
    result = froc(camelyon_example(), min_lesion_um=50)
    assert result.n_lesions == 2 and result.n_ignored_lesions == 1
    assert result.curve_sensitivity.tolist() == pytest.approx([0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 1, 1, 1])
    assert result.sensitivities == pytest.approx(
        {0.25: 0.5, 0.5: 0.5, 1.0: 1.0, 2.0: 1.0, 4.0: 1.0, 8.0: 1.0}
    )
    assert result.score == pytest.approx(5 / 6)
    every = froc(camelyon_example(), fp_per="all", min_lesion_um=50)
    assert every.curve_fps.tolist() == pytest.approx([0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 1.0, 1.25])
    # a threshold below the lesion sizes keeps all three
    assert froc(camelyon_example(), min_lesion_um=40).n_lesions == 3


def test_froc_overlapping_lesions_are_all_hit() -> None:
    tumour = SlideDetections("T", np.array([[75, 75, 0.9]]), [square(0, 0, 100), square(50, 50, 100)])
    negative = SlideDetections("N", np.empty((0, 3)))
    result = froc([tumour, negative], fp_rates=(0.0,))
    assert result.curve_sensitivity.tolist() == [1.0]
    assert result.score == 1.0


def test_froc_missed_lesions_and_no_detections() -> None:
    tumour = SlideDetections("T", np.array([[500, 500, 0.9]]), [square(0, 0, 100)])
    negative = SlideDetections("N", np.empty((0, 3)))
    result = froc([tumour, negative], fp_per="all")
    assert result.curve_fps.tolist() == [0.5]
    assert result.curve_sensitivity.tolist() == [0.0]
    assert result.score == 0.0
    # no detections anywhere: empty curve, zero sensitivity
    empty = froc([SlideDetections("T", np.empty(0), [square(0, 0, 10)]), negative])
    assert empty.curve_thresholds.size == 0 and empty.score == 0.0
    # a rate below the first point's FPs gives 0
    assert froc([tumour, negative], fp_per="all", fp_rates=(0.25,)).sensitivities == {0.25: 0.0}


def test_froc_result_serialisation_and_str() -> None:
    result = froc(camelyon_example())
    as_dict = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert as_dict["sensitivities"]["0.25"] == pytest.approx(1 / 3)
    assert as_dict["sensitivities"]["8"] == 1.0
    assert as_dict["score"] == pytest.approx(5 / 6)
    assert len(as_dict["curve_fps"]) == 9 and as_dict["n_lesions"] == 3
    text = str(result)
    assert "FROC 0.833" in text and "3 lesions" in text and "0.25: 0.333" in text


def test_froc_errors() -> None:
    negative = SlideDetections("N", np.array([[1, 1, 0.5]]))
    tumour = SlideDetections("T", np.array([[1, 1, 0.5]]), [square(0, 0, 10)])
    with pytest.raises(ValueError, match="no lesions"):
        froc([negative, negative])
    with pytest.raises(ValueError, match="min_lesion_um"):
        froc([tumour, negative], min_lesion_um=20)
    with pytest.raises(ValueError, match="negative slide"):
        froc([tumour])
    froc([tumour], fp_per="all")  # fine without negative slides
    with pytest.raises(ValueError, match="fp_per"):
        froc([tumour, negative], fp_per="tumour")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fp_rates"):
        froc([tumour, negative], fp_rates=())
    with pytest.raises(ValueError, match="at least one slide"):
        froc([])
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        SlideDetections("bad", np.array([[1.0, 2.0], [3.0, 4.0]]))
    with pytest.raises(ValueError, match="NaN"):
        SlideDetections("bad", np.array([[1.0, 2.0, np.nan]]))
    with pytest.raises(ValueError, match="lesion 0"):
        SlideDetections("bad", np.empty((0, 3)), [np.array([[0, 0], [1, 1]])])


# --------------------------------------------------------------------------- binary metrics, Pearson


def test_binary_metrics_hand_worked() -> None:
    labels = [1, 1, 1, 0, 0, 0, 0, 1]
    predicted = [1, 1, 0, 0, 0, 1, 0, 1]
    m = binary_metrics(labels, predicted)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 1, 3, 1)
    assert all(isinstance(m[k], int) for k in ("tp", "fp", "tn", "fn"))
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(3 / 4)


def test_binary_metrics_zero_division_gives_nan() -> None:
    # nothing predicted positive and no positives: precision, recall, f1 undefined
    m = binary_metrics([0, 0, 0], [0, 0, 0])
    assert (m["tn"], m["accuracy"], m["specificity"]) == (3, 1.0, 1.0)
    assert math.isnan(m["precision"]) and math.isnan(m["recall"]) and math.isnan(m["f1"])
    # all positive, all predicted positive: specificity undefined
    m = binary_metrics([True, True], [True, True])
    assert math.isnan(m["specificity"]) and m["precision"] == 1.0 and m["f1"] == 1.0
    # positives all missed, nothing predicted positive: precision undefined, recall and f1 zero
    m = binary_metrics([1, 1, 0], [0, 0, 0])
    assert math.isnan(m["precision"]) and m["recall"] == 0.0 and m["f1"] == 0.0
    # empty input
    m = binary_metrics([], [])
    assert m["tp"] == 0 and math.isnan(m["accuracy"])
    with pytest.raises(ValueError, match="length"):
        binary_metrics([0, 1], [1])


def test_pearson_r_linear_relation_and_nan_pairs() -> None:
    x = np.arange(10.0)
    r, p = pearson_r(x, 3 * x + 2)
    assert r == pytest.approx(1.0) and p < 1e-10
    r, _ = pearson_r(x, -0.5 * x)
    assert r == pytest.approx(-1.0)
    # a NaN pair is dropped, not propagated: the outlier 100 sits with the NaN
    y = 2 * x
    y[3] = np.nan
    x_out = x.copy()
    x_out[3] = 100.0
    r, p = pearson_r(x_out, y)
    assert r == pytest.approx(1.0)
    # matches scipy on noisy data
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=30), rng.normal(size=30)
    expected = stats.pearsonr(a, b)
    assert pearson_r(a, b) == pytest.approx((expected.statistic, expected.pvalue))


def test_pearson_r_errors_and_constant_input() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        pearson_r([1.0, 2.0, np.nan, 4.0], [1.0, np.nan, 3.0, 5.0])
    with pytest.raises(ValueError, match="equal length"):
        pearson_r([1, 2, 3], [1, 2])
    r, p = pearson_r([1, 2, 3, 4], [5, 5, 5, 5])
    assert math.isnan(r) and math.isnan(p)
