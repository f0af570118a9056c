"""The 12-to-8-bit step as a lookup table, for the cheapest exact order of operations.

``dataset_to_gray8`` (screener.dicom.image) maps every pixel of a grayscale integer image
through a table built from the values present. Every step of that table (modality
rescale, VOI LUT or window, MONOCHROME1 inversion, rounding) is elementwise, and the
min-max fallback depends only on the extreme values, which are present in the image.
So a table over *every* value between the image's minimum and maximum gives each present
pixel the same 8-bit value, and the worker can map only the pixels a recipe reads
(``preprocessing.prepare_indexed``): the border ring and the crop window, instead of the
whole frame. Exact, not approximate: the tests compare against ``dataset_to_gray8``.

Images this does not cover (colour, signed or non-integer data, a Modality LUT Sequence,
whose table need not be monotonic) go through ``dataset_to_gray8`` unchanged.

Uncompressed little-endian unsigned data is read as a view of the file's bytes
(``native_frame``) instead of through pydicom's decoder, which copies the frame and masks
the bits above Bits Stored: when the largest stored value fits in Bits Stored there is
nothing to mask and the view holds the same values (tested against pydicom); otherwise the
frame goes through pydicom as before.
"""

from __future__ import annotations

import cv2
import numpy as np
import pydicom

from screener.config import LimitSettings
from screener.dicom import image
from screener.dicom.image import MONOCHROME, ImageDecodeError, dataset_to_gray8

_NATIVE_LE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")  # Implicit / Explicit VR Little Endian


def native_frame(ds: pydicom.Dataset) -> np.ndarray | None:
    """The first frame of uncompressed little-endian unsigned 8/16-bit single-sample data as a
    read-only view of the Pixel Data bytes (no copy), or None where pydicom must decode it.
    The caller checks the values against Bits Stored (see ``gray8_table``)."""
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if ts not in _NATIVE_LE:
        return None
    try:
        allocated, samples = int(ds.BitsAllocated), int(ds.get("SamplesPerPixel", 1) or 1)
        signed, rows, cols = int(ds.get("PixelRepresentation", 0) or 0), int(ds.Rows), int(ds.Columns)
    except Exception:  # noqa: BLE001 - a header value pydicom cannot convert: pydicom's path reports it
        return None
    if samples != 1 or signed != 0 or allocated not in (8, 16):
        return None
    data = ds.PixelData
    dtype = np.dtype("<u2") if allocated == 16 else np.dtype(np.uint8)
    if not isinstance(data, bytes) or len(data) < rows * cols * dtype.itemsize:
        return None
    return np.frombuffer(data, dtype=dtype, count=rows * cols).reshape(rows, cols)


def gray8_table(ds: pydicom.Dataset, limits: LimitSettings | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(stored values, uint8 table indexed by them) or, for images it does not cover,
    (``dataset_to_gray8(ds)``, None). The header is checked against `limits` and its own pixel
    data before any decoder runs; raises ``ImageDecodeError`` as ``dataset_to_gray8``."""
    try:
        photometric = image._check_header(ds, limits)
    except ImageDecodeError:
        raise
    except Exception as exc:  # a header value pydicom cannot convert (wrong VR, garbage bytes)
        raise ImageDecodeError(f"image header cannot be parsed ({type(exc).__name__})") from None
    if photometric not in MONOCHROME or "ModalityLUTSequence" in ds:
        return dataset_to_gray8(ds, limits), None
    arr = native_frame(ds)
    if arr is not None:
        lo, hi = _extremes(arr)
        try:
            stored = int(ds.get("BitsStored", 0) or 0)
            high = int(ds.get("HighBit", stored - 1) or 0)
        except Exception:  # noqa: BLE001 - as above
            stored = high = 0
        if not 1 <= stored <= arr.dtype.itemsize * 8 or high != stored - 1 or hi >= 1 << stored:
            arr = None  # bits above Bits Stored are set (pydicom masks them) or an odd header: pydicom decodes
    if arr is None:
        arr = image._decode_first_frame(ds)
        if arr.ndim != 2 or arr.dtype not in (np.uint8, np.uint16):
            return dataset_to_gray8(ds, limits), None
        lo, hi = _extremes(arr)
    if hi - lo > image._LUT_MAX_RANGE:
        return dataset_to_gray8(ds, limits), None
    table = np.zeros(hi + 1, np.uint8)
    table[lo:] = image._to_gray8(np.arange(lo, hi + 1).astype(arr.dtype), ds, photometric == "MONOCHROME1")
    return arr, table


def _extremes(arr: np.ndarray) -> tuple[int, int]:
    """(min, max) of a 2-D uint8/uint16 array (OpenCV's single pass where it applies)."""
    if arr.size and arr.flags.c_contiguous:
        lo, hi, _, _ = cv2.minMaxLoc(arr)
        return int(lo), int(hi)
    return int(arr.min()), int(arr.max())
