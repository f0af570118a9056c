"""ROI engine: box mapping through the letterbox, metrics, augmentation, and a tiny end-to-end build."""

import json

import numpy as np
import pytest
import torch

from screener.engine import manifest as mf
from screener.engine import preprocessing as pp
from screener.engine.roi import box_from_output, box_to_output, predict_boxes
from trainer.roi import (
    NO_AUGMENT,
    BoxRegressor,
    RoiAugment,
    augment_roi,
    box_metrics,
    iou,
    roi_items_from,
    root_kind,
    wide_window,
)

RCP = pp.recipe("roi_input", 64)


# --------------------------------------------------------------------------- mapping


@pytest.mark.parametrize("shape", [(500, 300), (300, 520), (256, 256), (401, 17)])
def test_box_round_trip_through_letterbox(shape):
    h, w = shape
    box = (0.1 * w, 0.2 * h, 0.7 * w, 0.9 * h)
    norm = box_to_output(box, shape, RCP)
    assert all(0.0 <= v <= 1.0 for v in norm)
    back = box_from_output(np.array(norm), shape, RCP)
    assert np.allclose(back, box, atol=1e-9)


def test_box_from_output_portrait_and_landscape_by_hand():
    # portrait 400 x 200 (h x w): square side 400, window x from -100 to 300
    assert np.allclose(box_from_output([0.25, 0.0, 0.75, 1.0], (400, 200), RCP), (0, 0, 200, 400))
    assert np.allclose(box_from_output([0.5, 0.5, 0.625, 0.75], (400, 200), RCP), (100, 200, 150, 300))
    # landscape 200 x 400: window y from -100 to 300
    assert np.allclose(box_from_output([0.0, 0.25, 1.0, 0.75], (200, 400), RCP), (0, 0, 400, 200))
    assert np.allclose(box_from_output([0.5, 0.5, 0.75, 0.625], (200, 400), RCP), (200, 100, 300, 150))


def test_box_from_output_clips_orders_and_never_empty():
    x0, y0, x1, y1 = box_from_output([-0.5, -0.2, 1.5, 1.3], (400, 200), RCP)
    assert (x0, y0, x1, y1) == (0.0, 0.0, 200.0, 400.0)
    x0, y0, x1, y1 = box_from_output([0.6, 0.7, 0.4, 0.2], (400, 200), RCP)  # swapped corners
    assert x0 < x1 and y0 < y1
    x0, y0, x1, y1 = box_from_output([0.0, 0.0, 0.0, 0.0], (400, 200), RCP)  # in the padding, degenerate
    assert 0 <= x0 < x1 <= 200 and 0 <= y0 < y1 <= 400
    x0, y0, x1, y1 = box_from_output([1.0, 1.0, 1.0, 1.0], (400, 200), RCP)
    assert 0 <= x0 < x1 <= 200 and 0 <= y0 < y1 <= 400
    assert box_from_output([np.nan, 0, 1, 1], (400, 200), RCP) == (0.0, 0.0, 200.0, 400.0)
    with pytest.raises(ValueError):
        box_from_output([0, 0, 1, 1], (400, 200), pp.RECIPES["crop"])


def test_normalized_box_matches_prepared_pixels():
    """A bright rectangle drawn in the source lands where box_to_output says in the prepared input."""
    h, w = 300, 180
    gray = np.zeros((h, w), np.uint8)
    box = (40, 90, 120, 240)
    gray[90:240, 40:120] = 200
    img = pp.prepare(gray, pp.recipe("roi_input", 150), None)[..., 0]  # scale 0.5, x offset 30 px
    u = np.asarray(box_to_output(box, (h, w), pp.recipe("roi_input", 150))) * 150
    ys, xs = np.nonzero(img > 100)
    assert abs(xs.min() - u[0]) <= 1 and abs(xs.max() + 1 - u[2]) <= 1
    assert abs(ys.min() - u[1]) <= 1 and abs(ys.max() + 1 - u[3]) <= 1


# --------------------------------------------------------------------------- metrics


def test_iou_by_hand():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert iou((0, 0, 10, 10), (2, 2, 4, 4)) == pytest.approx(4 / 100)
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_box_metrics_by_hand():
    true = [(100, 300, 200, 600), (100, 300, 200, 600), (100, 300, 200, 600)]
    pred = [
        (100, 300, 200, 600),  # IoU 1
        (150, 300, 250, 600),  # IoU 1/3; wide window x 50..350 contains 100..200
        (310, 300, 410, 600),
    ]  # IoU 0; wide window x 210..510 misses x0 = 100
    m = box_metrics(pred, true)
    assert m["n"] == 3
    assert m["mean_iou"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert m["median_iou"] == pytest.approx(1 / 3)
    assert m["share_iou_ge_0_7"] == pytest.approx(1 / 3)
    assert m["wide_crop_containment"] == pytest.approx(2 / 3)
    assert m["mean_edge_error_px"] == pytest.approx((0 + 25 + 105) / 3)  # mean over the 4 edges
    empty = box_metrics([], [])
    assert empty["n"] == 0 and empty["mean_iou"] is None


def test_wide_window_clipped_and_containment_uses_image_bounds():
    shape = (700, 400)  # h, w
    pred = (100, 150, 300, 550)
    assert wide_window(pred) == (0, -50, 400, 750)
    assert wide_window(pred, shape) == (0, 0, 400, 700)  # clipped, no square step
    # the annotated box sticks out of the image: only its part inside the image must be covered
    m = box_metrics([pred], [(50, -10, 320, 680)], [shape])
    assert m["wide_crop_containment"] == 1.0
    m = box_metrics([(100, 400, 300, 500)], [(100, 50, 300, 650)], [shape])  # window y 200..700 misses 50
    assert m["wide_crop_containment"] == 0.0


# --------------------------------------------------------------------------- data sets


def test_items_from_lateral_and_oblique_roots(tmp_path, monkeypatch, mini_csxa):
    """Oblique roots go through trainer.data.oblique.load_oblique (a stand-in here): unannotated images are
    skipped and counted; groups of different roots never merge; splits are per root, by patient."""
    import sys
    import types
    from dataclasses import dataclass
    from pathlib import Path

    from tests.conftest import write_sheet
    from trainer.data.csxa import LoadReport
    from trainer.splits import SplitSpec

    obl = tmp_path / "oblique"
    obl.mkdir()
    write_sheet(
        obl / "datasets.xlsx",
        [(1, 0, 40, "L", 0)],
        header=["Number", "Gender", "Age", "View: L. left oblique; R. right oblique", "Stenosis"],
    )
    assert root_kind(obl) == "oblique" and root_kind(mini_csxa) == "lateral"

    @dataclass(frozen=True)
    class FakeOblique:
        image_path: Path
        box: tuple | None
        view: str
        label: int
        group: str

    samples = [
        FakeOblique(
            obl / f"{i:04d}040.png",
            (10.0, 20.0, 110.0, 220.0) if i % 3 else None,
            "L" if i % 2 else "R",
            i % 2,
            f"P{i // 2:04d}",
        )
        for i in range(1, 13)
    ]
    fake = types.ModuleType("trainer.data.oblique")
    fake.load_oblique = lambda root: (samples, LoadReport(root=str(root)))
    monkeypatch.setitem(sys.modules, "trainer.data.oblique", fake)

    items, problems = roi_items_from([mini_csxa], [obl], spec=SplitSpec(seed=1))
    lateral = [it for it in items if it.view == "lateral"]
    oblique = [it for it in items if it.view != "lateral"]
    assert len(lateral) == 6 and lateral[0].box == (100.0, 100.0, 160.0, 320.0)  # conftest keypoints' box
    assert len(oblique) == 8 and {it.view for it in oblique} == {"L", "R"}
    assert problems["unannotated_skipped"] == 4
    assert [r["kind"] for r in problems["roots"]] == ["lateral", "oblique"]
    assert not {it.group for it in lateral} & {it.group for it in oblique}
    assert all(it.split in ("train", "validation", "test") for it in items)
    by_group: dict[str, set[str]] = {}
    for it in items:
        by_group.setdefault(it.group, set()).add(it.split)
    assert all(len(s) == 1 for s in by_group.values())


# --------------------------------------------------------------------------- augmentation


def test_augment_keeps_box_on_the_object():
    size = 64
    img = np.zeros((size, size), np.uint8)
    img[10:50, 20:36] = 255  # object at x 20..36, y 10..50 (pixel edges)
    box = np.array([20, 10, 36, 50], np.float32) / size
    cfg = RoiAugment(hflip=0.5, scale=(0.8, 1.2), shift=0.1, gain=(1.0, 1.0), gamma=(1.0, 1.0))
    for seed in range(20):
        out, b = augment_roi(img, box, np.random.default_rng(seed), cfg)
        assert out.shape == img.shape and out.dtype == np.uint8
        assert np.all(b >= -1e-6) and np.all(b <= 1 + 1e-6) and b[2] > b[0] and b[3] > b[1]
        ys, xs = np.nonzero(out > 127)
        found = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) / size
        assert np.max(np.abs(found - b)) <= 1.5 / size, (seed, found * size, b * size)
    same, b = augment_roi(img, box, np.random.default_rng(0), NO_AUGMENT)
    assert np.array_equal(same, img) and np.allclose(b, box)


def test_model_outputs_ordered_normalized_boxes():
    model = BoxRegressor().eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 64, 64) * 3)
    assert out.shape == (3, 4)
    assert torch.all(out[:, 2] > out[:, 0]) and torch.all(out[:, 3] > out[:, 1])


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def roi_built(tmp_path_factory):
    from trainer.build import BuildOptions
    from trainer.roi import build_roi_engine
    from trainer.synth import synthesize

    root = tmp_path_factory.mktemp("roi")
    data = root / "synth"
    synthesize(data, n=40, seed=3)
    opts = BuildOptions(
        task="roi",
        data=data,
        out=root / "engines",
        recipe="roi_input",
        image_size=64,
        epochs=1,
        batch_size=8,
        progress=False,
        n_boot=50,
        demo=True,
    )
    return opts, build_roi_engine(opts)


@pytest.mark.slow
def test_roi_engine_builds_and_runs_on_the_node(roi_built):
    opts, folder = roi_built
    assert folder == opts.out / "roi" and not (opts.out / ".roi.building").exists()
    assert root_kind(opts.data) == "lateral"
    man = mf.load(folder, verify=True)
    assert man.task == "roi" and man.kind == "roi" and man.threshold is None
    assert man.output_name == "box" and man.input_size == 64
    assert man.preprocessing.crop == "full" and man.preprocessing.image_size == 64
    test = man.metrics["test"]
    for key in ("mean_iou", "median_iou", "share_iou_ge_0_7", "wide_crop_containment", "n"):
        assert key in test and test[key] is not None, key
    assert "validation" in man.metrics and man.data["n_images"] > 30
    assert {"onnx-fp32", "onnx-int8"} <= {b.name for b in man.backends}
    assert man.backend("onnx-fp32").max_abs_diff_vs_torch < 1e-4
    assert man.demo and man.training["pretrained"]["source"] == "random-init"
    for f in ("report.md", "report.json", "roi_examples.png", "iou_histogram.png"):
        assert (folder / f).is_file(), f
    report = json.loads((folder / "report.json").read_text())
    assert report["test"]["mean_iou"] == pytest.approx(test["mean_iou"])
    assert "mean IoU" in (folder / "report.md").read_text()

    from screener.engine.runtime import load_engine

    engine = load_engine(folder, "onnx-fp32")
    items, _ = roi_items_from([opts.data], [])
    grays = [pp.read_image_gray8(str(it.image_path)) for it in items[:5]]
    grays.append(np.zeros((90, 300), np.uint8))  # landscape, blank
    boxes = predict_boxes(engine, grays)
    assert len(boxes) == len(grays)
    for (x0, y0, x1, y1), g in zip(boxes, grays):
        h, w = g.shape
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        pp.preprocess(g, pp.RECIPES["wide_crop"], pp.Normalization(), (x0, y0, x1, y1))  # usable downstream
    assert predict_boxes(engine, []) == []


@pytest.mark.slow
def test_roi_onnx_matches_torch_and_trainer_tensor_equals_node_tensor(roi_built):
    opts, folder = roi_built
    man = mf.load(folder)
    model = BoxRegressor()
    model.load_state_dict(torch.load(opts.out / ".work" / "roi" / "best.pt", weights_only=True))
    model.eval()
    from trainer.roi import prepare_roi_data, tensors

    items, _ = roi_items_from([opts.data], [])
    data = prepare_roi_data(items[:4], man.preprocessing)
    x = tensors(data.images, man.normalization)
    for it, t in zip(data.items, x):  # the trainer's stored input == the node's preprocessing
        node = pp.preprocess(pp.read_image_gray8(str(it.image_path)), man.preprocessing, man.normalization)
        assert np.array_equal(node, t)
    import onnxruntime as ort

    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {man.input_name: x})[0]
    assert got.shape == (4, 4)
    assert np.max(np.abs(got - expected)) < 1e-4


@pytest.mark.slow
def test_roi_build_resumes_from_its_checkpoints(roi_built):
    """A second build with the same data and settings reuses the finished training (no new epochs)."""
    from trainer.roi import build_roi_engine

    opts, folder = roi_built
    best = opts.out / ".work" / "roi" / "best.pt"
    before = (best.stat().st_mtime_ns, mf.load(folder).metrics["test"]["mean_iou"])
    again = build_roi_engine(opts)
    assert again == folder
    assert (best.stat().st_mtime_ns, mf.load(folder).metrics["test"]["mean_iou"]) == before
