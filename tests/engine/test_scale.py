"""Scale-aware preprocessing (issue 10 item 7): the node resamples each image to the training
images' scale before the recipe; images already at that scale are not touched."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from screener.dicom.image import pixel_spacing_mm
from screener.engine import manifest as mf
from screener.engine import preprocessing as pp
from tests.support.dicom_factory import make_dx, make_study_ids

SCALE = pp.PixelScale(median_height_px=1000.0, mm_per_pixel=0.3, source="test")


def phantom(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w), np.uint8)
    img[(np.abs(x - w / 2) < w / 8) & (np.abs(y - h / 2) < h / 3)] = 220  # a "spine" in physical proportion
    return img


def test_factor_from_spacing_then_height():
    assert pp.scale_factor(2500, 0.15, SCALE) == pytest.approx(0.5)  # 0.15 mm/px -> 0.3 mm/px
    assert pp.scale_factor(2000, None, SCALE) == pytest.approx(0.5)  # by height
    no_mm = dataclasses.replace(SCALE, mm_per_pixel=None)
    assert pp.scale_factor(2000, 0.15, no_mm) == pytest.approx(0.5)  # spacing unused without a training mm/px
    assert pp.scale_factor(2000, 0.15, None) == 1.0  # old manifest: no resampling
    assert pp.scale_factor(1010, None, SCALE) == 1.0  # within tolerance
    assert pp.scale_factor(1000, 0.3, SCALE) == 1.0


def test_scale_one_returns_the_same_object():
    g = phantom(1000, 800)
    box = (10.0, 20.0, 300.0, 400.0)
    out, out_box, f = pp.to_training_scale(g, box, SCALE, 0.3)
    assert out is g and out_box is box and f == 1.0
    out, out_box, f = pp.to_training_scale(g, box, None, 0.1)
    assert out is g and f == 1.0


def test_native_dx_gets_the_training_crop_content():
    """A DX at 0.15 mm/px (2x the pixels of a 0.3 mm/px training image) gives, after resampling, the
    tensor the training-scale image gives; without resampling the centre crop would be 2x too small."""
    train = phantom(1000, 800)
    native = np.kron(train, np.ones((2, 2), np.uint8))  # the same anatomy at twice the resolution
    rcp, norm = pp.RECIPES["original"], pp.Normalization()
    want = pp.preprocess(train, rcp, norm)
    scaled, _, f = pp.to_training_scale(native, None, SCALE, 0.15)
    assert f == pytest.approx(0.5) and scaled.shape == train.shape
    got = pp.preprocess(scaled, rcp, norm)
    assert np.abs(got - want).max() < 1e-5
    unscaled = pp.preprocess(native, rcp, norm)
    assert np.abs(unscaled - want).max() > 0.5


def test_box_follows_the_image():
    g = phantom(2000, 1600)
    _, box, f = pp.to_training_scale(g, (100.0, 200.0, 500.0, 1000.0), SCALE, None)
    assert f == pytest.approx(0.5) and box == pytest.approx((50.0, 100.0, 250.0, 500.0))


def test_pixel_spacing_from_header():
    ds = make_dx(np.zeros((4, 4), np.uint8), make_study_ids())
    assert pixel_spacing_mm(ds) == pytest.approx(0.15)
    del ds.PixelSpacing
    ds.ImagerPixelSpacing = [0.1, 0.12]
    assert pixel_spacing_mm(ds) == pytest.approx(0.11)
    ds.ImagerPixelSpacing = [0, 0.1]
    assert pixel_spacing_mm(ds) is None
    del ds.ImagerPixelSpacing
    assert pixel_spacing_mm(ds) is None and pixel_spacing_mm(None) is None


def test_manifest_records_scale_and_old_manifests_load(tmp_path):
    from PIL import Image

    paths = []
    for i, h in enumerate((800, 1000, 900)):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.zeros((h, 700), np.uint8)).save(p)
        paths.append(p)
    scale = mf.measure_training_scale(paths, 0.25)
    assert scale.median_height_px == 900 and scale.mm_per_pixel == 0.25
    assert mf.measure_training_scale(paths).mm_per_pixel is None
    assert mf.measure_training_scale([tmp_path / "missing.png"]) is None
    assert pp.PixelScale.from_dict(scale.to_dict()) == scale
    with pytest.raises(ValueError):
        pp.PixelScale.from_dict({"median_height_px": 0})


def test_built_manifest_has_the_scale_and_old_one_none(built, tmp_path):
    opts, folder = built
    man = mf.load(folder)
    assert man.pixel_scale is not None and man.pixel_scale.median_height_px > 0
    data = json.loads((folder / mf.MANIFEST_NAME).read_text())
    data.pop("pixel_scale")
    old = mf.from_dict(data)
    assert old.pixel_scale is None  # written before the field existed: no resampling
