"""Oblique views end to end: synth -> ROI and stenosis engines -> ONNX vs torch -> node == trainer."""

import numpy as np
import pytest

from screener.engine import manifest as mf
from screener.engine import preprocessing as pp
from screener.engine.roi import predict_boxes
from screener.engine.runtime import load_engine
from trainer.data.csxa import LoadReport
from trainer.data.oblique import load_oblique
from trainer.data.prepare import prepare_samples, read_gray8

pytestmark = pytest.mark.slow


def test_manifests(all_engines):
    roi = mf.load(all_engines["roi"])
    assert roi.kind == "roi" and roi.output_name == "box" and roi.threshold is None
    test = roi.metrics["test"]
    for key in ("mean_iou", "share_iou_ge_0_7", "wide_crop_containment"):
        assert key in test
    sten = mf.load(all_engines["stenosis"])
    assert sten.kind == "classifier" and sten.preprocessing.name == "roi_he"
    assert sten.preprocessing.mirror_views == ("R",) and sten.preprocessing.colour == "equalize"
    assert sten.threshold.split == "validation"
    assert sten.class_names == ["normal", "stenosis"]
    assert sten.training["config"]["optimizer"] == "sgd"
    for m in (roi, sten):
        assert m.backend("onnx-fp32").max_abs_diff_vs_torch < 1e-4


def test_node_preprocessing_equals_trainer_given_same_box(all_engines):
    man = mf.load(all_engines["stenosis"])
    samples, _ = load_oblique(all_engines["oblique"])
    right = [s for s in samples if s.view == "R" and s.box is not None][:3]
    left = [s for s in samples if s.view == "L" and s.box is not None][:1]
    kept, images = prepare_samples(right + left, man.preprocessing, LoadReport(root=""), progress=False)
    for s, img in zip(kept, images):
        trainer_tensor = pp.normalize(img, man.normalization)
        gray = pp.read_image_gray8(str(s.image_path))
        node_tensor = pp.preprocess(
            gray, man.preprocessing, man.normalization, s.box, mirror=man.preprocessing.mirrors(s.view)
        )
        assert np.array_equal(node_tensor, trainer_tensor)
    # the mirror really happens for right views
    s = kept[0]
    gray = pp.read_image_gray8(str(s.image_path))
    unmirrored = pp.preprocess(gray, man.preprocessing, man.normalization, s.box, mirror=False)
    assert not np.array_equal(unmirrored, pp.normalize(images[0], man.normalization))


def test_roi_engine_boxes_feed_the_crop(all_engines):
    engine = load_engine(all_engines["roi"], "onnx-fp32")
    samples, _ = load_oblique(all_engines["oblique"])
    grays = [read_gray8(s.image_path)[0] for s in samples[:4]]
    boxes = predict_boxes(engine, grays)
    man = mf.load(all_engines["stenosis"])
    for g, b in zip(grays, boxes):
        h, w = g.shape
        assert 0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h
        x = pp.preprocess(g, man.preprocessing, man.normalization, b, mirror=True)
        assert x.shape == (3, man.input_size, man.input_size)
