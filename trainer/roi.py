"""`trainer build-engine --task roi`: the engine that finds the cervical spine in a radiograph.

It gives the node the box that annotations give the trainer (the spondylosis ``crop`` /
``wide_crop`` recipes, the stenosis ROI crop). Trained on

* lateral views: the box of the 23 CSXA keypoints (``trainer.csxa``);
* oblique views: LabelMe rectangles labelled ``cspine`` (``trainer.oblique``); images
  without one are skipped and counted (a data set may annotate only part of its images).

Model: a torchvision ResNet18 (random init, or a local ``--pretrained`` ResNet18 state
dict) with an integral-regression head: layer4 upsampled onto layer3 (stride 16), one logit
map per box edge, each edge the expected coordinate under its map's softmax. Output: the
normalized box (x0, y0, x1, y1) relative to the letterboxed square the ``roi_input`` recipe
feeds it (x0 <= x1, y0 <= y1). The spatial head learned clearly faster than global pooling +
4 sigmoid outputs (300 synthetic images, 128 px, 12 epochs: validation mean IoU 0.77 vs 0.70).
The input is the shared preprocessing (``prepare`` with crop ``full``, then ``normalize``);
``screener.engine.roi`` maps the output back to source pixels, on the trainer and on the node alike.

Loss: 5 x smooth L1 (beta 0.02) on the normalized coordinates + 2 x (1 - GIoU).
Augmentation (training only; each keeps the box exact): horizontal flip, scale
0.85-1.15 and a shift of up to 8 % of the side that keeps the box inside the image,
gain and gamma of the gray levels (black stays black, like the letterbox padding).
The geometric jitter is applied to the letterboxed gray square rather than to the
source image: for the gray colour mode this is the same affine map up to where the
black padding ends, and it lets every image be decoded and prepared once, not every epoch.
Adam, cosine learning-rate schedule, early stopping on validation mean IoU, best
checkpoint kept, resumable (``<out>/.work/roi``).

Evaluation (held-out test split, grouped by patient): mean and median IoU, the share
of images with IoU >= 0.7 and the share whose ``wide_crop`` window of the predicted box
(the box grown by 200 px above/below and 100 px left/right, clipped to the image, before
the square step) contains the annotated box. Written to report.md / report.json and
the manifest (``metrics.test``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import screener
from screener.engine import manifest as mf
from screener.engine import preprocessing as pp
from screener.engine.roi import box_from_output, box_to_output
from screener.engine.roi import iou as _iou
from screener.errors import DataError, UserError
from screener.logs import get_logger
from trainer import csxa, export
from trainer.model import load_pretrained, pick_device
from trainer.splits import SPLITS, SplitSpec, split_groups
from trainer.train import checkpoint_dir

log = get_logger(__name__)

__all__ = [
    "RoiItem",
    "roi_items_from",
    "root_kind",
    "iou",
    "box_metrics",
    "wide_window",
    "RoiAugment",
    "AUGMENT_PRESETS",
    "augment_roi",
    "BoxRegressor",
    "RoiTrainConfig",
    "RoiTrainResult",
    "train_roi",
    "predict_normalized",
    "build_roi_engine",
    "INT8_TOLERANCE",
    "TARGET_MEAN_IOU",
    "TARGET_CONTAINMENT",
]

RECIPE_NAME = "roi_input"
INT8_TOLERANCE = 0.01  # keep int8 only if its test mean IoU is within this of fp32
TARGET_MEAN_IOU = 0.8  # the bar on synthetic sets of >= 2,000 images
TARGET_CONTAINMENT = 0.95  # wide_crop of the predicted box contains the annotated box
IOU_GOOD = 0.7
DEFAULT_BATCH = 32
CLASS_NAMES = ["cspine"]
_WIDE_NOSQUARE = dataclasses.replace(pp.RECIPES["wide_crop"], square=False)
_TQDM_INTERVAL = 0.5 if sys.stderr.isatty() else 30.0


def iou(a: pp.Box, b: pp.Box) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    return _iou(a, b)


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class RoiItem:
    """One annotated image for the ROI engine."""

    image_path: Path
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in source pixels
    group: str  # patient group, prefixed with the data set so groups of different roots never merge
    view: str  # "lateral" (CSXA keypoints) or the oblique laterality "L" / "R"
    label: int = 0  # the data set's class label (spondylosis / stenosis), used to stratify the split
    root: str = ""  # the data set folder it came from
    split: str = ""  # train | validation | test, when roi_items_from was given a SplitSpec

    @property
    def kind(self) -> str:
        return "lateral" if self.view == "lateral" else "oblique"


def root_kind(root: Path) -> str:
    """ "oblique" when the data set's sheet has a ``View`` column, else "lateral" (CSXA)."""
    sheet = csxa.find_sheet(Path(root))
    names, _ = csxa.read_sheet(sheet)
    return "oblique" if any(n.strip().lower().startswith("view") for n in names) else "lateral"


def _summary(report: Any) -> Any:
    fn = getattr(report, "summary", None)
    return fn() if callable(fn) else str(report)


def _valid_box(box: Any) -> tuple[float, float, float, float] | None:
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return None
    x0, x1 = min(x0, x1), max(x0, x1)
    y0, y1 = min(y0, y1), max(y0, y1)
    if x1 - x0 < 1.0 or y1 - y0 < 1.0:
        return None
    return x0, y0, x1, y1


def roi_items_from(
    lateral_roots: Sequence[Path], oblique_roots: Sequence[Path], spec: SplitSpec | None = None
) -> tuple[list[RoiItem], dict[str, Any]]:
    """Annotated images of every data set, and what was skipped.

    Lateral roots (CSXA layout): images with all 23 keypoints, box = their bounding box.
    Oblique roots (``docs/stenosis-data.md``): images with a ``cspine`` rectangle; the
    unannotated ones are skipped and counted. With `spec`, each data set is split by
    patient group (``trainer.splits.split_groups``, stratified by that data set's label)
    over the samples its loader returns, before unannotated oblique images are dropped, so
    a root gets the same assignment a classifier build of that root computes from the
    same sample list and seed; ``RoiItem.split`` is then set.
    """
    items: list[RoiItem] = []
    per_root: list[dict[str, Any]] = []
    total_unannotated = 0
    tagged = [(Path(r), "lateral") for r in lateral_roots] + [(Path(r), "oblique") for r in oblique_roots]
    for k, (root, kind) in enumerate(tagged):
        prefix = f"{k}:{root.name}"
        if kind == "lateral":
            samples, report = csxa.load(root, need_keypoints=True)
            boxes = [s.box for s in samples]
            views = ["lateral"] * len(samples)
        else:
            from trainer.oblique import load_oblique  # the oblique-view loader (stenosis layout)

            samples, report = load_oblique(root)
            boxes = [getattr(s, "box", None) for s in samples]
            views = [str(getattr(s, "view", "") or "oblique") for s in samples]
        labels = [int(getattr(s, "label", 0)) for s in samples]
        groups = [f"{prefix}/{s.group}" for s in samples]
        splits = split_groups(groups, labels, spec) if (spec is not None and samples) else [""] * len(samples)
        kept = unannotated = invalid = 0
        for s, box, view, label, group, split in zip(samples, boxes, views, labels, groups, splits):
            if box is None:
                unannotated += 1
                continue
            vbox = _valid_box(box)
            if vbox is None:
                invalid += 1
                if hasattr(report, "skip"):
                    report.skip(s.image_path, f"empty or invalid ROI box {box}")
                continue
            items.append(RoiItem(Path(s.image_path), vbox, group, view, label, str(root), split))
            kept += 1
        total_unannotated += unannotated
        per_root.append(
            {
                "root": str(root),
                "name": root.name,
                "kind": kind,
                "samples": len(samples),
                "annotated": kept,
                "unannotated_skipped": unannotated,
                "invalid_box_skipped": invalid,
                "load": _summary(report),
            }
        )
        log.info("roi_data_loaded", root=str(root), kind=kind, annotated=kept, unannotated=unannotated)
    problems = {"roots": per_root, "unannotated_skipped": total_unannotated, "unreadable": []}
    return items, problems


@dataclass
class RoiData:
    """Annotated images prepared once: the letterboxed gray squares and the boxes."""

    items: list[RoiItem]
    images: np.ndarray  # uint8 (N, S, S): one channel of the prepared image (the colour mode is gray)
    shapes: np.ndarray  # int (N, 2): source height, width
    boxes: np.ndarray  # float64 (N, 4): annotated boxes in source pixels
    targets: np.ndarray  # float32 (N, 4): the same boxes normalized to the letterbox square
    splits: np.ndarray  # str (N,)
    fingerprint: str

    def index(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.splits == split)


def _fingerprint(items: Sequence[RoiItem]) -> str:
    """SHA-256 of the data sets' file lists (path relative to its root, size), views and boxes."""
    h = hashlib.sha256()
    for it in sorted(items, key=lambda i: (i.root, str(i.image_path))):
        root = Path(it.root)
        rel = it.image_path.relative_to(root) if it.image_path.is_relative_to(root) else it.image_path
        box_txt = ",".join(f"{v:.1f}" for v in it.box)
        h.update(f"{root.name}|{rel}|{it.image_path.stat().st_size}|{it.view}|{box_txt}\n".encode())
    return h.hexdigest()


def prepare_roi_data(
    items: Sequence[RoiItem], rcp: pp.Recipe, problems: dict[str, Any] | None = None, progress: bool = False
) -> RoiData:
    """Read and prepare every image once (shared preprocessing); unreadable ones are skipped and listed."""
    from trainer.data import read_gray8

    if rcp.crop != "full" or rcp.colour != "gray":
        raise ValueError(f"recipe {rcp.name}: the ROI engine needs crop 'full' and colour 'gray'")
    kept: list[RoiItem] = []
    images, shapes, targets = [], [], []
    bad = problems.setdefault("unreadable", []) if problems is not None else []
    for it in tqdm(
        items, desc="preprocess roi_input", unit="img", disable=not progress, leave=False, mininterval=_TQDM_INTERVAL
    ):
        try:
            gray, _mode = read_gray8(it.image_path)
            img = pp.prepare(gray, rcp, None)
        except ValueError as exc:
            bad.append({"file": str(it.image_path), "reason": str(exc).replace(str(it.image_path) + ": ", "")})
            log.warning("sample_skipped", file=str(it.image_path), reason=str(exc))
            continue
        if not (np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0], img[..., 2])):
            raise AssertionError("gray recipe produced unequal channels")  # storage below relies on it
        kept.append(it)
        images.append(img[..., 0])
        shapes.append(gray.shape)
        targets.append(box_to_output(it.box, gray.shape, rcp))
    size = rcp.image_size
    return RoiData(
        items=kept,
        images=np.stack(images) if images else np.zeros((0, size, size), np.uint8),
        shapes=np.array(shapes, dtype=np.int64).reshape(-1, 2),
        boxes=np.array([it.box for it in kept], dtype=np.float64).reshape(-1, 4),
        targets=np.array(targets, dtype=np.float32).reshape(-1, 4),
        splits=np.array([it.split for it in kept], dtype=object).astype(str),
        fingerprint=_fingerprint(kept),
    )


def gray_normalization(images: np.ndarray) -> pp.Normalization:
    """Mean and std of the training images (one gray channel, so equal for the three channels)."""
    if len(images) == 0:
        return pp.Normalization()
    total = total_sq = 0.0
    count = 0
    for img in images:  # per image: no float64 copy of the whole set
        f = img.astype(np.float64) / 255.0
        total += float(f.sum())
        total_sq += float((f * f).sum())
        count += f.size
    mean = total / count
    std = max(math.sqrt(max(total_sq / count - mean * mean, 1e-12)), 1e-3)
    return pp.Normalization((mean, mean, mean), (std, std, std), "training split")


def _to_tensor(gray_sq: np.ndarray, norm: pp.Normalization) -> np.ndarray:
    """One stored gray square -> the normalized (3, S, S) model input (== pp.preprocess on the node)."""
    return pp.normalize(np.repeat(gray_sq[:, :, None], 3, axis=2), norm)


def tensors(images: np.ndarray, norm: pp.Normalization) -> np.ndarray:
    if len(images) == 0:
        s = images.shape[1] if images.ndim == 3 else 0
        return np.zeros((0, 3, s, s), np.float32)
    return np.stack([_to_tensor(img, norm) for img in images])


# --------------------------------------------------------------------------- metrics


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
    pred = [tuple(float(v) for v in b) for b in pred_boxes]
    true = [tuple(float(v) for v in b) for b in true_boxes]
    if len(pred) != len(true):
        raise ValueError(f"{len(pred)} predicted boxes for {len(true)} annotated ones")
    shp = [None] * len(true) if shapes is None else [tuple(int(v) for v in s) for s in shapes]
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


# --------------------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class RoiAugment:
    """Box-consistent augmentation of the letterboxed gray square (training only)."""

    hflip: float = 0.5
    scale: tuple[float, float] = (0.85, 1.15)
    shift: float = 0.08  # max shift, share of the side (kept smaller where the box would leave the image)
    gain: tuple[float, float] = (0.8, 1.2)
    gamma: tuple[float, float] = (0.7, 1.4)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


NO_AUGMENT = RoiAugment(0.0, (1.0, 1.0), 0.0, (1.0, 1.0), (1.0, 1.0))
AUGMENT_PRESETS: dict[str, RoiAugment] = {
    "study": RoiAugment(),  # --augment names shared with the classifiers; the study's flips/rotations
    "light": RoiAugment(0.5, (0.92, 1.08), 0.04, (0.9, 1.1), (0.85, 1.2)),  # would break the box
    "none": NO_AUGMENT,
}


def augment_roi(
    img: np.ndarray, box: np.ndarray, rng: np.random.Generator, cfg: RoiAugment
) -> tuple[np.ndarray, np.ndarray]:
    """Augment a uint8 (S, S) gray square and its normalized box (x0, y0, x1, y1) together."""
    import cv2

    out = img
    b = np.asarray(box, dtype=np.float64).copy()
    size = img.shape[0]
    if cfg.hflip and rng.random() < cfg.hflip:
        out = out[:, ::-1]
        b = np.array([1.0 - b[2], b[1], 1.0 - b[0], b[3]])
    lo, hi = cfg.scale
    s = float(rng.uniform(lo, hi)) if hi > lo else float(lo)
    if s != 1.0 or cfg.shift > 0:
        t = np.zeros(2)
        for axis, (a0, a1) in enumerate(((b[0], b[2]), (b[1], b[3]))):
            # u' = s * u + t keeps the box inside [0, 1] for t in [-s * a0, 1 - s * a1]
            t_lo, t_hi = -s * a0, 1.0 - s * a1
            centre = (1.0 - s) / 2.0
            want = centre + float(rng.uniform(-cfg.shift, cfg.shift)) if cfg.shift > 0 else centre
            t[axis] = min(max(want, t_lo), t_hi) if t_lo <= t_hi else centre
        # cv2 puts pixel centres on integers; the box uses pixel edges: shift by 0.5 (1 - s)
        m = np.array([[s, 0.0, t[0] * size - 0.5 * (1 - s)], [0.0, s, t[1] * size - 0.5 * (1 - s)]])
        out = cv2.warpAffine(
            np.ascontiguousarray(out),
            m,
            (size, size),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )
        b = np.array([s * b[0] + t[0], s * b[1] + t[1], s * b[2] + t[0], s * b[3] + t[1]])
    g_lo, g_hi = cfg.gain
    y_lo, y_hi = cfg.gamma
    if g_hi > g_lo or y_hi > y_lo:
        gain = float(rng.uniform(g_lo, g_hi)) if g_hi > g_lo else g_lo
        gamma = float(rng.uniform(y_lo, y_hi)) if y_hi > y_lo else y_lo
        lut = np.clip(np.rint(255.0 * gain * (np.arange(256) / 255.0) ** gamma), 0, 255).astype(np.uint8)
        out = cv2.LUT(np.ascontiguousarray(out), lut)
    return np.ascontiguousarray(out), b.astype(np.float32)


class RoiDataset(Dataset):
    """Stored gray squares -> (normalized tensor, normalized box), with optional augmentation."""

    def __init__(
        self,
        images: np.ndarray,
        targets: np.ndarray,
        norm: pp.Normalization,
        aug: RoiAugment | None = None,
        seed: int = 0,
    ) -> None:
        self.images = images
        self.targets = np.asarray(targets, dtype=np.float32)
        self.norm = norm
        self.aug = aug
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, box = self.images[i], self.targets[i]
        if self.aug is not None and self.aug != NO_AUGMENT:
            img, box = augment_roi(img, box, np.random.default_rng((self.seed, self.epoch, i)), self.aug)
        return torch.from_numpy(_to_tensor(img, self.norm)), torch.from_numpy(np.asarray(box, np.float32))


# --------------------------------------------------------------------------- model


class BoxRegressor(nn.Module):
    """ResNet18 -> normalized box (x0, y0, x1, y1) relative to the letterboxed input, shape (N, 4).

    Integral regression: a light FPN (layer4, upsampled by a stride-2 transposed convolution,
    added to layer3: stride 16) gives one logit map per box edge; each edge is the expected
    coordinate under the softmax of its map (the grid's first and last cell centres mapped to
    0 and 1), so x0 <= x1 and y0 <= y1 after ordering. Input sizes must be multiples of 32.
    This module is what is exported (input ``image``, output ``box``)."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import resnet18

        self.backbone = resnet18(weights=None)
        self.backbone.fc = nn.Identity()  # unused: the head reads layer3 and layer4
        self.lateral = nn.Conv2d(256, 128, 1)
        self.top = nn.ConvTranspose2d(512, 128, 2, stride=2)
        self.edges = nn.Sequential(
            nn.Conv2d(128, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(inplace=True), nn.Conv2d(128, 4, 1)
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(image))))
        c3 = b.layer3(b.layer2(b.layer1(x)))
        c4 = b.layer4(c3)
        # input sizes are multiples of 32, so layer4 is exactly half of layer3; a transposed convolution
        # upsamples it (an ONNX Resize would defeat the int8 quantizer's symbolic shape inference)
        f = self.lateral(c3) + self.top(c4)
        logits = self.edges(f)  # (N, 4, H, W): left, right, top, bottom
        h, w = logits.shape[-2:]
        gx = (
            torch.linspace(0.0, 1.0, w, device=logits.device, dtype=logits.dtype)
            if w > 1
            else torch.full((1,), 0.5, device=logits.device, dtype=logits.dtype)
        )
        gy = (
            torch.linspace(0.0, 1.0, h, device=logits.device, dtype=logits.dtype)
            if h > 1
            else torch.full((1,), 0.5, device=logits.device, dtype=logits.dtype)
        )
        # per edge a softmax over the whole map, then its marginal along the edge's axis
        # (no ReduceLogSumExp: the int8 quantizer's shape inference does not know it)
        p = torch.softmax(logits.reshape(-1, 4, h * w), dim=-1).reshape(-1, 4, h, w)
        px = p[:, 0:2].sum(dim=2)  # (N, 2, W): x marginals of the left and right edges
        py = p[:, 2:4].sum(dim=3)  # (N, 2, H): y marginals of the top and bottom edges
        xs = (px * gx).sum(-1)
        ys = (py * gy).sum(-1)
        x0, x1 = torch.minimum(xs[:, 0], xs[:, 1]), torch.maximum(xs[:, 0], xs[:, 1])
        y0, y1 = torch.minimum(ys[:, 0], ys[:, 1]), torch.maximum(ys[:, 0], ys[:, 1])
        return torch.stack([x0, y0, x1, y1], dim=1)


def load_pretrained_resnet18(model: BoxRegressor, path: Path | None) -> dict[str, Any]:
    """A local torchvision ResNet18 ImageNet state dict into the backbone (fc skipped); never downloads."""
    return asdict(load_pretrained(model.backbone, path, arch="ResNet18"))


def _giou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Generalized IoU per row of two (N, 4) x0y0x1y1 tensors."""
    area_p = (pred[:, 2] - pred[:, 0]).clamp(min=0) * (pred[:, 3] - pred[:, 1]).clamp(min=0)
    area_t = (target[:, 2] - target[:, 0]).clamp(min=0) * (target[:, 3] - target[:, 1]).clamp(min=0)
    lt = torch.maximum(pred[:, :2], target[:, :2])
    rb = torch.minimum(pred[:, 2:], target[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    union = area_p + area_t - inter
    iou_ = inter / union.clamp(min=1e-7)
    lt_c = torch.minimum(pred[:, :2], target[:, :2])
    rb_c = torch.maximum(pred[:, 2:], target[:, 2:])
    hull = (rb_c - lt_c).clamp(min=0).prod(dim=1)
    return iou_ - (hull - union) / hull.clamp(min=1e-7)


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class RoiTrainConfig:
    epochs: int = 30
    batch_size: int = DEFAULT_BATCH
    lr: float = 1e-3
    min_lr_fraction: float = 0.01  # cosine schedule from lr down to lr * this
    l1_weight: float = 5.0
    l1_beta: float = 0.02
    giou_weight: float = 2.0
    patience: int = 8
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RoiTrainResult:
    best_epoch: int
    best_val_mean_iou: float
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"


@torch.no_grad()
def predict_normalized(
    model: nn.Module,
    images: np.ndarray,
    norm: pp.Normalization,
    device: torch.device,
    batch_size: int = 32,
    progress: bool = False,
) -> np.ndarray:
    """Normalized boxes (N, 4) for stored gray squares (no augmentation)."""
    model.eval()
    out = []
    for i in tqdm(
        range(0, len(images), batch_size),
        desc="predict",
        unit="batch",
        disable=not progress,
        leave=False,
        mininterval=_TQDM_INTERVAL,
    ):
        x = torch.from_numpy(tensors(images[i : i + batch_size], norm)).to(device)
        out.append(model(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 4), np.float32)


def to_source(outputs: np.ndarray, shapes: np.ndarray, rcp: pp.Recipe) -> list[pp.Box]:
    return [box_from_output(o, tuple(s), rcp) for o, s in zip(outputs, shapes)]


def train_roi(
    model: BoxRegressor,
    train_ds: RoiDataset,
    val_images: np.ndarray,
    val_shapes: np.ndarray,
    val_boxes: np.ndarray,
    rcp: pp.Recipe,
    cfg: RoiTrainConfig,
    work_dir: Path,
    device: torch.device,
    resume: bool = True,
    progress: bool = True,
) -> RoiTrainResult:
    """Train with early stopping on validation mean IoU (in source pixels).

    ``work_dir/last.pt`` holds everything needed to resume; ``best.pt`` the best weights."""
    work_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=max(1, cfg.epochs), eta_min=cfg.lr * cfg.min_lr_fraction
    )
    start_epoch, best, best_epoch, history, bad_epochs = 0, -math.inf, -1, [], 0
    last_path, best_path = work_dir / "last.pt", work_dir / "best.pt"
    if resume and last_path.is_file():
        state = torch.load(last_path, map_location=device, weights_only=False)
        if state.get("config") == cfg.to_dict():
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            start_epoch, best, best_epoch = state["epoch"] + 1, state["best"], state["best_epoch"]
            history, bad_epochs = state["history"], state["bad_epochs"]
            log.info("training_resumed", epoch=start_epoch, best_val_mean_iou=best)
        else:
            log.warning("checkpoint_ignored", reason="training configuration changed", file=str(last_path))
    t0 = time.perf_counter()
    stopped = False
    for epoch in range(start_epoch, cfg.epochs):
        if bad_epochs >= cfg.patience:
            stopped = True
            break
        model.train()
        train_ds.epoch = epoch
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        loader = DataLoader(
            train_ds,
            batch_size=cfg.batch_size,
            shuffle=True,
            generator=gen,
            num_workers=0,
            drop_last=len(train_ds) > cfg.batch_size,
        )
        total = 0.0
        n = 0
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="batch",
            disable=not progress,
            leave=False,
            mininterval=_TQDM_INTERVAL,
        )
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            opt.zero_grad(set_to_none=True)
            pred = model(x)
            giou = _giou(pred, y)
            loss = (
                cfg.l1_weight * nn.functional.smooth_l1_loss(pred, y, beta=cfg.l1_beta)
                + cfg.giou_weight * (1.0 - giou).mean()
            )
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(y)
            n += len(y)
            bar.set_postfix(loss=f"{total / max(n, 1):.4f}")
        sched.step()
        val_pred = to_source(predict_normalized(model, val_images, train_ds.norm, device), val_shapes, rcp)
        val = box_metrics(val_pred, val_boxes, val_shapes)
        val_iou = float(val["mean_iou"]) if val["mean_iou"] is not None else 0.0
        row = {
            "epoch": epoch + 1,
            "train_loss": total / max(n, 1),
            "val_mean_iou": val_iou,
            "val_share_iou_ge_0_7": val["share_iou_ge_0_7"] or 0.0,
            "val_wide_crop_containment": val["wide_crop_containment"] or 0.0,
            "lr": opt.param_groups[0]["lr"],
        }
        history.append(row)
        improved = val_iou > best
        if improved:
            best, best_epoch, bad_epochs = val_iou, epoch + 1, 0
            torch.save(model.state_dict(), best_path)
        else:
            bad_epochs += 1
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "epoch": epoch,
                "best": best,
                "best_epoch": best_epoch,
                "history": history,
                "bad_epochs": bad_epochs,
                "config": cfg.to_dict(),
            },
            last_path,
        )
        msg = (
            f"epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f}, val mean IoU {val_iou:.4f}, "
            f"IoU>=0.7 {row['val_share_iou_ge_0_7']:.3f}"
        )
        if progress:
            tqdm.write(msg + (" (best)" if improved else ""))
        log.info("epoch_done", **row, best=improved)
    if best_path.is_file():
        model.load_state_dict(torch.load(best_path, map_location=device, weights_only=True))
    return RoiTrainResult(
        best_epoch,
        float(best if best > -math.inf else float("nan")),
        len(history),
        stopped,
        history,
        time.perf_counter() - t0,
        str(device),
    )


# --------------------------------------------------------------------------- report


def _examples_figure(
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
        shape = tuple(int(v) for v in shapes[i])
        for box, colour, style in (
            (true[i], "lime", "-"),
            (pred[i], "red", "-"),
            (wide_window(pred[i], shape), "orange", "--"),
        ):
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


def _iou_histogram(path: Path, ious: np.ndarray) -> Path | None:
    if len(ious) == 0:
        return None
    from screener.engine.report import _figure, _save

    fig = _figure((5, 3))
    ax = fig.add_subplot(1, 1, 1)
    ax.hist(ious, bins=np.linspace(0, 1, 41), color="steelblue")
    ax.axvline(IOU_GOOD, color="red", linestyle="--", linewidth=1)
    ax.set_xlabel("IoU (test images)")
    ax.set_ylabel("images")
    return _save(fig, path)


def _fmt(v: Any, digits: int = 3) -> str:
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
        f"- Test mean IoU {_fmt(test.get('mean_iou'))}"
        + (f" (95% bootstrap CI {_fmt(ci[0])} to {_fmt(ci[1])})" if ci else ""),
        "- `wide_crop containment`: share of images whose wide_crop window of the predicted box (grown by "
        f"{_WIDE_NOSQUARE.wide_margin_y} px above and below, {_WIDE_NOSQUARE.wide_margin_x} px left and right, "
        "clipped to the image, before the square step) contains the whole annotated box.",
        "",
        "## Acceptance checks",
        "",
    ]
    for name, c in checks.items():
        lines.append(
            f"- {name}: {_fmt(c.get('value'))} (target {c.get('target')}): "
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


# --------------------------------------------------------------------------- build


def _roots(opts: Any) -> tuple[list[Path], list[Path], list[dict[str, str]]]:
    roots: list[Path] = []
    for r in [opts.data, *(getattr(opts, "extra_data", ()) or ())]:
        p = Path(r)
        if p not in roots:
            roots.append(p)
    lateral, oblique, described = [], [], []
    for r in roots:
        if not r.is_dir():
            raise UserError(f"--data {r}: data folder not found")
        try:
            kind = root_kind(r)
        except DataError as exc:
            raise UserError(str(exc)) from None
        (oblique if kind == "oblique" else lateral).append(r)
        described.append({"name": r.name, "kind": kind})
    return lateral, oblique, described


def _work_dir(out: Path, meta: dict[str, Any]) -> Path:
    """Checkpoint folder; cleared when data or training settings differ from last time."""
    return checkpoint_dir(out / ".work" / "roi", meta)


def _split_counts(data: RoiData) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for s in SPLITS:
        idx = data.index(s)
        views: dict[str, int] = {}
        for i in idx:
            views[data.items[i].view] = views.get(data.items[i].view, 0) + 1
        out[s] = {"n": int(len(idx)), **{f"view_{k}": v for k, v in sorted(views.items())}}
    return out


def _by_view(data: RoiData, idx: np.ndarray, pred: Sequence[pp.Box]) -> dict[str, dict[str, Any]]:
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


def build_roi_engine(opts: Any) -> Path:
    """Build ``<out>/roi`` from ``opts`` (a ``trainer.build.BuildOptions`` with task "roi").

    Data: ``opts.data`` plus ``opts.extra_data`` (if present); a root whose sheet has a
    ``View`` column is read as oblique views, any other as CSXA lateral views. Used
    options: recipe ("" or "roi_input"), image_size (0: the recipe's 256), epochs,
    batch_size (0: 32), pretrained (a ResNet18 state dict), checkpoint, backend,
    split_seed, augment (study | light | none: the ROI presets of the same names), patience,
    validated_by, version, demo, progress, n_boot. The classifier options (balance,
    target_sensitivity, roi_engine) do not apply; ``stn`` is refused.
    """
    if opts.task != "roi":
        raise UserError(f"build_roi_engine builds --task roi, not {opts.task}")
    if opts.backend not in ("onnx", "tensorrt", "all"):
        raise UserError(f"--backend {opts.backend}: expected onnx, tensorrt or all")
    if getattr(opts, "stn", False):
        raise UserError("--stn applies to the classifiers, not to the ROI engine")
    if opts.augment not in AUGMENT_PRESETS:
        raise UserError(f"--augment {opts.augment}: expected one of {', '.join(AUGMENT_PRESETS)}")
    recipe_name = getattr(opts, "recipe", "") or RECIPE_NAME
    if recipe_name in ("original",):  # the pre-task-defaults CLI default: not a choice for the ROI engine
        recipe_name = RECIPE_NAME
    try:
        rcp = pp.recipe(recipe_name, getattr(opts, "image_size", 0) or None)
    except ValueError as exc:
        raise UserError(f"--recipe: {exc}") from None
    if rcp.crop != "full" or rcp.colour != "gray":
        raise UserError(
            f"--recipe {recipe_name}: the ROI engine takes the whole image (crop 'full', gray); use {RECIPE_NAME}"
        )
    if rcp.image_size % 32:
        raise UserError(f"--image-size {rcp.image_size}: the ROI engine needs a multiple of 32 (e.g. 128, 256)")
    t_start = time.perf_counter()
    progress = bool(getattr(opts, "progress", True))
    lateral, oblique, described = _roots(opts)
    spec = SplitSpec(seed=opts.split_seed)
    try:
        items, problems = roi_items_from(lateral, oblique, spec=spec)
    except DataError as exc:
        raise UserError(str(exc)) from None
    if not items:
        raise UserError("no annotated image in " + ", ".join(str(r) for r in lateral + oblique))
    data = prepare_roi_data(items, rcp, problems, progress=progress)
    counts = _split_counts(data)
    for s in SPLITS:
        if counts[s]["n"] == 0:
            raise UserError(
                f"the {s} split has no annotated image ({len(data.items)} in all); "
                "the data set is too small to train and evaluate honestly"
            )
    tr, va, te = data.index("train"), data.index("validation"), data.index("test")

    model = BoxRegressor()
    pre_info = load_pretrained_resnet18(model, getattr(opts, "pretrained", None))
    norm = pp.IMAGENET if getattr(opts, "pretrained", None) else gray_normalization(data.images[tr])
    cfg = RoiTrainConfig(
        epochs=opts.epochs,
        batch_size=getattr(opts, "batch_size", 0) or DEFAULT_BATCH,
        patience=opts.patience,
        seed=opts.split_seed % 10_000,
    )
    aug = AUGMENT_PRESETS[opts.augment]
    device = pick_device()
    training: dict[str, Any] = {
        "config": cfg.to_dict(),
        "augment": opts.augment,
        "augment_params": aug.to_dict(),
        "device": str(device),
        "pretrained": pre_info,
        "loss": f"{cfg.l1_weight} x smooth L1 (beta {cfg.l1_beta}) + {cfg.giou_weight} x (1 - GIoU)",
        "optimizer": "adam, cosine schedule",
        "architecture": "torchvision resnet18 + integral-regression head "
        "(layer4 upsampled onto layer3, one softmax map "
        "per box edge) -> box (x0, y0, x1, y1) normalized to the letterboxed input",
    }
    checkpoint = getattr(opts, "checkpoint", None)
    if checkpoint:
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise UserError(f"--checkpoint {checkpoint}: file not found")
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
        except Exception as exc:  # noqa: BLE001
            raise UserError(
                f"--checkpoint {checkpoint}: not a checkpoint of the ROI model ({exc.__class__.__name__})"
            ) from None
        training["checkpoint"] = {"file": checkpoint.name, "sha256": mf.sha256_file(checkpoint)}
        model.to(device)
    else:
        meta = {
            "fingerprint": data.fingerprint,
            "recipe": rcp.to_dict(),
            "train": cfg.to_dict(),
            "augment": aug.to_dict(),
            "pretrained": str(getattr(opts, "pretrained", None) or ""),
            "split_seed": opts.split_seed,
            "normalization": norm.to_dict(),
        }
        work = _work_dir(Path(opts.out), meta)
        train_ds = RoiDataset(data.images[tr], data.targets[tr], norm, aug, seed=cfg.seed)
        result = train_roi(
            model, train_ds, data.images[va], data.shapes[va], data.boxes[va], rcp, cfg, work, device, progress=progress
        )
        training["result"] = dataclasses.asdict(result)

    out_val = predict_normalized(model, data.images[va], norm, device)
    out_test = predict_normalized(model, data.images[te], norm, device)
    pred_val = to_source(out_val, data.shapes[va], rcp)
    pred_test = to_source(out_test, data.shapes[te], rcp)
    val_m = box_metrics(pred_val, data.boxes[va], data.shapes[va])
    test_m = box_metrics(pred_test, data.boxes[te], data.shapes[te])
    test_ious = per_image_iou(pred_test, data.boxes[te])
    test_m["mean_iou_ci"] = bootstrap_mean_ci(test_ious, int(getattr(opts, "n_boot", 2000)))
    by_view = _by_view(data, te, pred_test)

    out_dir = Path(opts.out)
    building = out_dir / ".roi.building"
    if building.exists():
        shutil.rmtree(building)
    building.mkdir(parents=True)
    model = model.to("cpu").eval()
    backends, backend_metrics = _export_backends(model, building, rcp, opts, data, tr, te, norm, test_m["mean_iou"])
    created = datetime.now(UTC).replace(microsecond=0).isoformat()
    version = getattr(opts, "version", "") or f"{created[:10].replace('-', '.')}+{data.fingerprint[:8]}"
    n_total = len(data.items)
    checks = {
        "mean IoU": {
            "value": test_m["mean_iou"],
            "target": f">= {TARGET_MEAN_IOU}",
            "passed": bool(test_m["mean_iou"] is not None and test_m["mean_iou"] >= TARGET_MEAN_IOU),
            "note": ""
            if n_total >= 2000
            else f"the target is set for synthetic sets of >= 2,000 images; this set has {n_total}",
        },
        "wide_crop containment": {
            "value": test_m["wide_crop_containment"],
            "target": f">= {TARGET_CONTAINMENT}",
            "passed": bool(
                test_m["wide_crop_containment"] is not None and test_m["wide_crop_containment"] >= TARGET_CONTAINMENT
            ),
        },
    }
    data_info = {
        "fingerprint": data.fingerprint,
        "root_name": Path(opts.data).name,
        "roots": described,
        "n_images": n_total,
        "splits": counts,
        "split_seed": opts.split_seed,
        "split_method": "per data set: grouped by patient (consecutive sheet rows with equal gender and age), "
        "stratified by the data set's class label, over the samples its loader returns; "
        "unannotated oblique images are then dropped",
        "problems": problems,
    }
    extra = {
        "task": "roi",
        "engine_version": version,
        "recipe": rcp.to_dict(),
        "data": data_info,
        "backends": backend_metrics,
        "training": training,
        "validated": bool(getattr(opts, "validated_by", "")),
        "demo": bool(getattr(opts, "demo", False)),
    }
    figures = {
        "examples": _examples_figure(
            building / "roi_examples.png", data.images[te], data.shapes[te], data.boxes[te], pred_test, test_ious, rcp
        ),
        "iou_histogram": _iou_histogram(building / "iou_histogram.png", test_ious),
    }
    write_roi_report(
        building,
        f"roi engine {version}: evaluation on the held-out test split",
        test_m,
        val_m,
        by_view,
        checks,
        extra,
        figures,
    )
    notes = []
    if pre_info["source"] == "random-init":
        notes.append("trained from random initialisation (no --pretrained weights)")
    if getattr(opts, "demo", False):
        notes.append("demo engine built from synthetic data: not for clinical use")
    for name, c in checks.items():
        if not c["passed"]:
            notes.append(f"{name} {_fmt(c['value'])} misses the target {c['target']}")
    from screener.engine.report import to_jsonable

    manifest = mf.Manifest(
        task="roi",
        version=version,
        created=created,
        kind="roi",
        input_size=rcp.image_size,
        input_name="image",
        output_name="box",
        preprocessing=rcp,
        normalization=norm,
        class_names=list(CLASS_NAMES),
        threshold=None,
        metrics=to_jsonable(
            {
                "test": test_m,
                "validation": val_m,
                "test_by_view": by_view,
                "checks": checks,
                "backends": backend_metrics,
            }
        ),
        data=to_jsonable(data_info),
        training=to_jsonable(training),
        backends=backends,
        validated=bool(getattr(opts, "validated_by", "")),
        validated_by=getattr(opts, "validated_by", ""),
        demo=bool(getattr(opts, "demo", False)),
        software_version=screener.__version__,
        notes=notes,
    )
    final = mf.install(manifest, building, out_dir)
    log.info(
        "engine_built",
        task="roi",
        version=version,
        folder=str(final),
        test_mean_iou=test_m["mean_iou"],
        seconds=round(time.perf_counter() - t_start, 1),
    )
    return final


def _export_backends(
    model: BoxRegressor,
    folder: Path,
    rcp: pp.Recipe,
    opts: Any,
    data: RoiData,
    tr: np.ndarray,
    te: np.ndarray,
    norm: pp.Normalization,
    torch_mean_iou: float | None,
) -> tuple[list[mf.Backend], dict[str, Any]]:
    """ONNX fp32 + int8 (and TensorRT when asked and possible), each checked against torch."""
    test_t = tensors(data.images[te], norm)
    probe = test_t[: min(16, len(test_t))]
    backends: list[mf.Backend] = []
    info: dict[str, Any] = {"torch_test_mean_iou": torch_mean_iou}

    def mean_iou(outputs: np.ndarray) -> float:
        pred = to_source(outputs, data.shapes[te], rcp)
        return float(box_metrics(pred, data.boxes[te], data.shapes[te])["mean_iou"])

    if opts.backend in ("onnx", "all"):
        fp32 = export.export_onnx(model, folder / "model.onnx", rcp.image_size, output_name="box")
        diff = export.compare_with_torch(model, fp32, probe)
        iou32 = mean_iou(export.onnx_predict(fp32, test_t))
        backends.append(
            export.backend_record(
                "onnx-fp32", fp32, folder, "fp32", max_abs_diff_vs_torch=diff, note=f"test mean IoU {iou32:.4f}"
            )
        )
        calib = tensors(data.images[tr[np.random.default_rng(0).permutation(len(tr))[:64]]], norm)
        int8 = export.quantize_int8(fp32, folder / "model.int8.onnx", calib)
        diff8 = export.compare_with_torch(model, int8, probe)
        iou8 = mean_iou(export.onnx_predict(int8, test_t))
        keep = bool(math.isfinite(iou8) and math.isfinite(iou32) and iou8 >= iou32 - INT8_TOLERANCE)
        note = (
            f"kept: test mean IoU {iou8:.4f} within {INT8_TOLERANCE} of fp32 {iou32:.4f}"
            if keep
            else f"not kept: test mean IoU {iou8:.4f} more than {INT8_TOLERANCE} below fp32 {iou32:.4f}"
        )
        backends.append(
            export.backend_record("onnx-int8", int8, folder, "int8", kept=keep, max_abs_diff_vs_torch=diff8, note=note)
        )
        info.update(
            {
                "onnx_fp32_test_mean_iou": iou32,
                "onnx_fp32_max_abs_diff": diff,
                "onnx_int8_test_mean_iou": iou8,
                "onnx_int8_max_abs_diff": diff8,
                "onnx_int8_kept": keep,
            }
        )
        log.info("onnx_exported", max_abs_diff=diff, int8_mean_iou=iou8, fp32_mean_iou=iou32, int8_kept=keep)
    trt = export.tensorrt_backend(model, folder, rcp.image_size, opts.backend, info)
    if trt is not None:
        backends.append(trt)
    return backends, info
