"""Turn a trained module into the engine files the node runs.

* ``export_onnx``: fp32 ONNX, dynamic batch axis, one self-contained file.
* ``quantize_int8``: ONNX Runtime static int8 quantization, calibrated on real
  preprocessed training images (see the function's docstring for the settings).
* ``export_tensorrt``: a Torch-TensorRT fp16 program (NVIDIA hosts with the
  ``tensorrt`` extra only; imported lazily, never at module import).
* ``export_torch_program``: the ``torch.export`` program (``model.pt2``) the node's
  ``torch`` backend runs (CUDA fp16, or the CPU).
* ``compare_with_torch`` / ``onnx_predict``: parity checks used by the build.
* ``backend_record``: the manifest entry (SHA-256, path relative to the engine folder).

All functions are generic over the output shape: (N,) probabilities, an (N, 4)
box or an (N, K) vector are handled alike; the batch axis is always first.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from screener.engine.manifest import Backend, sha256_file
from screener.engine.runtime import TENSORRT_HINT, tensorrt_available
from screener.errors import UserError

EXAMPLE_BATCH = 2  # >= 2 so the exporter does not specialise the batch axis to 1
DEFAULT_CHUNK = 32

__all__ = [
    "export_onnx",
    "quantize_int8",
    "compare_with_torch",
    "onnx_predict",
    "torch_predict",
    "tensorrt_available",
    "export_tensorrt",
    "export_torch_program",
    "backend_record",
    "is_self_contained",
    "QUANTIZED_OPS",
]


# --------------------------------------------------------------------------- ONNX fp32


def export_onnx(
    module: nn.Module,
    path: Path,
    image_size: int,
    input_name: str = "image",
    output_name: str = "probability",
    opset: int = 18,
) -> Path:
    """Export `module` (eval, CPU, fp32) to a single self-contained ONNX file with a dynamic batch axis.

    Tries the dynamo exporter first (``torch.export`` + ``dynamic_shapes``); if that fails or
    yields a model whose batch axis is not dynamic, falls back to the TorchScript exporter with
    ``dynamic_axes``. Either way the result is checked with ``onnx.checker`` and any external
    data is folded back into the one ``.onnx`` file.

    The default opset is 18: the lowest the dynamo exporter implements; asking it for 17
    makes it attempt a down-conversion that fails for ResNet50 (ReduceMean axes) and
    leaves the model at 18 anyway. ONNX Runtime 1.31 runs opsets up to 23.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = _cpu_eval_copy(module)
    example = torch.randn(EXAMPLE_BATCH, 3, image_size, image_size, dtype=torch.float32)
    errors: list[str] = []
    for exporter in (_export_dynamo, _export_torchscript):
        try:
            with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
                tmp_file = Path(tmp) / "model.onnx"
                exporter(module, example, tmp_file, input_name, output_name, opset)
                model = onnx.load(str(tmp_file), load_external_data=True)
            if not _batch_is_dynamic(model):
                raise RuntimeError("the exported batch axis is static")
            onnx.checker.check_model(model)
            _save_single_file(model, path)
            return path
        except Exception as exc:  # noqa: BLE001 - try the next exporter, report all on failure
            errors.append(f"{exporter.__name__}: {exc.__class__.__name__}: {exc}")
    raise RuntimeError("ONNX export failed:\n" + "\n".join(errors))


def _cpu_eval_copy(module: nn.Module) -> nn.Module:
    """An eval-mode fp32 CPU copy of `module`, so the caller's device and train/eval state are untouched."""
    import copy

    on_cpu = all(
        t.device.type == "cpu" and t.dtype == torch.float32
        for t in [*module.parameters(), *module.buffers()]
        if t.is_floating_point()
    )
    if on_cpu and not module.training:
        return module
    return copy.deepcopy(module).float().cpu().eval()


def _export_dynamo(
    module: nn.Module, example: torch.Tensor, file: Path, input_name: str, output_name: str, opset: int
) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(file),
            dynamo=True,
            external_data=False,
            input_names=[input_name],
            output_names=[output_name],
            opset_version=opset,
            dynamic_shapes=({0: batch},),
            optimize=True,
            verbose=False,
        )


def _export_torchscript(
    module: nn.Module, example: torch.Tensor, file: Path, input_name: str, output_name: str, opset: int
) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(file),
            dynamo=False,
            input_names=[input_name],
            output_names=[output_name],
            opset_version=opset,
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
            do_constant_folding=True,
        )


def _batch_is_dynamic(model: Any) -> bool:
    """True when the first axis of every graph input and output is symbolic."""
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if not dims or dims[0].HasField("dim_value"):
            return False
    return True


def _save_single_file(model: Any, path: Path) -> None:
    """Write `model` with every tensor inline (no external-data side file), atomically."""
    import onnx

    tmp = path.with_name(path.name + ".part")
    onnx.save_model(model, str(tmp), save_as_external_data=False)
    tmp.replace(path)


def is_self_contained(path: Path) -> bool:
    """True when no initializer of the ONNX file refers to external data."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    return not any(uses_external_data(t) for t in model.graph.initializer)


# --------------------------------------------------------------------------- ONNX int8

# The convolutional trunk; everything after it (ReduceMean/GlobalAveragePool, Gemm, Softmax) stays fp32.
QUANTIZED_OPS = ("Conv", "Add", "MaxPool", "Relu", "Clip", "Concat")


def quantize_int8(
    fp32_path: Path, int8_path: Path, calibration: Iterable[np.ndarray] | np.ndarray, input_name: str = "image"
) -> Path:
    """Static int8 quantization with ONNX Runtime, calibrated on real preprocessed images.

    `calibration`: float32 batches (N, 3, S, S) or one such array (split into batches of 8).

    Settings (measured on a 2-core AVX-512 VNNI x86 CPU, ResNet50 224 px, batch 32):

    * ``quant_pre_process`` first (symbolic shape inference + ORT's basic graph
      optimisation: BatchNorm folded into the convolutions before calibration);
    * QDQ format, which ORT's CPU EP fuses into QLinearConv / QLinearAdd kernels;
    * weights signed int8, symmetric, **per output channel** (per-tensor lost accuracy);
    * activations unsigned uint8, asymmetric (post-ReLU tensors keep the full range).
      U8S8 is what ORT's x86 MLAS kernels run fastest (VPDPBUSD / VPMADDUBSW take
      u8 x s8): ~3.5x ORT fp32 here, while S8S8 was ~1.4x and ``reduce_range=True`` slower
      and less accurate, so ``reduce_range=False``. On AVX2 CPUs without VNNI the
      u8 x s8 pair sums can in rare cases saturate; the build's int8 AUROC check (and
      ``kept=False``) is the guard;
    * MinMax calibration: Percentile and Entropy were no more accurate here and are slower;
    * only the convolutional trunk is quantized (``QUANTIZED_OPS``); the head (pooling
      mean, Gemm, Softmax, Gather) stays fp32, so a probability is not rounded to 1/255
      steps and a box or vector output keeps full precision. This is also the fastest variant.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    batches = list(_calibration_batches(calibration))
    if not batches:
        raise ValueError("quantize_int8 needs at least one calibration image")
    with tempfile.TemporaryDirectory(dir=int8_path.parent, prefix=".quant-") as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        quant_pre_process(str(fp32_path), str(prepped), skip_symbolic_shape=False)
        out = Path(tmp) / "int8.onnx"
        quantize_static(
            str(prepped),
            str(out),
            _Reader(input_name, batches),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=True,
            reduce_range=False,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
        import onnx

        model = onnx.load(str(out), load_external_data=True)
    onnx.checker.check_model(model)
    _save_single_file(model, int8_path)
    return int8_path


def _calibration_batches(calibration: Iterable[np.ndarray] | np.ndarray, size: int = 8) -> Iterator[np.ndarray]:
    if isinstance(calibration, np.ndarray):
        arr = np.ascontiguousarray(calibration, dtype=np.float32)
        if arr.ndim == 3:
            arr = arr[None]
        for i in range(0, len(arr), size):
            yield arr[i : i + size]
        return
    for batch in calibration:
        arr = np.ascontiguousarray(batch, dtype=np.float32)
        yield arr[None] if arr.ndim == 3 else arr


class _Reader:
    """The CalibrationDataReader protocol over a list of batches."""

    def __init__(self, input_name: str, batches: list[np.ndarray]) -> None:
        self._name = input_name
        self._batches = batches
        self._it = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {self._name: batch}

    def rewind(self) -> None:
        self._it = iter(self._batches)


# --------------------------------------------------------------------------- parity


def _session(onnx_path: Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
    opts.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


def onnx_predict(onnx_path: Path, inputs: np.ndarray, batch_size: int = DEFAULT_CHUNK) -> np.ndarray:
    """Run an ONNX file on the CPU EP in chunks; returns outputs with the batch axis first."""
    sess = _session(onnx_path)
    name = sess.get_inputs()[0].name
    x = np.ascontiguousarray(inputs, dtype=np.float32)
    outs = [sess.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(outs, axis=0) if outs else np.zeros((0,), np.float32)


def torch_predict(module: nn.Module, inputs: np.ndarray, batch_size: int = DEFAULT_CHUNK) -> np.ndarray:
    """The eager reference: CPU, eval, inference mode, fp32 (the caller's module is left as it was)."""
    module = _cpu_eval_copy(module)
    x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
    with torch.inference_mode():
        outs = [module(x[i : i + batch_size]).float().numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(outs, axis=0) if outs else np.zeros((0,), np.float32)


def compare_with_torch(module: nn.Module, onnx_path: Path, inputs: np.ndarray) -> float:
    """Max absolute difference between the eager module and the ONNX file on the same inputs."""
    ref = torch_predict(module, inputs)
    got = onnx_predict(onnx_path, inputs)
    if ref.shape != got.shape:
        raise ValueError(f"output shapes differ: torch {ref.shape}, onnx {got.shape}")
    return float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64)))) if ref.size else 0.0


# --------------------------------------------------------------------------- TensorRT


class _Fp16(nn.Module):
    """fp32 in, fp16 network, fp32 out: the TensorRT program's interface stays fp32."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.half()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.module(image.half()).float()


def export_tensorrt(
    module: nn.Module, path: Path, image_size: int, min_batch: int = 1, opt_batch: int = 8, max_batch: int = 32
) -> Path:
    """Compile `module` with Torch-TensorRT (dynamo IR, fp16, dynamic batch) and save it.

    The saved file is a ``torch.export`` ExportedProgram (load with ``torch.export.load``
    after ``import torch_tensorrt``); its input and output are fp32, the network runs in
    fp16 (explicit typing: the weights are cast to half, which every Torch-TensorRT 2.x
    honours, whether or not it still supports the deprecated ``enabled_precisions``).
    Raises UserError when CUDA or torch_tensorrt is missing.
    """
    ok, why = tensorrt_available()
    if not ok:
        raise UserError(f"{TENSORRT_HINT} ({why})")
    import copy

    import torch_tensorrt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = _Fp16(copy.deepcopy(module).eval()).eval().cuda()
    shape = (3, image_size, image_size)
    spec = torch_tensorrt.Input(
        min_shape=(min_batch, *shape),
        opt_shape=(opt_batch, *shape),
        max_shape=(max_batch, *shape),
        dtype=torch.float32,
    )
    with torch.no_grad():
        trt_gm = torch_tensorrt.compile(net, ir="dynamo", inputs=[spec], min_block_size=1)
        torch_tensorrt.save(trt_gm, str(path), output_format="exported_program", inputs=[spec])
    return path


# --------------------------------------------------------------------------- manifest


def backend_record(name: str, file: Path, folder: Path, precision: str, **kw: Any) -> Backend:
    """The manifest entry of one built file: its path relative to `folder` and its SHA-256."""
    file, folder = Path(file), Path(folder)
    try:
        rel = file.resolve().relative_to(folder.resolve())
    except ValueError:
        raise ValueError(f"{file} is not inside the engine folder {folder}") from None
    return Backend(name=name, file=rel.as_posix(), sha256=sha256_file(file), precision=precision, **kw)


def tensorrt_backend(
    module: nn.Module, folder: Path, image_size: int, requested: str, info: dict[str, Any]
) -> Backend | None:
    """The TensorRT step of an engine build (``--backend tensorrt|all``).

    Builds and records ``model.trt.ep`` when CUDA and torch-tensorrt are present. Otherwise
    it notes why in `info` and prints it; with ``--backend tensorrt`` alone that is an error."""
    if requested not in ("tensorrt", "all"):
        return None
    ok, reason = tensorrt_available()
    if not ok:
        msg = f"TensorRT backend skipped: {reason}"
        print(msg)
        info["tensorrt"] = msg
        if requested == "tensorrt":
            raise UserError(f"{msg}. Build with --backend onnx on this host.")
        return None
    trt = export_tensorrt(module, folder / "model.trt.ep", image_size)
    info["tensorrt"] = "built"
    return backend_record("tensorrt-fp16", trt, folder, "fp16")


# --------------------------------------------------------------------------- torch.export (the `torch` backend)


def export_torch_program(module: nn.Module, path: Path, image_size: int, max_batch: int = 4096) -> Path:
    """Write the engine's ``torch.export`` program (``torch.export.save``): fp32 in, outputs as the
    ONNX file's, dynamic batch. The node's ``torch`` backend loads it (CUDA fp16, or the CPU)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = _cpu_eval_copy(module)
    example = torch.zeros(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with torch.no_grad():
        program = torch.export.export(net, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path
