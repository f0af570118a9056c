"""ROI engine data: annotated boxes from every data set, prepared once, and the training dataset.

Lateral roots (CSXA): the box of the 23 keypoints; oblique roots: the ``cspine`` rectangle.
Each image is decoded and letterboxed once (the shared preprocessing, recipe ``roi_input``) and
stored as one gray channel; augmentation (training only, each keeping the box exact) works on
that gray square.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from screener.engine import preprocessing as pp
from screener.engine.roi import box_to_output
from screener.logs import get_logger
from trainer.data import csxa
from trainer.data.prepare import StoredImages, read_gray8
from trainer.progress import bar as progress_bar
from trainer.splits import SplitSpec, split_groups

log = get_logger(__name__)


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
        samples: Sequence[Any]
        if kind == "lateral":
            samples, report = csxa.load(root, need_keypoints=True)
            boxes = [s.box for s in samples]
            views = ["lateral"] * len(samples)
        else:
            from trainer.data.oblique import load_oblique  # the oblique-view loader (stenosis layout)

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
    if rcp.crop != "full" or rcp.colour != "gray":
        raise ValueError(f"recipe {rcp.name}: the ROI engine needs crop 'full' and colour 'gray'")
    kept: list[RoiItem] = []
    images, shapes, targets = [], [], []
    bad = problems.setdefault("unreadable", []) if problems is not None else []
    for it in progress_bar(items, "preprocess roi_input", "img", progress):
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


def to_tensor(gray_sq: np.ndarray, norm: pp.Normalization) -> np.ndarray:
    """One stored gray square -> the normalized (3, S, S) model input (== pp.preprocess on the node)."""
    return pp.normalize(np.repeat(gray_sq[:, :, None], 3, axis=2), norm)


def tensors(images: np.ndarray, norm: pp.Normalization) -> np.ndarray:
    if len(images) == 0:
        s = images.shape[1] if images.ndim == 3 else 0
        return np.zeros((0, 3, s, s), np.float32)
    return np.stack([to_tensor(img, norm) for img in images])


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


class RoiDataset(StoredImages):
    """Stored gray squares -> (normalized tensor, normalized box), with optional augmentation."""

    def __init__(
        self,
        images: np.ndarray,
        targets: np.ndarray,
        norm: pp.Normalization,
        aug: RoiAugment | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(images, norm, seed)
        self.targets = np.asarray(targets, dtype=np.float32)
        self.aug = aug

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, box = self.images[i], self.targets[i]
        if self.aug is not None and self.aug != NO_AUGMENT:
            img, box = augment_roi(img, box, self.rng(i), self.aug)
        return torch.from_numpy(to_tensor(img, self.norm)), torch.from_numpy(np.asarray(box, np.float32))
