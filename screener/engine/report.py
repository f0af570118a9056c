"""Evaluation report files: ``report.json``, ``report.md`` and figures.

The markdown report always puts the model's test metrics beside the
majority-class baseline, because with a ~96 % disease prevalence a constant
"disease" answer already reaches ~96 % accuracy.

Figures are drawn with matplotlib's Agg backend through ``Figure`` objects
(no pyplot state), so this module works headless and leaks no figures.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

from screener.engine.metrics import (
    BinaryMetrics,
    EvaluationReport,
    bootstrap_auc_ci,
    calibration_bins,
    roc_auc,
    roc_curve,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "format_estimate",
    "format_table",
    "plot_calibration",
    "plot_roc",
    "to_jsonable",
    "write_report",
]

DEFAULT_TITLE = "Cervical spine X-ray classifier: evaluation report"

#: At most this many items of a list in ``extra`` are shown in report.md.
_MAX_LIST_ITEMS = 20


# --------------------------------------------------------------------------
# formatting helpers
# --------------------------------------------------------------------------


def _fmt_value(value: Any, digits: int = 3) -> str:
    """Human-readable cell: floats rounded, ``None``/NaN as ``n/a``."""
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "n/a"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{float(value):.{digits}f}"
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, (int, float, np.integer, np.floating)) for v in value)
    ):
        return f"[{_fmt_value(value[0], digits)}, {_fmt_value(value[1], digits)}]"
    return str(value)


def format_estimate(value: float | None, ci: Sequence[float] | None = None, digits: int = 3) -> str:
    """``0.912 [0.880, 0.940]``; ``n/a`` when the value is undefined."""
    text = _fmt_value(value, digits)
    if value is None or ci is None or text == "n/a":
        return text
    return f"{text} [{_fmt_value(ci[0], digits)}, {_fmt_value(ci[1], digits)}]"


def _cell(value: Any, digits: int) -> str:
    return _fmt_value(value, digits).replace("|", "\\|").replace("\n", " ")


def format_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    *,
    headers: Mapping[str, str] | None = None,
    digits: int = 3,
) -> str:
    """Markdown table of ``rows`` restricted to ``columns`` (in that order).

    Floats are rounded to ``digits`` places, ``None``/NaN render as ``n/a``,
    missing keys as empty cells, and ``|`` is escaped. ``headers`` optionally
    maps a column key to its displayed header. Pre-formatted strings (e.g.
    from :func:`format_estimate`) pass through unchanged.
    """
    heads = [_cell((headers or {}).get(c, c), digits) for c in columns]
    lines = [
        "| " + " | ".join(heads) + " |",
        "| " + " | ".join("---" for _ in columns) + " |",
    ]
    for row in rows:
        cells = [_cell(row[c], digits) if c in row else "" for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100.0 * value:.1f}%"


def to_jsonable(obj: Any) -> Any:
    """Convert dataclasses, numpy values, paths, tuples and sets to JSON types.

    NaN and infinities become ``None`` so that ``allow_nan=False`` holds.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((to_jsonable(v) for v in obj), key=repr)
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


# --------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------


def can_plot() -> bool:
    """Figures need matplotlib, which the trainer extra installs and a node-only install lacks."""
    return importlib.util.find_spec("matplotlib") is not None


def _figure(figsize: tuple[float, float]) -> Figure:
    from matplotlib.figure import Figure  # the object API needs no global backend

    return Figure(figsize=figsize)


def _save(fig: Figure, path: str | Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, format="png", dpi=120, bbox_inches="tight")
    return out


def plot_roc(
    path: str | Path,
    y_true: ArrayLike,
    scores: ArrayLike,
    threshold: float | None = None,
    title: str = "ROC curve (test set)",
    *,
    auroc_ci: Sequence[float] | None = None,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> Path:
    """Write a ROC curve PNG and return its path.

    The legend carries the AUROC with its bootstrap CI (``auroc_ci`` if
    given, otherwise computed with ``n_boot`` replicates). The operating
    point ``score >= threshold`` is marked, and the diagonal shows chance,
    which is also where any constant (majority-class) answer lies.
    """
    y = np.asarray(y_true).astype(np.int64).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    fpr, tpr, _ = roc_curve(y, s)
    auc = roc_auc(y, s)
    if auroc_ci is None and not math.isnan(auc) and n_boot > 0:
        auroc_ci = bootstrap_auc_ci(y, s, n_boot=n_boot, alpha=alpha, seed=seed)
    level = int(round(100 * (1 - alpha)))
    label = f"model, AUROC {format_estimate(None if math.isnan(auc) else auc, auroc_ci)}"
    if auroc_ci is not None and not math.isnan(auc):
        label += f" ({level}% CI)"

    fig = _figure((5.5, 5.5))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(fpr, tpr, color="C0", lw=2, label=label)
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="chance / majority baseline (AUROC 0.5)")
    if threshold is not None and y.size:
        pred = s >= threshold
        n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
        if n_pos and n_neg:
            op_tpr = float(np.sum(pred & (y == 1)) / n_pos)
            op_fpr = float(np.sum(pred & (y == 0)) / n_neg)
            ax.plot(
                [op_fpr],
                [op_tpr],
                "o",
                color="C3",
                ms=8,
                label=(f"operating point t={threshold:.3g}: sens {op_tpr:.3f}, spec {1 - op_fpr:.3f}"),
            )
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(title)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_calibration(
    path: str | Path,
    y_true: ArrayLike,
    scores: ArrayLike,
    n_bins: int = 10,
    title: str = "Calibration (test set)",
    *,
    class_names: Sequence[str] = ("healthy", "disease"),
) -> Path:
    """Write a reliability diagram above a histogram of predictions (PNG).

    The histogram is split by true class and uses a log count axis, since the
    classes are heavily imbalanced.
    """
    y = np.asarray(y_true).astype(np.int64).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    bins = calibration_bins(y, s, n_bins)
    filled = [b for b in bins if b.count]

    fig = _figure((5.5, 7))
    ax, hx = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.4]})
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfect calibration")
    if filled:
        ax.plot([b.mean_pred for b in filled], [b.frac_pos for b in filled], "o-", color="C0", label="model")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.01, 1.01)
    ax.set_ylabel("observed fraction positive")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)

    edges = np.linspace(0.0, 1.0, n_bins + 1)
    hx.hist(
        [s[y == 0], s[y == 1]],
        bins=edges,
        stacked=True,
        color=["C2", "C3"],
        label=[f"{class_names[0]} (label 0)", f"{class_names[1]} (label 1)"],
        log=True,
    )
    hx.set_xlabel("predicted probability of the positive class")
    hx.set_ylabel("count (log)")
    hx.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


# --------------------------------------------------------------------------
# markdown report
# --------------------------------------------------------------------------


def _metric_rows(columns: Sequence[tuple[str, BinaryMetrics]]) -> list[dict[str, str]]:
    """One row per metric, one column per predictor/split."""
    spec: list[tuple[str, str, str | None]] = [
        ("AUROC", "auroc", "auroc_ci"),
        ("Sensitivity", "sensitivity", "sensitivity_ci"),
        ("Specificity", "specificity", "specificity_ci"),
        ("Balanced accuracy", "balanced_accuracy", None),
        ("PPV (precision)", "ppv", None),
        ("NPV", "npv", None),
        ("F1", "f1", None),
        ("MCC", "mcc", None),
        ("Accuracy", "accuracy", None),
    ]
    rows = []
    for label, key, ci_key in spec:
        row = {"metric": label}
        for name, m in columns:
            row[name] = format_estimate(getattr(m, key), getattr(m, ci_key) if ci_key else None)
        rows.append(row)
    return rows


def _confusion_table(m: BinaryMetrics, class_names: Sequence[str]) -> str:
    neg, pos = class_names
    cm = m.confusion
    rows = [
        {"": f"true {neg} (0)", "a": cm.tn, "b": cm.fp, "t": cm.n_negative},
        {"": f"true {pos} (1)", "a": cm.fn, "b": cm.tp, "t": cm.n_positive},
    ]
    return format_table(
        rows,
        ["", "a", "b", "t"],
        headers={"a": f"predicted {neg}", "b": f"predicted {pos}", "t": "total"},
    )


def _fmt_extra(value: Any) -> str:
    """Key/value cell for ``extra``: floats keep 6 significant digits."""
    if isinstance(value, (dict, list)):
        return f"`{json.dumps(value, sort_keys=True)}`"
    if isinstance(value, float):
        return f"{value:.6g}"
    return _fmt_value(value)


def _render_extra(extra: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    for key in extra:
        value = to_jsonable(extra[key])
        if isinstance(value, list) and value:
            lines.append(f"- **{key}** ({len(value)} items):")
            for item in value[:_MAX_LIST_ITEMS]:
                lines.append(f"  - {_fmt_extra(item)}")
            if len(value) > _MAX_LIST_ITEMS:
                lines.append(f"  - ... ({len(value) - _MAX_LIST_ITEMS} more, see report.json)")
        elif isinstance(value, dict) and value:
            lines.append(f"- **{key}**:")
            for sub, sub_value in value.items():
                lines.append(f"  - {sub}: {_fmt_extra(sub_value)}")
        else:
            lines.append(f"- **{key}**: {_fmt_extra(value)}")
    return lines


def _markdown(
    report: EvaluationReport,
    extra: Mapping[str, Any] | None,
    figures: Mapping[str, Path],
    title: str,
) -> str:
    neg_name, pos_name = report.class_names
    test, val, base = report.test, report.validation, report.majority_baseline
    choice = report.threshold
    level = int(round(100 * report.ci_level))
    c = report.counts
    out: list[str] = [f"# {title}", ""]

    out += [
        f"> **Warning: accuracy alone is misleading here.** {_pct(test.prevalence)} of the "
        f"test cases are '{pos_name}', so the majority-class baseline "
        f"({base.predictor}) already scores {_pct(base.accuracy)} accuracy, "
        f"with balanced accuracy {_fmt_value(base.balanced_accuracy)} and no skill at all. "
        f"{'Accuracy and F1 reward' if base.f1 else 'Accuracy rewards'} it; "
        "judge the model on AUROC, sensitivity, specificity and "
        "balanced accuracy, beside the baseline.",
        "",
        f"Positive class: **{pos_name}** (label 1); negative class: **{neg_name}** (label 0).",
        "",
        "## Data",
        "",
        format_table(
            [
                {
                    "split": "validation",
                    "n": c["validation"],
                    "pos": c["validation_positive"],
                    "neg": c["validation_negative"],
                    "prev": _pct(val.prevalence),
                },
                {
                    "split": "test",
                    "n": c["test"],
                    "pos": c["test_positive"],
                    "neg": c["test_negative"],
                    "prev": _pct(test.prevalence),
                },
            ],
            ["split", "n", "pos", "neg", "prev"],
            headers={"pos": f"{pos_name} (1)", "neg": f"{neg_name} (0)", "prev": f"prevalence of {pos_name}"},
        ),
        "",
        "## Operating point (chosen on validation, never on test)",
        "",
        f"- Threshold: **{choice.threshold:.6g}** (predict '{pos_name}' when p >= threshold)",
        f"- Method: {choice.method}",
        f"- Chosen on: {choice.split} split ({choice.n_positive} {pos_name}, {choice.n_negative} {neg_name})",
        f"- Target sensitivity: {_fmt_value(choice.target_sensitivity)}; achieved on validation: "
        f"sensitivity {_fmt_value(choice.achieved_sensitivity)}, "
        f"specificity {_fmt_value(choice.achieved_specificity)}",
        "",
        "## Test metrics beside the majority-class baseline",
        "",
        f"Intervals are {level}% CIs: stratified bootstrap ({report.n_boot} replicates, "
        f"seed {report.seed}) for AUROC, Wilson score for sensitivity and specificity. "
        "`n/a` marks an undefined value (zero denominator).",
        "",
    ]
    model_col = "Model (test)"
    base_col = "Majority baseline (test)"
    val_col = "Model (validation, same threshold)"
    out += [
        format_table(
            _metric_rows([(model_col, test), (base_col, base), (val_col, val)]),
            ["metric", model_col, base_col, val_col],
            headers={"metric": "Metric"},
        ),
        "",
        f"Majority baseline: {base.predictor}, evaluated on test.",
        "",
        f"## Confusion matrix (test, threshold {choice.threshold:.6g})",
        "",
        _confusion_table(test, report.class_names),
        "",
        "## Calibration (test)",
        "",
        f"- Brier score: {_fmt_value(report.brier_score, 4)} "
        f"(constant validation prevalence: {_fmt_value(report.brier_score_prevalence_baseline, 4)}; "
        "lower is better)",
        f"- Expected calibration error ({len(report.calibration)} equal-width bins): "
        f"{_fmt_value(report.expected_calibration_error, 4)}",
        "",
    ]
    if figures:
        out += ["## Figures", ""]
        if "roc" in figures:
            out += [f"![ROC curve]({figures['roc'].name})", ""]
        if "calibration" in figures:
            out += [f"![Calibration]({figures['calibration'].name})", ""]
    if extra:
        out += ["## Run details", ""] + _render_extra(extra) + [""]
    return "\n".join(out)


def write_report(
    out_dir: str | Path,
    report: EvaluationReport,
    extra: Mapping[str, Any] | None = None,
    y_test: ArrayLike | None = None,
    p_test: ArrayLike | None = None,
    title: str = DEFAULT_TITLE,
) -> dict[str, Path]:
    """Write ``report.json`` and ``report.md`` (plus figures) into ``out_dir``.

    ``report.json`` holds ``dataclasses.asdict(report)`` with ``extra`` under
    the key ``"extra"``; it is strict JSON (no NaN). When both ``y_test`` and
    ``p_test`` are given, ``roc.png`` and ``calibration.png`` are drawn and
    linked from the markdown. Returns the written paths under the keys
    ``json``, ``markdown`` and, if drawn, ``roc`` and ``calibration``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if y_test is not None and p_test is not None and can_plot():
        n_given = int(np.asarray(y_test).reshape(-1).shape[0])
        if n_given != report.counts["test"]:
            raise ValueError(f"y_test has {n_given} cases but the report was computed on {report.counts['test']}")
        paths["roc"] = plot_roc(
            out / "roc.png",
            y_test,
            p_test,
            threshold=report.threshold.threshold,
            auroc_ci=report.test.auroc_ci,
            n_boot=report.n_boot,
            alpha=1.0 - report.ci_level,
            seed=report.seed,
        )
        paths["calibration"] = plot_calibration(
            out / "calibration.png",
            y_test,
            p_test,
            n_bins=max(1, len(report.calibration)),
            class_names=report.class_names,
        )
    payload = to_jsonable(report)
    payload["extra"] = to_jsonable(dict(extra)) if extra else {}
    json_path = out / "report.json"
    json_path.write_text(json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
    paths["json"] = json_path
    md_path = out / "report.md"
    figures = {k: v for k, v in paths.items() if k in ("roc", "calibration")}
    md_path.write_text(_markdown(report, extra, figures, title), encoding="utf-8")
    paths["markdown"] = md_path
    return paths
