"""DICOM pixels to the 8-bit gray image the shared preprocessing takes.

`dataset_to_gray8` is the node's only way from a received DICOM image to pixels:

1. Decode the pixel data with pydicom's pixel backend (any transfer syntax for which
   a decoder is installed: native, RLE, JPEG, JPEG-LS, JPEG 2000, ...). pydicom
   masks the bits above Bits Stored and sign-extends signed data. **Multi-frame
   images: only the first frame is decoded and used** (a cervical spine radiograph
   is one frame; a multi-frame object is not what the engines were trained on).
2. Colour (RGB, YBR_*; pydicom converts YBR to RGB): ITU-R 601 luminance via the
   shared `to_gray8`. No modality/VOI transform applies to colour images.
3. Grayscale: Modality LUT (Rescale Slope/Intercept or Modality LUT Sequence,
   `pydicom.pixels.apply_modality_lut`), then VOI, first applicable of:
   VOI LUT Sequence (first LUT, `pydicom.pixels.apply_voi`) ->
   Window Center/Width (first value; VOI LUT Function LINEAR, LINEAR_EXACT or
   SIGMOID, PS3.3 C.11.2.1.2 / C.11.2.1.3) -> min-max of the image.
   An invalid window (width < 1 for LINEAR, <= 0 otherwise, unknown function) or
   an unusable VOI LUT falls through to the next method; the reason is logged.
4. MONOCHROME1 is inverted so that high = bright bone, as in MONOCHROME2.
5. The VOI output, normalized to 0..1 in float64, is scaled to 0..255 and rounded
   with `np.rint`: deterministic for a given input.

Windowing is computed here rather than with `pydicom.pixels.apply_windowing`
(the formulas are the same; a test checks the two agree) so that the MONOCHROME1
inversion is folded into the window function itself: an image stored as
MONOCHROME1 with stored' = M - stored gives bit-identical output to its
MONOCHROME2 original (M = 2**BitsStored - 1) when its window is
center' = M - center for LINEAR_EXACT and SIGMOID, and center' = M - center + 1
for LINEAR (whose (c - 0.5, w - 1) convention makes the exact mirror of a
window one value off; the difference is < 1/(w-1) of the output range).

Any failure becomes `ImageDecodeError` with a short reason for the database,
never a traceback.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut, apply_voi, pixel_array

from screener.engine.preprocessing import to_gray8
from screener.logs import get_logger

log = get_logger(__name__)

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")
SUPPORTED_PHOTOMETRIC = MONOCHROME + COLOUR
VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_REASON_MAX = 200


# The image SOP classes the node receives and screens (cervical spine radiographs).
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SCREENED_SOP_CLASSES = (CR_IMAGE_STORAGE, DX_FOR_PRESENTATION, DX_FOR_PROCESSING)


class ImageDecodeError(Exception):
    """The image cannot be turned into pixels; ``str(exc)`` is a short reason for the DB."""

    @property
    def reason(self) -> str:
        return str(self)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= _REASON_MAX else text[: _REASON_MAX - 3] + "..."


def _first(value: Any) -> float:
    """First value of a possibly multi-valued DS/IS element, as float."""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        if len(value) == 0:
            raise ValueError("empty value")
        value = value[0]
    return float(value)


# --------------------------------------------------------------------------- decode


def _check_header(ds: pydicom.Dataset) -> str:
    if not any(t in ds for t in _PIXEL_TAGS):
        raise ImageDecodeError("no pixel data")
    if "PixelData" not in ds:
        raise ImageDecodeError("float pixel data is not supported (not a radiograph)")
    if ds.PixelData is None or len(ds.PixelData) == 0:
        raise ImageDecodeError("pixel data is empty")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if not photometric:
        raise ImageDecodeError("photometric interpretation missing")
    if photometric not in SUPPORTED_PHOTOMETRIC:
        raise ImageDecodeError(f"unsupported photometric interpretation {photometric}")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise ImageDecodeError("rows/columns missing or invalid") from None
    if rows < 1 or cols < 1:
        raise ImageDecodeError(f"invalid image size {cols}x{rows}")
    return photometric


def _decode_first_frame(ds: pydicom.Dataset) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = pixel_array(ds, index=0)
    except ImageDecodeError:
        raise
    except Exception as exc:  # any decoder failure: corrupt, truncated, no codec
        raise ImageDecodeError(f"pixel data could not be decoded: {_short(exc)}") from None
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise ImageDecodeError(f"unexpected decoded shape {arr.shape}")
    return arr


# --------------------------------------------------------------------------- VOI


def _window(x: np.ndarray, center: float, width: float, function: str, invert: bool) -> np.ndarray:
    """PS3.3 C.11.2.1.2 windowing to 0..1 (float64); `invert` folds in MONOCHROME1.

    Inverting the output (1 - y) of each function is the same as evaluating it on
    the negated distance from the center (with the LINEAR half-value offset
    mirrored), which keeps the floating-point operations identical for an image
    and its exact MONOCHROME1 mirror.
    """
    d = (center - x) if invert else (x - center)
    if function == "LINEAR":
        if width < 1:
            raise ValueError(f"window width {width} < 1 for LINEAR")
        t = ((d - 0.5) if invert else (d + 0.5)) / (width - 1.0) + 0.5
    elif function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"window width {width} <= 0")
        t = d / width + 0.5
    elif function == "SIGMOID":
        if width <= 0:
            raise ValueError(f"window width {width} <= 0")
        with np.errstate(over="ignore"):
            t = 1.0 / (1.0 + np.exp(-4.0 * d / width))
    else:
        raise ValueError(f"unsupported VOI LUT function {function!r}")
    return np.clip(t, 0.0, 1.0)


def _voi_lut(x: np.ndarray, ds: pydicom.Dataset, invert: bool) -> np.ndarray:
    """First item of the VOI LUT Sequence, output normalized to 0..1."""
    item = ds.VOILUTSequence[0]
    desc = [int(v) for v in item.LUTDescriptor]
    if len(desc) != 3 or "LUTData" not in item:
        raise ValueError("VOI LUT descriptor/data missing")
    entries = desc[0] or 65536
    first_map = desc[1]
    bits = desc[2]
    top = float(2**bits - 1)
    # Clip to the mapped range first (pydicom indexes through uint16).
    idx = np.clip(np.rint(x), first_map, first_map + entries - 1).astype(np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = apply_voi(idx, ds, 0).astype(np.int64)
    if invert:
        y = int(top) - y
    return np.clip(y.astype(np.float64) / top, 0.0, 1.0)


def _minmax(x: np.ndarray, invert: bool) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    if not hi > lo:
        return np.zeros(x.shape, np.float64)
    return ((hi - x) if invert else (x - lo)) / (hi - lo)


def _voi(x: np.ndarray, ds: pydicom.Dataset, invert: bool) -> tuple[np.ndarray, str]:
    """Apply the VOI (LUT, window or min-max); returns (0..1 float64, method used)."""
    if ds.get("VOILUTSequence"):
        try:
            return _voi_lut(x, ds, invert), "voi_lut"
        except Exception as exc:
            log.warning("dicom.voi_lut_unusable", reason=_short(exc))
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
        try:
            return _window(x, _first(center), _first(width), function, invert), "window"
        except Exception as exc:
            log.warning("dicom.window_unusable", reason=_short(exc))
    return _minmax(x, invert), "minmax"


# --------------------------------------------------------------------------- public


def dataset_to_gray8(ds: pydicom.Dataset) -> np.ndarray:
    """Decode `ds` to a 2-D uint8 image, high = bright bone (see module doc).

    Raises `ImageDecodeError` (short reason) for missing/corrupt/truncated pixel
    data, a missing decoder or an unsupported photometric interpretation.
    """
    photometric = _check_header(ds)
    arr = _decode_first_frame(ds)

    if photometric in COLOUR or arr.ndim == 3:
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise ImageDecodeError(f"colour image with unexpected shape {arr.shape}")
        try:
            return to_gray8(arr, "RGB")
        except ValueError as exc:
            raise ImageDecodeError(_short(exc)) from None

    invert = photometric == "MONOCHROME1"
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if hi - lo <= _LUT_MAX_RANGE:
            return _via_lut(arr, ds, invert, lo, hi)
    return _to_gray8(arr, ds, invert)


# Integer images (every CR/DX) go through a lookup table: the same float64 pipeline is evaluated
# once per distinct stored value present in the image, then indexed. Every step is elementwise,
# and min-max uses the same present values, so the output is bit-identical to the per-pixel path
# while a 2048 x 2048 12-bit image costs a fraction of the time.
_LUT_MAX_RANGE = 1 << 20


def _to_gray8(arr: np.ndarray, ds: pydicom.Dataset, invert: bool) -> np.ndarray:
    try:
        x = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    except Exception as exc:
        raise ImageDecodeError(f"modality LUT could not be applied: {_short(exc)}") from None
    if not np.isfinite(x).all():
        raise ImageDecodeError("modality LUT gives non-finite values")
    t, _method = _voi(x, ds, invert=invert)
    return np.rint(t * 255.0).astype(np.uint8)


def _via_lut(arr: np.ndarray, ds: pydicom.Dataset, invert: bool, lo: int, hi: int) -> np.ndarray:
    offset = arr.astype(np.int64) - lo
    present = np.flatnonzero(np.bincount(offset.ravel(), minlength=hi - lo + 1))
    values = (present + lo).astype(arr.dtype)
    lut = np.zeros(hi - lo + 1, np.uint8)
    lut[present] = _to_gray8(values, ds, invert)
    return lut[offset]


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = "\\".join(str(v) for v in value)
    return str(value).strip().upper()


def header_attributes(ds: pydicom.Dataset) -> dict[str, str]:
    """Routing-relevant attributes, uppercased, '' when absent. No patient data.

    Keys: Modality, BodyPartExamined, ViewPosition, Laterality (Image Laterality,
    else series Laterality), SeriesDescription, ViewCodeMeaning (first item of the
    View Code Sequence, which DX images often carry instead of View Position),
    SOPClassUID (as is).
    """
    laterality = _text(ds, "ImageLaterality") or _text(ds, "Laterality")
    view_code = ""
    seq = ds.get("ViewCodeSequence")
    if seq:
        view_code = str(seq[0].get("CodeMeaning", "") or "").strip().upper()
    return {
        "Modality": _text(ds, "Modality"),
        "BodyPartExamined": _text(ds, "BodyPartExamined"),
        "ViewPosition": _text(ds, "ViewPosition"),
        "Laterality": laterality,
        "SeriesDescription": _text(ds, "SeriesDescription"),
        "ViewCodeMeaning": view_code,
        "SOPClassUID": str(ds.get("SOPClassUID", "") or ""),
    }
