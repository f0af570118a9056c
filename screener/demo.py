"""`make run` helper: build small demo engines from synthetic data when engines/ lacks them.

Demo engines are marked ``demo: true`` and ``validated: false`` in their manifest;
the node labels their results "not for diagnosis". Takes a few minutes on a CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from screener import config, logs
from screener.errors import UserError

DEMO_SIZES = {"spondylosis": dict(n=160, image_size=96, epochs=2)}


def missing_engines(settings: config.Settings, engines_dir: Path) -> list[str]:
    return [name for name in settings.engines.enabled if not (engines_dir / name / "manifest.json").is_file()]


def build_demo(engines_dir: Path, names: Sequence[str], work: Path) -> None:
    from trainer.build import BuildOptions, build_engine
    from trainer.synth import synthesize

    for name in names:
        if name not in DEMO_SIZES:
            raise UserError(f"no demo recipe for engine '{name}': build it with `trainer build-engine --task {name}`")
        size = DEMO_SIZES[name]
        data = work / f"demo-{name}"
        if not (data / "datasets.xlsx").is_file():
            print(f"demo: writing {size['n']} synthetic images to {data}", file=sys.stderr)
            synthesize(data, n=size["n"], seed=11, healthy_fraction=0.3)
        print(f"demo: building the {name} demo engine (small, not validated)", file=sys.stderr)
        build_engine(BuildOptions(task=name, data=data, out=engines_dir, image_size=size["image_size"],
                                  epochs=size["epochs"], batch_size=16, augment="light", demo=True,
                                  n_boot=500, version=f"demo-{name}"))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m screener.demo")
    p.add_argument("--engines", type=Path, default=Path("engines"))
    p.add_argument("--config", type=Path, default=Path("config.toml"))
    p.add_argument("--work", type=Path, default=Path("var"))
    args = p.parse_args(argv)
    logs.configure("console", "warning")
    try:
        settings = config.load(args.config if args.config.is_file() else None)
        names = missing_engines(settings, args.engines)
        if not names:
            print("demo: all enabled engines are present in " + str(args.engines), file=sys.stderr)
            return 0
        build_demo(args.engines, names, args.work)
    except UserError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
