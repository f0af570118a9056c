"""`make run` helper: build small demo engines from synthetic data when engines/ lacks them.

Demo engines are marked ``demo: true`` and ``validated: false`` in their manifest;
the node labels their results "not for diagnosis". Takes a few minutes on a CPU.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from screener import config, logs
from screener.errors import UserError

# Small and quick: these engines show the node working; they are not meant to be accurate.
DEMO = {
    "spondylosis": dict(image_size=96, epochs=2),
    "roi": dict(image_size=96, epochs=3),
    "stenosis": dict(image_size=96, epochs=2),
}
ORDER = ("spondylosis", "roi", "stenosis")  # the stenosis build uses the ROI engine


def missing_engines(settings: config.Settings, engines_dir: Path) -> list[str]:
    return [name for name in settings.engines.enabled if not (engines_dir / name / "manifest.json").is_file()]


def _data(work: Path, kind: str) -> Path:
    from trainer.synth import synthesize, synthesize_oblique

    data = work / f"demo-{kind}"
    if not (data / "datasets.xlsx").is_file():
        print(f"demo: writing synthetic {kind} images to {data}", file=sys.stderr)
        if kind == "lateral":
            synthesize(data, n=160, seed=11, healthy_fraction=0.3)
        else:
            synthesize_oblique(data, n=160, seed=11, positive_fraction=0.4, annotated_fraction=0.6)
    return data


def build_demo(engines_dir: Path, names: Sequence[str], work: Path) -> None:
    from trainer.build import BuildOptions, build_engine

    unknown = [n for n in names if n not in DEMO]
    if unknown:
        raise UserError(f"no demo recipe for engine(s) {', '.join(unknown)}: build with `trainer build-engine`")
    for name in [n for n in ORDER if n in names]:
        size = DEMO[name]
        print(f"demo: building the {name} demo engine (small, synthetic, not validated)", file=sys.stderr)
        common: dict[str, Any] = dict(
            out=engines_dir,
            image_size=size["image_size"],
            epochs=size["epochs"],
            batch_size=16,
            augment="light",
            demo=True,
            n_boot=500,
            version=f"demo-{name}",
        )
        if name == "spondylosis":
            opts = BuildOptions(task=name, data=_data(work, "lateral"), **common)
        elif name == "roi":
            opts = BuildOptions(task=name, data=_data(work, "lateral"), extra_data=(_data(work, "oblique"),), **common)
        else:
            roi = engines_dir / "roi"
            opts = BuildOptions(
                task=name,
                data=_data(work, "oblique"),
                roi_engine=roi if (roi / "manifest.json").is_file() else None,
                **common,
            )
        build_engine(opts)
        # A demo build is not resumed or audited: its checkpoints (hundreds of MB) are not kept.
        shutil.rmtree(Path(engines_dir) / ".work" / name, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.demo")
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
