"""Throughput of the engine backends against torch eager, on the same inputs.

    python -m bench.engines [--sizes 224 512] [--batches 1 8 32] [--seconds 5]
                            [--engines-dir engines/] [--threads N] [--no-random]

By default it builds a ResNet50 probability engine with random weights (BatchNorm
statistics set from one batch of random images so activations stay in range),
exports it to a temporary folder as ONNX fp32 and int8 (random calibration data:
fine for speed, meaningless for accuracy) and, where CUDA and torch_tensorrt are
present, as TensorRT fp16. With ``--engines-dir`` it also runs the files of every
built engine found there (``<dir>/<task>/manifest.json``, hashes verified), at each
engine's own input size.

Each cell: one warm-up call, then calls until ``--seconds`` have passed (at least one),
timed with ``time.perf_counter``; images/s = images processed / elapsed. torch and ONNX
Runtime use the same number of threads (all CPUs by default). The "x eager" column is
the ratio to torch eager (CPU, fp32, ``torch.inference_mode``) at the same size and batch.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from screener.engine import manifest as mf
from screener.engine import runtime
from screener.errors import UserError


@dataclass(frozen=True)
class Row:
    source: str  # "random" or the engine folder name
    size: int
    batch: int
    engine: str
    images_per_s: float


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def measure(fn: Callable[[np.ndarray], object], x: np.ndarray, seconds: float) -> float:
    """Images per second of `fn` on batch `x`: one warm-up call, then at least one timed call."""
    fn(x)
    n = 0
    start = time.perf_counter()
    while True:
        fn(x)
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n * len(x) / elapsed


def random_head(seed: int = 0) -> nn.Module:
    """ResNet50 + ProbabilityHead, random weights, BatchNorm statistics from one random batch."""
    from trainer.model import ProbabilityHead, build_classifier

    torch.manual_seed(seed)
    model, _ = build_classifier(None)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64))
    return ProbabilityHead(model).eval()


def torch_runner(module: nn.Module) -> Callable[[np.ndarray], object]:
    def run(x: np.ndarray) -> object:
        with torch.inference_mode():
            return module(torch.from_numpy(x))

    return run


def inputs(size: int, batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, 3, size, size)).astype(np.float32)


def build_random_engines(
    head: nn.Module, size: int, folder: Path, threads: int, max_batch: int
) -> list[runtime.EngineRuntime]:
    """Export the random model at `size` and open each backend."""
    from trainer import export

    log(f"[{size}px] exporting ONNX fp32 ...")
    fp32 = export.export_onnx(head, folder / f"model-{size}.onnx", size)
    log(f"[{size}px] quantizing int8 (random calibration) ...")
    int8 = export.quantize_int8(fp32, folder / f"model-{size}.int8.onnx", inputs(size, 8, seed=1))
    engines: list[runtime.EngineRuntime] = [
        runtime.OnnxRuntimeEngine(fp32, threads=threads, max_batch=max_batch, backend="onnx-fp32"),
        runtime.OnnxRuntimeEngine(int8, threads=threads, max_batch=max_batch, backend="onnx-int8"),
    ]
    ok, why = runtime.tensorrt_available()
    if ok:
        log(f"[{size}px] compiling TensorRT fp16 ...")
        trt = export.export_tensorrt(head, folder / f"model-{size}.trt.ep", size, max_batch=max(32, max_batch))
        engines.append(runtime.TensorRTEngine(trt, max_batch=max_batch, backend="tensorrt-fp16"))
    else:
        log(f"[{size}px] TensorRT skipped: {why}")
    return engines


def find_engine_folders(root: Path) -> list[Path]:
    """Every folder under `root` (itself included) that holds a manifest.json."""
    return sorted({p.parent for p in Path(root).rglob(mf.MANIFEST_NAME)})


def open_built_engines(folder: Path, threads: int, max_batch: int) -> tuple[mf.Manifest, list[runtime.EngineRuntime]]:
    """The runnable kept backends of one built engine folder (hashes verified)."""
    man = mf.load(folder, verify=True)
    trt_ok = runtime.tensorrt_available()[0]
    engines = []
    for b in man.backends:
        if not b.kept:
            log(f"{folder.name}: {b.name} not kept, skipped")
            continue
        if b.name.startswith("tensorrt") and not trt_ok:
            log(f"{folder.name}: {b.name} skipped (no CUDA / torch_tensorrt here)")
            continue
        engines.append(runtime.open_runtime(folder, man, b, threads=threads, max_batch=max_batch))
    return man, engines


class Baselines:
    """torch eager images/s per (size, batch), with one lazily built random ResNet50."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._head: nn.Module | None = None
        self.values: dict[tuple[int, int], float] = {}

    @property
    def head(self) -> nn.Module:
        if self._head is None:
            self._head = random_head()
        return self._head

    def get(self, size: int, batch: int, x: np.ndarray) -> float:
        key = (size, batch)
        if key not in self.values:
            log(f"[{size}px] torch eager, batch {batch} ...")
            self.values[key] = measure(torch_runner(self.head), x, self.seconds)
        return self.values[key]


def bench_engines(
    source: str,
    size: int,
    batches: list[int],
    engines: list[runtime.EngineRuntime],
    base: Baselines,
    seconds: float,
    rows: list[Row],
) -> None:
    x_all = inputs(size, max(batches))
    for batch in batches:
        x = x_all[:batch]
        if source == "random" or (size, batch) not in base.values:
            rows.append(Row("random", size, batch, "torch-eager", base.get(size, batch, x)))
        for eng in engines:
            log(f"[{size}px] {source} {eng.backend}, batch {batch} ...")
            rows.append(Row(source, size, batch, eng.backend, measure(eng.predict, x, seconds)))


def format_table(rows: list[Row], base: Baselines) -> str:
    header = f"{'source':<16} {'size':>5} {'batch':>5}  {'engine':<14} {'img/s':>9} {'x eager':>8}"
    lines = [header, "-" * len(header)]
    for r in sorted(rows, key=lambda r: (r.size, r.source != "random", r.source, r.batch)):
        ref = base.values.get((r.size, r.batch))
        ratio = f"{r.images_per_s / ref:7.2f}x" if ref else "       -"
        lines.append(f"{r.source:<16} {r.size:>5} {r.batch:>5}  {r.engine:<14} {r.images_per_s:>9.2f} {ratio}")
    return "\n".join(lines)


def environment(threads: int) -> str:
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"CPU: {cpu}; threads: {threads} (torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}); CUDA: {torch.cuda.is_available()}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 512])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--seconds", type=float, default=5.0, help="timed seconds per cell (after one warm-up call)")
    ap.add_argument("--engines-dir", type=Path, default=None, help="also benchmark every built engine here")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch and ORT (default: all)")
    ap.add_argument("--no-random", action="store_true", help="skip the random-weights ResNet50")
    args = ap.parse_args(argv)
    if any(b < 1 for b in args.batches) or any(s < 32 for s in args.sizes):
        ap.error("batches must be >= 1 and sizes >= 32")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = args.threads or runtime.default_threads()
    torch.set_num_threads(threads)
    max_batch = max(args.batches)
    base = Baselines(args.seconds)
    rows: list[Row] = []
    log(environment(threads))
    try:
        if not args.no_random:
            with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
                for size in args.sizes:
                    engines = build_random_engines(base.head, size, Path(tmp), threads, max_batch)
                    bench_engines("random", size, args.batches, engines, base, args.seconds, rows)
                    del engines
        if args.engines_dir is not None:
            folders = find_engine_folders(args.engines_dir)
            if not folders:
                log(f"no built engines (manifest.json) under {args.engines_dir}")
            for folder in folders:
                man, engines = open_built_engines(folder, threads, max_batch)
                bench_engines(folder.name, man.input_size, args.batches, engines, base, args.seconds, rows)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(environment(threads))
    print(format_table(rows, base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
