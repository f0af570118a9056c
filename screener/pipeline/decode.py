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
"""

from __future__ import annotations

import numpy as np
import pydicom

from screener.config import LimitSettings
from screener.dicom import image
from screener.dicom.image import MONOCHROME, ImageDecodeError, dataset_to_gray8


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
    arr = image._decode_first_frame(ds)
    if arr.ndim != 2 or arr.dtype not in (np.uint8, np.uint16):
        return dataset_to_gray8(ds, limits), None
    lo, hi = int(arr.min()), int(arr.max())
    if hi - lo > image._LUT_MAX_RANGE:
        return dataset_to_gray8(ds, limits), None
    table = np.zeros(hi + 1, np.uint8)
    table[lo:] = image._to_gray8(np.arange(lo, hi + 1).astype(arr.dtype), ds, photometric == "MONOCHROME1")
    return arr, table
