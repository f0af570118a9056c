"""`trainer`: synthetic data, engine builds, evaluation and the study's ablation."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

from screener import logs
from screener.errors import UserError

# What `pip install 'cspine-screener[trainer]'` adds to the node's install; imported lazily by the commands.
EXTRA_MODULES = ("torch", "torchvision", "onnx", "openpyxl", "matplotlib")
INSTALL_HINT = "pip install 'cspine-screener[trainer]'"


def missing_extra() -> list[str]:
    """The trainer extra's modules that cannot be found (nothing is imported)."""
    return [name for name in EXTRA_MODULES if importlib.util.find_spec(name) is None]


def _extra_message(missing: Sequence[str]) -> str:
    return (
        f"trainer: error: the trainer needs the 'trainer' extra, which this install lacks "
        f"(missing: {', '.join(missing)}). Install it with: {INSTALL_HINT}"
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a value between 0 and 1, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trainer", description=__doc__)
    p.add_argument("--log", choices=("console", "json"), default="console", help="log format (stderr)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write a synthetic CSXA-style data set")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--n", type=_positive_int, default=200, help="number of images (default 200)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--healthy-fraction",
        type=_fraction,
        default=0.04,
        help="spondylosis: share of healthy images (default 0.04, like CSXA)",
    )
    s.add_argument(
        "--positive-fraction",
        type=_fraction,
        default=0.35,
        help="stenosis: share of images with stenosis (default 0.35, like the study)",
    )
    s.add_argument(
        "--annotated-fraction",
        type=_fraction,
        default=0.5,
        help="stenosis: share of images with an ROI rectangle (default 0.5)",
    )
    s.add_argument(
        "--task",
        choices=("spondylosis", "stenosis"),
        default="spondylosis",
        help="lateral views (spondylosis) or oblique views (stenosis)",
    )

    b = sub.add_parser("build-engine", help="train, evaluate and compile an engine")
    b.add_argument("--task", choices=("spondylosis", "stenosis", "roi"), required=True)
    b.add_argument(
        "--data",
        type=Path,
        action="append",
        required=True,
        help="CSXA-style data folder (repeatable for --task roi: lateral and oblique sets)",
    )
    b.add_argument("--out", type=Path, default=Path("engines"), help="engines folder (default engines/)")
    b.add_argument(
        "--recipe", default="", help="preprocessing recipe (default: original for spondylosis, roi_he for stenosis)"
    )
    b.add_argument("--image-size", type=_positive_int, default=0, help="input size (default: the recipe's)")
    b.add_argument("--epochs", type=_positive_int, default=30)
    b.add_argument("--batch-size", type=_positive_int, default=0, help="default: the study's (16 / 4)")
    b.add_argument("--roi-engine", type=Path, help="stenosis: ROI engine folder for unannotated images")
    b.add_argument(
        "--optimizer",
        choices=("adam", "sgd"),
        default="",
        help="default: the study's (adam for spondylosis, sgd for stenosis)",
    )
    b.add_argument("--lr", type=float, default=0.0, help="learning rate (default: the study's)")
    b.add_argument("--pretrained", type=Path, help="local torchvision ResNet50 ImageNet state dict")
    b.add_argument("--checkpoint", type=Path, help="skip training: use these weights")
    b.add_argument("--backend", choices=("onnx", "tensorrt", "all"), default="onnx")
    b.add_argument("--split-seed", type=int, default=20241122)
    b.add_argument("--target-sensitivity", type=_fraction, default=0.95)
    b.add_argument("--augment", choices=("study", "light", "none"), default="study")
    b.add_argument("--balance", choices=("weights", "oversample", "none"), default="weights")
    b.add_argument("--patience", type=_positive_int, default=8, help="early stopping patience (epochs)")
    b.add_argument("--stn", action="store_true", help="spatial transformer in front of the ResNet50")
    b.add_argument("--validated-by", default="", help="name of who validated this engine for clinical use")
    b.add_argument("--version", default="", help="engine version (default: date + data fingerprint)")
    b.add_argument("--demo", action="store_true", help="mark the engine as a demo (synthetic data)")

    e = sub.add_parser("evaluate", help="evaluate a built engine on the test split of a data set")
    e.add_argument("--engine", type=Path, required=True, help="engine folder (with manifest.json)")
    e.add_argument("--data", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--backend", default="onnx-fp32", choices=("auto", "onnx-fp32", "onnx-int8", "tensorrt"))

    a = sub.add_parser("ablate", help="the study's Table 1 conditions on one split")
    a.add_argument("--data", type=Path, required=True)
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--task", choices=("spondylosis", "stenosis"), default="spondylosis")
    a.add_argument(
        "--conditions",
        nargs="+",
        default=None,
        help="default: the study's Table 1 (spondylosis) or Table 5 (stenosis) conditions",
    )
    a.add_argument("--image-size", type=_positive_int, default=0)
    a.add_argument("--epochs", type=_positive_int, default=30)
    a.add_argument("--batch-size", type=_positive_int, default=0)
    a.add_argument("--pretrained", type=Path)
    a.add_argument("--split-seed", type=int, default=20241122)
    a.add_argument("--augment", choices=("study", "light", "none"), default="study")
    return p


def run(args: argparse.Namespace) -> int:
    progress = not args.quiet
    if args.command == "synth":
        try:
            if args.task == "stenosis":
                from trainer.synth import synthesize_oblique

                res = synthesize_oblique(
                    args.out,
                    n=args.n,
                    seed=args.seed,
                    positive_fraction=args.positive_fraction,
                    annotated_fraction=args.annotated_fraction,
                    progress=progress,
                )
            else:
                from trainer.synth import synthesize

                res = synthesize(
                    args.out, n=args.n, seed=args.seed, healthy_fraction=args.healthy_fraction, progress=progress
                )
        except (ValueError, FileExistsError) as exc:
            raise UserError(str(exc)) from None
        negative = "normal" if args.task == "stenosis" else "healthy"
        print(
            f"wrote {res.n_images} images ({res.n_healthy} {negative}, {res.n_patients} patients, "
            f"{res.n_rows} sheet rows) to {res.root}"
        )
        return 0
    if args.command == "build-engine":
        from trainer.build import BuildOptions, build_engine

        folder = build_engine(
            BuildOptions(
                task=args.task,
                data=args.data[0],
                extra_data=tuple(args.data[1:]),
                roi_engine=args.roi_engine,
                out=args.out,
                recipe=args.recipe,
                image_size=args.image_size,
                epochs=args.epochs,
                batch_size=args.batch_size,
                pretrained=args.pretrained,
                checkpoint=args.checkpoint,
                backend=args.backend,
                split_seed=args.split_seed,
                target_sensitivity=args.target_sensitivity,
                augment=args.augment,
                balance=args.balance,
                patience=args.patience,
                validated_by=args.validated_by,
                version=args.version,
                demo=args.demo,
                optimizer=args.optimizer,
                lr=args.lr,
                progress=progress,
                stn=args.stn,
            )
        )
        print(f"engine written to {folder} (report: {folder / 'report.md'})")
        return 0
    if args.command == "evaluate":
        from trainer.evaluate import evaluate_engine

        paths = evaluate_engine(args.engine, args.data, args.out, args.backend, progress)
        print(f"report written to {paths['report.md']}")
        return 0
    if args.command == "ablate":
        from trainer.ablate import AblationOptions, run_ablation

        table = run_ablation(
            AblationOptions(
                data=args.data,
                out=args.out,
                task=args.task,
                conditions=tuple(args.conditions) if args.conditions else None,
                image_size=args.image_size,
                epochs=args.epochs,
                batch_size=args.batch_size,
                pretrained=args.pretrained,
                split_seed=args.split_seed,
                augment=args.augment,
                progress=progress,
            )
        )
        print(table)
        return 0
    raise AssertionError(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    missing = missing_extra()
    if missing:
        print(_extra_message(missing), file=sys.stderr)
        return 2
    args = parser().parse_args(argv)
    logs.configure(renderer=args.log, level="info")
    try:
        return run(args)
    except UserError as exc:
        print(f"trainer: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:  # ModuleNotFoundError too: an extra module found but not importable
        root = (exc.name or "").split(".")[0]
        if root not in EXTRA_MODULES:
            raise
        print(_extra_message([root]), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("trainer: interrupted (a build resumes from its last checkpoint)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
