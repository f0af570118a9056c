"""End to end: synth (small) -> build-engine -> manifest -> ONNX vs torch -> node preprocessing == trainer's."""

import json

import numpy as np
import pytest
import torch

from screener.engine import manifest as mf
from screener.engine import preprocessing as pp
from trainer.build import load_prepared
from trainer.data.prepare import PreparedDataset
from trainer.model import ProbabilityHead, build_classifier
from trainer.splits import SplitSpec

pytestmark = pytest.mark.slow


def test_manifest_complete(built):
    opts, folder = built
    man = mf.load(folder, verify=True)
    assert man.task == "spondylosis" and man.kind == "classifier"
    assert man.input_size == 64 and man.preprocessing.name == "original"
    assert man.threshold is not None and man.threshold.split == "validation"
    assert man.threshold.target_sensitivity == 0.95
    test = man.metrics["test"]
    assert test["auroc_ci"] is not None and "sensitivity" in test and "specificity" in test
    assert "balanced_accuracy" in test and man.metrics["majority_baseline"]["balanced_accuracy"] == 0.5
    assert len(man.data["fingerprint"]) == 64 and man.data["split_seed"] == opts.split_seed
    assert man.training["pretrained"]["source"] == "random-init"
    assert any("random initialisation" in n for n in man.notes)
    assert man.validated is False and man.demo is True
    names = {b.name for b in man.backends}
    assert {"onnx-fp32", "onnx-int8"} <= names
    int8 = man.backend("onnx-int8")
    assert int8.test_auroc is not None and int8.note
    for f in ("report.md", "report.json", "roc.png", "calibration.png"):
        assert (folder / f).is_file(), f
    md = (folder / "report.md").read_text()
    assert "baseline" in md.lower()
    json.loads((folder / "report.json").read_text())


def test_onnx_matches_torch(built):
    opts, folder = built
    man = mf.load(folder)
    assert man.backend("onnx-fp32").max_abs_diff_vs_torch < 1e-4
    import onnxruntime as ort

    model, _ = build_classifier(None)
    model.load_state_dict(torch.load(opts.out / ".work" / "spondylosis" / "best.pt", weights_only=True))
    head = ProbabilityHead(model).eval()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 3, 64, 64)).astype(np.float32)
    with torch.inference_mode():
        expected = head(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {man.input_name: x})[0]
    assert np.max(np.abs(got - expected)) < 1e-4


def test_node_tensor_equals_trainer_tensor(built):
    opts, folder = built
    man = mf.load(folder)
    prepared = load_prepared(opts.data, man.preprocessing, SplitSpec(seed=man.data["split_seed"]), False)
    ds = PreparedDataset(prepared.images, prepared.labels, man.normalization)  # no augmentation at eval
    assert prepared.fingerprint == man.data["fingerprint"]
    for i in range(0, len(prepared.samples), 11):
        sample = prepared.samples[i]
        trainer_tensor = ds[i][0].numpy()
        gray = pp.read_image_gray8(str(sample.image_path))
        node_tensor = pp.preprocess(gray, man.preprocessing, man.normalization)
        assert node_tensor.dtype == trainer_tensor.dtype
        assert np.array_equal(node_tensor, trainer_tensor)


def test_node_dicom_path_equals_trainer_tensor(built, tmp_path):
    """The same pixels arriving as DICOM (8-bit, identity window) give the trainer's tensor."""
    import pydicom

    from screener.dicom.image import dataset_to_gray8
    from tests.support.dicom_factory import make_dx, make_study_ids

    opts, folder = built
    man = mf.load(folder)
    prepared = load_prepared(opts.data, man.preprocessing, SplitSpec(seed=man.data["split_seed"]), False)
    ds_trainer = PreparedDataset(prepared.images, prepared.labels, man.normalization)
    for i in (0, 5, 17):
        gray = pp.read_image_gray8(str(prepared.samples[i].image_path))
        ds = make_dx(gray, make_study_ids(), "LL", bits=8)
        ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 128, 256, "LINEAR"  # identity VOI for 8-bit data
        path = tmp_path / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        node_gray = dataset_to_gray8(pydicom.dcmread(path))
        node_tensor = pp.preprocess(node_gray, man.preprocessing, man.normalization)
        assert np.array_equal(node_tensor, ds_trainer[i][0].numpy())
