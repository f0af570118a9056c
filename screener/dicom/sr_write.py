"""Part 10 bytes of a dataset in Explicit VR Little Endian: the bytes pydicom's
``dcmwrite(..., enforce_file_format=True)`` writes, in a fraction of its time.

`screener.dicom.sr.sr_to_bytes` calls `part10_bytes`. pydicom's writer costs ~17 us per data element
(an SR has ~150 per finding): a buffer object per element, a writer looked up per VR, the character
sets converted again for every element, and an ambiguous-VR pass over every dataset made in memory.
This encoder writes the same bytes directly:

- the preamble and File Meta Information with pydicom itself, after the same steps as dcmwrite
  (Media Storage SOP Class / Instance UID from the dataset, `validate_file_meta`);
- elements in tag order (group length tags of groups > 6 skipped), explicit VR, 16- or 32-bit
  lengths as PS3.5 7.1.2; sequences and items with the length flags of the elements and items
  (pydicom's: defined lengths unless the element / item was read with undefined length);
- values as pydicom's writers make them for the common cases: strings of the string VRs, UIDs,
  IS / DS (the original string when there is one), binary numbers, and text (SH, LO, ST, LT, UT,
  UC) of printable ASCII where the dataset's character sets encode ASCII unchanged;
- every other element (PN, dates as date objects, OB, AT, non-ASCII text, ...) is written by
  pydicom's own `write_data_element`, with the character sets pydicom would pass it.

A sequence item with raw elements (from a source header read from a file: copied Patient / Study
sequences) is written by pydicom's `write_dataset`, after the same ambiguous-VR pass. A dataset that
pydicom would change before writing in ways not repeated here (an ambiguous VR such as "US or SS" in
a dataset made in memory, raw elements at the root, a root read from a file in this same encoding,
File Meta or Command elements in the dataset, pixel data) is not encoded here: `part10_bytes` returns
None and the caller uses dcmwrite. tests/dicom/test_sr_fast.py compares both writers' bytes.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from struct import Struct, pack
from typing import Any

from pydicom.charset import convert_encodings, default_encoding, encode_string
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset, validate_file_meta
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_data_element, write_dataset, write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

_SHORT = Struct("<HH2sH")  # group, element, VR, 16-bit length
_LONG = Struct("<HH2s2xL")  # group, element, VR, reserved, 32-bit length
_UL = Struct("<L")
_ITEM = b"\xfe\xff\x00\xe0"
_UNDEFINED = 0xFFFFFFFF
_ITEM_DELIMITER = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_LONG_VRS = frozenset(str(vr) for vr in EXPLICIT_VR_LENGTH_32)
_STRING_VRS = frozenset({"AE", "AS", "CS", "UR"})  # pydicom's write_string
_DATE_VRS = frozenset({"DA", "DT", "TM"})  # write_string when the value is a str
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC"})  # write_text (character sets apply)
_NUMBER_FORMATS = {"FD": "d", "FL": "f", "SL": "l", "SV": "q", "UL": "L", "US": "H", "UV": "Q"}  # write_numbers
_SPECIFIC_CHARACTER_SET = BaseTag(0x00080005)
_PRINTABLE_ASCII = "".join(chr(c) for c in range(0x20, 0x7F))


class _NotEncoded(Exception):
    """The dataset needs pydicom's writer (see module doc)."""


def part10_bytes(ds: Dataset) -> bytes | None:
    """The bytes of ``dcmwrite(buf, ds, enforce_file_format=True)`` for a dataset whose File Meta
    Transfer Syntax is Explicit VR Little Endian, or None where pydicom must write it."""
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is None or file_meta.get("TransferSyntaxUID") != ExplicitVRLittleEndian:
        return None
    if any(tag >> 16 in (0, 2) for tag in ds._dict) or 0x7FE00010 in ds._dict:
        return None
    preamble = getattr(ds, "preamble", None)
    if preamble and len(preamble) != 128:
        return None
    if ds.original_encoding == (False, True) and ds.original_character_set == ds._character_set:
        return None  # read as written: pydicom writes its raw elements as read, and corrects no VR
    try:
        body = _dataset(ds, default_encoding, [ds])
    except _NotEncoded:
        return None

    meta: FileMetaDataset = copy.deepcopy(file_meta)
    meta_class = meta.get("MediaStorageSOPClassUID", None)
    ds_class = ds.get("SOPClassUID", None)
    if meta_class is None or (ds_class and ds_class != meta_class):
        meta.MediaStorageSOPClassUID = ds_class
    meta_instance = meta.get("MediaStorageSOPInstanceUID", None)
    ds_instance = ds.get("SOPInstanceUID", None)
    if meta_instance is None or (ds_instance and ds_instance != meta_instance):
        meta.MediaStorageSOPInstanceUID = ds_instance
    try:
        validate_file_meta(meta, enforce_standard=True)
    except Exception:  # noqa: BLE001 - dcmwrite raises its own error
        return None
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = False, True
    fp.write(preamble or b"\x00" * 128)
    fp.write(b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    return bytes(fp.getvalue()) + body


@lru_cache(maxsize=64)
def _encodings(charsets: str | tuple[str, ...]) -> tuple[list[str], bool]:
    """pydicom's conversion of a dataset's character sets, and whether they encode printable ASCII
    unchanged (then ASCII text needs no encoder)."""
    encodings = convert_encodings(list(charsets) if isinstance(charsets, tuple) else charsets)
    try:
        ascii_same = encode_string(_PRINTABLE_ASCII, encodings) == _PRINTABLE_ASCII.encode("ascii")
    except Exception:  # noqa: BLE001 - then pydicom encodes every text value
        ascii_same = False
    return encodings, ascii_same


def _dataset(ds: Dataset, parent_encoding: Any, ancestors: list[Dataset]) -> bytes:
    """`ds`'s elements (`ancestors`: `ds` and the datasets above it, nearest first)."""
    elem = ds._dict.get(_SPECIFIC_CHARACTER_SET)  # as ds.get("SpecificCharacterSet", parent_encoding)
    if elem is None:
        charset = parent_encoding
    else:
        charset = (elem if isinstance(elem, DataElement) else ds[_SPECIFIC_CHARACTER_SET]).value
    charset = charset or [default_encoding]
    key = charset if isinstance(charset, str) else tuple(charset)
    try:
        encodings, ascii_same = _encodings(key)
    except Exception as exc:  # noqa: BLE001 - pydicom's writer raises (or warns) as it does
        raise _NotEncoded from exc
    out: list[bytes] = []
    elements = ds._dict
    for tag in sorted(elements):
        if (tag & 0xFFFF) == 0 and (tag >> 16) > 6:
            continue  # retired group length (PS3.5 7.2): pydicom does not write it
        elem = elements[tag]
        if not isinstance(elem, DataElement):
            raise _NotEncoded  # raw element: pydicom decides whether to convert it
        vr = elem.VR
        if vr is None or len(vr) != 2:
            raise _NotEncoded  # ambiguous VR: pydicom corrects it first
        out.append(_element(elem, tag, vr, encodings, ascii_same, ancestors))
    return b"".join(out)


def _item(item: Dataset, encodings: list[str], ancestors: list[Dataset]) -> bytes:
    """A sequence item's elements. An item with raw elements (a header read from a file and copied
    into the SR) is written by pydicom, after the ambiguous-VR pass that dcmwrite makes over the
    whole tree before writing (the same ancestors)."""
    if all(isinstance(e, DataElement) for e in item._dict.values()):
        return _dataset(item, encodings, [item, *ancestors])
    correct_ambiguous_vr(item, True, [item, *ancestors])
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = False, True
    write_dataset(fp, item, parent_encoding=list(encodings))
    return bytes(fp.getvalue())


def _delegate(elem: DataElement, encodings: list[str]) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = False, True
    write_data_element(fp, elem, list(encodings))
    return bytes(fp.getvalue())


def _element(
    elem: DataElement, tag: int, vr: str, encodings: list[str], ascii_same: bool, ancestors: list[Dataset]
) -> bytes:
    value = elem.value
    undefined = elem.is_undefined_length
    if vr == "SQ":
        parts = []
        for item in value or ():
            if not isinstance(item, Dataset):
                raise _NotEncoded
            body = _item(item, encodings, ancestors)
            if getattr(item, "is_undefined_length_sequence_item", False):
                parts.append(_ITEM + _UL.pack(_UNDEFINED) + body + _ITEM_DELIMITER)
            else:
                parts.append(_ITEM + _UL.pack(len(body)) + body)
        data = b"".join(parts)
        if undefined:
            return _LONG.pack(tag >> 16, tag & 0xFFFF, b"SQ", _UNDEFINED) + data + _SEQUENCE_DELIMITER
        return _LONG.pack(tag >> 16, tag & 0xFFFF, b"SQ", len(data)) + data
    if undefined or elem.is_buffered:
        return _delegate(elem, encodings)
    if elem.is_empty:
        data = b""
    else:
        encoded = _value(vr, value, ascii_same)
        if encoded is None:
            return _delegate(elem, encodings)
        data = encoded
    if vr in _LONG_VRS:
        return _LONG.pack(tag >> 16, tag & 0xFFFF, vr.encode(default_encoding), len(data)) + data
    if len(data) > 0xFFFF:
        return _delegate(elem, encodings)  # pydicom writes it as UN (with a warning)
    return _SHORT.pack(tag >> 16, tag & 0xFFFF, vr.encode(default_encoding), len(data)) + data


def _multi(value: Any) -> bool:
    return isinstance(value, MultiValue | list | tuple)


def _value(vr: str, value: Any, ascii_same: bool) -> bytes | None:
    """The value's bytes as pydicom's writer for `vr` makes them, or None (pydicom writes it)."""
    if vr == "UI" or vr in _STRING_VRS or (vr in _DATE_VRS and isinstance(value, str)):
        if _multi(value):
            if not all(isinstance(v, str) for v in value):
                return None
            text = "\\".join(value)
        elif isinstance(value, str):
            text = value
        else:
            return None
        if len(text) % 2:
            text += "\0" if vr == "UI" else " "
        try:
            return text.encode(default_encoding)
        except UnicodeError:
            return None
    if vr in _TEXT_VRS:
        if not (ascii_same and isinstance(value, str) and value.isascii() and value.isprintable()):
            return None
        data = value.encode("ascii")
        return data + b" " if len(data) % 2 else data
    if vr == "IS" or vr == "DS":
        if _multi(value):
            text = "\\".join(x.original_string if hasattr(x, "original_string") else str(x) for x in value)
        else:
            text = value.original_string if hasattr(value, "original_string") else str(value)
        if len(text) % 2:
            text += " "
        try:
            return bytes(text, default_encoding)
        except UnicodeError:
            return None
    fmt = _NUMBER_FORMATS.get(vr)
    if fmt is not None:
        try:
            if isinstance(value, MultiValue | list):
                return pack(f"<{len(value)}{fmt}", *value)
            if isinstance(value, int | float):
                return pack(f"<{fmt}", value)
        except Exception:  # noqa: BLE001 - pydicom raises its own error
            return None
    return None
