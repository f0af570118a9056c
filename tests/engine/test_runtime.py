"""screener.engine.runtime: load a verified engine folder, pick a backend, predict."""

from __future__ import annotations

import dataclasses
import os
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from screener.engine import manifest as mf
from screener.engine import runtime
from screener.engine.preprocessing import Normalization, recipe
from screener.errors import ManifestError, UserError
from trainer import export
from trainer.model import ProbabilityHead

SIZE = 32


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, 2),
        )
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, SIZE, SIZE)).astype(np.float32)


def make_manifest(backends: list[mf.Backend]) -> mf.Manifest:
    return mf.Manifest(
        task="spondylosis",
        version="test-1",
        created="2025-01-01T00:00:00+00:00",
        kind="classifier",
        input_size=SIZE,
        input_name="image",
        output_name="probability",
        preprocessing=recipe("original", SIZE),
        normalization=Normalization(),
        class_names=["healthy", "spondylosis"],
        threshold=mf.Threshold(0.5, "fixed"),
        metrics={},
        data={},
        training={},
        backends=backends,
        demo=True,
    )


@pytest.fixture(scope="module")
def head():
    return ProbabilityHead(TinyNet()).eval()


@pytest.fixture(scope="module")
def engine_folder(tmp_path_factory, head):
    folder = tmp_path_factory.mktemp("engine") / "spondylosis"
    fp32 = export.export_onnx(head, folder / "model.onnx", SIZE)
    int8 = export.quantize_int8(fp32, folder / "model.int8.onnx", images(16, seed=1))
    mf.write(
        make_manifest(
            [
                export.backend_record("onnx-fp32", fp32, folder, "fp32"),
                export.backend_record("onnx-int8", int8, folder, "int8", kept=True),
            ]
        ),
        folder,
    )
    return folder


@pytest.fixture
def copy_folder(engine_folder, tmp_path):
    dst = tmp_path / "spondylosis"
    shutil.copytree(engine_folder, dst)
    return dst


def with_int8_kept(folder, kept: bool) -> None:
    man = mf.load(folder, verify=False)
    backends = [dataclasses.replace(b, kept=kept) if b.name == "onnx-int8" else b for b in man.backends]
    mf.write(dataclasses.replace(man, backends=backends), folder)


def _no_tensorrt() -> bool:
    return not runtime.tensorrt_available()[0]


needs_no_tensorrt = pytest.mark.skipif(not _no_tensorrt(), reason="this host can run TensorRT")


def test_load_engine_auto_uses_int8(engine_folder, head):
    loaded = runtime.load_engine(engine_folder)
    assert loaded.backend.name == "onnx-int8"
    assert loaded.runtime.backend == "onnx-int8" and isinstance(loaded.runtime, runtime.EngineRuntime)
    assert loaded.manifest.task == "spondylosis"
    out = loaded.predict(images(5, seed=2))
    assert out.shape == (5,) and out.dtype == np.float32
    assert np.all((out >= 0) & (out <= 1))


def test_load_engine_fp32_matches_torch(engine_folder, head):
    loaded = runtime.load_engine(engine_folder, "onnx-fp32", threads=1)
    x = images(5, seed=3)
    with torch.inference_mode():
        ref = head(torch.from_numpy(x)).numpy()
    assert np.max(np.abs(loaded.predict(x) - ref)) < 1e-4
    assert loaded.runtime.providers[-1] == "CPUExecutionProvider"


def test_predict_chunks_and_single_image(engine_folder):
    path = engine_folder / "model.onnx"
    small = runtime.OnnxRuntimeEngine(path, max_batch=2)
    big = runtime.OnnxRuntimeEngine(path)
    x = images(5, seed=4)
    assert np.allclose(small.predict(x), big.predict(x), atol=1e-6)
    assert big.predict(x[0]).shape == (1,)
    assert big.predict(x[:0]).shape == (0,)
    with pytest.raises(ValueError, match="expects input shape"):
        big.predict(np.zeros((1, 3, SIZE + 1, SIZE), np.float32))


def test_auto_falls_back_to_fp32_when_int8_not_kept(copy_folder):
    with_int8_kept(copy_folder, False)
    (copy_folder / "model.int8.onnx").unlink()  # an unkept file is not verified or needed
    loaded = runtime.load_engine(copy_folder)
    assert loaded.backend.name == "onnx-fp32"
    with pytest.raises(ManifestError, match="not kept"):
        runtime.load_engine(copy_folder, "onnx-int8")


def test_choose_backend_rules():
    fp32 = mf.Backend("onnx-fp32", "model.onnx", "0" * 64, "fp32")
    int8 = mf.Backend("onnx-int8", "model.int8.onnx", "1" * 64, "int8", kept=False, note="lost AUROC")
    man = make_manifest([fp32, int8])
    assert runtime.choose_backend(man, "auto").name == "onnx-fp32"
    assert runtime.choose_backend(man, "onnx-fp32") is fp32
    with pytest.raises(ManifestError, match="not kept: lost AUROC"):
        runtime.choose_backend(man, "onnx-int8")
    kept = make_manifest([fp32, dataclasses.replace(int8, kept=True)])
    assert runtime.choose_backend(kept, "auto").name == "onnx-int8"
    with pytest.raises(ManifestError, match="no tensorrt backend"):
        runtime.choose_backend(kept, "tensorrt")
    with pytest.raises(ManifestError, match="no onnx-int8 backend"):
        runtime.choose_backend(make_manifest([fp32]), "onnx-int8")
    with pytest.raises(UserError, match="unknown backend"):
        runtime.choose_backend(kept, "openvino")


@needs_no_tensorrt
def test_tensorrt_without_cuda():
    fp32 = mf.Backend("onnx-fp32", "model.onnx", "0" * 64, "fp32")
    trt = mf.Backend("tensorrt-fp16", "model.trt.ep", "2" * 64, "fp16")
    man = make_manifest([fp32, trt])
    assert runtime.choose_backend(man, "auto").name == "onnx-fp32"
    with pytest.raises(ManifestError, match=r"needs CUDA.*pip install"):
        runtime.choose_backend(man, "tensorrt")


def test_tampered_file_is_rejected(copy_folder):
    f = copy_folder / "model.int8.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="SHA-256"):
        runtime.load_engine(copy_folder)


def test_missing_file_is_rejected(copy_folder):
    (copy_folder / "model.onnx").unlink()
    with pytest.raises(ManifestError, match="missing"):
        runtime.load_engine(copy_folder, "onnx-int8")


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        runtime.load_engine(tmp_path)


# --------------------------------------------------------------------------- torch backend (CPU here)


@pytest.fixture(scope="module")
def torch_folder(tmp_path_factory, head):
    folder = tmp_path_factory.mktemp("engine-torch") / "spondylosis"
    fp32 = export.export_onnx(head, folder / "model.onnx", SIZE)
    pt2 = export.export_torch_program(head, folder / "model.pt2", SIZE)
    mf.write(
        make_manifest(
            [
                export.backend_record("onnx-fp32", fp32, folder, "fp32"),
                export.backend_record("torch", pt2, folder, "fp32"),
            ]
        ),
        folder,
    )
    return folder


def test_torch_backend_on_cpu_matches_torch(torch_folder, head):
    eng = runtime.load_engine(torch_folder, "torch")
    assert eng.backend.name == "torch" and isinstance(eng.runtime, runtime.TorchEngine)
    x = images(37, seed=4)  # more than max_batch, odd size: chunks and the dynamic batch axis
    with torch.no_grad():
        want = head(torch.from_numpy(x)).numpy()
    got = eng.predict(x)
    assert got.shape == (37,) and np.allclose(got, want, atol=1e-5)
    assert eng.predict(x[:1]).shape == (1,)


def test_torch_program_is_hashed(torch_folder, tmp_path):
    dst = tmp_path / "spondylosis"
    shutil.copytree(torch_folder, dst)
    with open(dst / "model.pt2", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ManifestError):
        runtime.load_engine(dst, "torch")


def test_auto_picks_torch_only_with_cuda(torch_folder, monkeypatch):
    man = mf.load(torch_folder)
    monkeypatch.setattr(runtime, "torch_cuda_available", lambda: (False, "no CUDA device"))
    assert runtime.choose_backend(man, "auto").name == "onnx-fp32"
    monkeypatch.setattr(runtime, "torch_cuda_available", lambda: (True, ""))
    monkeypatch.setattr(runtime, "tensorrt_available", lambda: (False, "none"))
    assert runtime.choose_backend(man, "auto").name == "torch"


def test_torch_uint8_input_matches_host_normalization(torch_folder):
    eng = runtime.load_engine(torch_folder, "torch").runtime
    u8 = np.random.default_rng(5).integers(0, 256, size=(3, SIZE, SIZE, 3), dtype=np.uint8)
    norm = Normalization((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    from screener.engine.preprocessing import normalize_batch

    want = normalize_batch(u8, norm)
    assert np.array_equal(eng.normalize_uint8(u8, norm.mean, norm.std).numpy(), want)  # bit for bit
    assert np.allclose(eng.predict_uint8(u8, norm.mean, norm.std), eng.predict(want), atol=1e-6)


def test_sessions_split_the_batch_and_agree(engine_folder):
    """Several single-threaded sessions (the CPU default) give the outputs of one session."""
    from screener.engine.runtime import OnnxRuntimeEngine, default_sessions, default_threads

    x = images(19)
    for file in ("model.onnx", "model.int8.onnx"):
        one = OnnxRuntimeEngine(engine_folder / file, threads=1, sessions=1, max_batch=8)
        two = OnnxRuntimeEngine(engine_folder / file, threads=1, sessions=2, max_batch=8)
        assert len(one.sessions) == 1 and len(two.sessions) == 2
        for n in (1, 2, 5, 19):
            assert np.array_equal(two.predict(x[:n]), one.predict(x[:n])), (file, n)
    default = OnnxRuntimeEngine(engine_folder / "model.onnx")
    assert len(default.sessions) == default_sessions(default_threads())
    assert default.threads_per_session == max(1, default_threads() // len(default.sessions))
    one_session = runtime.load_engine(engine_folder, "onnx-fp32", sessions=1).runtime
    assert len(one_session.sessions) == 1 and one_session.threads_per_session == default_threads()


def test_engine_threads_run_at_lower_priority(engine_folder):
    import threading

    from screener.engine.runtime import OnnxRuntimeEngine

    eng = OnnxRuntimeEngine(engine_folder / "model.onnx", threads=1, sessions=2, nice=5)
    base = os.getpriority(os.PRIO_PROCESS, 0)
    seen = {eng._executor.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()}
    assert seen == {min(19, base + 5)}
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the calling thread keeps its priority
