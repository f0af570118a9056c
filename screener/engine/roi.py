"""The ROI engine's pre- and post-processing: where is the cervical spine in a radiograph?

The ROI engine (``trainer build-engine --task roi``, manifest ``kind`` "roi") takes the
whole image letterboxed to a square (recipe crop ``full``, see ``screener.engine.preprocessing``)
and outputs one box per image, ``(x0, y0, x1, y1)`` normalized to that square (0..1,
x0 < x1, y0 < y1). ``box_from_output`` maps such a row back to source pixels through the
same window the preprocessing cut; ``box_to_output`` is its inverse (the trainer uses it
to make training targets, so both sides share one mapping).

``predict_boxes`` is what the node calls: 8-bit gray images -> boxes in source pixels,
clipped to the image and never empty. The box is then used by the classifier recipes
that need one (``crop``, ``wide_crop``, the stenosis ROI crop).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from screener.engine import preprocessing as pp

__all__ = ["box_from_output", "box_to_output", "predict_boxes", "iou", "MIN_BOX_PX"]

MIN_BOX_PX = 1.0  # a returned box is at least this wide and high (source pixels)


def _letterbox(shape: tuple[int, int], rcp: pp.Recipe) -> tuple[float, float, float, float]:
    if rcp.crop != "full":
        raise ValueError(f"recipe {rcp.name}: the ROI engine's input must use crop 'full', not {rcp.crop!r}")
    x0, y0, x1, y1 = pp.window((int(shape[0]), int(shape[1])), rcp, None)
    return float(x0), float(y0), float(x1), float(y1)


def box_from_output(out_row: Sequence[float] | np.ndarray, shape: tuple[int, int], rcp: pp.Recipe) -> pp.Box:
    """One engine output row (x0, y0, x1, y1 normalized to the letterbox square) -> source pixels.

    `shape` is the source image's (height, width). The box is clipped to the image
    (0..width, 0..height) and made at least ``MIN_BOX_PX`` wide and high with x1 > x0,
    y1 > y0. Swapped corners are put in order; a non-finite output gives the whole image.
    """
    h, w = int(shape[0]), int(shape[1])
    if h < 1 or w < 1:
        raise ValueError(f"empty image shape {shape}")
    row = np.asarray(out_row, dtype=np.float64).reshape(-1)
    if row.size != 4:
        raise ValueError(f"an ROI output row has 4 values (x0, y0, x1, y1), got {row.size}")
    if not np.all(np.isfinite(row)):
        return 0.0, 0.0, float(w), float(h)
    wx0, wy0, wx1, wy1 = _letterbox((h, w), rcp)
    xs = wx0 + row[[0, 2]] * (wx1 - wx0)
    ys = wy0 + row[[1, 3]] * (wy1 - wy0)
    x0, x1 = _ordered_span(float(xs.min()), float(xs.max()), float(w))
    y0, y1 = _ordered_span(float(ys.min()), float(ys.max()), float(h))
    return x0, y0, x1, y1


def _ordered_span(lo: float, hi: float, size: float) -> tuple[float, float]:
    """[lo, hi] clipped to [0, size], at least MIN_BOX_PX long (or the whole axis if shorter)."""
    lo, hi = min(max(lo, 0.0), size), min(max(hi, 0.0), size)
    need = min(MIN_BOX_PX, size)
    if hi - lo < need:
        mid = 0.5 * (lo + hi)
        lo = min(max(mid - need / 2, 0.0), size - need)
        hi = lo + need
    return lo, hi


def box_to_output(box: pp.Box, shape: tuple[int, int], rcp: pp.Recipe) -> tuple[float, float, float, float]:
    """Inverse of ``box_from_output`` (without clipping): source-pixel box -> normalized letterbox box."""
    wx0, wy0, wx1, wy1 = _letterbox((int(shape[0]), int(shape[1])), rcp)
    x0, y0, x1, y1 = (float(v) for v in box)
    sx, sy = wx1 - wx0, wy1 - wy0
    return (min(x0, x1) - wx0) / sx, (min(y0, y1) - wy0) / sy, (max(x0, x1) - wx0) / sx, (max(y0, y1) - wy0) / sy


def predict_boxes(engine, grays: Sequence[np.ndarray]) -> list[pp.Box]:
    """Boxes (x0, y0, x1, y1) in source pixels of each image, from a loaded ROI engine.

    `engine` is a ``screener.engine.runtime.LoadedEngine`` whose manifest has kind "roi"; `grays`
    are 2-D 8-bit gray images (other arrays go through ``to_gray8`` first). Each image is
    prepared with the manifest's recipe and normalization (the shared preprocessing),
    the batch runs through ``engine.predict`` and every output row is mapped back with
    ``box_from_output``.
    """
    man = engine.manifest
    if man.kind != "roi":
        raise ValueError(f"{man.task} engine is a {man.kind}, not an ROI engine")
    if not grays:
        return []
    rcp, norm = man.preprocessing, man.normalization
    shapes, tensors = [], []
    for g in grays:
        gray = g if (isinstance(g, np.ndarray) and g.dtype == np.uint8 and g.ndim == 2) else pp.to_gray8(np.asarray(g))
        shapes.append(gray.shape)
        tensors.append(pp.preprocess(gray, rcp, norm, None))
    out = np.asarray(engine.predict(np.stack(tensors)), dtype=np.float64)
    if out.ndim != 2 or out.shape != (len(tensors), 4):
        raise ValueError(f"ROI engine {man.task} returned shape {out.shape}, expected ({len(tensors)}, 4)")
    return [box_from_output(row, shape, rcp) for row, shape in zip(out, shapes)]


def iou(a: pp.Box, b: pp.Box) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes (0 when both are empty)."""
    ax0, ay0, ax1, ay1 = (float(v) for v in a)
    bx0, by0, bx1, by1 = (float(v) for v in b)
    iw = max(0.0, min(ax1, bx1) - max(ax0, bx0))
    ih = max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    union = max(0.0, ax1 - ax0) * max(0.0, ay1 - ay0) + max(0.0, bx1 - bx0) * max(0.0, by1 - by0) - inter
    if union <= 0.0 or not math.isfinite(union):
        return 0.0
    return inter / union
