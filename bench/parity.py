"""Probability change of the pipelined data path against today's reference path, per image.

    python -m bench.parity [--n 300] [--size 1024] [--engines DIR | --random 224] [--backend onnx-int8]

Screens the same N DX files (bench/common.py) twice with the same engine: through the
reference path (``dataset_to_gray8`` on the whole frame, ``preprocessing.preprocess``; in this
process) and through the worker pool (lookup-table order, ``prepare_indexed``, batch
normalization). Prints the largest and mean absolute change in probability and the number of
images whose finding flips. A route is enabled by default only when the largest change is
below 0.002 (issue 11); the exact routes give 0.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench.common import dx_images, random_engine, write_files
from screener import config, logs
from screener.config import PipelineSettings
from screener.engine.runtime import load_engine
from screener.pipeline.prepare import prepare_file_reference
from screener.screening import Screener


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--engines", type=Path)
    p.add_argument("--random", type=int, default=224)
    p.add_argument("--backend", default="onnx-int8")
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args(argv)
    logs.configure("console", "warning")
    rules = config.load("config.toml").routing
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        root = args.engines or random_engine(tmp / "engines", args.random).parent
        engines = {"spondylosis": load_engine(root / "spondylosis", args.backend)}
        paths = write_files(dx_images(args.n, args.size, tmp, seed=11), tmp / "files")
        ref = Screener(engines, rules, args.batch, serial=True, task=prepare_file_reference).screen(paths)
        with Screener(engines, rules, args.batch, PipelineSettings()) as s:
            new = s.screen(paths)
    diffs, flips = [], 0
    for a, b in zip(ref, new):
        assert a.state == b.state == "screened", (a.failed, b.failed)
        for ra, rb in zip(a.results, b.results):
            diffs.append(abs(ra.probability - rb.probability))
            flips += ra.present != rb.present
    print(f"{len(diffs)} results on {args.n} images {args.size}x{args.size}; engine {args.backend}")
    print(f"largest |change in probability|: {max(diffs):.3g}; mean {sum(diffs) / len(diffs):.3g}; flips {flips}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
