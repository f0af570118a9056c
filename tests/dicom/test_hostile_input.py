"""Untrusted input (issue 10): header limits before decoding, header vs encoded data, Deflated
bombs (while reading and while receiving), truncated encapsulated data failed (not skipped),
decoder panics contained. Reasons never quote header values."""

from __future__ import annotations

import struct
import tracemalloc
import zlib

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from bench.hostile_corpus import write_deflate_bomb
from screener.config import LimitSettings, Settings
from screener.dicom.image import (
    ImageDecodeError,
    check_limits,
    dataset_to_gray8,
    inflate_bounded,
    inflated_size_within,
    read_spooled,
)
from screener.errors import ConfigError
from screener.screening import Screener
from tests.support.dicom_factory import make_dx, make_study_ids, save

PHI = ("Test^Patient", "PID-TEST-1", "19700101")


def gray(h: int = 48, w: int = 40) -> np.ndarray:
    return (np.add.outer(np.arange(h) * 3, np.arange(w) * 5) % 256).astype(np.uint8)


def dx(h: int = 48, w: int = 40, **kw) -> pydicom.Dataset:
    return make_dx(gray(h, w), make_study_ids(), "LL", **kw)


def no_phi(reason: str) -> None:
    for value in PHI:
        assert value not in reason


# --------------------------------------------------------------------------- limits


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (dict(Rows=65535, Columns=65535), "Rows exceeds the limit of 8192"),
        (dict(Columns=9000), "Columns exceeds the limit of 8192"),
        (dict(NumberOfFrames=2), "NumberOfFrames exceeds the limit of 1"),
        (dict(SamplesPerPixel=3), "SamplesPerPixel does not match PhotometricInterpretation"),
        (dict(SamplesPerPixel=4), "SamplesPerPixel is neither 1 nor 3"),
        (dict(BitsAllocated=32), "BitsAllocated exceeds the limit of 16"),
        (dict(BitsAllocated=12), "BitsAllocated is not 8, 16 or 32"),
        (dict(BitsStored=17), "BitsStored does not fit BitsAllocated"),
        (dict(PixelRepresentation=2), "PixelRepresentation is neither 0 nor 1"),
    ],
)
def test_header_over_limits_fails_before_decoding(edit, reason, monkeypatch):
    ds = dx()
    for k, v in edit.items():
        setattr(ds, k, v)
    monkeypatch.setattr("screener.dicom.image.pixel_array", lambda *a, **k: pytest.fail("decoder must not run"))
    with pytest.raises(ImageDecodeError, match=reason) as exc:
        dataset_to_gray8(ds)
    no_phi(str(exc.value))


def test_limits_are_configurable_and_validated():
    ds = dx(h=48, w=40)
    with pytest.raises(ImageDecodeError, match="Rows exceeds the limit of 32"):
        check_limits(ds, LimitSettings(max_rows=32))
    check_limits(ds, LimitSettings(max_rows=48))
    with pytest.raises(ConfigError, match="limits.max_rows"):
        LimitSettings(max_rows=0)
    with pytest.raises(ConfigError, match="limits.max_dataset_mb"):
        LimitSettings(max_dataset_mb=16)  # smaller than one 8192 x 8192 x 16-bit image
    assert Settings().limits == LimitSettings()


def test_tiny_rle_declaring_65535_squared_allocates_nothing():
    """Issue 10 item 2: a 2.7 KB RLE image declaring 65535 x 65535 reached 8 GB."""
    ds = dx()
    ds.compress(RLELossless)
    ds.Rows = ds.Columns = 65535
    tracemalloc.start()
    try:
        with pytest.raises(ImageDecodeError, match="Rows exceeds the limit"):
            dataset_to_gray8(ds)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def test_rle_within_limits_but_too_large_for_its_segments():
    ds = dx()
    ds.compress(RLELossless)
    ds.Rows, ds.Columns = 8000, 8000
    with pytest.raises(ImageDecodeError):
        dataset_to_gray8(ds)


# --------------------------------------------------------------------------- header vs encoded data


def test_native_pixel_data_shorter_than_declared():
    ds = dx()
    ds.Rows = int(ds.Rows) + 1
    with pytest.raises(ImageDecodeError, match="pixel data shorter than declared"):
        dataset_to_gray8(ds)


@pytest.mark.parametrize("syntax", [JPEGLSLossless, JPEG2000Lossless], ids=["jpeg-ls", "j2k"])
@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda d: setattr(d, "Rows", int(d.Rows) + 1), "Rows does not match the"),
        (lambda d: setattr(d, "Columns", int(d.Columns) + 1), "Columns does not match the"),
        (
            lambda d: (setattr(d, "SamplesPerPixel", 3), setattr(d, "PhotometricInterpretation", "RGB")),
            "(SamplesPerPixel does not match the|BitsAllocated must be 8)",
        ),
    ],
    ids=["rows+1", "columns+1", "samples3"],
)
def test_header_disagreeing_with_codestream_never_reaches_the_decoder(syntax, edit, reason, monkeypatch):
    """Issue 10 item 1: these made python-gdcm abort the node process (SIGABRT)."""
    ds = dx(bits=8)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = gray().tobytes()
    if syntax == JPEGLSLossless:
        pytest.importorskip("jpeg_ls", reason="pyjpegls encoder not installed")
    ds.compress(syntax)
    edit(ds)
    monkeypatch.setattr("screener.dicom.image.pixel_array", lambda *a, **k: pytest.fail("decoder must not run"))
    with pytest.raises(ImageDecodeError, match=reason):
        dataset_to_gray8(ds)


def test_samples3_on_one_component_8bit_jpeg2000():
    ds = dx(bits=8)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = gray().tobytes()
    ds.compress(JPEG2000Lossless)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    with pytest.raises(ImageDecodeError, match="SamplesPerPixel does not match the JPEG 2000 codestream"):
        dataset_to_gray8(ds)


def test_encapsulated_items_checked():
    ds = dx()
    ds.compress(JPEG2000Lossless)
    frame = pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1).__next__()
    ds.PixelData = encapsulate([frame])[:-10]  # last item shorter than its length says
    with pytest.raises(ImageDecodeError, match="item length exceeds"):
        dataset_to_gray8(ds)
    ds.PixelData = b"\x00" * 16
    with pytest.raises(ImageDecodeError, match="invalid item tag"):
        dataset_to_gray8(ds)
    ds.PixelData = encapsulate([frame], has_bot=False)[:8] + struct.pack("<HHI", 0xFFFE, 0xE000, 0)
    with pytest.raises(ImageDecodeError, match="first fragment is empty"):
        dataset_to_gray8(ds)
    bad_bot = struct.pack("<HHI", 0xFFFE, 0xE000, 8) + struct.pack("<II", 0, 4)
    ds.PixelData = bad_bot + encapsulate([frame], has_bot=False)[8:]
    with pytest.raises(ImageDecodeError, match="Basic Offset Table does not match NumberOfFrames"):
        dataset_to_gray8(ds)


def test_rust_decoder_panic_is_a_decode_error():
    """A byte-flipped RLE stream made pylibjpeg-rle panic (pyo3 PanicException, a BaseException)."""

    class PanicException(BaseException):
        pass

    def panic(*a, **k):
        raise PanicException("index out of bounds")

    ds = dx()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("screener.dicom.image.pixel_array", panic)
        with pytest.raises(ImageDecodeError, match="decoder aborted"):
            dataset_to_gray8(ds)


def test_reasons_never_quote_header_values():
    ds = dx()
    ds.PhotometricInterpretation = "Test^Patient"  # a hostile value in a coded attribute
    with pytest.raises(ImageDecodeError) as exc:
        dataset_to_gray8(ds)
    assert "not a defined term" in str(exc.value)
    no_phi(str(exc.value))


# --------------------------------------------------------------------------- reading spool files


def test_deflate_bomb_while_reading(tmp_path):
    bomb = tmp_path / "bomb.dcm"
    write_deflate_bomb(bomb, inflated_mb=300)
    assert bomb.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(ImageDecodeError, match="inflates beyond the limit of 256 MB"):
            read_spooled(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20  # inflated in discarded chunks: never the whole bomb


def test_corrupt_deflate_stream_is_a_reason_not_zlib_error(tmp_path):
    ds = dx()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    p = tmp_path / "dfl.dcm"
    save(ds, p)
    good = read_spooled(p)
    assert (
        good.SOPInstanceUID == ds.SOPInstanceUID and good.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    )
    np.testing.assert_array_equal(dataset_to_gray8(good), dataset_to_gray8(dx_like(ds)))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 200])  # truncated deflate stream
    with pytest.raises(ImageDecodeError, match="Deflated data set is corrupt or truncated"):
        read_spooled(p)


def dx_like(ds: pydicom.Dataset) -> pydicom.Dataset:
    copy = pydicom.Dataset(ds)
    copy.file_meta = pydicom.dataset.FileMetaDataset(ds.file_meta)
    copy.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    return copy


def test_inflate_helpers():
    raw = bytes(5 << 20)
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zipped = comp.compress(raw) + comp.flush()
    assert inflated_size_within(zipped, 6 << 20) == len(raw)
    with pytest.raises(ValueError):
        inflated_size_within(zipped, 4 << 20)
    assert inflate_bounded(zipped, 5 << 20) == raw
    with pytest.raises(ValueError):
        inflate_bounded(zipped, (5 << 20) - 1)
    with pytest.raises(zlib.error):
        inflate_bounded(zipped[:-50], 6 << 20)


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, RLELossless], ids=["j2k", "rle"])
@pytest.mark.parametrize("frac", [0.6, 0.9, 0.99])
def test_truncated_encapsulated_file_is_failed_not_skipped(tmp_path, syntax, frac):
    """Issue 10 item 5: pydicom returned an empty data set and the image was 'skipped: unsupported
    SOP class (none)' (skipped studies are purged by retention, failed ones kept for review)."""
    ds = dx(h=96, w=80)
    ds.compress(syntax)
    p = tmp_path / "t.dcm"
    save(ds, p)
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * frac)])
    out, gray8, engines = Screener({}, Settings().routing).read(p)
    assert out.state == "failed", out.skipped
    assert gray8 is None and engines == []
    assert "SOP class" not in out.failed or "SOPClassUID missing" in out.failed
    no_phi(out.failed)


def test_truncated_file_without_engines_still_failed(tmp_path):
    ds = dx()
    p = tmp_path / "t.dcm"
    save(ds, p)
    p.write_bytes(p.read_bytes()[:140])  # preamble, DICM and a piece of the meta
    out, _, _ = Screener({}, Settings().routing).read(p)
    assert out.state == "failed"


def test_oversized_file_refused_before_reading(tmp_path):
    ds = dx()
    p = tmp_path / "big.dcm"
    save(ds, p)
    with open(p, "ab") as f:
        f.truncate(p.stat().st_size + (2 << 20))
    limits = LimitSettings(max_rows=64, max_columns=64, max_dataset_mb=1)
    with pytest.raises(ImageDecodeError, match="file larger than the data set limit of 1 MB"):
        read_spooled(p, limits)


def test_unparseable_header_element_dropped_not_raised(tmp_path):
    ds = dx()
    p = tmp_path / "x.dcm"
    save(ds, p)
    data = bytearray(p.read_bytes())
    i = data.index(b"CS", data.index(b"\x08\x00\x60\x00"))  # (0008,0060) Modality
    data[i : i + 2] = b"\x55\xac"
    p.write_bytes(bytes(data))
    out = read_spooled(p)
    assert "Modality" not in out
    assert str(out.SOPInstanceUID) == ds.SOPInstanceUID


# --------------------------------------------------------------------------- receiving


def test_deflate_bomb_refused_while_receiving(tmp_path):
    """Issue 10 item 2: a 1 MB Deflated data set inflating to 1 GiB was acknowledged with 0x0000."""
    from pynetdicom import AE, _config

    from screener.config import NodeSettings
    from screener.dicom.listener import INFLATED_TOO_LARGE, Listener
    from screener.store import Store

    limits = LimitSettings(max_rows=256, max_columns=256, max_dataset_mb=2)
    settings = Settings(
        node=NodeSettings(host="127.0.0.1", port=0, var_dir=str(tmp_path / "var"), min_free_mb=0), limits=limits
    )
    store = Store.open(tmp_path / "var")
    listener = Listener(settings, store)
    listener.start()
    bomb = tmp_path / "bomb.dcm"
    sop = write_deflate_bomb(bomb, inflated_mb=8)
    ok = tmp_path / "ok.dcm"
    small = dx()
    small.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    save(small, ok)
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the bytes as they are
    try:
        ae = AE(ae_title="HOSTILE")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1", DeflatedExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", listener.port, ae_title="CSPINE")
        assert assoc.is_established
        rsp = assoc.send_c_store(bomb)
        assert rsp.Status == INFLATED_TOO_LARGE and 0xC000 <= rsp.Status <= 0xCFFF
        assert store.get_instance(sop) is None  # never stored, never acknowledged
        rsp = assoc.send_c_store(ok)  # the node keeps serving
        assert rsp.Status == 0x0000
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
        listener.stop()
        store.close()
