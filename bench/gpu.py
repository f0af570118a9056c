"""GPU measurements in one call (at most ~8 minutes on an H100/H200 with 16 CPU cores).

    python -m bench.gpu [--out DIR] [--n 2000] [--workers 1 4 8 16] [--quick]

1. The ``torch`` backend (torch.export program, CUDA fp16, channels-last, CUDA graphs)
   of a random-weight ResNet50 at 224 px and 512 px: engines-only images/s for several
   batch sizes, from device tensors and from host float32 arrays (what the node passes).
   ``torch.compile`` (reduce-overhead) at 224 px batch 256 for comparison.
2. Replay of ``--n`` 2048 x 2048 12-bit DX files (64 distinct, the rest hard links) with
   the 224 px engine: reading the files only, engines only, and replay end-to-end at each
   ``--workers`` count (screening loop and audit; SRs once, at the largest count).

Every figure names the card. Results go to stdout and ``--out``/gpu-results.txt.

On a lent GPU machine with torch but no package registry: copy ``screener/``, ``bench/`` and
``tests/support/`` into a folder the device tool carries (e.g. ``.d11/``, ignored through
``.git/info/exclude``), add the pure-Python wheels the node needs (pydicom, pynetdicom,
highdicom, structlog, pylibjpeg and its plugins, opencv-python-headless, ...; Python 3.12,
manylinux x86_64) under ``.d11/whl/``, and run::

    cd .d11 && python3 -m pip install -q --no-index --no-deps --target /tmp/site whl/*.whl \
      && PYTHONPATH=$PWD:/tmp/site python3 -m bench.gpu --out $OUT
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def log(msg: str, sink: list[str]) -> None:
    print(msg, flush=True)
    sink.append(msg)


def engine_rates(folder: Path, size: int, batches: list[int], seconds: float, card: str, out: list[str]) -> None:
    import torch

    from screener.engine.runtime import TorchEngine

    t0 = time.perf_counter()
    eng = TorchEngine(folder / "model.pt2", max_batch=max(batches), image_size=size, mode="graph")
    log(f"[{card}] {size}px torch fp16 graph: loaded and captured in {time.perf_counter() - t0:.1f} s", out)
    for b in batches:
        x = torch.randn(b, 3, size, size, device="cuda").half()
        eng.predict_tensor(x)
        torch.cuda.synchronize()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            eng.predict_tensor(x)
            n += b
        torch.cuda.synchronize()
        dev = n / (time.perf_counter() - t0)
        xh = np.random.default_rng(0).normal(size=(b, 3, size, size)).astype(np.float32)
        eng.predict(xh)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            eng.predict(xh)
            n += b
        host = n / (time.perf_counter() - t0)
        u8 = np.random.default_rng(0).integers(0, 256, size=(b, size, size, 3), dtype=np.uint8)
        eng.predict_uint8(u8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            eng.predict_uint8(u8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
            n += b
        host8 = n / (time.perf_counter() - t0)
        log(
            f"[{card}] {size}px batch {b:>4} graph: {dev:8.0f} img/s from device tensors, "
            f"{host:8.0f} from host fp32, {host8:8.0f} from host uint8 (normalized on the GPU)",
            out,
        )
    del eng
    torch.cuda.empty_cache()


def compile_rate(folder: Path, size: int, batch: int, seconds: float, card: str, out: list[str]) -> None:
    import torch

    from screener.engine.runtime import TorchEngine

    t0 = time.perf_counter()
    eng = TorchEngine(folder / "model.pt2", max_batch=batch, image_size=size, mode="compile")
    log(f"[{card}] {size}px torch.compile: compiled in {time.perf_counter() - t0:.1f} s", out)
    x = torch.randn(batch, 3, size, size, device="cuda").half()
    eng.predict_tensor(x)
    torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        eng.predict_tensor(x)
        n += batch
    torch.cuda.synchronize()
    dev = n / (time.perf_counter() - t0)
    u8 = np.random.default_rng(0).integers(0, 256, size=(batch, size, size, 3), dtype=np.uint8)
    eng.predict_uint8(u8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        eng.predict_uint8(u8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        n += batch
    host8 = n / (time.perf_counter() - t0)
    log(
        f"[{card}] {size}px batch {batch:>4} torch.compile: {dev:8.0f} img/s from device tensors, "
        + f"{host8:8.0f} from host uint8",
        out,
    )


def replay_rates(engine_root: Path, n: int, workers: list[int], batch: int, card: str, out: list[str]) -> None:
    from bench.common import dx_images, write_files
    from bench.replay import engines_only_rate, link_folder, read_rate
    from screener import config
    from screener.config import PipelineSettings
    from screener.engine.runtime import load_engine
    from screener.replay import replay
    from screener.screening import Screener

    rules = config.load("config.toml").routing
    engines = {"spondylosis": load_engine(engine_root / "spondylosis", "torch", max_batch=batch)}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        t0 = time.perf_counter()
        sources = write_files(dx_images(64, 2048, tmp), tmp / "src")
        paths = link_folder(sources, n, tmp / "archive")
        log(f"[{card}] wrote 64 distinct 2048x2048 DX, {n} paths, in {time.perf_counter() - t0:.1f} s", out)
        rate_read = read_rate(paths)
        probe = Screener(engines, rules, batch, serial=True)
        rate_eng, _ = engines_only_rate(probe, sources, n, batch)
        log(
            f"[{card}] read the files only: {rate_read:9.1f} files/s; "
            f"engines only (host fp32 in): {rate_eng:9.1f} img/s",
            out,
        )
        for i, w in enumerate(workers):
            with_sr = i == len(workers) - 1
            s = Screener(engines, rules, batch, PipelineSettings(workers=w, prefetch_batches=4))
            _ = s.pool
            t0 = time.perf_counter()
            summary = replay(
                tmp / "archive", tmp / f"audit-{w}", s, engines, chunk=batch, progress=False, write_sr=with_sr
            )
            t_all = time.perf_counter() - t0
            e2e = n / t_all
            slower = min(rate_read, rate_eng)
            log(
                f"[{card}] replay {n} DX, {w:>2} workers{' + SRs' if with_sr else ''}: {e2e:8.1f} img/s end-to-end "
                f"(loop {summary.images_per_s:.1f}), {summary.screened} screened, {summary.srs} SRs; "
                f"/ min(read, engines) = {e2e / slower:.2f}",
                out,
            )
            st = ", ".join(f"{k} {v / n * 1e3:.2f} ms" for k, v in sorted(s.stage_seconds.items()))
            log(f"[{card}]     per image: {st}", out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--quick", action="store_true", help="small sizes, for a CPU dry run of the script")
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--replay-only", action="store_true", help="skip the engines-only measurements")
    args = p.parse_args(argv)
    import torch

    from bench.common import random_engine
    from screener import logs

    logs.configure("console", "warning")
    out: list[str] = []
    cuda = torch.cuda.is_available()
    card = torch.cuda.get_device_name(0) if cuda else "CPU (no CUDA)"
    log(f"[{card}] torch {torch.__version__}, CPUs {len(os.sched_getaffinity(0))}", out)
    t_start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp_s:
            tmp = Path(tmp_s)
            sizes = [224] if (args.quick or args.replay_only) else [224, 512]
            folders = {}
            for size in sizes:
                t0 = time.perf_counter()
                folders[size] = random_engine(tmp / f"e{size}", size, backends=("torch",))
                log(f"[{card}] exported ResNet50 {size}px torch program in {time.perf_counter() - t0:.1f} s", out)
            if cuda and not args.replay_only:
                engine_rates(folders[224], 224, [32, 128, 256, 512], args.seconds, card, out)
                if 512 in folders:
                    engine_rates(folders[512], 512, [32, 64, 128], args.seconds, card, out)
                if not args.skip_compile:
                    try:
                        compile_rate(folders[224], 224, 256, args.seconds, card, out)
                    except Exception as exc:  # noqa: BLE001 - report and go on
                        log(f"[{card}] torch.compile failed: {exc.__class__.__name__}: {exc}", out)
            batch = 256 if cuda else 8
            replay_rates(folders[224].parent, args.n, args.workers, batch, card, out)
    finally:
        log(f"[{card}] total {time.perf_counter() - t_start:.1f} s", out)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu-results.txt").write_text("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
