"""Load an engine folder and run it: the node's side of ``trainer/export.py``.

``load_engine(folder, requested)`` reads and verifies the manifest (schema and the
SHA-256 of every kept backend file), picks a backend with ``choose_backend`` and
returns a runtime whose ``predict`` maps a float32 (N, 3, S, S) batch to the
engine's outputs, batch axis first ((N,) probabilities, an (N, 4) box, ...).

onnxruntime is imported when an ONNX engine is opened; torch and torch_tensorrt only
when a TensorRT or torch engine is considered, so a CPU node never pays for them.

The ``torch`` backend runs the engine's ``torch.export`` program (``model.pt2``, written
by ``trainer build-engine``). On CUDA: fp16 weights, channels-last, compiled once at
load with ``torch.compile(mode="reduce-overhead")`` for one padded batch size (about 20 s;
``SCREENER_TORCH_MODE=compile``, the default). Where compiling fails, or with
``SCREENER_TORCH_MODE=graph``, inputs are padded to powers of two and each size is captured
once in a CUDA graph at load; ``eager`` does neither. On the
CPU (tests, hosts without CUDA) it runs the program in fp32 as exported.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from screener.engine import manifest as manifest_mod
from screener.engine.manifest import Backend, Manifest
from screener.errors import ManifestError, UserError

REQUESTS = ("auto", "tensorrt", "torch", "onnx-int8", "onnx-fp32")
DEFAULT_MAX_BATCH = 32
TENSORRT_HINT = "TensorRT backend needs CUDA and the tensorrt extra: pip install '.[tensorrt]'"


@runtime_checkable
class EngineRuntime(Protocol):
    """What the node needs from a loaded engine."""

    name: str
    backend: str

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, 3, S, S) -> outputs with the batch axis first."""
        ...


def _as_batch(batch: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(batch, dtype=np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected a (N, C, H, W) batch, got shape {x.shape}")
    return x


# --------------------------------------------------------------------------- ONNX Runtime


class OnnxRuntimeEngine:
    """An ONNX file on ONNX Runtime: CUDA EP first when this onnxruntime build has it, else CPU.

    On the CPU a batch is split over `sessions` sessions of the same file that run in
    parallel, each with `threads` intra-op threads (default: up to 4 sessions, the CPUs
    shared between them; on 2 CPUs two single-threaded sessions). One session with a thread
    per CPU runs as fast alone (85 against 87 img/s, ResNet50 int8, 2 cores), but its threads
    meet at a barrier after every operator, so when the decode workers take a CPU for a moment
    every operator waits for the thread that lost it: with the pool running the engine's time
    per image rose from 12.3 to 19.5 ms. Single-threaded sessions share the CPUs with the
    workers without waiting for each other (`nice`: the niceness of the threads that run them,
    so that receiving images goes first on a busy node; per thread on Linux). Intra-op threads
    do not spin while idle (no cost alone, measured; the CPU goes to the workers instead).
    Outputs do not depend on how a batch is split (static int8 quantization, fp32: per image,
    tested).
    """

    def __init__(
        self,
        path: Path,
        threads: int | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        name: str | None = None,
        backend: str = "onnx",
        sessions: int | None = None,
        nice: int = 0,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.name = name or self.path.stem
        self.backend = backend
        self.max_batch = max(1, int(max_batch))
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        cpus = default_threads()
        if "CUDAExecutionProvider" in providers:
            count = 1
        elif sessions:
            count = max(1, int(sessions))
        else:
            count = 1 if threads else default_sessions(cpus)
        per_session = int(threads) if threads else max(1, cpus // count)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.intra_op_num_threads = per_session
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        try:
            self.sessions = [ort.InferenceSession(str(self.path), opts, providers=providers) for _ in range(count)]
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ManifestError(f"{self.path}: ONNX Runtime cannot load the engine ({exc})") from None
        self.session = self.sessions[0]
        self.threads_per_session = per_session
        self._executor: Any = None
        if len(self.sessions) > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(
                len(self.sessions), thread_name_prefix=f"ort-{self.name}", initializer=_lower_priority, initargs=(nice,)
            )
        inp = self.session.get_inputs()[0]
        self.input_name: str = inp.name
        self.input_shape: list[Any] = list(inp.shape)
        out = self.session.get_outputs()[0]
        self.output_name: str = out.name
        self.output_shape: list[Any] = list(out.shape)
        self.providers: list[str] = self.session.get_providers()

    def _check(self, x: np.ndarray) -> None:
        for axis, (want, got) in enumerate(zip(self.input_shape[1:], x.shape[1:]), start=1):
            if isinstance(want, int) and want != got:
                raise ValueError(
                    f"engine {self.name} expects input shape {self.input_shape}, got {list(x.shape)} (axis {axis})"
                )

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Run in chunks of at most `max_batch`; returns float32 outputs, batch axis first."""
        x = _as_batch(batch)
        self._check(x)
        if len(x) == 0:
            tail = [d if isinstance(d, int) else 0 for d in self.output_shape[1:]]
            return np.zeros((0, *tail), np.float32)
        # With several sessions, small chunks taken in turn by whichever session is free: when a
        # decode worker holds a CPU for a while the other session keeps working (halves would wait
        # for the slower one). Single-threaded ONNX Runtime runs as fast at 4 images as at 32.
        parts = len(self.sessions) * 4 if len(self.sessions) > 1 else 1
        step = max(1, min(self.max_batch, -(-len(x) // parts)))
        chunks = [x[i : i + step] for i in range(0, len(x), step)]
        if self._executor is None or len(chunks) == 1:
            outs = [self.session.run([self.output_name], {self.input_name: c})[0] for c in chunks]
        else:
            sessions = self.sessions
            jobs = [
                self._executor.submit(sessions[k % len(sessions)].run, [self.output_name], {self.input_name: c})
                for k, c in enumerate(chunks)
            ]
            outs = [j.result()[0] for j in jobs]
        return np.concatenate(outs, axis=0).astype(np.float32, copy=False)


# --------------------------------------------------------------------------- TensorRT


def tensorrt_available() -> tuple[bool, str]:
    """(True, "") when CUDA and torch_tensorrt can be used here; else (False, why not)."""
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        return False, f"torch is not importable ({exc.__class__.__name__})"
    if not torch.cuda.is_available():
        return False, "no CUDA device (TensorRT needs an NVIDIA GPU)"
    try:
        importlib.import_module("torch_tensorrt")
    except Exception as exc:  # noqa: BLE001 - missing or broken install: same answer
        return False, f"torch_tensorrt is not installed ({exc.__class__.__name__}: {exc})"
    return True, ""


class TensorRTEngine:
    """A Torch-TensorRT program saved by ``trainer.export.export_tensorrt``, run on CUDA in fp16."""

    def __init__(
        self, path: Path, max_batch: int = DEFAULT_MAX_BATCH, name: str | None = None, backend: str = "tensorrt"
    ) -> None:
        ok, why = tensorrt_available()
        if not ok:
            raise ManifestError(f"{TENSORRT_HINT} ({why})")
        import torch

        importlib.import_module("torch_tensorrt")  # registers the TensorRT ops before loading
        self.path = Path(path)
        self.name = name or self.path.stem
        self.backend = backend
        self.max_batch = max(1, int(max_batch))
        self._torch = torch
        self._device = torch.device("cuda")
        self.module = self._load(self.path)

    def _load(self, path: Path) -> Any:
        """ExportedProgram (``torch_tensorrt.save`` default) or TorchScript, by suffix then by trying."""
        loaders = [self._load_exported, self._load_script]
        if path.suffix in (".ts", ".jit"):
            loaders.reverse()
        errors = []
        for loader in loaders:
            try:
                return loader(path)
            except Exception as exc:  # noqa: BLE001 - try the other format
                errors.append(f"{exc.__class__.__name__}: {exc}")
        raise ManifestError(f"{path}: not a loadable TensorRT program ({'; '.join(errors)})")

    def _load_exported(self, path: Path) -> Any:
        return self._torch.export.load(str(path)).module()

    def _load_script(self, path: Path) -> Any:
        return self._torch.jit.load(str(path), map_location=self._device).eval()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, 3, S, S) -> float32 outputs on the host, in chunks of `max_batch`."""
        torch = self._torch
        x = _as_batch(batch)
        outs = []
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
            for i in range(0, len(x), self.max_batch):
                chunk = torch.from_numpy(x[i : i + self.max_batch]).to(self._device)
                out = self.module(chunk)
                if isinstance(out, (tuple, list)):
                    out = out[0]
                outs.append(out.float().cpu().numpy())
        if not outs:
            return np.zeros((0,), np.float32)
        return np.concatenate(outs, axis=0)


# --------------------------------------------------------------------------- torch (torch.export program)


def torch_cuda_available() -> tuple[bool, str]:
    """(True, "") when torch is importable and sees a CUDA device; else (False, why not).

    Without an NVIDIA driver (no /proc/driver/nvidia) torch is not even imported."""
    if not Path("/proc/driver/nvidia").exists() and not Path("/dev/nvidiactl").exists():
        return False, "no NVIDIA driver on this host"
    if importlib.util.find_spec("torch") is None:
        return False, "torch is not installed (pip install '.[gpu]')"
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        return False, f"torch is not importable ({exc.__class__.__name__})"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, ""


TORCH_MODES = ("graph", "compile", "eager")


class TorchEngine:
    """A ``torch.export`` program: CUDA fp16 channels-last with CUDA graphs, or fp32 on the CPU."""

    def __init__(
        self,
        path: Path,
        max_batch: int = DEFAULT_MAX_BATCH,
        name: str | None = None,
        backend: str = "torch",
        device: str | None = None,
        mode: str | None = None,
        image_size: int | None = None,
    ) -> None:
        try:
            import torch
        except Exception as exc:  # noqa: BLE001
            raise ManifestError(f"the torch backend needs PyTorch: pip install '.[gpu]' ({exc})") from None
        self._torch = torch
        self.path = Path(path)
        self.name = name or self.path.stem
        self.backend = backend
        self.max_batch = max(1, int(max_batch))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.mode = mode or os.environ.get("SCREENER_TORCH_MODE", "compile")
        if self.mode not in TORCH_MODES:
            raise UserError(f"SCREENER_TORCH_MODE={self.mode!r}: expected one of {', '.join(TORCH_MODES)}")
        try:
            module = torch.export.load(str(self.path)).module()
        except Exception as exc:  # noqa: BLE001 - any unreadable program: one answer
            why = exc.__class__.__name__
            raise ManifestError(f"{self.path}: not a loadable torch.export program ({why})") from None
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            module = module.to(self.device).half().to(memory_format=torch.channels_last)
            self.dtype = torch.float16
        else:
            self.dtype = torch.float32
        self.module: Any = module
        self.image_size = image_size
        # Padded batch sizes: powers of two up to max_batch (each compiled or captured once).
        sizes, b = [], 1
        while b < self.max_batch:
            sizes.append(b)
            b *= 2
        self.buckets = [*sizes, self.max_batch]
        if self.cuda and self.mode == "compile":
            self.buckets = [self.max_batch]  # one compiled shape; smaller batches are padded
        self._graphs: dict[int, tuple[Any, Any, Any]] = {}
        if self.cuda and self.mode == "compile":
            try:
                self.module = torch.compile(module, mode="reduce-overhead", dynamic=False)
                self._warm_up()
            except Exception as exc:  # noqa: BLE001 - no compiler toolchain, an Inductor bug: CUDA graphs
                from screener.logs import get_logger

                get_logger(__name__).warning("torch_compile_failed", engine=self.name, error=exc.__class__.__name__)
                self.mode, self.module = "graph", module
                self.buckets = [*sizes, self.max_batch]
        if self.cuda and self.mode == "graph":
            self._warm_up()

    def _warm_up(self) -> None:
        """Compile or capture every padded batch size now, at load, not on first use."""
        if not self.image_size:
            return
        s = self.image_size
        for size in self.buckets:
            self._run_padded(self._torch.zeros(size, 3, s, s, device=self.device, dtype=self.dtype))

    def _bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _capture(self, x: Any) -> tuple[Any, Any, Any]:
        torch = self._torch
        static_in = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up on a side stream before capture (cuDNN picks its kernels)
                self.module(static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.module(static_in)
        return graph, static_in, static_out

    def _run_padded(self, x: Any) -> Any:
        """Run a device batch whose size is one of the buckets."""
        if not self.cuda or self.mode == "eager":
            return self.module(x)
        if self.mode == "compile":
            return self.module(x)
        key = (int(x.shape[0]), tuple(x.shape[2:]))
        if key not in self._graphs:
            self._graphs[key] = self._capture(x)  # type: ignore[index]
        graph, static_in, static_out = self._graphs[key]  # type: ignore[index]
        static_in.copy_(x)
        graph.replay()
        return static_out

    def predict_tensor(self, x: Any) -> Any:
        """A device tensor (N, 3, S, S) of the engine's dtype -> outputs on the device (float32)."""
        torch = self._torch
        outs = []
        with torch.inference_mode():
            for i in range(0, int(x.shape[0]), self.max_batch):
                chunk = x[i : i + self.max_batch]
                n = int(chunk.shape[0])
                size = self._bucket(n) if self.cuda else n
                if size != n:
                    pad = torch.zeros((size - n, *chunk.shape[1:]), device=chunk.device, dtype=chunk.dtype)
                    chunk = torch.cat([chunk, pad])
                if self.cuda:
                    chunk = chunk.contiguous(memory_format=torch.channels_last)
                out = self._run_padded(chunk)
                if isinstance(out, (tuple, list)):
                    out = out[0]
                outs.append(out[:n].float().clone())
        return torch.cat(outs) if outs else torch.zeros((0,), device=self.device)

    def predict_uint8(self, images: np.ndarray, mean: Any, std: Any) -> np.ndarray:
        """uint8 (N, S, S, 3) model images -> outputs on the host, normalized on the device.

        A quarter of the bytes of the float32 batch cross the bus. The normalization is
        ``preprocessing.normalize_batch``'s float32 operations in the same order
        ((x / 255 - mean) / std, each correctly rounded), then the cast to fp16."""
        if len(images) == 0:
            return np.zeros((0,), np.float32)
        return self.predict_tensor(self.normalize_uint8(images, mean, std).to(self.dtype)).cpu().numpy()

    def normalize_uint8(self, images: np.ndarray, mean: Any, std: Any) -> Any:
        """uint8 (N, S, S, 3) on the host -> float32 (N, 3, S, S) on the device (see predict_uint8)."""
        torch = self._torch
        u8 = np.ascontiguousarray(images, dtype=np.uint8)
        if u8.ndim != 4 or u8.shape[-1] != 3:
            raise ValueError(f"expected uint8 (N, S, S, 3) images, got shape {u8.shape}")
        t = torch.from_numpy(u8)
        if self.cuda:
            t = t.pin_memory().to(self.device, non_blocking=True)
        m = torch.tensor(np.asarray(mean, np.float32), device=t.device).view(1, 3, 1, 1)
        sd = torch.tensor(np.asarray(std, np.float32), device=t.device).view(1, 3, 1, 1)
        x = t.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        return ((x - m) / sd).contiguous()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, 3, S, S) -> float32 outputs on the host."""
        torch = self._torch
        x = _as_batch(batch)
        if len(x) == 0:
            return np.zeros((0,), np.float32)
        t = torch.from_numpy(x)
        if self.cuda:
            t = t.pin_memory().to(self.device, non_blocking=True).to(self.dtype)
        return self.predict_tensor(t).cpu().numpy()


# --------------------------------------------------------------------------- choice and loading


def _find(manifest: Manifest, requested: str) -> Backend | None:
    """The backend named `requested`, or for "tensorrt" any "tensorrt-*" backend (e.g. tensorrt-fp16)."""
    exact = manifest.backend(requested)
    if exact is not None:
        return exact
    return next((b for b in manifest.backends if b.name.startswith(requested + "-")), None)


def _usable(backend: Backend | None) -> bool:
    return backend is not None and backend.kept


def choose_backend(manifest: Manifest, requested: str = "auto") -> Backend:
    """Pick the backend to run.

    ``auto``: TensorRT when CUDA and torch_tensorrt are usable and the manifest kept a TensorRT
    backend; else ``torch`` when CUDA is usable and the manifest kept a torch program; else
    onnx-int8 if kept; else onnx-fp32. An explicit request for a backend the
    manifest lacks, did not keep, or (TensorRT) that cannot run here raises ManifestError.
    """
    if requested not in REQUESTS:
        raise UserError(f"unknown backend {requested!r}; choose one of {', '.join(REQUESTS)}")
    if requested == "auto":
        trt = _find(manifest, "tensorrt")
        if _usable(trt) and tensorrt_available()[0]:
            return trt  # type: ignore[return-value]
        program = manifest.backend("torch")
        if _usable(program) and torch_cuda_available()[0]:
            return program  # type: ignore[return-value]
        for name in ("onnx-int8", "onnx-fp32"):
            b = manifest.backend(name)
            if _usable(b):
                return b  # type: ignore[return-value]
        names = ", ".join(f"{b.name}{'' if b.kept else ' (not kept)'}" for b in manifest.backends)
        raise ManifestError(f"{manifest.task} engine has no usable backend (listed: {names})")
    chosen = _find(manifest, requested)
    if chosen is None:
        names = ", ".join(b.name for b in manifest.backends)
        raise ManifestError(f"{manifest.task} engine has no {requested} backend (it has: {names})")
    if not chosen.kept:
        why = f": {chosen.note}" if chosen.note else ""
        raise ManifestError(f"{manifest.task} engine's {chosen.name} backend was built but not kept{why}")
    if requested == "tensorrt":
        ok, reason = tensorrt_available()
        if not ok:
            raise ManifestError(f"{manifest.task} engine: {TENSORRT_HINT} ({reason})")
    return chosen


@dataclass
class LoadedEngine:
    """A verified engine folder and its running backend."""

    manifest: Manifest
    backend: Backend
    runtime: EngineRuntime
    folder: Path | None = None

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.runtime.predict(batch)


def open_runtime(
    folder: Path,
    manifest: Manifest,
    backend: Backend,
    threads: int | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    nice: int = 0,
    sessions: int | None = None,
) -> EngineRuntime:
    """Instantiate the runtime for one backend record of `manifest`."""
    path = Path(folder) / backend.file
    name = f"{manifest.task}:{backend.name}"
    if backend.name.startswith("tensorrt"):
        return TensorRTEngine(path, max_batch=max_batch, name=name, backend=backend.name)
    if backend.name == "torch":
        return TorchEngine(path, max_batch=max_batch, name=name, backend=backend.name, image_size=manifest.input_size)
    if backend.name.startswith("onnx"):
        return OnnxRuntimeEngine(
            path, threads=threads, max_batch=max_batch, name=name, backend=backend.name, nice=nice, sessions=sessions
        )
    raise ManifestError(f"{path}: unknown backend kind {backend.name!r}")


def load_engine(
    folder: Path,
    requested: str = "auto",
    threads: int | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    nice: int = 0,
    sessions: int | None = None,
) -> LoadedEngine:
    """Load and verify ``folder/manifest.json`` (SHA-256 of every kept file), then open a backend."""
    folder = Path(folder)
    man = manifest_mod.load(folder, verify=True)
    backend = choose_backend(man, requested)
    runtime = open_runtime(folder, man, backend, threads=threads, max_batch=max_batch, nice=nice, sessions=sessions)
    return LoadedEngine(man, backend, runtime, folder)


def _lower_priority(nice: int) -> None:
    """Lower the calling thread's priority by `nice` (per thread on Linux); best effort."""
    if nice > 0:
        with contextlib.suppress(OSError):
            os.nice(nice)


def default_sessions(cpus: int) -> int:
    """ONNX Runtime sessions per engine on the CPU: one per CPU, at most 4 (see OnnxRuntimeEngine)."""
    return max(1, min(int(cpus), 4))


def default_threads() -> int:
    """All CPUs this process may use (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
