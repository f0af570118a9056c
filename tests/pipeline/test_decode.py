"""The lookup-table order of the 12-to-8-bit step is exact: same pixels, same model images."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from screener.dicom.image import dataset_to_gray8
from screener.engine import preprocessing as pp
from screener.pipeline.decode import gray8_table
from tests.pipeline.conftest import gray_image
from tests.support.dicom_factory import make_dx, make_study_ids


def variants():
    study = make_study_ids()
    g = gray_image(3, 200)
    base = make_dx(g, study, "LL")
    yield "window LINEAR_EXACT", base
    ds = make_dx(g, study, "LL")
    ds.VOILUTFunction = "LINEAR"
    ds.WindowCenter, ds.WindowWidth = 1500, 1800
    yield "window LINEAR narrow", ds
    ds = make_dx(g, study, "LL")
    ds.VOILUTFunction = "SIGMOID"
    yield "sigmoid", ds
    ds = make_dx(g, study, "LL", photometric="MONOCHROME1")
    yield "MONOCHROME1", ds
    ds = make_dx(g, study, "LL")
    del ds.WindowCenter, ds.WindowWidth
    ds.RescaleSlope, ds.RescaleIntercept = -2, 100
    yield "min-max, negative slope", ds
    ds = make_dx(g, study, "LL")
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.LUTData = [int(v) for v in np.sqrt(np.arange(4096) / 4095.0) * 4095]
    ds.VOILUTSequence = [item]
    yield "VOI LUT", ds
    ds = make_dx(255 - g, study, "LL")  # bright background: polarity inverted
    yield "bright border", ds
    ds = make_dx(g, study, "LL", bits=16)
    yield "16-bit", ds


RECIPES = [
    pp.Recipe("c", crop="centre", centre_size=120, image_size=32),
    pp.Recipe("c-big", crop="centre", centre_size=260, image_size=48, colour="gs_eq_inv"),
    pp.Recipe("box", crop="box", image_size=40, colour="equalize"),
    pp.Recipe("wide", crop="wide_box", image_size=40, wide_margin_x=30, wide_margin_y=60),
    pp.Recipe("full", crop="full", image_size=64),
]


@pytest.mark.parametrize("name,ds", list(variants()), ids=[n for n, _ in variants()])
def test_table_gives_dataset_to_gray8(name, ds):
    want = dataset_to_gray8(ds)
    raw, table = gray8_table(ds)
    assert table is not None
    assert np.array_equal(table[raw], want)
    for rcp in RECIPES:
        for mirror in (False, True):
            box = (40.0, 30.5, 150.0, 170.0) if rcp.needs_box else None
            got = pp.prepare_indexed(raw, table, rcp, box, mirror)
            assert np.array_equal(got, pp.prepare(want, rcp, box, mirror)), (name, rcp.name, mirror)


def test_uncovered_images_fall_back():
    ds = make_dx(gray_image(1, 64), make_study_ids(), "LL")
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.ModalityLUTType = "US"
    item.LUTData = [int(v) for v in (4095 - np.arange(4096))]
    ds.ModalityLUTSequence = [item]
    del ds.RescaleSlope, ds.RescaleIntercept
    gray, table = gray8_table(ds)
    assert table is None and np.array_equal(gray, dataset_to_gray8(ds))


@pytest.mark.parametrize("shape", [(97, 131), (500, 500), (640, 480), (50, 40)])
def test_one_channel_resize_equals_three(shape):
    """prepare's shortcut for identical channels gives the 3-channel resize, bit for bit."""
    import cv2

    rng = np.random.default_rng(shape[0])
    g = rng.integers(0, 256, size=shape, dtype=np.uint8)
    for size in (32, 224, 512):
        for mirror in (False, True):
            rcp = pp.Recipe("t", crop="centre", centre_size=max(shape), image_size=size, auto_polarity=False)
            got = pp.prepare(g, rcp, mirror=mirror)
            win = pp.window(shape, rcp, None)
            img = np.dstack([pp._pad_to_window(g, win, shape, 0)] * 3)
            img = np.ascontiguousarray(img[:, ::-1] if mirror else img)
            interp = cv2.INTER_AREA if img.shape[0] >= size and img.shape[1] >= size else cv2.INTER_LINEAR
            assert np.array_equal(got, cv2.resize(img, (size, size), interpolation=interp))


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_native_frame_is_pydicom_pixel_array(bits):
    """The uncompressed fast path reads the same values as pydicom's decoder (no copy)."""
    from pydicom.pixels import pixel_array

    from screener.pipeline.decode import native_frame

    ds = make_dx(gray_image(4, 96), make_study_ids(), "LL", bits=bits)
    view = native_frame(ds)
    assert view is not None and not view.flags.writeable
    assert np.array_equal(view, pixel_array(ds, index=0))


def test_bits_above_bits_stored_go_through_pydicom():
    """Garbage above Bits Stored: pydicom masks it, so the table route must see masked values."""
    ds = make_dx(gray_image(5, 96), make_study_ids(), "LL", bits=12)
    values = np.frombuffer(ds.PixelData, "<u2").reshape(96, 96).copy()
    values[::7, ::5] |= 0xA000
    ds.PixelData = values.tobytes()
    raw, table = gray8_table(ds)
    assert table is not None and int(raw.max()) < 4096
    assert np.array_equal(table[raw], dataset_to_gray8(ds))


def test_native_frame_declines_what_it_does_not_cover():
    from pydicom.uid import ExplicitVRBigEndian

    from screener.pipeline.decode import native_frame

    ds = make_dx(gray_image(6, 64), make_study_ids(), "LL", bits=12)
    signed = make_dx(gray_image(6, 64), make_study_ids(), "LL", bits=12)
    signed.PixelRepresentation = 1
    assert native_frame(signed) is None
    short = make_dx(gray_image(6, 64), make_study_ids(), "LL", bits=12)
    short.PixelData = short.PixelData[:-2]
    assert native_frame(short) is None
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    assert native_frame(ds) is None


def test_fast_route_equals_reference_on_real_and_broken_files(tmp_path):
    """Every bundled pydicom test file with pixel data (other modalities, bit depths, high bits,
    encodings, signed data, colour) and mutated copies of each (truncated, byte-flipped, wrong
    Rows, absurd sizes, wrong sample count), routed to an engine whatever they are: the worker's
    route and the reference route give the same outcome and bit-identical model images. Run in
    isolated workers, as the node runs them (a decoder that crashes fails the comparison)."""
    from bench.hostile_corpus import build_corpus
    from screener.config import PipelineSettings, RoutingRule
    from screener.pipeline.pool import Failure, WorkerPool
    from screener.pipeline.prepare import EngineSpec, Job, Plan
    from tests.pipeline import tasks

    files = [p for kind, p in build_corpus(tmp_path / "corpus", flips=1, bomb_mb=1) if "bomb" not in kind]
    assert len(files) > 300
    everything = RoutingRule(name="all", engines=["spondylosis"])
    plan = Plan((everything,), (EngineSpec("spondylosis", "classifier", pp.recipe("original", 64)),))
    settings = PipelineSettings()
    with WorkerPool(settings.worker_count, settings.memory_limit_mb, 60, preload=("tests.pipeline.tasks",)) as pool:
        results = dict(pool.map(tasks.compare_routes, [Job(str(p), plan) for p in files]))
    problems = {
        files[i].name: (r.reason if isinstance(r, Failure) else r)
        for i, r in results.items()
        if isinstance(r, Failure) or r
    }
    assert not problems


def _native_variant(rng: np.random.Generator, i: int) -> Dataset:
    """A random native DX: 8 or 16 bits allocated, any Bits Stored, High Bit usually Bits Stored - 1,
    sometimes garbage above Bits Stored, MONOCHROME1/2, window / VOI LUT / min-max / rescale, odd
    sizes, one or two frames, implicit or explicit VR."""
    from pydicom.uid import ImplicitVRLittleEndian

    allocated = int(rng.choice([8, 16]))
    stored = int(rng.integers(6, allocated + 1))
    h, w = int(rng.integers(40, 130)), int(rng.integers(40, 130))
    frames = int(rng.choice([1, 2]))
    ds = make_dx(
        gray_image(i, 140)[:h, :w], make_study_ids(), "LL", photometric=str(rng.choice(["MONOCHROME1", "MONOCHROME2"]))
    )
    values = rng.integers(0, 1 << stored, size=(frames, h, w)).astype(np.uint16)
    values[:, h // 3 : h // 2] //= 3  # structure: not all values equally likely
    if rng.random() < 0.25:  # bits above Bits Stored set in some pixels
        values[:, :: int(rng.integers(2, 9))] |= np.uint16(((1 << allocated) - 1) ^ ((1 << stored) - 1))
    ds.BitsAllocated, ds.BitsStored = allocated, stored
    ds.HighBit = stored - 1 if rng.random() < 0.85 else allocated - 1
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = values.astype(np.uint8 if allocated == 8 else "<u2").tobytes()
    if len(ds.PixelData) % 2:
        ds.PixelData += b"\0"
    kind = rng.integers(0, 4)
    if kind == 0:
        del ds.WindowCenter, ds.WindowWidth  # min-max
    elif kind == 1:
        ds.WindowCenter, ds.WindowWidth = float(rng.integers(1, 1 << stored)), float(rng.integers(2, 1 << stored))
        ds.VOILUTFunction = str(rng.choice(["LINEAR", "LINEAR_EXACT", "SIGMOID"]))
    elif kind == 2:
        item = Dataset()  # written to a file: the ambiguous VRs given explicitly
        item.add_new(0x00283002, "US", [(1 << stored) % 65536, 0, 12])  # LUT Descriptor (0: 65536)
        item.add_new(0x00283006, "US", [int(v) for v in np.sqrt(np.arange(1 << stored) / ((1 << stored) - 1)) * 4095])
        ds.VOILUTSequence = [item]
    if rng.random() < 0.3:
        ds.RescaleSlope, ds.RescaleIntercept = float(rng.choice([-2.0, 0.5, 3.0])), float(rng.integers(-100, 100))
    if rng.random() < 0.3:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return ds


def test_native_view_route_equals_reference_on_random_images(tmp_path):
    """The general case of the native view: random native images written to files and read back
    as the worker reads them; the worker's route gives the reference's outcome and model images."""
    from screener.config import RoutingRule
    from screener.pipeline import decode
    from screener.pipeline.prepare import EngineSpec, Job, Plan
    from tests.pipeline import tasks

    rng = np.random.default_rng(2026)
    plan = Plan(
        (RoutingRule(name="all", engines=["a", "b"]),),
        (
            EngineSpec("a", "classifier", pp.recipe("original", 32)),
            EngineSpec(
                "b", "classifier", pp.Recipe("b", crop="centre", centre_size=60, image_size=24, colour="gs_eq_inv")
            ),
        ),
    )
    viewed = 0
    for i in range(80):
        ds = _native_variant(rng, i)
        path = tmp_path / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        viewed += decode.native_frame(pydicom.dcmread(path)) is not None
        assert tasks.compare_routes(Job(str(path), plan)) == "", i
    assert viewed > 60
