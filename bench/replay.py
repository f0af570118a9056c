"""Replay throughput: images/s of `screener replay` over a folder of synthetic DX images, against
engines-only images/s on the same images, in one run.

    python -m bench.replay [--n 200] [--size 1024] [--engines engines/] [--backend auto]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

from bench.node import engines_only_seconds, present_engines, routed_engines, synthetic_images
from screener import config, logs
from screener.dicom.image import dataset_to_gray8
from screener.node import load_engines
from screener.replay import replay
from screener.screening import Screener


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--per-study", type=int, default=4)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--engines", type=Path, default=Path("engines"))
    p.add_argument("--backend", default="auto")
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    logs.configure("console", "warning")
    base = config.load("config.toml")
    settings = dataclasses.replace(
        base,
        engines=dataclasses.replace(
            base.engines, dir=str(args.engines), backend=args.backend, enabled=present_engines(args.engines)
        ),
    )
    engines = load_engines(settings)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        print(f"writing {args.n} DX images {args.size}x{args.size} ...", file=sys.stderr)
        images = synthetic_images(args.n, args.per_study, args.size, tmp)
        folder = tmp / "archive"
        folder.mkdir()
        for i, ds in enumerate(images):
            ds.save_as(folder / f"{i:05d}.dcm", enforce_file_format=True)
        screener = Screener(engines, settings.routing, args.batch)
        t0 = time.perf_counter()
        summary = replay(folder, tmp / "audit", screener, engines, chunk=args.batch, progress=False)
        t_replay = time.perf_counter() - t0
        t_eng = engines_only_seconds(
            engines, [dataset_to_gray8(ds) for ds in images], args.batch, routed_engines(images, settings.routing)
        )
    print(
        f"replay: {summary.files} files, {summary.screened} screened, {summary.srs} SRs; engines "
        + ", ".join(f"{k}: {v.backend.name}" for k, v in engines.items())
    )
    print(f"replay (decode overlapped with inference, SRs, audit): {args.n / t_replay:8.2f} images/s")
    print(f"engines only (same images, preprocessed beforehand):   {args.n / t_eng:8.2f} images/s")
    print(f"replay / engines-only:                                  {(args.n / t_replay) / (args.n / t_eng):8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
