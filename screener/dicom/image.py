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

import os
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi, pixel_array
from pydicom.uid import UID

from screener.config import LimitSettings
from screener.dicom import jpeg12
from screener.engine.preprocessing import to_gray8
from screener.logs import get_logger

log = get_logger(__name__)
jpeg12.register()  # 12-bit JPEG Extended (.4.51) through GDCM: see screener/dicom/jpeg12.py

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
    """A library exception as a reason: its type and its message scrubbed of anything that could be
    a header value (numbers, names, quoted text), see `screener.errors.scrub_message`."""
    from screener.errors import scrub_message

    text = scrub_message(" ".join(str(exc).split()))
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= _REASON_MAX else text[: _REASON_MAX - 3] + "..."


def _first(value: Any) -> float:
    """First value of a possibly multi-valued DS/IS element, as float."""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        if len(value) == 0:
            raise ValueError("empty value")
        value = value[0]
    return float(value)


# --------------------------------------------------------------------------- decode


def _check_header(ds: pydicom.Dataset, limits: LimitSettings | None = None) -> str:
    if not any(t in ds for t in _PIXEL_TAGS):
        raise ImageDecodeError("no pixel data")
    if "PixelData" not in ds:
        raise ImageDecodeError("float pixel data is not supported (not a radiograph)")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if not photometric:
        raise ImageDecodeError("photometric interpretation missing")
    if photometric not in SUPPORTED_PHOTOMETRIC:
        shown = photometric if photometric in _KNOWN_PHOTOMETRIC else "(not a defined term)"
        raise ImageDecodeError(f"unsupported photometric interpretation {shown}")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise ImageDecodeError("rows/columns missing or invalid") from None
    if rows < 1 or cols < 1:
        raise ImageDecodeError("invalid image size (Rows or Columns is 0)")
    check_limits(ds, limits or LimitSettings())
    if ds.PixelData is None or len(ds.PixelData) == 0:
        raise ImageDecodeError("pixel data is empty")
    check_pixel_length(ds)
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
    except BaseException as exc:  # a Rust decoder's panic (pyo3 PanicException) is a BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        raise ImageDecodeError(f"pixel data could not be decoded: decoder aborted ({type(exc).__name__})") from None
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


def dataset_to_gray8(ds: pydicom.Dataset, limits: LimitSettings | None = None) -> np.ndarray:
    """Decode `ds` to a 2-D uint8 image, high = bright bone (see module doc).

    The header is checked against `limits` (default: `LimitSettings()`) and against the
    encoded pixel data (`check_limits`, `check_pixel_length`) before any decoder runs.
    Raises `ImageDecodeError` (short reason) for missing/corrupt/truncated pixel
    data, a missing decoder or an unsupported photometric interpretation.
    """
    try:
        photometric = _check_header(ds, limits)
    except ImageDecodeError:
        raise
    except Exception as exc:  # a header value pydicom cannot convert (wrong VR, garbage bytes)
        raise ImageDecodeError(f"image header cannot be parsed ({type(exc).__name__})") from None
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
    else series Laterality), SeriesDescription, ProtocolName, ViewCode and
    ViewCodeMeaning (Code Value and Code Meaning of the first item of the View Code
    Sequence, which DX images often carry instead of View Position), SOPClassUID (as is).
    """
    laterality = _text(ds, "ImageLaterality") or _text(ds, "Laterality")
    view_code = view_meaning = ""
    try:
        seq = ds.get("ViewCodeSequence")
        if seq:
            view_code = str(seq[0].get("CodeValue", "") or "").strip().upper()
            view_meaning = str(seq[0].get("CodeMeaning", "") or "").strip().upper()
    except Exception:  # a malformed sequence routes like an absent one
        view_code = view_meaning = ""
    return {
        "Modality": _text(ds, "Modality"),
        "BodyPartExamined": _text(ds, "BodyPartExamined"),
        "ViewPosition": _text(ds, "ViewPosition"),
        "Laterality": laterality,
        "SeriesDescription": _text(ds, "SeriesDescription"),
        "ProtocolName": _text(ds, "ProtocolName"),
        "ViewCode": view_code,
        "ViewCodeMeaning": view_meaning,
        "SOPClassUID": str(ds.get("SOPClassUID", "") or ""),
    }


# --------------------------------------------------------------------------- limits, reading
#
# Everything here runs before any decoder: a header that declares more than the limits allow, or
# that disagrees with its own encoded pixel data (the cause of decoder aborts and gigabyte
# allocations), fails the image with a reason. Reasons name the attribute by keyword and never
# quote a header value (a value can be patient data); numbers quoted are our own limits.

_KNOWN_PHOTOMETRIC = SUPPORTED_PHOTOMETRIC + ("PALETTE COLOR", "ARGB", "CMYK", "HSV", "YBR_FULL_420", "XYB")
_JPEG_SYNTAXES = {
    "1.2.840.10008.1.2.4.50": "JPEG",
    "1.2.840.10008.1.2.4.51": "JPEG",
    "1.2.840.10008.1.2.4.57": "JPEG",
    "1.2.840.10008.1.2.4.70": "JPEG",
    "1.2.840.10008.1.2.4.80": "JPEG-LS",
    "1.2.840.10008.1.2.4.81": "JPEG-LS",
}
_J2K_SYNTAXES = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}
_RLE_SYNTAX = "1.2.840.10008.1.2.5"
_ITEM = 0xE000FFFE  # (FFFE,E000) read as a little-endian uint32
_SEQ_DELIMITER = 0xE0DDFFFE


def _int_attr(ds: pydicom.Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    try:
        if value is None or value == "":
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        if default is not None and value in (None, ""):
            return default
        raise ImageDecodeError(f"{keyword} missing or invalid") from None


def check_limits(ds: pydicom.Dataset, limits: LimitSettings) -> None:
    """Raise `ImageDecodeError` when the header declares more than `limits` allow or is inconsistent:
    Rows, Columns, NumberOfFrames, SamplesPerPixel, BitsAllocated, BitsStored, PixelRepresentation,
    and SamplesPerPixel against PhotometricInterpretation."""
    rows, cols = _int_attr(ds, "Rows"), _int_attr(ds, "Columns")
    if rows > limits.max_rows:
        raise ImageDecodeError(f"Rows exceeds the limit of {limits.max_rows}")
    if cols > limits.max_columns:
        raise ImageDecodeError(f"Columns exceeds the limit of {limits.max_columns}")
    frames = _int_attr(ds, "NumberOfFrames", 1)
    if frames < 1:
        raise ImageDecodeError("NumberOfFrames missing or invalid")
    if frames > limits.max_frames:
        raise ImageDecodeError(f"NumberOfFrames exceeds the limit of {limits.max_frames}")
    samples = _int_attr(ds, "SamplesPerPixel")
    if samples not in (1, 3):
        raise ImageDecodeError("SamplesPerPixel is neither 1 nor 3")
    if samples > limits.max_samples_per_pixel:
        raise ImageDecodeError(f"SamplesPerPixel exceeds the limit of {limits.max_samples_per_pixel}")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if (photometric in MONOCHROME) != (samples == 1):
        raise ImageDecodeError("SamplesPerPixel does not match PhotometricInterpretation")
    allocated = _int_attr(ds, "BitsAllocated")
    if allocated not in (8, 16, 32):
        raise ImageDecodeError("BitsAllocated is not 8, 16 or 32")
    if allocated > limits.max_bits_allocated:
        raise ImageDecodeError(f"BitsAllocated exceeds the limit of {limits.max_bits_allocated}")
    if samples > 1 and allocated != 8:
        raise ImageDecodeError("BitsAllocated must be 8 for colour images")
    stored = _int_attr(ds, "BitsStored", allocated)
    if not 1 <= stored <= allocated:
        raise ImageDecodeError("BitsStored does not fit BitsAllocated")
    if _int_attr(ds, "PixelRepresentation", 0) not in (0, 1):
        raise ImageDecodeError("PixelRepresentation is neither 0 nor 1")


def _transfer_syntax(ds: pydicom.Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if not ts:
        raise ImageDecodeError("TransferSyntaxUID missing from the file meta information")
    return UID(str(ts))


def check_pixel_length(ds: pydicom.Dataset) -> None:
    """The encoded pixel data must hold what the header declares: for native data the declared size
    (Rows x Columns x SamplesPerPixel x BitsAllocated x NumberOfFrames); for encapsulated data
    well-formed items, a sane Basic Offset Table and a first frame whose codestream header (JPEG,
    JPEG-LS, JPEG 2000 dimensions and components; RLE segment count) matches the DICOM header."""
    ts = _transfer_syntax(ds)
    rows, cols = int(ds.Rows), int(ds.Columns)
    samples = int(ds.SamplesPerPixel)
    allocated = int(ds.BitsAllocated)
    frames = _int_attr(ds, "NumberOfFrames", 1)
    data = ds.PixelData
    if not ts.is_encapsulated:
        expected = rows * cols * samples * (allocated // 8) * frames
        if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "YBR_FULL_422":
            expected = expected // 3 * 2
        if len(data) < expected:
            raise ImageDecodeError(
                "pixel data shorter than declared by Rows, Columns, SamplesPerPixel, BitsAllocated, NumberOfFrames"
            )
        return
    first = _first_fragment(bytes(data[: 1 << 20]) if len(data) > (1 << 20) else bytes(data), len(data), frames)
    _check_codestream(str(ts), first, rows, cols, samples, allocated)


def _first_fragment(head: bytes, total: int, frames: int) -> bytes:
    """Walk the items of encapsulated pixel data (only `head`, the first MiB, is given; `total` is the
    full length): check the Basic Offset Table and return the start of the first fragment."""

    def item(pos: int) -> tuple[int, int]:
        if pos + 8 > len(head):
            raise ImageDecodeError("encapsulated pixel data truncated (item header)")
        tag, length = struct.unpack_from("<II", head, pos)
        if tag != _ITEM:
            raise ImageDecodeError("encapsulated pixel data has an invalid item tag")
        if length == 0xFFFFFFFF or pos + 8 + length > total:
            raise ImageDecodeError("encapsulated pixel data: item length exceeds the encoded data")
        return pos + 8, length

    start, bot_len = item(0)
    if bot_len % 4:
        raise ImageDecodeError("encapsulated pixel data: Basic Offset Table length is not a multiple of 4")
    if bot_len:
        n = bot_len // 4
        if n != frames:
            raise ImageDecodeError("Basic Offset Table does not match NumberOfFrames")
        if start + bot_len > len(head):
            raise ImageDecodeError("Basic Offset Table too large")
        offsets = struct.unpack_from(f"<{n}I", head, start)
        fragments_bytes = total - (start + bot_len)
        if offsets[0] != 0 or any(b <= a for a, b in zip(offsets, offsets[1:])) or offsets[-1] >= fragments_bytes:
            raise ImageDecodeError("Basic Offset Table offsets are not increasing within the pixel data")
    pos = start + bot_len
    if pos + 8 > total:
        raise ImageDecodeError("encapsulated pixel data has no fragment")
    frag_start, frag_len = item(pos)
    if frag_len == 0:
        raise ImageDecodeError("encapsulated pixel data: first fragment is empty")
    return head[frag_start : frag_start + frag_len]


def _jpeg_sof(src: bytes) -> tuple[int, int, int, int] | None:
    """(precision, height, width, components) from the SOF marker of a JPEG or JPEG-LS codestream."""
    if src[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(src):
        if src[pos] != 0xFF:
            return None
        marker = src[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", src, pos + 2)
        # SOF0..SOF15 except DHT (C4), JPG (C8), DAC (CC); SOF55 (F7) for JPEG-LS
        if (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7:
            if pos + 10 > len(src):
                return None
            precision, height, width, components = struct.unpack_from(">BHHB", src, pos + 4)
            return precision, height, width, components
        if marker == 0xDA:  # start of scan before any SOF
            return None
        pos += 2 + length
    return None


def _j2k_siz(src: bytes) -> tuple[int, int, int, int] | None:
    """(precision, height, width, components) from the SIZ marker of a JPEG 2000 codestream
    (a JP2 wrapper is skipped by looking for SOC + SIZ)."""
    pos = src.find(b"\xff\x4f\xff\x51", 0, 4096)
    if pos < 0 or pos + 42 > len(src):
        return None
    xsiz, ysiz, xo, yo = struct.unpack_from(">IIII", src, pos + 8)
    (csiz,) = struct.unpack_from(">H", src, pos + 40)
    if csiz < 1 or pos + 42 + 3 * csiz > len(src):
        return None
    precision = (src[pos + 42] & 0x7F) + 1
    return precision, ysiz - yo, xsiz - xo, csiz


def _check_codestream(ts: str, src: bytes, rows: int, cols: int, samples: int, allocated: int) -> None:
    if ts == _RLE_SYNTAX:
        if len(src) < 64:
            raise ImageDecodeError("RLE header truncated")
        (segments,) = struct.unpack_from("<I", src, 0)
        if segments != samples * (allocated // 8):
            raise ImageDecodeError("RLE segment count does not match SamplesPerPixel and BitsAllocated")
        return
    if ts in _JPEG_SYNTAXES:
        kind, info = _JPEG_SYNTAXES[ts], _jpeg_sof(src)
    elif ts in _J2K_SYNTAXES:
        kind, info = "JPEG 2000", _j2k_siz(src)
    else:
        return  # no header parser: the decoder (in its worker) is the check
    if info is None:
        raise ImageDecodeError(f"{kind} codestream header not found in the first fragment")
    precision, height, width, components = info
    if height and height != rows:  # JPEG may defer the height to a DNL marker (height 0)
        raise ImageDecodeError(f"Rows does not match the {kind} codestream")
    if width != cols:
        raise ImageDecodeError(f"Columns does not match the {kind} codestream")
    if components != samples:
        raise ImageDecodeError(f"SamplesPerPixel does not match the {kind} codestream")
    if precision > allocated:
        raise ImageDecodeError(f"BitsAllocated is smaller than the {kind} codestream precision")


def inflate_bounded(data: bytes, max_bytes: int) -> bytes:
    """Raw-deflate `data` (PS3.5 A.5) but never produce more than `max_bytes`; ValueError beyond,
    `zlib.error` on corrupt or truncated streams."""
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    out = d.decompress(data, max_bytes + 1)
    if len(out) > max_bytes or d.unconsumed_tail:
        raise ValueError("inflated data set exceeds the limit")
    if not d.eof:
        raise zlib.error("incomplete or truncated stream")
    return out


def inflated_size_within(data: bytes, max_bytes: int, chunk: int = 1 << 20) -> int:
    """Size of raw-deflated `data` once inflated, counted in chunks that are discarded (memory stays
    about `chunk`); ValueError as soon as it passes `max_bytes`, `zlib.error` when corrupt."""
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    total, tail = 0, data
    while tail:
        out = d.decompress(tail, chunk)
        total += len(out)
        if total > max_bytes:
            raise ValueError("inflated data set exceeds the limit")
        tail = d.unconsumed_tail
        if d.eof or not out and not tail:
            break
    total += len(d.flush())
    if total > max_bytes:
        raise ValueError("inflated data set exceeds the limit")
    return total


def read_spooled(path: str | os.PathLike[str], limits: LimitSettings | None = None) -> pydicom.Dataset:
    """Read a stored Part 10 file for screening, pixel data deferred (read only when decoded).

    Raises `ImageDecodeError` with a short reason (never a header value) when the file is larger
    than ``limits.max_dataset_mb``, is not DICOM, its Deflated data set is corrupt or inflates
    beyond the limit, or nothing usable was read: pydicom returns an empty data set, without an
    error, when a truncated or corrupt undefined-length element (encapsulated pixel data) ends the
    file; such a file is failed here, never taken for "another SOP class"."""
    limits = limits or LimitSettings()
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > limits.max_dataset_bytes:
            raise ImageDecodeError(f"file larger than the data set limit of {limits.max_dataset_mb} MB")
        meta = pydicom.filereader.read_file_meta_info(p)
        if str(meta.get("TransferSyntaxUID", "")) == pydicom.uid.DeflatedExplicitVRLittleEndian:
            ds = _read_deflated(p, limits)
        else:
            ds = pydicom.dcmread(str(p), defer_size="1 MB")
    except ImageDecodeError:
        raise
    except zlib.error:
        raise ImageDecodeError("Deflated data set is corrupt or truncated") from None
    except ValueError as exc:
        if "inflated data set exceeds" in str(exc):
            raise ImageDecodeError(
                f"Deflated data set inflates beyond the limit of {limits.max_dataset_mb} MB"
            ) from None
        raise ImageDecodeError(f"not a readable DICOM file ({type(exc).__name__})") from None
    except (InvalidDicomError, OSError, EOFError, struct.error, KeyError, TypeError, IndexError) as exc:
        raise ImageDecodeError(f"not a readable DICOM file ({type(exc).__name__})") from None
    if len(ds) == 0:
        raise ImageDecodeError("data set empty after the file meta information (truncated or corrupt)")
    _drop_unparseable(ds)
    if not str(ds.get("SOPClassUID", "") or "").strip():
        raise ImageDecodeError("SOPClassUID missing (data set truncated or corrupt)")
    return ds


def _drop_unparseable(ds: pydicom.Dataset) -> None:
    """Convert every top-level element now (pixel data aside) and drop those pydicom cannot parse
    (an unknown VR, a value that does not fit its VR: corruption), so that no later access raises;
    the stored file is untouched. Dropped tags are logged, never their values."""
    bad = []
    for tag in list(ds.keys()):
        if tag == 0x7FE00010:
            continue
        try:
            ds[tag]
        except Exception:  # noqa: BLE001 - any parser error means this element is unusable
            bad.append(tag)
    for tag in bad:
        del ds[tag]
    if bad:
        log.warning("dicom.unparseable_elements_dropped", tags=[f"{int(t):08X}" for t in bad[:10]], count=len(bad))


def _read_deflated(path: Path, limits: LimitSettings) -> pydicom.Dataset:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble

    with open(path, "rb") as fp:
        preamble = read_preamble(fp, False)
        file_meta = _read_file_meta_info(fp)
        zipped = fp.read()
    inflated_size_within(zipped, limits.max_dataset_bytes)  # a bomb costs a chunk of memory, not its size
    buffer = DicomBytesIO(inflate_bounded(zipped, limits.max_dataset_bytes))
    dataset = read_dataset(cast(BinaryIO, buffer), False, True)
    ds = pydicom.dataset.FileDataset(str(path), dataset, preamble, file_meta, False, True)
    ds.set_original_encoding(False, True, dataset._character_set)
    return ds


def pixel_spacing_mm(ds: pydicom.Dataset | None) -> float | None:
    """mm per pixel of the image: Pixel Spacing (0028,0030), else Imager Pixel Spacing (0018,1164),
    the mean of row and column spacing; None when absent or not two positive numbers."""
    if ds is None:
        return None
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            value = ds.get(keyword)
            if value is None:
                continue
            values = [
                float(v) for v in (value if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value])
            ]
        except (TypeError, ValueError):
            continue
        if len(values) == 2 and all(np.isfinite(v) and 0 < v < 10 for v in values):
            return (values[0] + values[1]) / 2.0
    return None
