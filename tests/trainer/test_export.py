"""trainer.export: ONNX fp32 (dynamic batch, self-contained, parity), int8, TensorRT guard."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from screener.errors import UserError
from trainer import export
from trainer.model import ProbabilityHead, build_classifier

SIZE = 32


class TinyNet(nn.Module):
    """A small conv net with the engine's interface: (N, 3, S, S) -> (N, outputs)."""

    def __init__(self, outputs: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(16, outputs)
        with torch.no_grad():  # spread the outputs so a probability is not stuck near 0.5
            self.fc.weight.mul_(8.0)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def images(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    """Smooth random images, roughly normalized, like preprocessed radiographs."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(n, 3, size // 8, size // 8))
    x = np.kron(coarse, np.ones((1, 1, 8, 8))) + 0.3 * rng.normal(size=(n, 3, size, size))
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def tiny():
    return ProbabilityHead(TinyNet()).eval()


@pytest.fixture(scope="module")
def fp32(tmp_path_factory, tiny):
    folder = tmp_path_factory.mktemp("export")
    return export.export_onnx(tiny, folder / "model.onnx", SIZE)


@pytest.fixture(scope="module")
def int8(fp32, tmp_path_factory):
    folder = tmp_path_factory.mktemp("int8")
    return export.quantize_int8(fp32, folder / "model.int8.onnx", images(32, seed=1))


def test_dynamic_batch_and_parity(tiny, fp32):
    for n in (1, 2, 5):
        x = images(n, seed=n)
        out = export.onnx_predict(fp32, x)
        assert out.shape == (n,) and out.dtype == np.float32
        assert export.compare_with_torch(tiny, fp32, x) < 1e-4


def test_chunked_prediction_matches(fp32):
    x = images(7, seed=3)
    assert np.allclose(export.onnx_predict(fp32, x, batch_size=2), export.onnx_predict(fp32, x), atol=1e-6)


def test_names_and_symbolic_batch(fp32):
    model = onnx.load(str(fp32))
    onnx.checker.check_model(model)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "image" and out.name == "probability"
    assert inp.type.tensor_type.shape.dim[0].dim_param
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == [3, SIZE, SIZE]


def test_single_self_contained_file(fp32):
    assert export.is_self_contained(fp32)
    assert sorted(p.name for p in fp32.parent.iterdir()) == ["model.onnx"]


def test_vector_output_shape(tmp_path):
    box = TinyNet(outputs=4, seed=3)
    path = export.export_onnx(box, tmp_path / "roi.onnx", SIZE, output_name="box")
    x = images(5, seed=4)
    assert export.onnx_predict(path, x).shape == (5, 4)
    assert export.compare_with_torch(box, path, x) < 1e-4


def test_resnet50_probability_head(tmp_path):
    """The real engine's network, at a small size; BN statistics set from data so nothing saturates."""
    model, _ = build_classifier(None)
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(images(4, 64, seed=5)))
    head = ProbabilityHead(model).eval()
    path = export.export_onnx(head, tmp_path / "model.onnx", 64)
    x = images(3, 64, seed=6)
    out = export.onnx_predict(path, x)
    assert out.shape == (3,)
    assert export.compare_with_torch(head, path, x) < 1e-4


def test_int8_close_to_fp32(fp32, int8):
    assert export.is_self_contained(int8)
    onnx.checker.check_model(onnx.load(str(int8)))
    x = images(64, seed=7)
    ref, got = export.onnx_predict(fp32, x), export.onnx_predict(int8, x)
    assert got.shape == ref.shape == (64,)
    assert ref.std() > 0.05  # the check below means something
    assert np.max(np.abs(got - ref)) < 0.15
    assert np.corrcoef(got, ref)[0, 1] > 0.97
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(int8)).graph.node)


def test_int8_accepts_batches_iterable(fp32, tmp_path):
    batches = (images(4, seed=s) for s in range(3))
    path = export.quantize_int8(fp32, tmp_path / "q.onnx", batches)
    assert export.onnx_predict(path, images(2, seed=9)).shape == (2,)


def test_int8_needs_calibration(fp32, tmp_path):
    with pytest.raises(ValueError):
        export.quantize_int8(fp32, tmp_path / "q.onnx", [])


def test_backend_record(fp32, tmp_path):
    rec = export.backend_record("onnx-fp32", fp32, fp32.parent, "fp32", max_abs_diff_vs_torch=1e-6)
    assert rec.file == "model.onnx" and rec.precision == "fp32" and rec.kept
    assert len(rec.sha256) == 64 and rec.max_abs_diff_vs_torch == 1e-6
    with pytest.raises(ValueError):
        export.backend_record("onnx-fp32", fp32, tmp_path, "fp32")


def _has_tensorrt() -> bool:
    return export.tensorrt_available()[0]


@pytest.mark.skipif(_has_tensorrt(), reason="this host can build TensorRT engines")
def test_tensorrt_unavailable_is_a_user_error(tiny, tmp_path):
    ok, reason = export.tensorrt_available()
    assert ok is False and reason
    with pytest.raises(UserError, match=r"pip install '\.\[tensorrt\]'"):
        export.export_tensorrt(tiny, tmp_path / "model.trt.ep", SIZE)
    assert not (tmp_path / "model.trt.ep").exists()


@pytest.mark.gpu
def test_tensorrt_compiles_and_matches(tiny, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("torch_tensorrt")
    from screener.engine.runtime import TensorRTEngine

    path = export.export_tensorrt(tiny, tmp_path / "model.trt.ep", SIZE, min_batch=1, opt_batch=4, max_batch=8)
    engine = TensorRTEngine(path, max_batch=8)
    x = images(11, seed=10)  # more than max_batch: exercises chunking
    got = engine.predict(x)
    ref = export.torch_predict(tiny, x)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.max(np.abs(got - ref)) < 2e-2
