"""DICOM pixels -> 8-bit gray: photometric, modality/VOI transforms, codecs, failures."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_windowing
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from screener.config import LimitSettings
from screener.dicom.image import ImageDecodeError, dataset_to_gray8, header_attributes

DX = "1.2.840.10008.5.1.4.1.1.1.1"


def make_ds(
    pixels: np.ndarray, *, bits_stored: int = 12, photometric: str = "MONOCHROME2", signed: bool = False, **attrs
) -> Dataset:
    """An in-memory DX-like dataset holding `pixels` (2-D, 3-D frames or H x W x 3)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DX
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = DX
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    a = np.asarray(pixels)
    colour = photometric in ("RGB", "YBR_FULL")
    frames = a.shape[0] if (a.ndim == 3 and not colour) else 1
    ds.Rows, ds.Columns = (a.shape[1], a.shape[2]) if frames > 1 else (a.shape[0], a.shape[1])
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if a.dtype.itemsize == 1 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = np.ascontiguousarray(a).tobytes()
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def phantom(h: int = 64, w: int = 48, bits: int = 12, seed: int = 0) -> np.ndarray:
    """A radiograph-like 12-bit image: dark background, bright 'bone', noise, full range."""
    rng = np.random.default_rng(seed)
    top = 2**bits - 1
    img = rng.integers(0, 300, size=(h, w)).astype(np.int64)
    img[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3] += 2500
    img += np.arange(w)[None, :] * 20
    img[0, 0], img[-1, -1] = 0, top
    return np.clip(img, 0, top).astype(np.uint16)


def roundtrip(ds: Dataset) -> Dataset:
    """Write and read back as a Part 10 file (DS/IS values become strings, as received)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


# --------------------------------------------------------------------------- photometric


@pytest.mark.parametrize("function,shift", [("LINEAR_EXACT", 0), ("SIGMOID", 0), ("LINEAR", 1)])
def test_monochrome1_mirror_gives_identical_output(function, shift):
    # MONOCHROME1 stored = M - value with center' = M - center is the exact mirror for
    # LINEAR_EXACT and SIGMOID; for LINEAR the (c - 0.5, w - 1) convention shifts it by one.
    img = phantom()
    m = 2**12 - 1
    c, w = 1800, 2600
    mono2 = make_ds(img, WindowCenter=c, WindowWidth=w, VOILUTFunction=function)
    mono1 = make_ds(
        (m - img.astype(np.int64)).astype(np.uint16),
        photometric="MONOCHROME1",
        WindowCenter=m - c + shift,
        WindowWidth=w,
        VOILUTFunction=function,
    )
    out2, out1 = dataset_to_gray8(roundtrip(mono2)), dataset_to_gray8(roundtrip(mono1))
    assert out2.dtype == np.uint8 and out2.shape == img.shape
    assert out2.max() - out2.min() > 200  # the window spreads the image over the range
    np.testing.assert_array_equal(out1, out2)


def test_monochrome1_mirror_linear_with_naive_center_is_within_one_level():
    img = phantom()
    m = 2**12 - 1
    mono2 = make_ds(img, WindowCenter=1800, WindowWidth=2600)
    mono1 = make_ds(
        (m - img.astype(np.int64)).astype(np.uint16), photometric="MONOCHROME1", WindowCenter=m - 1800, WindowWidth=2600
    )
    diff = dataset_to_gray8(mono1).astype(int) - dataset_to_gray8(mono2).astype(int)
    assert np.abs(diff).max() <= 1


def test_monochrome1_mirror_without_window_uses_minmax_identically():
    img = phantom(seed=3)
    m = 2**12 - 1
    out2 = dataset_to_gray8(make_ds(img))
    out1 = dataset_to_gray8(make_ds((m - img.astype(np.int64)).astype(np.uint16), photometric="MONOCHROME1"))
    np.testing.assert_array_equal(out1, out2)
    lo, hi = img.min(), img.max()
    np.testing.assert_array_equal(out2, np.rint((img - float(lo)) / (hi - lo) * 255).astype(np.uint8))


def test_monochrome1_is_inverted_so_bone_is_bright():
    img = np.zeros((8, 8), np.uint16)
    img[2:6, 2:6] = 4000  # bright bone in MONOCHROME2 sense
    out = dataset_to_gray8(make_ds((4095 - img).astype(np.uint16), photometric="MONOCHROME1"))
    assert out[3, 3] == 255 and out[0, 0] == 0


# --------------------------------------------------------------------------- modality LUT / bits


def test_rescale_slope_intercept_is_applied_before_the_window():
    stored = phantom()
    slope, intercept = 2.0, -1000.0
    real = stored.astype(np.float64) * slope + intercept
    c, w = 2000.0, 5000.0  # in rescaled units
    ds = roundtrip(
        make_ds(
            stored,
            RescaleSlope=slope,
            RescaleIntercept=intercept,
            WindowCenter=c,
            WindowWidth=w,
            VOILUTFunction="LINEAR_EXACT",
        )
    )
    expected = np.rint(np.clip((real - c) / w + 0.5, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(dataset_to_gray8(ds), expected)


def test_rescale_without_window_is_minmax_of_rescaled_values():
    stored = phantom()
    plain = dataset_to_gray8(make_ds(stored))
    scaled = dataset_to_gray8(roundtrip(make_ds(stored, RescaleSlope=0.5, RescaleIntercept=-1024)))
    np.testing.assert_array_equal(plain, scaled)


def test_modality_lut_sequence():
    stored = np.arange(64, dtype=np.uint16).reshape(8, 8) * 60  # 0..3780
    lut = (4095 - np.arange(4096)).astype(np.uint16)  # an inverting modality LUT
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.ModalityLUTType = "US"
    item.LUTData = lut.tolist()
    ds = make_ds(stored, ModalityLUTSequence=[item])
    out = dataset_to_gray8(ds)
    mapped = (4095 - stored).astype(np.float64)
    expected = np.rint((mapped - mapped.min()) / (mapped.max() - mapped.min()) * 255).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)


def test_bits_stored_12_ignores_garbage_in_high_bits():
    img = phantom()
    garbage = np.random.default_rng(1).integers(0, 16, size=img.shape).astype(np.uint16) << 12
    clean = make_ds(img, WindowCenter=2048, WindowWidth=4096)
    dirty = make_ds(img | garbage, WindowCenter=2048, WindowWidth=4096)
    assert (np.frombuffer(dirty.PixelData, np.uint16) > 4095).any()
    np.testing.assert_array_equal(dataset_to_gray8(dirty), dataset_to_gray8(clean))


def test_signed_pixels_are_sign_extended():
    values = np.array([[-2048, -1000, 0], [500, 1000, 2047]], dtype=np.int16)
    stored = (values.astype(np.int32) & 0x0FFF).astype(np.uint16)  # 12-bit two's complement
    stored |= 0x5000  # garbage above bit 11
    ds = make_ds(stored, signed=True)
    out = dataset_to_gray8(ds)
    expected = np.rint((values + 2048.0) / 4095.0 * 255).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)


# --------------------------------------------------------------------------- VOI


def test_window_values():
    img = np.array([[0, 50, 100, 150, 200, 400]], dtype=np.uint16)
    out = dataset_to_gray8(make_ds(img, WindowCenter=100, WindowWidth=200, VOILUTFunction="LINEAR_EXACT"))
    np.testing.assert_array_equal(out, [[0, 64, 128, 191, 255, 255]])  # rint(127.5) = 128 (even)


def test_first_of_multiple_window_values_is_used():
    img = phantom()
    one = dataset_to_gray8(roundtrip(make_ds(img, WindowCenter=1000, WindowWidth=800)))
    two = dataset_to_gray8(roundtrip(make_ds(img, WindowCenter=[1000, 3000], WindowWidth=[800, 100])))
    np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_window_agrees_with_pydicom(function):
    img = phantom(seed=5)
    ds = roundtrip(
        make_ds(img, WindowCenter=1500, WindowWidth=1200, VOILUTFunction=function, RescaleSlope=1, RescaleIntercept=0)
    )
    ref = apply_windowing(apply_modality_lut(ds.pixel_array, ds), ds)  # range 0..4095 here
    expected = np.rint(ref / 4095.0 * 255).astype(np.uint8)
    diff = dataset_to_gray8(ds).astype(int) - expected.astype(int)
    assert np.abs(diff).max() <= 1 and (diff != 0).mean() < 0.01


def test_invalid_window_falls_back_to_minmax():
    img = phantom()
    plain = dataset_to_gray8(make_ds(img))
    np.testing.assert_array_equal(dataset_to_gray8(make_ds(img, WindowCenter=100, WindowWidth=0)), plain)
    np.testing.assert_array_equal(
        dataset_to_gray8(make_ds(img, WindowCenter=100, WindowWidth=50, VOILUTFunction="CUBIC")), plain
    )


def _voi_lut_item(lut: np.ndarray, first_map: int, bits: int, vr: str = "US") -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(lut), first_map, bits]
    data = lut.astype("<u2")
    item.add_new(0x00283006, vr, data.tobytes() if vr == "OW" else data.tolist())  # LUT Data
    return item


@pytest.mark.parametrize("vr", ["US", "OW"])
def test_voi_lut_sequence_is_preferred_over_window(vr):
    img = phantom()
    x = np.arange(4096, dtype=np.float64)
    lut = np.rint(4095 * np.sqrt(x / 4095)).astype(np.uint16)  # a gamma-like 12-bit VOI LUT
    ds = roundtrip(make_ds(img, VOILUTSequence=[_voi_lut_item(lut, 0, 12, vr)], WindowCenter=100, WindowWidth=10))
    expected = np.rint(lut[img].astype(np.float64) / 4095 * 255).astype(np.uint8)
    np.testing.assert_array_equal(dataset_to_gray8(ds), expected)


def test_voi_lut_clips_below_first_map_and_above_last_entry():
    img = np.array([[0, 99, 100, 101, 355, 356, 4000]], dtype=np.uint16)
    lut = np.arange(256, dtype=np.uint16)  # 8-bit LUT of 256 entries starting at 100
    out = dataset_to_gray8(make_ds(img, VOILUTSequence=[_voi_lut_item(lut, 100, 8)]))
    np.testing.assert_array_equal(out, [[0, 0, 0, 1, 255, 255, 255]])


def test_voi_lut_monochrome1_is_inverted():
    img = np.array([[0, 1000, 4095]], dtype=np.uint16)
    lut = np.arange(4096, dtype=np.uint16)
    ds = make_ds(img, photometric="MONOCHROME1", VOILUTSequence=[_voi_lut_item(lut, 0, 12)])
    np.testing.assert_array_equal(dataset_to_gray8(ds), [[255, 193, 0]])


# --------------------------------------------------------------------------- codecs


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "j2k-lossless"])
def test_compressed_decodes_like_uncompressed(syntax):
    img = phantom(h=40, w=36)
    plain = make_ds(img, WindowCenter=2000, WindowWidth=3000)
    expected = dataset_to_gray8(plain)
    comp = make_ds(img, WindowCenter=2000, WindowWidth=3000)
    comp.compress(syntax)
    assert comp.file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(dataset_to_gray8(roundtrip(comp)), expected)


def test_corrupt_compressed_data_is_a_decode_error():
    comp = make_ds(phantom(h=40, w=36))
    comp.compress(JPEG2000Lossless)
    ds = roundtrip(comp)
    frames = bytearray(ds.PixelData)
    # keep the Basic Offset Table, item headers and the codestream's SIZ header, destroy the body
    frames[120:] = bytes(len(frames) - 120)
    ds.PixelData = bytes(frames)
    with pytest.raises(ImageDecodeError, match="could not be decoded"):
        dataset_to_gray8(ds)


# --------------------------------------------------------------------------- shapes, colour


def test_multiframe_uses_first_frame():
    a, b = phantom(seed=1), phantom(seed=2)
    multi = make_ds(np.stack([a, b]))
    two_frames = LimitSettings(max_frames=2, max_dataset_mb=512)
    np.testing.assert_array_equal(dataset_to_gray8(multi, two_frames), dataset_to_gray8(make_ds(a)))
    with pytest.raises(ImageDecodeError, match="NumberOfFrames exceeds the limit of 1"):
        dataset_to_gray8(multi)  # CR and DX are single-frame: the default limit


def test_rgb_to_gray():
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    out = dataset_to_gray8(make_ds(rgb, bits_stored=8, photometric="RGB"))
    assert out.shape == (4, 5)
    assert (out == round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)).all()


def test_8bit_monochrome_without_window_is_stretched():
    img = np.array([[10, 20], [30, 110]], np.uint8)
    out = dataset_to_gray8(make_ds(img, bits_stored=8))
    np.testing.assert_array_equal(out, [[0, 26], [51, 255]])


def test_constant_image_gives_zeros():
    out = dataset_to_gray8(make_ds(np.full((4, 4), 700, np.uint16)))
    assert out.dtype == np.uint8 and not out.any()


# --------------------------------------------------------------------------- failures


def test_truncated_pixel_data_is_a_decode_error():
    ds = make_ds(phantom())
    ds.PixelData = ds.PixelData[:-100]
    with pytest.raises(ImageDecodeError, match="pixel data shorter than declared") as exc:
        dataset_to_gray8(ds)
    assert "\n" not in str(exc.value) and len(str(exc.value)) <= 230


def test_missing_pixel_data():
    ds = make_ds(phantom())
    del ds.PixelData
    with pytest.raises(ImageDecodeError, match="no pixel data"):
        dataset_to_gray8(ds)


def test_unsupported_photometric():
    ds = make_ds(phantom(), photometric="PALETTE COLOR")
    with pytest.raises(ImageDecodeError, match="unsupported photometric interpretation PALETTE COLOR"):
        dataset_to_gray8(ds)


def test_missing_photometric_and_size():
    ds = make_ds(phantom())
    del ds.PhotometricInterpretation
    with pytest.raises(ImageDecodeError, match="photometric"):
        dataset_to_gray8(ds)
    ds = make_ds(phantom())
    del ds.Rows
    with pytest.raises(ImageDecodeError, match="rows/columns"):
        dataset_to_gray8(ds)


# --------------------------------------------------------------------------- header


def test_header_attributes():
    ds = make_ds(phantom(), SeriesDescription=" C-Spine lat ", PatientName="Doe^Jane", PatientID="123")
    with pytest.warns(UserWarning):  # lower case is invalid for CS, but senders do it
        ds.BodyPartExamined, ds.ViewPosition, ds.ImageLaterality = "cspine", "ll", "r"
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "399067008", "SCT", "lateral"
    ds.ViewCodeSequence = [item]
    attrs = header_attributes(ds)
    assert attrs == {
        "Modality": "DX",
        "BodyPartExamined": "CSPINE",
        "ViewPosition": "LL",
        "Laterality": "R",
        "SeriesDescription": "C-SPINE LAT",
        "ProtocolName": "",
        "ViewCode": "399067008",
        "ViewCodeMeaning": "LATERAL",
        "SOPClassUID": DX,
    }
    assert "DOE" not in " ".join(attrs.values()) and "123" not in " ".join(attrs.values())


def test_header_attributes_absent_and_series_laterality():
    ds = Dataset()
    ds.Laterality = "L"
    attrs = header_attributes(ds)
    assert attrs["Laterality"] == "L"
    assert attrs["Modality"] == attrs["ViewPosition"] == attrs["BodyPartExamined"] == ""
    assert attrs["SeriesDescription"] == attrs["ViewCodeMeaning"] == attrs["SOPClassUID"] == ""
