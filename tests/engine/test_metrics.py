"""Tests for screener.engine.metrics and screener.engine.report (fast, numpy only)."""

from __future__ import annotations

import dataclasses
import json
import math
from statistics import NormalDist

import numpy as np
import pytest

from screener.engine import metrics as m
from screener.engine import report as r


def brute_force_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Pairwise AUROC: 1 per correctly ordered pair, 0.5 per tie."""
    pos, neg = s[y == 1], s[y == 0]
    total = 0.0
    for a in pos:
        for b in neg:
            total += 1.0 if a > b else 0.5 if a == b else 0.0
    return total / (len(pos) * len(neg))


def imbalanced(n: int, seed: int, prevalence: float = 0.9635, shift: float = 1.5):
    """Synthetic labels (mostly positive) and informative probabilities."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    logits = rng.normal(size=n) + shift * y + 2.0
    return y, 1.0 / (1.0 + np.exp(-logits))


# ----------------------------------------------------------------- AUROC ---


@pytest.mark.parametrize("seed", range(8))
def test_auroc_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 80))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    s = np.round(rng.random(n), 1) + 0.2 * y  # coarse rounding -> many ties
    expected = brute_force_auc(y, s)
    assert m.roc_auc(y, s) == pytest.approx(expected, abs=1e-12)
    fpr, tpr, _ = m.roc_curve(y, s)
    assert np.trapezoid(tpr, fpr) == pytest.approx(expected, abs=1e-12)


def test_roc_curve_groups_ties_into_one_point():
    y = np.array([0, 1, 0, 1])
    s = np.array([0.5, 0.5, 0.2, 0.8])
    fpr, tpr, thr = m.roc_curve(y, s)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    assert thr[0] == np.inf
    np.testing.assert_allclose(thr[1:], [0.8, 0.5, 0.2])


def test_auroc_perfect_inverted_constant_random():
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8, 0.9])
    assert m.roc_auc(y, s) == 1.0
    assert m.roc_auc(y, 1.0 - s) == 0.0
    assert m.roc_auc(y, np.full(7, 0.4)) == 0.5
    rng = np.random.default_rng(0)
    yr = rng.integers(0, 2, 4000)
    assert m.roc_auc(yr, rng.random(4000)) == pytest.approx(0.5, abs=0.03)


def test_auroc_nan_when_a_class_is_absent():
    assert math.isnan(m.roc_auc([1, 1, 1], [0.2, 0.5, 0.9]))
    lo, hi = m.bootstrap_auc_ci([0, 0], [0.2, 0.5], n_boot=10)
    assert math.isnan(lo) and math.isnan(hi)


def test_inputs_are_validated():
    with pytest.raises(ValueError):
        m.roc_auc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        m.roc_auc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError):
        m.roc_auc([0, 1, 1], [0.1, 0.2])


# ------------------------------------------------------------ intervals ---


def test_bootstrap_ci_contains_estimate_is_seeded_and_narrows_with_n():
    y_small, p_small = imbalanced(300, seed=1, prevalence=0.7)
    y_big, p_big = imbalanced(6000, seed=2, prevalence=0.7)
    lo_s, hi_s = m.bootstrap_auc_ci(y_small, p_small, n_boot=500, seed=3)
    lo_b, hi_b = m.bootstrap_auc_ci(y_big, p_big, n_boot=500, seed=3)
    assert lo_s <= m.roc_auc(y_small, p_small) <= hi_s
    assert lo_b <= m.roc_auc(y_big, p_big) <= hi_b
    assert (hi_b - lo_b) < 0.5 * (hi_s - lo_s)
    assert m.bootstrap_auc_ci(y_small, p_small, n_boot=500, seed=3) == (lo_s, hi_s)


def test_bootstrap_matches_naive_resampling():
    y, p = imbalanced(200, seed=4, prevalence=0.6)
    p = np.round(p, 2)  # ties
    lo, hi = m.bootstrap_auc_ci(y, p, n_boot=3000, seed=0)
    rng = np.random.default_rng(99)
    pos, neg = p[y == 1], p[y == 0]
    labels = np.r_[np.ones(pos.size, int), np.zeros(neg.size, int)]
    aucs = [m.roc_auc(labels, np.r_[rng.choice(pos, pos.size), rng.choice(neg, neg.size)]) for _ in range(3000)]
    ref_lo, ref_hi = np.quantile(aucs, [0.025, 0.975])
    assert lo == pytest.approx(ref_lo, abs=0.015)
    assert hi == pytest.approx(ref_hi, abs=0.015)


def test_wilson_ci_known_values():
    lo, hi = m.wilson_ci(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4)
    assert hi == pytest.approx(0.9433, abs=1e-4)
    assert m.wilson_ci(0, 10)[0] == 0.0
    assert m.wilson_ci(10, 10)[1] == 1.0
    assert all(math.isnan(v) for v in m.wilson_ci(0, 0))
    narrow = m.wilson_ci(800, 1000)
    assert narrow[1] - narrow[0] < hi - lo


# ------------------------------------------------------------ threshold ---


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95, 0.99, 1.0])
def test_threshold_is_highest_reaching_target_on_validation(target):
    y, p = imbalanced(2000, seed=5)
    choice = m.threshold_for_sensitivity(y, p, target)
    assert choice.split == "validation"
    assert choice.achieved_sensitivity >= target
    assert choice.achieved_sensitivity == pytest.approx(np.mean(p[y == 1] >= choice.threshold))
    assert choice.achieved_specificity == pytest.approx(np.mean(p[y == 0] < choice.threshold))
    # Any higher threshold (the next positive score up) misses the target.
    higher = p[(y == 1) & (p > choice.threshold)]
    if higher.size:
        assert np.mean(p[y == 1] >= higher.min()) < target
    assert choice.n_positive == int(y.sum()) and choice.n_negative == int((1 - y).sum())


def test_threshold_exact_small_example():
    y = np.array([1, 1, 1, 1, 0, 0])
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.75, 0.1])
    assert m.threshold_for_sensitivity(y, p, 0.75).threshold == 0.7
    assert m.threshold_for_sensitivity(y, p, 0.76).threshold == 0.6
    assert m.threshold_for_sensitivity(y, p, 0.5).threshold == 0.8


def test_threshold_degenerate_inputs():
    no_pos = m.threshold_for_sensitivity([0, 0, 0], [0.1, 0.2, 0.3], 0.95)
    assert no_pos.threshold == 0.5
    assert "fallback" in no_pos.method
    assert no_pos.achieved_sensitivity is None
    no_neg = m.threshold_for_sensitivity([1, 1], [0.3, 0.9], 0.95)
    assert no_neg.threshold == 0.3
    assert no_neg.achieved_specificity is None
    with pytest.raises(ValueError):
        m.threshold_for_sensitivity([0, 1], [0.1, 0.9], 1.5)


def test_evaluate_never_uses_test_data_for_the_threshold():
    y_val, p_val = imbalanced(1500, seed=6)
    y_test, p_test = imbalanced(1500, seed=7)
    a = m.evaluate(y_val, p_val, y_test, p_test, n_boot=50)
    # Completely different (even adversarial) test scores: same threshold.
    b = m.evaluate(y_val, p_val, y_test, 1.0 - p_test, n_boot=50)
    assert a.threshold == b.threshold == m.threshold_for_sensitivity(y_val, p_val, 0.95)
    assert a.validation == b.validation
    assert a.test.threshold == a.threshold.threshold
    assert a.test.auroc != b.test.auroc


# -------------------------------------------------------- binary metrics ---


def test_binary_metrics_hand_computed_confusion_matrix():
    # tp=6, fn=2, fp=3, tn=9
    y = np.array([1] * 8 + [0] * 12)
    s = np.array([0.9] * 6 + [0.1] * 2 + [0.8] * 3 + [0.2] * 9)
    bm = m.binary_metrics(y, s, 0.5, n_boot=100)
    assert bm.confusion == m.ConfusionMatrix(tn=9, fp=3, fn=2, tp=6)
    assert bm.n == 20 and bm.n_positive == 8 and bm.n_negative == 12
    assert bm.prevalence == pytest.approx(0.4)
    assert bm.accuracy == pytest.approx(15 / 20)
    assert bm.sensitivity == pytest.approx(0.75)
    assert bm.specificity == pytest.approx(0.75)
    assert bm.balanced_accuracy == pytest.approx(0.75)
    assert bm.ppv == pytest.approx(6 / 9)
    assert bm.npv == pytest.approx(9 / 11)
    assert bm.f1 == pytest.approx(12 / 17)
    assert bm.mcc == pytest.approx(48 / math.sqrt(9 * 8 * 12 * 11))
    assert bm.sensitivity_ci == pytest.approx(m.wilson_ci(6, 8))
    assert bm.specificity_ci == pytest.approx(m.wilson_ci(9, 12))
    assert bm.auroc == pytest.approx(brute_force_auc(y, s))
    assert bm.auroc_ci[0] <= bm.auroc <= bm.auroc_ci[1]


def test_mcc_and_f1_known_values():
    y = np.array([0, 0, 1, 1, 1])
    perfect = m.binary_metrics(y, y.astype(float), 0.5, n_boot=0)
    assert perfect.mcc == pytest.approx(1.0) and perfect.f1 == pytest.approx(1.0)
    inverted = m.binary_metrics(y, 1.0 - y, 0.5, n_boot=0)
    assert inverted.mcc == pytest.approx(-1.0) and inverted.f1 == 0.0
    # y = [1,1,0,0], pred = [1,0,1,0]: tp=fp=fn=tn=1 -> MCC 0, F1 0.5
    half = m.binary_metrics([1, 1, 0, 0], [0.9, 0.1, 0.9, 0.1], 0.5, n_boot=0)
    assert half.mcc == pytest.approx(0.0) and half.f1 == pytest.approx(0.5)


def test_undefined_ratios_are_none_not_nan():
    bm = m.binary_metrics([0, 0, 1], [0.1, 0.2, 0.3], threshold=0.9, n_boot=20)
    assert bm.ppv is None and bm.mcc is None
    assert bm.f1 == 0.0
    only_pos = m.binary_metrics([1, 1], [0.3, 0.9], threshold=0.5, n_boot=20)
    assert only_pos.specificity is None and only_pos.specificity_ci is None
    assert only_pos.auroc is None and only_pos.auroc_ci is None
    assert only_pos.balanced_accuracy is None
    json.dumps(dataclasses.asdict(bm), allow_nan=False)
    json.dumps(dataclasses.asdict(only_pos), allow_nan=False)


def test_majority_baseline_of_96_4_set():
    y_ref = np.array([1] * 96 + [0] * 4)
    y_test = np.array([1] * 960 + [0] * 40)
    base = m.majority_baseline(y_ref, y_test)
    assert base.accuracy == pytest.approx(0.96)
    assert base.balanced_accuracy == pytest.approx(0.5)
    assert base.auroc == 0.5 and base.auroc_ci == (0.5, 0.5)
    assert base.sensitivity == 1.0 and base.specificity == 0.0
    assert base.npv is None and base.mcc is None
    assert base.threshold is None
    assert "disease" in base.predictor
    # Majority taken from the first argument, not from the evaluated labels.
    flipped = m.majority_baseline(1 - y_ref, y_test)
    assert flipped.sensitivity == 0.0 and flipped.specificity == 1.0
    assert flipped.accuracy == pytest.approx(0.04)
    assert "healthy" in flipped.predictor


# --------------------------------------------------------------- McNemar ---


def _pairs(b: int, c: int, both_right: int = 5, both_wrong: int = 3):
    """Predictions with b cases only A got right and c cases only B got right."""
    n = b + c + both_right + both_wrong
    y = np.ones(n, dtype=int)
    a = np.r_[np.ones(b), np.zeros(c), np.ones(both_right), np.zeros(both_wrong)].astype(int)
    bb = np.r_[np.zeros(b), np.ones(c), np.ones(both_right), np.zeros(both_wrong)].astype(int)
    return y, a, bb


def test_mcnemar_exact_known_example():
    res = m.mcnemar(*_pairs(10, 2))
    assert (res.b, res.c) == (10, 2)
    assert res.p_value == pytest.approx(0.0386, abs=1e-4)
    assert res.p_value == pytest.approx(2 * 79 / 4096)
    assert "exact" in res.method
    assert m.mcnemar(*_pairs(2, 10)).p_value == res.p_value


def test_mcnemar_edge_cases():
    equal = m.mcnemar(*_pairs(5, 5))
    assert equal.p_value == 1.0
    none = m.mcnemar(*_pairs(0, 0))
    assert none.p_value == 1.0 and none.b == none.c == 0
    assert "exact" in m.mcnemar(*_pairs(20, 4)).method
    assert "chi-square" in m.mcnemar(*_pairs(20, 5)).method


def test_mcnemar_large_sample_chi_square():
    res = m.mcnemar(*_pairs(40, 20))
    expected_stat = (abs(40 - 20) - 1) ** 2 / 60
    assert res.statistic == pytest.approx(expected_stat)
    # chi-square(1) survival function = 2 * (1 - Phi(sqrt(x)))
    assert res.p_value == pytest.approx(2 * (1 - NormalDist().cdf(math.sqrt(expected_stat))))
    assert res.p_value == pytest.approx(0.01418, abs=1e-4)
    assert "continuity" in res.method


# ----------------------------------------------------------- calibration ---


def test_calibration_bins_and_brier():
    y = np.array([0, 0, 1, 1, 1])
    p = np.array([0.05, 0.15, 0.15, 0.95, 1.0])
    bins = m.calibration_bins(y, p, n_bins=10)
    assert len(bins) == 10
    assert sum(b.count for b in bins) == 5
    assert bins[0].count == 1 and bins[0].frac_pos == 0.0
    assert bins[1].count == 2 and bins[1].frac_pos == 0.5
    assert bins[1].mean_pred == pytest.approx(0.15)
    assert bins[9].count == 2 and bins[9].bin_hi == 1.0  # 1.0 lands in the last bin
    assert bins[5].count == 0 and bins[5].mean_pred is None and bins[5].frac_pos is None
    assert m.brier_score([0, 1], [0.2, 0.6]) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        m.calibration_bins([0, 1], [0.2, 1.5])


# ------------------------------------------------------------- evaluate ---


def test_evaluate_bundles_everything_and_is_json_safe():
    y_val, p_val = imbalanced(800, seed=8)
    y_test, p_test = imbalanced(800, seed=9)
    rep = m.evaluate(y_val, p_val, y_test, p_test, target_sensitivity=0.9, n_boot=200, seed=1)
    assert rep.class_names == ("healthy", "disease") and rep.positive_class == "disease"
    assert rep.threshold.target_sensitivity == 0.9
    assert rep.validation.sensitivity >= 0.9
    assert rep.test.n == 800 and rep.counts["test"] == 800
    assert rep.counts["validation_positive"] == int(y_val.sum())
    assert rep.majority_baseline.balanced_accuracy == 0.5
    assert len(rep.calibration) == 10
    assert 0.0 <= rep.brier_score <= 1.0
    text = json.dumps(dataclasses.asdict(rep), allow_nan=False)
    assert json.loads(text)["test"]["confusion"]["tp"] == rep.test.confusion.tp


def test_evaluate_with_single_class_test_set_stays_json_safe():
    y_val, p_val = imbalanced(300, seed=10)
    rep = m.evaluate(y_val, p_val, np.ones(20, int), np.linspace(0.5, 1.0, 20), n_boot=20)
    assert rep.test.auroc is None and rep.majority_baseline.auroc is None
    json.dumps(dataclasses.asdict(rep), allow_nan=False)


# --------------------------------------------------------------- report ---


def test_format_table():
    text = r.format_table(
        [{"condition": "baseline", "auroc": 0.81234, "p": None}, {"condition": "a|b", "auroc": 0.9}],
        ["condition", "auroc", "p"],
    )
    lines = text.splitlines()
    assert lines[0] == "| condition | auroc | p |"
    assert lines[1] == "| --- | --- | --- |"
    assert lines[2] == "| baseline | 0.812 | n/a |"
    assert lines[3] == "| a\\|b | 0.900 |  |"
    assert r.format_estimate(0.5, (0.4, 0.6)) == "0.500 [0.400, 0.600]"
    assert r.format_estimate(None, (0.4, 0.6)) == "n/a"


def test_write_report_files(tmp_path):
    y_val, p_val = imbalanced(600, seed=11)
    y_test, p_test = imbalanced(600, seed=12)
    rep = m.evaluate(y_val, p_val, y_test, p_test, n_boot=200)
    extra = {
        "data_fingerprint": "sha256:abc",
        "split_sizes": {"train": 4000, "val": 600, "test": 600},
        "skipped_files": [f"img{i}.dcm" for i in range(30)],
        "lr": 1e-4,
        "not_a_number": float("nan"),
        "out_dir": tmp_path,
    }
    paths = r.write_report(tmp_path / "out", rep, extra=extra, y_test=y_test, p_test=p_test)
    assert set(paths) == {"json", "markdown", "roc", "calibration"}
    for path in paths.values():
        assert path.exists() and path.stat().st_size > 0
    assert paths["roc"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    data = json.loads(paths["json"].read_text())
    assert data["extra"]["data_fingerprint"] == "sha256:abc"
    assert data["extra"]["not_a_number"] is None
    assert data["majority_baseline"]["balanced_accuracy"] == 0.5
    json.dumps(data, allow_nan=False)

    md = paths["markdown"].read_text()
    assert "Majority baseline (test)" in md
    assert "accuracy alone is misleading" in md
    assert "roc.png" in md and "calibration.png" in md
    assert "validation" in md and "Threshold" in md
    assert "| true healthy (0) |" in md
    assert "data_fingerprint" in md and "more, see report.json" in md
    for label in ("AUROC", "Sensitivity", "Specificity", "Balanced accuracy", "PPV", "NPV", "F1", "MCC", "Accuracy"):
        assert f"| {label}" in md


def test_write_report_without_predictions_has_no_figures(tmp_path):
    y_val, p_val = imbalanced(200, seed=13)
    y_test, p_test = imbalanced(200, seed=14)
    rep = m.evaluate(y_val, p_val, y_test, p_test, n_boot=50)
    paths = r.write_report(tmp_path, rep)
    assert set(paths) == {"json", "markdown"}
    assert "roc.png" not in paths["markdown"].read_text()
    with pytest.raises(ValueError):
        r.write_report(tmp_path, rep, y_test=y_test[:10], p_test=p_test[:10])
