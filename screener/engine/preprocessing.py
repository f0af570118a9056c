"""The one preprocessing code path shared by the trainer and the node.

Pure functions on numpy arrays. The trainer imports this module; the node runs it
on decoded DICOM pixels. For the same 8-bit gray image, recipe and box both sides
produce the identical tensor (tested).

Pipeline (`preprocess`):

1. ``to_gray8``: any PNG/DICOM-derived array to 8-bit gray. Alpha is dropped,
   colour converted with ITU-R 601 weights, 16-bit data stretched min-max to 0..255
   (8-bit data are left unchanged, as in the study).
2. ``fix_polarity`` (``auto_polarity``): radiographs are stored dark-background.
   An image whose outer border ring is mostly bright (mean > 127) is inverted.
   DICOM MONOCHROME1 is inverted by the node's decoder before this step, so both
   photometric interpretations reach this point identically.
3. Window (``crop``):
   - ``centre``: the study's ``original``: a centred ``centre_size`` (500) square.
     Images smaller than that are *padded* with black, never upscaled here, so the
     anatomy keeps the scale it has in larger images (the study left this open).
   - ``box``: the box of the 23 keypoints (trainer) or of the ROI engine (node).
   - ``wide_box``: that box enlarged by up to ``wide_margin_y`` (200) px above and
     below and ``wide_margin_x`` (100) px left and right, clipped to the image.
   - ``full``: the whole image letterboxed (centred, padded black) to a square: the
     ROI engine's input; its normalized output box maps back through this window.
   With ``square=True`` (default) a box window is grown on its shorter side to a
   square around its centre, so resizing keeps the aspect ratio; the part outside
   the image is padded black. The study resized without saying how; a tall spine
   squeezed to a square would distort disc heights, which are part of the finding.
4. Colour, computed on the real pixels of the window *before* padding (padding
   must not enter the histogram): ``gray`` [g, g, g]; ``gs_eq_inv`` [g, eq, 255-g]
   (the study's variant 1, channel order as listed, RGB); ``gs_inv_eq`` [g, 255-g, eq]
   (variant 2); ``equalize`` [eq, eq, eq] (the stenosis study's HE). ``eq`` is
   global histogram equalization (cv2.equalizeHist), not CLAHE. Crop comes before
   equalization so the histogram is that of the region the model sees.
5. ``mirror`` (right oblique views): horizontal flip to the canonical orientation.
6. Resize to ``image_size`` squared with area interpolation (cv2.INTER_AREA).
7. ``normalize``: /255, then per-channel (x - mean) / std from the engine manifest;
   output float32, channels first (C, H, W).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the original image

CROP_MODES = ("centre", "box", "wide_box", "full")
COLOUR_MODES = ("gray", "gs_eq_inv", "gs_inv_eq", "equalize")


@dataclass(frozen=True)
class Recipe:
    """How an image becomes a model input. Stored verbatim in each engine manifest."""

    name: str
    crop: str = "centre"
    colour: str = "gray"
    image_size: int = 224
    centre_size: int = 500
    wide_margin_y: int = 200
    wide_margin_x: int = 100
    square: bool = True
    auto_polarity: bool = True
    # Views mirrored to the canonical orientation (stenosis: right obliques look like left ones).
    mirror_views: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.crop not in CROP_MODES:
            raise ValueError(f"recipe {self.name}: crop must be one of {CROP_MODES}, got {self.crop!r}")
        if self.colour not in COLOUR_MODES:
            raise ValueError(f"recipe {self.name}: colour must be one of {COLOUR_MODES}, got {self.colour!r}")
        if self.image_size < 16:
            raise ValueError(f"recipe {self.name}: image_size {self.image_size} is too small")

    @property
    def needs_box(self) -> bool:
        return self.crop in ("box", "wide_box")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        d = dict(data)
        d["mirror_views"] = tuple(d.get("mirror_views", ()))
        return cls(**d)

    def mirrors(self, view: str | None) -> bool:
        """Whether an image of this view (laterality 'L'/'R') is mirrored before the model."""
        return bool(view) and str(view).upper() in self.mirror_views


# The study's Table 1 conditions (spondylosis), plus the stenosis study's ROI + HE.
RECIPES: dict[str, Recipe] = {
    "original": Recipe("original", crop="centre", colour="gray"),
    "crop": Recipe("crop", crop="box", colour="gray"),
    "wide_crop": Recipe("wide_crop", crop="wide_box", colour="gray"),
    "colour": Recipe("colour", crop="centre", colour="gs_eq_inv"),
    "colour_crop": Recipe("colour_crop", crop="box", colour="gs_eq_inv"),
    "colour_wide_crop": Recipe("colour_wide_crop", crop="wide_box", colour="gs_eq_inv"),
    "roi_he": Recipe("roi_he", crop="box", colour="equalize", image_size=512, mirror_views=("R",)),
    "roi_gray": Recipe("roi_gray", crop="box", colour="gray", image_size=512, mirror_views=("R",)),
    # ROI engine input: the whole image letterboxed to a square; its output box is relative to it.
    "roi_input": Recipe("roi_input", crop="full", colour="gray", image_size=256),
}


def recipe(name: str, image_size: int | None = None) -> Recipe:
    """A named recipe, optionally at another input size."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    base = RECIPES[name]
    if image_size is None or image_size == base.image_size:
        return base
    return dataclasses.replace(base, image_size=image_size)


@dataclass(frozen=True)
class Normalization:
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    source: str = "default"

    def to_dict(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "source": self.source}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalization:
        return cls(tuple(data["mean"]), tuple(data["std"]), data.get("source", ""))


IMAGENET = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "imagenet")


# --------------------------------------------------------------------------- gray


def to_gray8(img: np.ndarray, channel_order: str = "BGR") -> np.ndarray:
    """Any 2-D or H x W x C (C in 1..4) uint8/uint16/float array to 8-bit gray.

    `channel_order` is the order of colour channels (cv2 reads BGR; PIL gives RGB).
    """
    a = np.asarray(img)
    if a.ndim == 3:
        c = a.shape[2]
        if c == 1:
            a = a[:, :, 0]
        elif c == 2:  # gray + alpha
            a = a[:, :, 0]
        elif c in (3, 4):
            rgb = a[:, :, :3].astype(np.float64)
            if channel_order.upper() == "BGR":
                b, g, r = rgb[:, :, 0], rgb[:, :, 1], rgb[:, :, 2]
            else:
                r, g, b = rgb[:, :, 0], rgb[:, :, 1], rgb[:, :, 2]
            gray = 0.299 * r + 0.587 * g + 0.114 * b
            if a.dtype == np.uint8:
                return np.clip(np.rint(gray), 0, 255).astype(np.uint8)
            return stretch_to_gray8(gray)
        else:
            raise ValueError(f"unsupported channel count {c}")
    elif a.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {a.shape}")
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    return stretch_to_gray8(a)


def stretch_to_gray8(a: np.ndarray) -> np.ndarray:
    """Linear min-max stretch of any numeric array to uint8 (constant images give 0)."""
    f = a.astype(np.float64)
    lo, hi = float(f.min()), float(f.max())
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.clip(np.rint((f - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def border_mean(gray: np.ndarray, frac: float = 0.05) -> float:
    h, w = gray.shape
    bh, bw = max(1, int(h * frac)), max(1, int(w * frac))
    ring = np.concatenate([gray[:bh].ravel(), gray[-bh:].ravel(), gray[:, :bw].ravel(), gray[:, -bw:].ravel()])
    return float(ring.mean())


def fix_polarity(gray: np.ndarray) -> tuple[np.ndarray, bool]:
    """Invert an image stored with a bright background. Returns (image, inverted)."""
    if border_mean(gray) > 127.0:
        return (255 - gray).astype(np.uint8), True
    return gray, False


# --------------------------------------------------------------------------- window


def keypoint_box(points: np.ndarray) -> Box:
    """Bounding box (x0, y0, x1, y1) of N x 2 points."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(p) == 0:
        raise ValueError("no points for a box")
    return (float(p[:, 0].min()), float(p[:, 1].min()), float(p[:, 0].max()), float(p[:, 1].max()))


def clip_box(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """Integer box clipped to the image; never empty, never negative."""
    x0, y0, x1, y1 = box
    ix0 = int(np.clip(np.floor(min(x0, x1)), 0, width - 1))
    iy0 = int(np.clip(np.floor(min(y0, y1)), 0, height - 1))
    ix1 = int(np.clip(np.ceil(max(x0, x1)), ix0 + 1, width))
    iy1 = int(np.clip(np.ceil(max(y0, y1)), iy0 + 1, height))
    return ix0, iy0, ix1, iy1


def window(shape: tuple[int, int], rcp: Recipe, box: Box | None) -> tuple[int, int, int, int]:
    """The window (x0, y0, x1, y1) the model sees; may extend past the image (padded)."""
    h, w = shape
    if rcp.crop == "centre":
        s = rcp.centre_size
        x0, y0 = (w - s) // 2, (h - s) // 2
        return x0, y0, x0 + s, y0 + s
    if rcp.crop == "full":  # the whole image, letterboxed to a square (ROI engine input)
        s = max(h, w)
        x0, y0 = (w - s) // 2, (h - s) // 2
        return x0, y0, x0 + s, y0 + s
    if box is None:
        raise ValueError(f"recipe {rcp.name} needs a box (keypoints or ROI engine)")
    bx0, by0, bx1, by1 = box
    if rcp.crop == "wide_box":
        bx0, bx1 = bx0 - rcp.wide_margin_x, bx1 + rcp.wide_margin_x
        by0, by1 = by0 - rcp.wide_margin_y, by1 + rcp.wide_margin_y
    x0, y0, x1, y1 = clip_box((bx0, by0, bx1, by1), w, h)
    if rcp.square:
        side = max(x1 - x0, y1 - y0)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        x0, y0 = cx - side // 2, cy - side // 2
        x1, y1 = x0 + side, y0 + side
    return x0, y0, x1, y1


def _pad_to_window(
    region: np.ndarray, win: tuple[int, int, int, int], shape: tuple[int, int], value: int
) -> np.ndarray:
    h, w = shape
    x0, y0, x1, y1 = win
    top, left = max(0, -y0), max(0, -x0)
    bottom, right = max(0, y1 - h), max(0, x1 - w)
    if top == bottom == left == right == 0:
        return region
    return cv2.copyMakeBorder(region, top, bottom, left, right, cv2.BORDER_CONSTANT, value=value)


def colour_channels(gray: np.ndarray, mode: str) -> list[tuple[np.ndarray, int]]:
    """The channels of a colour mode as (image, padding value) pairs."""
    if mode == "gray":
        return [(gray, 0)] * 3
    eq = cv2.equalizeHist(gray)
    inv = (255 - gray).astype(np.uint8)
    if mode == "gs_eq_inv":
        return [(gray, 0), (eq, 0), (inv, 255)]
    if mode == "gs_inv_eq":
        return [(gray, 0), (inv, 255), (eq, 0)]
    if mode == "equalize":
        return [(eq, 0)] * 3
    raise ValueError(f"unknown colour mode {mode!r}")


def prepare(gray: np.ndarray, rcp: Recipe, box: Box | None = None, mirror: bool = False) -> np.ndarray:
    """8-bit gray image -> uint8 H x W x 3 (RGB order) at the recipe's size, before normalization."""
    if gray.dtype != np.uint8 or gray.ndim != 2:
        raise ValueError("prepare expects a 2-D uint8 image; use to_gray8 first")
    if rcp.auto_polarity:
        gray, _ = fix_polarity(gray)
    h, w = gray.shape
    win = window((h, w), rcp, box)
    x0, y0, x1, y1 = win
    real = gray[max(0, y0) : min(h, y1), max(0, x0) : min(w, x1)]
    return _finish(real, win, (h, w), rcp, mirror)


def _finish(
    real: np.ndarray, win: tuple[int, int, int, int], shape: tuple[int, int], rcp: Recipe, mirror: bool
) -> np.ndarray:
    """`prepare` after the crop: colour, padding, mirror, resize (uint8 S x S x 3)."""
    h, w = shape
    if real.size == 0:
        raise ValueError(f"empty crop window {win} for image {w}x{h}")
    chans = colour_channels(real, rcp.colour)
    if all(ch is chans[0][0] and val == chans[0][1] for ch, val in chans):
        # Three identical channels (gray, equalize): pad, mirror and resize one, then stack it.
        # cv2.resize treats channels independently, so this is the 3-channel result (tested).
        chans = chans[:1]
    img = np.dstack([_pad_to_window(ch, win, (h, w), val) for ch, val in chans])
    if mirror:
        img = img[:, ::-1]
    size = rcp.image_size
    interp = cv2.INTER_AREA if img.shape[0] >= size and img.shape[1] >= size else cv2.INTER_LINEAR
    out = cv2.resize(np.ascontiguousarray(img), (size, size), interpolation=interp)
    if out.ndim == 2:
        out = np.dstack([out, out, out])
    return np.ascontiguousarray(out)


def prepare_indexed(
    raw: np.ndarray, lut: np.ndarray, rcp: Recipe, box: Box | None = None, mirror: bool = False
) -> np.ndarray:
    """``prepare(lut[raw], rcp, box, mirror)`` without mapping the whole frame (exact, tested).

    `raw` is a 2-D array of non-negative integers (stored pixel values), `lut` a uint8
    table indexed by them (the decoder's 12-to-8-bit window as a lookup table). Only the
    pixels ``prepare`` reads are mapped: the border ring for the polarity test and the
    crop window; for a 500 px centre crop of a 2048 px frame that is a fifth of the pixels.
    The ``full`` crop (the ROI input) reads every pixel and maps the whole frame."""
    if lut.dtype != np.uint8 or raw.ndim != 2:
        raise ValueError("prepare_indexed expects a 2-D index array and a uint8 lookup table")
    if rcp.crop == "full":
        return prepare(lut[raw], rcp, box, mirror)
    h, w = raw.shape
    if rcp.auto_polarity:
        # border_mean on the mapped ring: the same values in the same order, so the same mean.
        bh, bw = max(1, int(h * 0.05)), max(1, int(w * 0.05))
        # The mean of uint8 values is an exact integer sum divided by the count (every float64
        # partial sum is an integer below 2**53), so the parts can be summed separately.
        # np.take(mode="clip") is lut[index] without the bounds check (the table covers every value).
        parts = (raw[:bh], raw[-bh:], raw[:, :bw], raw[:, -bw:])
        total = sum(int(np.take(lut, part, mode="clip").sum(dtype=np.int64)) for part in parts)
        if total / sum(part.size for part in parts) > 127.0:  # fix_polarity: 255 - gray, folded into the table
            lut = (255 - lut).astype(np.uint8)
    win = window((h, w), rcp, box)
    x0, y0, x1, y1 = win
    real = np.take(lut, raw[max(0, y0) : min(h, y1), max(0, x0) : min(w, x1)], mode="clip")
    return _finish(real, win, (h, w), rcp, mirror)


def normalize(img: np.ndarray, norm: Normalization) -> np.ndarray:
    """uint8 H x W x 3 -> float32 3 x H x W, (x/255 - mean) / std per channel."""
    f = img.astype(np.float32) / np.float32(255.0)
    mean = np.asarray(norm.mean, dtype=np.float32)
    std = np.asarray(norm.std, dtype=np.float32)
    f = (f - mean) / std
    return np.ascontiguousarray(f.transpose(2, 0, 1))


def normalize_batch(images: list[np.ndarray] | np.ndarray, norm: Normalization) -> np.ndarray:
    """uint8 N x H x W x 3 -> float32 N x 3 x H x W: ``normalize`` of each image, in one pass.

    The same float32 operations in the same order per element, so the result is
    bit-identical to ``np.stack([normalize(img, norm) for img in images])`` (tested). A uint8
    input has 256 values per channel: they are normalized once into a table and every pixel
    is looked up, written straight into the channels-first layout (one pass instead of four).
    """
    a = np.asarray(images) if not isinstance(images, np.ndarray) else images
    mean = np.asarray(norm.mean, dtype=np.float32)
    std = np.asarray(norm.std, dtype=np.float32)
    if a.dtype == np.uint8 and a.ndim == 4 and a.shape[-1] == 3:
        table = (np.arange(256, dtype=np.float32) / np.float32(255.0))[:, None] - mean
        table /= std  # 256 x 3: the same operations as below, per value
        out = np.empty((a.shape[0], 3, a.shape[1], a.shape[2]), np.float32)
        for c in range(3):
            np.take(table[:, c], a[..., c], out=out[:, c], mode="clip")
        return out
    f = a.astype(np.float32) / np.float32(255.0)
    f -= mean
    f /= std
    return np.ascontiguousarray(f.transpose(0, 3, 1, 2))


def preprocess(
    gray: np.ndarray, rcp: Recipe, norm: Normalization, box: Box | None = None, mirror: bool = False
) -> np.ndarray:
    """The full path: 8-bit gray -> normalized float32 C x H x W model input."""
    return normalize(prepare(gray, rcp, box, mirror), norm)


def channel_stats(images: list[np.ndarray] | Any) -> Normalization:
    """Per-channel mean/std over uint8 H x W x 3 images (the study's dataset normalization).

    Accumulates sums and squared sums (the study's online approach)."""
    total = np.zeros(3, np.float64)
    total_sq = np.zeros(3, np.float64)
    count = 0
    for img in images:
        f = img.reshape(-1, 3).astype(np.float64) / 255.0
        total += f.sum(0)
        total_sq += (f * f).sum(0)
        count += f.shape[0]
    if count == 0:
        return Normalization()
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 1e-12))
    std = np.maximum(std, 1e-3)
    return Normalization(tuple(float(m) for m in mean), tuple(float(s) for s in std), "training split")  # type: ignore[arg-type]


def read_image(path: str) -> np.ndarray:
    """Decode a PNG/JPEG file as stored (any mode, 8 or 16 bit, BGR order); ValueError if unreadable."""
    data = np.fromfile(path, dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None:
        raise ValueError(f"{path}: corrupt or unreadable image")
    return img


def read_image_gray8(path: str) -> np.ndarray:
    """Read a PNG/JPEG file as 8-bit gray (the trainer's path to `prepare`)."""
    return to_gray8(read_image(path), "BGR")


# --------------------------------------------------------------------------- physical scale
#
# The recipes' pixel counts (centre_size 500, wide margins 200/100 px) mean what they meant in
# training only at the training images' scale. An engine manifest records that scale
# (`PixelScale`: the median height of the training images in pixels and, where known or given at
# build time, their mm per pixel). Before the recipe the node resamples each image to it
# (`to_training_scale`): by mm per pixel when both the manifest and the image (Pixel Spacing,
# else Imager Pixel Spacing) know it, else by image height. Within `SCALE_TOLERANCE` of 1 the
# image is left untouched (no resampling at all), so images already at the training scale give
# the trainer's tensor bit for bit. Manifests without a scale (older engines): no resampling.

SCALE_TOLERANCE = 0.02


@dataclass(frozen=True)
class PixelScale:
    median_height_px: float
    mm_per_pixel: float | None = None  # None: unknown
    source: str = ""  # how it was obtained (e.g. "training images; mm per pixel given at build time")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PixelScale:
        mm = data.get("mm_per_pixel")
        scale = cls(float(data["median_height_px"]), float(mm) if mm else None, str(data.get("source", "")))
        if not scale.median_height_px > 0 or (scale.mm_per_pixel is not None and not scale.mm_per_pixel > 0):
            raise ValueError("pixel_scale: median_height_px and mm_per_pixel must be positive")
        return scale


def pixel_scale_of(heights: list[int] | Any, mm_per_pixel: float | None = None, source: str = "") -> PixelScale:
    """The training scale from the training images' heights (px) and an optional mm per pixel."""
    h = np.asarray(list(heights), dtype=np.float64)
    if h.size == 0:
        raise ValueError("no image heights to measure the training scale")
    return PixelScale(float(np.median(h)), float(mm_per_pixel) if mm_per_pixel else None, source)


def scale_factor(height_px: int, spacing_mm: float | None, scale: PixelScale | None) -> float:
    """How much to resize an image (new size = size x factor) to bring it to `scale`; 1.0 means
    leave it as it is (no scale recorded, or within `SCALE_TOLERANCE`)."""
    if scale is None or height_px < 1:
        return 1.0
    if scale.mm_per_pixel and spacing_mm and spacing_mm > 0:
        factor = spacing_mm / scale.mm_per_pixel
    else:
        factor = scale.median_height_px / float(height_px)
    return 1.0 if abs(factor - 1.0) <= SCALE_TOLERANCE else factor


def to_training_scale(
    gray: np.ndarray, box: Box | None, scale: PixelScale | None, spacing_mm: float | None = None
) -> tuple[np.ndarray, Box | None, float]:
    """(image, box, factor): `gray` and its box (pixels of `gray`) resampled to the engine's training
    scale; the same objects back, untouched, when the factor is 1. Area interpolation shrinking,
    linear enlarging."""
    factor = scale_factor(gray.shape[0], spacing_mm, scale)
    if factor == 1.0:
        return gray, box, 1.0
    h, w = gray.shape[:2]
    nh, nw = max(1, int(round(h * factor))), max(1, int(round(w * factor)))
    interp = cv2.INTER_AREA if factor < 1.0 else cv2.INTER_LINEAR
    out = cv2.resize(np.ascontiguousarray(gray), (nw, nh), interpolation=interp)
    fx, fy = nw / w, nh / h
    new_box = None if box is None else (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
    return out, new_box, factor
