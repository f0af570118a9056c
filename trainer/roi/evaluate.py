"""ROI engine evaluation: box metrics in source pixels, per view, and the report with its figures."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from screener.engine import preprocessing as pp
from screener.engine.roi import box_from_output, box_to_output
from screener.engine.roi import iou as _iou
from trainer.roi.data import RoiData

TARGET_MEAN_IOU = 0.8  # the bar on synthetic sets of >= 2,000 images


TARGET_CONTAINMENT = 0.95  # wide_crop of the predicted box contains the annotated box


IOU_GOOD = 0.7


_WIDE_NOSQUARE = dataclasses.replace(pp.RECIPES["wide_crop"], square=False)


def iou(a: pp.Box, b: pp.Box) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    return _iou(a, b)


def wide_window(box: pp.Box, shape: tuple[int, int] | None = None) -> tuple[float, float, float, float]:
    """The ``wide_crop`` window of a box before the square step: grown by the recipe's margins
    (200 px above and below, 100 px left and right) and, given the image `shape`, clipped to it."""
    if shape is not None:
        wx0, wy0, wx1, wy1 = pp.window((int(shape[0]), int(shape[1])), _WIDE_NOSQUARE, box)
        return float(wx0), float(wy0), float(wx1), float(wy1)
    x0, y0, x1, y1 = (float(v) for v in box)
    mx, my = _WIDE_NOSQUARE.wide_margin_x, _WIDE_NOSQUARE.wide_margin_y
    return x0 - mx, y0 - my, x1 + mx, y1 + my


def _contains(outer: Sequence[float], inner: Sequence[float], shape: tuple[int, int] | None) -> bool:
    ix0, iy0, ix1, iy1 = (float(v) for v in inner)
    if shape is not None:  # the part of the annotated box inside the image (the window is clipped too)
        h, w = float(shape[0]), float(shape[1])
        ix0, ix1 = min(max(ix0, 0.0), w), min(max(ix1, 0.0), w)
        iy0, iy1 = min(max(iy0, 0.0), h), min(max(iy1, 0.0), h)
    ox0, oy0, ox1, oy1 = outer
    eps = 1e-6
    return ox0 <= ix0 + eps and oy0 <= iy0 + eps and ox1 >= ix1 - eps and oy1 >= iy1 - eps


def _as_box(b: Sequence[float] | np.ndarray) -> pp.Box:
    x0, y0, x1, y1 = (float(v) for v in b)
    return x0, y0, x1, y1


def _as_shape(s: Sequence[int] | np.ndarray) -> tuple[int, int]:
    return int(s[0]), int(s[1])


def box_metrics(
    pred_boxes: Sequence[pp.Box] | np.ndarray,
    true_boxes: Sequence[pp.Box] | np.ndarray,
    shapes: Sequence[tuple[int, int]] | np.ndarray | None = None,
) -> dict[str, Any]:
    """Box quality over a set of images (boxes in source pixels).

    ``mean_iou``, ``median_iou``, ``share_iou_ge_0_7``; ``wide_crop_containment``: the share
    of images whose ``wide_window`` of the predicted box contains the annotated box (with
    `shapes`, (height, width) per image, both are clipped to the image as the node's crop
    is); ``mean_edge_error_px``: mean absolute error of the four box edges; ``n``.
    Empty input gives ``n`` 0 and None for the rest.
    """
    pred = [_as_box(b) for b in pred_boxes]
    true = [_as_box(b) for b in true_boxes]
    if len(pred) != len(true):
        raise ValueError(f"{len(pred)} predicted boxes for {len(true)} annotated ones")
    shp: list[tuple[int, int] | None] = [None] * len(true) if shapes is None else [_as_shape(s) for s in shapes]
    if len(shp) != len(true):
        raise ValueError(f"{len(shp)} image shapes for {len(true)} boxes")
    n = len(true)
    if n == 0:
        return {
            "mean_iou": None,
            "median_iou": None,
            "share_iou_ge_0_7": None,
            "wide_crop_containment": None,
            "mean_edge_error_px": None,
            "n": 0,
        }
    ious = np.array([iou(p, t) for p, t in zip(pred, true)], dtype=np.float64)
    contained = np.array([_contains(wide_window(p, s), t, s) for p, t, s in zip(pred, true, shp)])
    edge = np.abs(np.asarray(pred, np.float64) - np.asarray(true, np.float64)).mean(axis=1)
    return {
        "mean_iou": float(ious.mean()),
        "median_iou": float(np.median(ious)),
        "share_iou_ge_0_7": float(np.mean(ious >= IOU_GOOD)),
        "wide_crop_containment": float(contained.mean()),
        "mean_edge_error_px": float(edge.mean()),
        "n": n,
    }


def per_image_iou(pred_boxes: Sequence[pp.Box], true_boxes: Sequence[pp.Box]) -> np.ndarray:
    return np.array([iou(p, t) for p, t in zip(pred_boxes, true_boxes)], dtype=np.float64)


def bootstrap_mean_ci(
    values: np.ndarray, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float] | None:
    """Percentile bootstrap CI of the mean (images resampled with replacement)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2 or n_boot < 1:
        return None
    rng = np.random.default_rng(seed)
    means = np.array([v[rng.integers(0, len(v), len(v))].mean() for _ in range(int(n_boot))])
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def to_source(outputs: np.ndarray, shapes: np.ndarray, rcp: pp.Recipe) -> list[pp.Box]:
    return [box_from_output(o, tuple(s), rcp) for o, s in zip(outputs, shapes)]


def examples_figure(
    path: Path,
    images: np.ndarray,
    shapes: np.ndarray,
    true: np.ndarray,
    pred: Sequence[pp.Box],
    ious: np.ndarray,
    rcp: pp.Recipe,
    k: int = 8,
) -> Path | None:
    """Test images (letterboxed, as the model sees them) with the annotated box (green), the
    predicted box (red) and the wide_crop window of the predicted box (dashed orange): the
    lowest-IoU images first, then evenly spaced ones."""
    if len(images) == 0:
        return None
    from matplotlib.patches import Rectangle

    from screener.engine.report import _figure, _save

    order = np.argsort(ious)
    worst = [int(i) for i in order[: min(k // 2, len(order))]]
    others = order[len(worst) :]
    n_rest = min(k - len(worst), len(others))
    rest = [int(others[j]) for j in np.linspace(0, len(others) - 1, num=n_rest).astype(int)] if n_rest else []
    chosen = worst + rest
    cols = min(4, len(chosen))
    rows = int(math.ceil(len(chosen) / cols))
    fig = _figure((3.0 * cols, 3.2 * rows))
    size = images.shape[1]
    for j, i in enumerate(chosen):
        ax = fig.add_subplot(rows, cols, j + 1)
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=255)
        shape = _as_shape(shapes[i])
        drawn: list[tuple[pp.Box, str, str]] = [
            (_as_box(true[i]), "lime", "-"),
            (pred[i], "red", "-"),
            (wide_window(pred[i], shape), "orange", "--"),
        ]
        for box, colour, style in drawn:
            u = np.asarray(box_to_output(box, shape, rcp)) * size
            ax.add_patch(
                Rectangle(
                    (u[0], u[1]), u[2] - u[0], u[3] - u[1], fill=False, edgecolor=colour, linestyle=style, linewidth=1.2
                )
            )
        ax.set_title(f"IoU {ious[i]:.2f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("test images: annotated (green), predicted (red), wide_crop of predicted (orange)", fontsize=9)
    return _save(fig, path)


def iou_histogram(path: Path, ious: np.ndarray) -> Path | None:
    if len(ious) == 0:
        return None
    from screener.engine.report import _figure, _save

    fig = _figure((5, 3))
    ax = fig.add_subplot(1, 1, 1)
    ax.hist(ious, bins=np.linspace(0, 1, 41).tolist(), color="steelblue")
    ax.axvline(IOU_GOOD, color="red", linestyle="--", linewidth=1)
    ax.set_xlabel("IoU (test images)")
    ax.set_ylabel("images")
    return _save(fig, path)


def fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def write_roi_report(
    folder: Path,
    title: str,
    test: dict[str, Any],
    validation: dict[str, Any],
    by_view: dict[str, dict[str, Any]],
    checks: dict[str, Any],
    extra: dict[str, Any],
    figures: dict[str, Path | None],
) -> dict[str, Path]:
    """``report.json`` and ``report.md`` (figures already drawn, linked when present)."""
    from screener.engine.report import format_table, to_jsonable

    folder.mkdir(parents=True, exist_ok=True)
    payload = to_jsonable(
        {"test": test, "validation": validation, "test_by_view": by_view, "checks": checks, "extra": extra}
    )
    json_path = folder / "report.json"
    json_path.write_text(json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
    cols = ["split", "n", "mean_iou", "median_iou", "share_iou_ge_0_7", "wide_crop_containment", "mean_edge_error_px"]
    rows = [{"split": "test", **test}, {"split": "validation", **validation}]
    rows += [{"split": f"test, {view}", **m} for view, m in by_view.items()]
    ci = test.get("mean_iou_ci")
    lines = [
        f"# {title}",
        "",
        "The ROI engine finds the cervical spine: one box per image, in source pixels. Annotated boxes are the "
        "bounding box of the 23 CSXA keypoints (lateral views) or the `cspine` LabelMe rectangle (oblique views). "
        "Split by patient; all numbers are on images the model never saw in training.",
        "",
        "## Test metrics",
        "",
        format_table(
            rows,
            cols,
            headers={
                "share_iou_ge_0_7": "IoU >= 0.7",
                "mean_iou": "mean IoU",
                "median_iou": "median IoU",
                "wide_crop_containment": "wide_crop contains annotated box",
                "mean_edge_error_px": "mean edge error (px)",
            },
        ),
        "",
        f"- Test mean IoU {fmt(test.get('mean_iou'))}"
        + (f" (95% bootstrap CI {fmt(ci[0])} to {fmt(ci[1])})" if ci else ""),
        "- `wide_crop containment`: share of images whose wide_crop window of the predicted box (grown by "
        f"{_WIDE_NOSQUARE.wide_margin_y} px above and below, {_WIDE_NOSQUARE.wide_margin_x} px left and right, "
        "clipped to the image, before the square step) contains the whole annotated box.",
        "",
        "## Acceptance checks",
        "",
    ]
    for name, c in checks.items():
        lines.append(
            f"- {name}: {fmt(c.get('value'))} (target {c.get('target')}): "
            f"**{'pass' if c.get('passed') else 'FAIL'}**" + (f"; {c['note']}" if c.get("note") else "")
        )
    lines.append("")
    shown = {k: v for k, v in figures.items() if v is not None}
    if shown:
        lines += ["## Figures", ""] + [f"![{k}]({v.name})" for k, v in shown.items()] + [""]
    lines += ["## Run details", "", "```json", json.dumps(to_jsonable(extra), indent=2, sort_keys=True), "```", ""]
    md_path = folder / "report.md"
    md_path.write_text("\n".join(lines), encoding="utf-8")
    return {"json": json_path, "markdown": md_path, **shown}


def by_view(data: RoiData, idx: np.ndarray, pred: Sequence[pp.Box]) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[int]] = {}
    for j, i in enumerate(idx):
        it = data.items[i]
        groups.setdefault("lateral" if it.view == "lateral" else f"oblique {it.view}", []).append(j)
    if len(groups) < 2:
        return {}
    return {
        name: box_metrics([pred[j] for j in js], data.boxes[idx[js]], data.shapes[idx[js]])
        for name, js in sorted(groups.items())
    }
