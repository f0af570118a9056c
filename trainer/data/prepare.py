"""From samples to model inputs: reading, the shared preprocessing, caching, datasets."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from screener.engine import preprocessing as pp
from trainer.augment import Augment, augment
from trainer.data.csxa import LoadReport, Sample
from trainer.progress import bar as progress_bar


def image_mode(img: np.ndarray) -> str:
    """A PIL-style name of how the file stored its pixels (for the report)."""
    bits16 = img.dtype == np.uint16
    if img.ndim == 2 or img.shape[2] == 1:
        return "I;16" if bits16 else "L"
    return {2: "LA", 3: "RGB", 4: "RGBA"}.get(img.shape[2], f"{img.shape[2]}ch") + ("-16" if bits16 else "")


def read_gray8(path: Path) -> tuple[np.ndarray, str]:
    """Read any PNG as 8-bit gray; ValueError names the file if it is not a readable image."""
    img = pp.read_image(str(path))
    return pp.to_gray8(img, "BGR"), image_mode(img)


def sample_box(sample: Any) -> pp.Box | None:
    """The annotated box (lateral: the 23 keypoints' box; oblique: the ROI rectangle)."""
    return sample.box


def prepare_samples(
    samples: Sequence[Any], rcp: pp.Recipe, report: LoadReport, progress: bool = True
) -> tuple[list[Any], np.ndarray]:
    """Prepare every sample once (uint8 N x S x S x 3); unreadable images are skipped and reported."""
    kept: list[Sample] = []
    arrays: list[np.ndarray] = []
    modes: Counter[str] = Counter()
    for s in progress_bar(samples, f"preprocess {rcp.name}", "img", progress):
        try:
            gray, mode = read_gray8(s.image_path)
            box = sample_box(s)
            if rcp.needs_box and box is None:
                report.skip(s.image_path, f"recipe {rcp.name} needs keypoints")
                continue
            arrays.append(pp.prepare(gray, rcp, box, mirror=rcp.mirrors(getattr(s, "view", None))))
        except ValueError as exc:
            report.skip(s.image_path, str(exc).replace(str(s.image_path) + ": ", ""))
            continue
        modes[mode] += 1
        kept.append(s)
    report.modes = dict(sorted(modes.items()))
    size = rcp.image_size
    stacked = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)
    return kept, stacked


def fingerprint(samples: Sequence[Any], root: Path) -> str:
    """SHA-256 of the file list (relative path, size), labels and keypoint boxes."""
    h = hashlib.sha256()
    for s in sorted(samples, key=lambda s: s.id):
        rel = s.image_path.relative_to(root) if s.image_path.is_relative_to(root) else s.image_path
        box = s.box
        box_txt = ",".join(f"{v:.1f}" for v in box) if box else "-"
        view = f"|{s.view}" if getattr(s, "view", "") else ""
        h.update(f"{rel}|{s.image_path.stat().st_size}|{s.label}|{box_txt}{view}\n".encode())
    return h.hexdigest()


class StoredImages(Dataset):
    """Images prepared once, normalized per item; the training loop sets `epoch`, so each
    (seed, epoch, item) draws its own reproducible augmentation (`rng`)."""

    def __init__(self, images: np.ndarray, norm: pp.Normalization, seed: int = 0) -> None:
        self.images = images
        self.norm = norm
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.images)

    def rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, self.epoch, i))


class PreparedDataset(StoredImages):
    """Prepared uint8 images -> normalized tensors, with optional augmentation."""

    def __init__(
        self,
        images: np.ndarray,
        labels: Sequence[int] | np.ndarray,
        norm: pp.Normalization,
        aug: Augment | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(images, norm, seed)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.aug = aug

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i]
        if self.aug is not None:
            img = augment(img, self.rng(i), self.aug)
        return torch.from_numpy(pp.normalize(img, self.norm)), int(self.labels[i])
