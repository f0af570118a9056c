"""Replay throughput: images/s of `screener replay` over a folder of synthetic DX images, against
engines-only images/s and the rate of merely reading the same files, in one run.

    python -m bench.replay [--n 200] [--size 2048] [--engines DIR | --random 224]
                           [--backend auto] [--batch 32] [--workers 1 2] [--distinct 64]

``--random S`` builds a random-weight ResNet50 engine at S px (ONNX fp32/int8 and torch;
see bench/common.py) instead of using built engines. The folder holds ``--distinct``
different files and hard links up to ``--n`` paths, so 2,000 images of 2048 x 2048 take
~0.5 GB of disk, not 17 GB (the page cache holds them: "reading" is from memory, as in
the node, which screens what it has just received). Every replay runs with a fresh audit
folder; for each ``--workers`` value the line gives end-to-end images/s (screening loop,
audit, SRs) and, separately, the screening loop alone; then the stage breakdown (worker
side: read + decode + preprocess per image, summed over workers; engine side: normalize
and engine per image). The last three lines keep their format (scripts read them) and
refer to the largest ``--workers`` value.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import dx_images, log, random_engine, write_files
from screener import config, logs
from screener.config import PipelineSettings
from screener.node import load_engines
from screener.pipeline.prepare import prepare_file_reference
from screener.replay import replay
from screener.screening import Screener


def present_engines(folder: Path) -> list[str]:
    """Every engine with a manifest in `folder` (as bench.node, without its network imports)."""
    names = sorted(p.parent.name for p in Path(folder).glob("*/manifest.json"))
    if not names:
        raise SystemExit(f"no engines in {folder}: build them (make run builds demo engines)")
    return names


def link_folder(sources: list[Path], n: int, folder: Path) -> list[Path]:
    """`n` paths under `folder` (100 per subfolder), hard links to `sources` in turn."""
    paths = []
    for i in range(n):
        p = folder / f"{i // 100:03d}" / f"{i:05d}.dcm"
        p.parent.mkdir(parents=True, exist_ok=True)
        os.link(sources[i % len(sources)], p)
        paths.append(p)
    return paths


def read_rate(paths: list[Path]) -> float:
    """Files/s of reading every file's bytes (after one pass that warms the page cache)."""
    for p in paths[: min(len(paths), 256)]:
        p.read_bytes()
    t0 = time.perf_counter()
    for p in paths:
        p.read_bytes()
    return len(paths) / (time.perf_counter() - t0)


def engines_only_rate(screener: Screener, sources: list[Path], n: int, batch: int) -> tuple[float, dict[str, float]]:
    """Images/s of the engines alone on the same images' model inputs (prepared beforehand, not timed)."""
    ref = Screener(screener.engines, screener.rules, batch, serial=True)
    prepared = ref.read_many(sources).prepared
    per_engine: dict[str, float] = {}
    total = 0.0
    for name, eng in screener.engines.items():
        m = eng.manifest
        if m.kind != "classifier":
            continue
        imgs = [p.inputs[name] for p in prepared if name in p.inputs]
        if not imgs:
            continue
        from screener.engine import preprocessing as pp

        on_device = getattr(eng.runtime, "predict_uint8", None) if getattr(eng.runtime, "cuda", False) else None
        if on_device is not None:  # as the Screener does on CUDA: uint8 in, normalized on the GPU
            u8 = np.stack(imgs)
            x = np.concatenate([u8] * (n // len(u8) + 1))[:n]
            mean, std = m.normalization.mean, m.normalization.std

            def run(chunk: np.ndarray, f=on_device, mean=mean, std=std) -> object:
                return f(chunk, mean, std)
        else:
            x_all = pp.normalize_batch(np.stack(imgs), m.normalization)
            x = np.concatenate([x_all] * (n // len(x_all) + 1))[:n]
            run = eng.predict  # type: ignore[assignment]
        run(x[:batch])  # warm-up
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            run(x[i : i + batch])
        per_engine[name] = time.perf_counter() - t0
        total += per_engine[name]
    return n / total, per_engine


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--per-study", type=int, default=4)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--engines", type=Path, default=Path("engines"))
    p.add_argument("--random", type=int, default=0, help="use a random-weight ResNet50 engine at this size")
    p.add_argument("--backend", default="auto")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[0], help="decode workers (0: one per CPU)")
    p.add_argument("--distinct", type=int, default=64, help="distinct files; the rest are hard links")
    p.add_argument("--serial", action="store_true", help="also run the serial reference path (main's order)")
    args = p.parse_args(argv)
    logs.configure("console", "warning")
    base = config.load("config.toml")
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        engines_dir = args.engines
        if args.random:
            engines_dir = tmp / "engines"
            random_engine(engines_dir, args.random)
        settings = dataclasses.replace(
            base,
            engines=dataclasses.replace(
                base.engines, dir=str(engines_dir), backend=args.backend, enabled=present_engines(engines_dir)
            ),
        )
        engines = load_engines(settings)
        log(f"writing {min(args.n, args.distinct)} DX images {args.size}x{args.size}, linking {args.n} paths ...")
        sources = write_files(dx_images(min(args.n, args.distinct), args.size, tmp, args.per_study), tmp / "src")
        folder = tmp / "archive"
        paths = link_folder(sources, args.n, folder)
        mb = sum(q.stat().st_size for q in paths) / 1e6
        rate_read = read_rate(paths)
        probe = Screener(engines, settings.routing, args.batch, serial=True)
        rate_eng, per_engine = engines_only_rate(probe, sources, args.n, args.batch)
        runs = []
        for w in ([-1] if args.serial else []) + list(args.workers):
            ps = PipelineSettings(workers=max(0, w))
            if w < 0:
                screener = Screener(engines, settings.routing, args.batch, serial=True, task=prepare_file_reference)
            else:
                screener = Screener(engines, settings.routing, args.batch, ps)
                _ = screener.pool  # started before the clock: the node starts it once
            log(f"replay with {'serial reference path' if w < 0 else f'{ps.worker_count} worker(s)'} ...")
            t0 = time.perf_counter()
            summary = replay(folder, tmp / f"audit-{w}", screener, engines, chunk=args.batch, progress=False)
            t_all = time.perf_counter() - t0
            runs.append((w if w < 0 else ps.worker_count, summary, t_all, dict(screener.stage_seconds)))
    backends = ", ".join(f"{k}: {v.backend.name} {v.manifest.input_size}px" for k, v in engines.items())
    print(f"{args.n} files ({args.distinct} distinct, {mb / args.n:.1f} MB each), {args.size}x{args.size} 12-bit DX")
    print(f"engines {backends}; CPUs available: {len(os.sched_getaffinity(0))}")
    print(f"read the files only:                                    {rate_read:8.2f} files/s")
    print(
        "engines only per engine:                                "
        + ", ".join(f"{k} {args.n / v:.2f} img/s" for k, v in per_engine.items())
    )
    for w, summary, t_all, st in runs:
        n = max(1, summary.files)
        stages = ", ".join(f"{k} {v / n * 1e3:.1f} ms" for k, v in sorted(st.items()))
        label = "serial    " if w < 0 else f"workers {w:>2}"
        print(
            f"{label}: end-to-end {args.n / t_all:8.2f} img/s (screening loop {summary.images_per_s:.2f}); "
            f"{summary.screened} screened, {summary.failed} failed, {summary.srs} SRs"
        )
        print(f"            per image: {stages}")
    w, summary, t_all, _ = runs[-1]
    print(
        f"replay: {summary.files} files, {summary.screened} screened, {summary.srs} SRs; engines "
        + ", ".join(f"{k}: {v.backend.name}" for k, v in engines.items())
    )
    print(f"replay (decode overlapped with inference, SRs, audit): {args.n / t_all:8.2f} images/s")
    print(f"engines only (same images, preprocessed beforehand):   {rate_eng:8.2f} images/s")
    print(f"replay / engines-only:                                  {(args.n / t_all) / rate_eng:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
