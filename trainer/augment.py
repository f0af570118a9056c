"""Training-time augmentation (never used at inference).

The study's recipe: horizontal and vertical flips with p=0.5 each, then a rotation
by U(-20, 20) degrees followed by one by U(-60, 60) degrees. Configurable: the
node never augments, so augmentation cannot break trainer/node equality.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np


@dataclass(frozen=True)
class Augment:
    hflip: float = 0.5
    vflip: float = 0.5
    rotations: tuple[float, ...] = (20.0, 60.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, Augment] = {
    "study": Augment(0.5, 0.5, (20.0, 60.0)),
    "light": Augment(0.5, 0.0, (10.0,)),
    "none": Augment(0.0, 0.0, ()),
}


def augment(img: np.ndarray, rng: np.random.Generator, cfg: Augment) -> np.ndarray:
    """Flip and rotate an H x W x 3 uint8 image; the border is filled black."""
    out = img
    if cfg.hflip and rng.random() < cfg.hflip:
        out = out[:, ::-1]
    if cfg.vflip and rng.random() < cfg.vflip:
        out = out[::-1]
    angle = sum(float(rng.uniform(-r, r)) for r in cfg.rotations)
    if cfg.rotations and angle != 0.0:
        h, w = out.shape[:2]
        m = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, 1.0)
        out = cv2.warpAffine(
            np.ascontiguousarray(out), m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
        )
    return np.ascontiguousarray(out)
