"""Honest evaluation metrics for binary classifiers on imbalanced data.

Conventions used throughout this module:

* Labels are binary, ``1`` is the *positive* class (disease) and ``0`` the
  negative class (healthy).
* ``scores`` are the model's probabilities for the positive class; a case is
  predicted positive when ``score >= threshold``.
* All functions are pure: numpy arrays in, plain Python floats / ints /
  frozen dataclasses out. Ratios that are undefined (a zero denominator, a
  class absent) are reported as ``None`` in the dataclasses so that
  ``json.dumps(dataclasses.asdict(x), allow_nan=False)`` always works. The
  lower-level helpers (``roc_auc``, ``bootstrap_auc_ci``, ``wilson_ci``)
  return ``nan`` in those cases, as numerical functions conventionally do.
* Decision thresholds are chosen on the validation split only
  (:func:`threshold_for_sensitivity`); :func:`evaluate` never looks at test
  scores to pick anything.

Only numpy and the standard library are used (no scipy / scikit-learn).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "BinaryMetrics",
    "CalibrationBin",
    "ConfusionMatrix",
    "EvaluationReport",
    "McNemarResult",
    "ThresholdChoice",
    "binary_metrics",
    "bootstrap_auc_ci",
    "brier_score",
    "calibration_bins",
    "confusion_matrix",
    "evaluate",
    "expected_calibration_error",
    "majority_baseline",
    "mcnemar",
    "roc_auc",
    "roc_curve",
    "threshold_for_sensitivity",
    "wilson_ci",
]

#: Below this many discordant pairs McNemar's test uses the exact binomial test.
MCNEMAR_EXACT_BELOW = 25

_THRESHOLD_METHOD = "max threshold with validation sensitivity >= target"


# --------------------------------------------------------------------------
# dataclasses
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfusionMatrix:
    """Counts of a binary confusion matrix (positive class = 1)."""

    tn: int
    fp: int
    fn: int
    tp: int

    @property
    def n(self) -> int:
        """Total number of cases."""
        return self.tn + self.fp + self.fn + self.tp

    @property
    def n_positive(self) -> int:
        """Number of truly positive cases (tp + fn)."""
        return self.tp + self.fn

    @property
    def n_negative(self) -> int:
        """Number of truly negative cases (tn + fp)."""
        return self.tn + self.fp


@dataclass(frozen=True)
class ThresholdChoice:
    """A decision threshold chosen on the validation split.

    ``achieved_*`` are measured on the validation data the threshold was
    chosen on (they are therefore optimistic; the test metrics are the
    honest estimate).
    """

    threshold: float
    target_sensitivity: float
    achieved_sensitivity: float | None
    achieved_specificity: float | None
    method: str = _THRESHOLD_METHOD
    split: str = "validation"
    n_positive: int = 0
    n_negative: int = 0


@dataclass(frozen=True)
class BinaryMetrics:
    """Threshold metrics plus AUROC for one predictor on one split.

    ``*_ci`` are ``(lo, hi)`` intervals at level ``ci_level``: Wilson score
    intervals for sensitivity / specificity, a stratified percentile
    bootstrap for AUROC. Undefined values are ``None``. ``threshold`` is
    ``None`` for constant predictors (baselines) that have no threshold.
    """

    predictor: str
    n: int
    n_positive: int
    n_negative: int
    prevalence: float | None
    threshold: float | None
    accuracy: float | None
    sensitivity: float | None
    sensitivity_ci: tuple[float, float] | None
    specificity: float | None
    specificity_ci: tuple[float, float] | None
    balanced_accuracy: float | None
    ppv: float | None
    npv: float | None
    f1: float | None
    mcc: float | None
    confusion: ConfusionMatrix
    auroc: float | None
    auroc_ci: tuple[float, float] | None
    ci_level: float = 0.95


@dataclass(frozen=True)
class McNemarResult:
    """Paired comparison of two classifiers on the same cases.

    ``b`` = cases A got right and B got wrong, ``c`` = cases A got wrong and
    B got right. For the exact method ``statistic`` is ``min(b, c)`` (the
    binomial tail count); for the chi-square method it is the
    continuity-corrected chi-square statistic with 1 degree of freedom.
    """

    b: int
    c: int
    n: int
    statistic: float
    p_value: float
    method: str


@dataclass(frozen=True)
class CalibrationBin:
    """One bin of a reliability diagram; ``None`` means the bin is empty."""

    bin_lo: float
    bin_hi: float
    mean_pred: float | None
    frac_pos: float | None
    count: int


@dataclass(frozen=True)
class EvaluationReport:
    """Everything the trainer reports about one trained model.

    The threshold was chosen on validation (``threshold.split``); ``test``
    holds the honest metrics at that threshold; ``majority_baseline`` is the
    constant answer of the validation majority class, evaluated on test.
    """

    class_names: tuple[str, str]
    positive_class: str
    threshold: ThresholdChoice
    test: BinaryMetrics
    validation: BinaryMetrics
    majority_baseline: BinaryMetrics
    calibration: tuple[CalibrationBin, ...]
    brier_score: float
    brier_score_prevalence_baseline: float
    expected_calibration_error: float | None
    counts: dict[str, int]
    n_boot: int
    seed: int
    ci_level: float


# --------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------


def _as_1d(arr: np.ndarray) -> np.ndarray:
    """Flatten an ``(n, 1)`` column to ``(n,)``; leave other shapes alone."""
    return arr[:, 0] if arr.ndim == 2 and arr.shape[1] == 1 else arr


def _labels(y: ArrayLike, name: str = "y_true") -> np.ndarray:
    """Validate binary labels and return them as a 1-D int64 array."""
    arr = _as_1d(np.asarray(y))
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {np.shape(y)}")
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if arr.size and not np.all(np.isin(arr, (0, 1))):
        raise ValueError(f"{name} must contain only 0 and 1")
    return arr.astype(np.int64)


def _scores(s: ArrayLike, n: int, name: str = "scores") -> np.ndarray:
    """Validate scores (finite, 1-D, length ``n``) and return float64."""
    arr = _as_1d(np.asarray(s, dtype=np.float64))
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries, labels have {n}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _ratio(num: int | float, den: int | float) -> float | None:
    """``num / den`` or ``None`` when the denominator is zero."""
    return float(num) / float(den) if den else None


def _none_if_nan(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def _ci_or_none(ci: tuple[float, float]) -> tuple[float, float] | None:
    lo, hi = ci
    if math.isnan(lo) or math.isnan(hi):
        return None
    return (float(lo), float(hi))


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


# --------------------------------------------------------------------------
# ROC / AUROC
# --------------------------------------------------------------------------


def roc_curve(y_true: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve, one point per distinct score value.

    Returns ``(fpr, tpr, thresholds)`` with thresholds in decreasing order;
    point ``i`` is the result of predicting positive when
    ``score >= thresholds[i]``. The first point is ``(0, 0)`` with threshold
    ``+inf``. Tied scores form a single point (a diagonal segment), so the
    trapezoidal area under the curve equals :func:`roc_auc`. If a class is
    absent the corresponding rate is all ``nan``.
    """
    y = _labels(y_true)
    s = _scores(scores, y.shape[0])
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    y_sorted = y[order]
    if s_sorted.size:
        last_of_run = np.r_[np.nonzero(np.diff(s_sorted))[0], s_sorted.size - 1]
    else:
        last_of_run = np.zeros(0, dtype=np.int64)
    tps = np.cumsum(y_sorted)[last_of_run]
    fps = (last_of_run + 1) - tps
    tps = np.r_[0, tps].astype(np.float64)
    fps = np.r_[0, fps].astype(np.float64)
    thresholds = np.r_[np.inf, s_sorted[last_of_run]]
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    tpr = tps / n_pos if n_pos else np.full_like(tps, np.nan)
    fpr = fps / n_neg if n_neg else np.full_like(fps, np.nan)
    return fpr, tpr, thresholds


def _auc_index(s_pos: np.ndarray, s_neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Locate each positive score among the distinct negative scores.

    Returns ``(neg_u, pos_lo, pos_eq)``: the index of every negative in the
    sorted distinct negative scores (``K`` of them), for every positive the
    number of distinct negative values strictly below it (``0..K``), and the
    index of the equal negative value or ``-1`` when there is none.
    """
    uniq = np.unique(s_neg)
    neg_u = np.searchsorted(uniq, s_neg)
    pos_lo = np.searchsorted(uniq, s_pos, side="left")
    clipped = np.minimum(pos_lo, uniq.size - 1)
    pos_eq = np.where(uniq[clipped] == s_pos, clipped, -1)
    return neg_u, pos_lo, pos_eq


def _twice_u(neg_counts: np.ndarray, pos_lo: np.ndarray, pos_eq: np.ndarray) -> np.ndarray:
    """``2 * U`` per row: neg_counts ``(b, K)``; pos_lo / pos_eq ``(b, n_pos)``."""
    b = neg_counts.shape[0]
    cum = np.zeros((b, neg_counts.shape[1] + 1), dtype=np.int64)
    np.cumsum(neg_counts, axis=1, out=cum[:, 1:])
    rows = np.arange(b)[:, None]
    below = cum[rows, pos_lo].sum(axis=1)
    ties = np.where(pos_eq >= 0, neg_counts[rows, np.maximum(pos_eq, 0)], 0).sum(axis=1)
    return 2 * below + ties


def roc_auc(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney U / (n_pos * n_neg)).

    Each (positive, negative) pair counts 1 if the positive scores higher,
    0.5 on a tie, 0 otherwise. Returns ``nan`` if either class is absent.
    """
    y = _labels(y_true)
    s = _scores(scores, y.shape[0])
    s_pos, s_neg = s[y == 1], s[y == 0]
    if s_pos.size == 0 or s_neg.size == 0:
        return float("nan")
    neg_u, pos_lo, pos_eq = _auc_index(s_pos, s_neg)
    neg_counts = np.bincount(neg_u, minlength=int(neg_u.max()) + 1)[None, :]
    twice_u = int(_twice_u(neg_counts, pos_lo[None, :], pos_eq[None, :])[0])
    return twice_u / (2.0 * s_pos.size * s_neg.size)


def bootstrap_auc_ci(
    y_true: ArrayLike,
    scores: ArrayLike,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Stratified percentile bootstrap interval for the AUROC.

    Positives and negatives are resampled separately (with replacement,
    keeping their counts), so every replicate contains both classes. Returns
    the ``alpha/2`` and ``1 - alpha/2`` quantiles of the replicate AUROCs, or
    ``(nan, nan)`` if a class is absent. Deterministic for a given ``seed``.
    """
    _check_alpha(alpha)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    y = _labels(y_true)
    s = _scores(scores, y.shape[0])
    s_pos, s_neg = s[y == 1], s[y == 0]
    n_pos, n_neg = s_pos.size, s_neg.size
    if n_pos == 0 or n_neg == 0:
        return (float("nan"), float("nan"))
    neg_u, pos_lo, pos_eq = _auc_index(s_pos, s_neg)
    n_u = int(neg_u.max()) + 1
    rng = np.random.default_rng(seed)
    aucs = np.empty(n_boot, dtype=np.float64)
    # Replicates are processed in chunks: one bincount over offset indices
    # gives every replicate's histogram over the distinct negative scores.
    chunk = max(1, min(n_boot, 4_000_000 // max(n_u, n_pos, n_neg)))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        neg_sample = neg_u[rng.integers(0, n_neg, size=(b, n_neg))]
        pos_pick = rng.integers(0, n_pos, size=(b, n_pos))
        offsets = (np.arange(b) * n_u)[:, None]
        neg_counts = np.bincount((neg_sample + offsets).ravel(), minlength=b * n_u).reshape(b, n_u)
        twice_u = _twice_u(neg_counts, pos_lo[pos_pick], pos_eq[pos_pick])
        aucs[start : start + b] = twice_u / (2.0 * n_pos * n_neg)
    lo, hi = np.quantile(aucs, [alpha / 2.0, 1.0 - alpha / 2.0])
    return (float(lo), float(hi))


# --------------------------------------------------------------------------
# proportions and thresholds
# --------------------------------------------------------------------------


def wilson_ci(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``k / n``.

    Returns ``(nan, nan)`` when ``n == 0``.
    """
    _check_alpha(alpha)
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (float("nan"), float("nan"))
    z = NormalDist().inv_cdf(1.0 - alpha / 2.0)
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2.0 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, center - half)
    hi = 1.0 if k == n else min(1.0, center + half)
    return (lo, hi)


def threshold_for_sensitivity(y_val: ArrayLike, p_val: ArrayLike, target: float = 0.95) -> ThresholdChoice:
    """Highest threshold whose validation sensitivity is ``>= target``.

    Predicting positive when ``p >= threshold``: the threshold is the k-th
    highest positive-class score among validation positives, with k the
    smallest count such that ``k / n_positive >= target``. Any higher
    threshold would include fewer than k positives. With no validation
    positives the threshold falls back to 0.5 (and ``method`` says so).
    Only validation data are used.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    y = _labels(y_val, "y_val")
    p = _scores(p_val, y.shape[0], "p_val")
    pos = np.sort(p[y == 1])[::-1]
    neg = p[y == 0]
    n_pos, n_neg = int(pos.size), int(neg.size)
    if n_pos == 0:
        threshold = 0.5
        method = "fallback: no positive cases in validation, threshold fixed at 0.5"
        sens = None
    else:
        # Smallest k with k / n_pos >= target (tolerant of float round-off).
        k = min(n_pos, max(1, math.ceil(target * n_pos - 1e-9)))
        threshold = float(pos[k - 1])
        method = _THRESHOLD_METHOD
        sens = float(np.mean(pos >= threshold))
    spec = float(np.mean(neg < threshold)) if n_neg else None
    if n_neg == 0:
        method += " (no negative cases in validation: specificity undefined)"
    return ThresholdChoice(
        threshold=threshold,
        target_sensitivity=float(target),
        achieved_sensitivity=sens,
        achieved_specificity=spec,
        method=method,
        split="validation",
        n_positive=n_pos,
        n_negative=n_neg,
    )


# --------------------------------------------------------------------------
# threshold metrics
# --------------------------------------------------------------------------


def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike) -> ConfusionMatrix:
    """Confusion matrix of binary predictions against binary labels."""
    y = _labels(y_true)
    yp = _labels(y_pred, "y_pred")
    if yp.shape != y.shape:
        raise ValueError(f"y_pred has {yp.shape[0]} entries, y_true has {y.shape[0]}")
    tp = int(np.sum((y == 1) & (yp == 1)))
    tn = int(np.sum((y == 0) & (yp == 0)))
    fp = int(np.sum((y == 0) & (yp == 1)))
    fn = int(np.sum((y == 1) & (yp == 0)))
    return ConfusionMatrix(tn=tn, fp=fp, fn=fn, tp=tp)


def _metrics_from_confusion(
    cm: ConfusionMatrix,
    *,
    predictor: str,
    threshold: float | None,
    auroc: float | None,
    auroc_ci: tuple[float, float] | None,
    alpha: float,
) -> BinaryMetrics:
    tn, fp, fn, tp = cm.tn, cm.fp, cm.fn, cm.tp
    n, n_pos, n_neg = cm.n, cm.n_positive, cm.n_negative
    sens = _ratio(tp, n_pos)
    spec = _ratio(tn, n_neg)
    ppv = _ratio(tp, tp + fp)
    npv = _ratio(tn, tn + fn)
    balanced = (sens + spec) / 2.0 if sens is not None and spec is not None else None
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    mcc_den = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    mcc = (tp * tn - fp * fn) / math.sqrt(mcc_den) if mcc_den else None
    return BinaryMetrics(
        predictor=predictor,
        n=n,
        n_positive=n_pos,
        n_negative=n_neg,
        prevalence=_ratio(n_pos, n),
        threshold=threshold,
        accuracy=_ratio(tp + tn, n),
        sensitivity=sens,
        sensitivity_ci=_ci_or_none(wilson_ci(tp, n_pos, alpha)),
        specificity=spec,
        specificity_ci=_ci_or_none(wilson_ci(tn, n_neg, alpha)),
        balanced_accuracy=balanced,
        ppv=ppv,
        npv=npv,
        f1=f1,
        mcc=None if mcc is None else float(mcc),
        confusion=cm,
        auroc=auroc,
        auroc_ci=auroc_ci,
        ci_level=1.0 - alpha,
    )


def binary_metrics(
    y_true: ArrayLike,
    scores: ArrayLike,
    threshold: float,
    *,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    predictor: str = "model",
) -> BinaryMetrics:
    """Metrics of ``score >= threshold`` against ``y_true``, plus AUROC.

    Sensitivity / specificity carry Wilson intervals, AUROC a stratified
    bootstrap interval (``n_boot`` replicates; ``n_boot=0`` skips it).
    MCC is ``None`` when undefined (a row or column of the confusion matrix
    is empty, e.g. constant predictions).
    """
    y = _labels(y_true)
    s = _scores(scores, y.shape[0])
    cm = confusion_matrix(y, (s >= threshold).astype(np.int64))
    auroc = _none_if_nan(roc_auc(y, s))
    auroc_ci = None
    if auroc is not None and n_boot > 0:
        auroc_ci = _ci_or_none(bootstrap_auc_ci(y, s, n_boot=n_boot, alpha=alpha, seed=seed))
    return _metrics_from_confusion(
        cm,
        predictor=predictor,
        threshold=float(threshold),
        auroc=auroc,
        auroc_ci=auroc_ci,
        alpha=alpha,
    )


def majority_baseline(
    y_reference: ArrayLike,
    y_test: ArrayLike,
    *,
    alpha: float = 0.05,
    class_names: Sequence[str] = ("healthy", "disease"),
    reference_split: str = "reference",
) -> BinaryMetrics:
    """Metrics of always answering the majority class of ``y_reference``.

    The majority is taken from ``y_reference`` (train or validation labels,
    never test) and the constant answer is evaluated on ``y_test``. A tie
    goes to the positive class. A constant score has AUROC exactly 0.5
    (CI ``(0.5, 0.5)``), or ``None`` if ``y_test`` lacks a class.
    ``threshold`` is ``None``: a constant predictor has none.
    """
    _check_alpha(alpha)
    y_ref = _labels(y_reference, "y_reference")
    y = _labels(y_test, "y_test")
    if y_ref.size == 0:
        raise ValueError("y_reference is empty: cannot determine the majority class")
    majority = 1 if 2 * int(y_ref.sum()) >= y_ref.size else 0
    cm = confusion_matrix(y, np.full(y.shape, majority, dtype=np.int64))
    both = cm.n_positive > 0 and cm.n_negative > 0
    name = class_names[majority]
    return _metrics_from_confusion(
        cm,
        predictor=f"constant '{name}', the majority class of {reference_split} labels",
        threshold=None,
        auroc=0.5 if both else None,
        auroc_ci=(0.5, 0.5) if both else None,
        alpha=alpha,
    )


# --------------------------------------------------------------------------
# paired comparison
# --------------------------------------------------------------------------


def mcnemar(y_true: ArrayLike, pred_a: ArrayLike, pred_b: ArrayLike) -> McNemarResult:
    """McNemar's test comparing two classifiers' predictions on the same cases.

    Exact two-sided binomial test (p = 0.5) when the number of discordant
    pairs ``b + c`` is below 25, otherwise the chi-square statistic with
    continuity correction ``(|b - c| - 1)^2 / (b + c)`` and its 1-dof
    p-value ``erfc(sqrt(x / 2))``.
    """
    y = _labels(y_true)
    a = _labels(pred_a, "pred_a")
    b_pred = _labels(pred_b, "pred_b")
    if a.shape != y.shape or b_pred.shape != y.shape:
        raise ValueError("y_true, pred_a and pred_b must have the same length")
    a_ok = a == y
    b_ok = b_pred == y
    b = int(np.sum(a_ok & ~b_ok))
    c = int(np.sum(~a_ok & b_ok))
    n_disc = b + c
    if n_disc < MCNEMAR_EXACT_BELOW:
        k = min(b, c)
        tail = sum(math.comb(n_disc, i) for i in range(k + 1))
        p_value = min(1.0, 2 * tail / 2**n_disc)
        return McNemarResult(
            b=b,
            c=c,
            n=int(y.size),
            statistic=float(k),
            p_value=float(p_value),
            method="exact binomial (two-sided)",
        )
    stat = (abs(b - c) - 1) ** 2 / n_disc
    p_value = math.erfc(math.sqrt(stat / 2.0))
    return McNemarResult(
        b=b,
        c=c,
        n=int(y.size),
        statistic=float(stat),
        p_value=float(p_value),
        method="chi-square with continuity correction (1 dof)",
    )


# --------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------


def _probabilities(y_true: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = _labels(y_true)
    p = _scores(scores, y.shape[0])
    if p.size and (p.min() < 0.0 or p.max() > 1.0):
        raise ValueError("calibration needs probabilities in [0, 1]")
    return y, p


def calibration_bins(y_true: ArrayLike, scores: ArrayLike, n_bins: int = 10) -> list[CalibrationBin]:
    """Reliability-diagram bins: ``n_bins`` equal-width bins over [0, 1].

    Bins are ``[lo, hi)`` except the last, which includes 1.0. Every bin is
    returned; empty ones have ``count == 0`` and ``None`` means.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    y, p = _probabilities(y_true, scores)
    edges = [round(i / n_bins, 12) for i in range(n_bins + 1)]
    idx = np.clip(np.floor(p * n_bins).astype(np.int64), 0, n_bins - 1)
    out: list[CalibrationBin] = []
    for i in range(n_bins):
        mask = idx == i
        count = int(mask.sum())
        out.append(
            CalibrationBin(
                bin_lo=float(edges[i]),
                bin_hi=float(edges[i + 1]),
                mean_pred=float(p[mask].mean()) if count else None,
                frac_pos=float(y[mask].mean()) if count else None,
                count=count,
            )
        )
    return out


def expected_calibration_error(bins: Sequence[CalibrationBin]) -> float | None:
    """Count-weighted mean of ``|frac_pos - mean_pred|`` over non-empty bins."""
    total = sum(b.count for b in bins)
    if total == 0:
        return None
    return float(
        sum(b.count * abs(b.frac_pos - b.mean_pred) for b in bins if b.count) / total  # type: ignore[operator]
    )


def brier_score(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Mean squared difference between probability and label (lower is better)."""
    y, p = _probabilities(y_true, scores)
    if y.size == 0:
        raise ValueError("brier_score of an empty set is undefined")
    return float(np.mean((p - y) ** 2))


# --------------------------------------------------------------------------
# the one call the trainer uses
# --------------------------------------------------------------------------


def evaluate(
    y_val: ArrayLike,
    p_val: ArrayLike,
    y_test: ArrayLike,
    p_test: ArrayLike,
    target_sensitivity: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
    class_names: Sequence[str] = ("healthy", "disease"),
    *,
    alpha: float = 0.05,
    n_bins: int = 10,
) -> EvaluationReport:
    """Full evaluation of a model's probabilities on validation and test.

    1. The threshold is chosen on validation only
       (:func:`threshold_for_sensitivity`).
    2. Test and validation metrics are computed at that threshold.
    3. The majority-class baseline (majority of the validation labels) is
       evaluated on test.
    4. Calibration bins, ECE and Brier score are computed on test, beside the
       Brier score of constantly predicting the validation prevalence.
    """
    if len(class_names) != 2:
        raise ValueError("class_names must name exactly two classes (negative, positive)")
    names = (str(class_names[0]), str(class_names[1]))
    yv = _labels(y_val, "y_val")
    pv = _scores(p_val, yv.shape[0], "p_val")
    yt = _labels(y_test, "y_test")
    pt = _scores(p_test, yt.shape[0], "p_test")
    if yv.size == 0 or yt.size == 0:
        raise ValueError("validation and test sets must be non-empty")

    choice = threshold_for_sensitivity(yv, pv, target_sensitivity)
    test = binary_metrics(yt, pt, choice.threshold, n_boot=n_boot, alpha=alpha, seed=seed)
    val = binary_metrics(yv, pv, choice.threshold, n_boot=n_boot, alpha=alpha, seed=seed)
    baseline = majority_baseline(yv, yt, alpha=alpha, class_names=names, reference_split="validation")
    bins = calibration_bins(yt, pt, n_bins)
    val_prev = float(yv.mean())
    counts = {
        "validation": int(yv.size),
        "validation_positive": int(yv.sum()),
        "validation_negative": int(yv.size - yv.sum()),
        "test": int(yt.size),
        "test_positive": int(yt.sum()),
        "test_negative": int(yt.size - yt.sum()),
    }
    return EvaluationReport(
        class_names=names,
        positive_class=names[1],
        threshold=choice,
        test=test,
        validation=val,
        majority_baseline=baseline,
        calibration=tuple(bins),
        brier_score=brier_score(yt, pt),
        brier_score_prevalence_baseline=float(np.mean((val_prev - yt) ** 2)),
        expected_calibration_error=expected_calibration_error(bins),
        counts=counts,
        n_boot=int(n_boot),
        seed=int(seed),
        ci_level=1.0 - alpha,
    )
