"""`trainer ablate`: the spondylosis study's Table 1 conditions on one patient-grouped split.

Every condition trains the same model with the same seed and split; each gets a
threshold from its own validation set; the table gives test AUROC with CI,
sensitivity, specificity, balanced accuracy and McNemar's paired test against
``original`` (the study used unpaired z-tests on one shared test set).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from screener.engine import metrics, report
from screener.engine import preprocessing as pp
from screener.errors import UserError
from trainer.augment import PRESETS
from trainer.build import TASKS, load_prepared
from trainer.data.prepare import PreparedDataset
from trainer.model import build_classifier, pick_device
from trainer.splits import SplitSpec
from trainer.train import TrainConfig, predict_proba, train

STUDY_CONDITIONS = ("original", "crop", "wide_crop", "colour", "colour_crop", "colour_wide_crop")


@dataclass(frozen=True)
class Condition:
    name: str
    recipe: str
    flip: bool = True  # stenosis: mirror right obliques to the canonical orientation
    stn: bool = False


# The stenosis study's Table 5: histogram equalization, flip, STN, each on or off.
STENOSIS_CONDITIONS = (
    Condition("roi", "roi_gray", flip=False),
    Condition("roi+HE", "roi_he", flip=False),
    Condition("roi+flip", "roi_gray", flip=True),
    Condition("roi+HE+flip", "roi_he", flip=True),
    Condition("roi+HE+flip+STN", "roi_he", flip=True, stn=True),
)


@dataclass(frozen=True)
class AblationOptions:
    data: Path
    out: Path
    task: str = "spondylosis"
    conditions: tuple[str, ...] | None = None
    image_size: int = 0
    epochs: int = 30
    batch_size: int = 0
    pretrained: Path | None = None
    split_seed: int = 20241122
    augment: str = "study"
    progress: bool = True


def conditions_for(opts: AblationOptions) -> tuple[Condition, ...]:
    if opts.task == "stenosis":
        known = {c.name: c for c in STENOSIS_CONDITIONS}
        names = opts.conditions or tuple(known)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UserError(f"unknown stenosis condition(s) {', '.join(unknown)}; known: {', '.join(known)}")
        return tuple(known[n] for n in names)
    names = opts.conditions or STUDY_CONDITIONS
    for n in names:
        try:
            pp.recipe(n)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    return tuple(Condition(n, n) for n in names)


def run_ablation(opts: AblationOptions) -> str:
    conditions = conditions_for(opts)
    defaults = TASKS[opts.task]
    spec = SplitSpec(seed=opts.split_seed)
    device = pick_device()
    results: dict[str, dict] = {}
    for cond in conditions:
        rcp = pp.recipe(cond.recipe, opts.image_size or None)
        if not cond.flip:
            rcp = dataclasses.replace(rcp, mirror_views=())
        data = load_prepared(opts.data, rcp, spec, opts.progress, opts.task)
        tx, ty = data.part("train")
        vx, vy = data.part("validation")
        sx, sy = data.part("test")
        test_ids = [s.id for s, sp in zip(data.samples, data.splits) if sp == "test"]
        model, _ = build_classifier(opts.pretrained, stn=cond.stn)
        norm = pp.IMAGENET if opts.pretrained else pp.channel_stats(tx)
        cfg = TrainConfig(
            epochs=opts.epochs,
            batch_size=opts.batch_size or defaults.batch_size,
            optimizer=defaults.optimizer,
            lr=defaults.lr,
            step_epochs=defaults.step_epochs,
            gamma=defaults.gamma,
            seed=opts.split_seed % 10_000,
        )
        work = opts.out / ".work" / cond.name.replace("+", "_")
        train(
            model,
            PreparedDataset(tx, ty, norm, PRESETS[opts.augment], seed=cfg.seed),
            PreparedDataset(vx, vy, norm),
            cfg,
            work,
            device,
            progress=opts.progress,
        )
        p_val = predict_proba(model, PreparedDataset(vx, vy, norm), device)
        p_test = predict_proba(model, PreparedDataset(sx, sy, norm), device)
        ev = metrics.evaluate(vy, p_val, sy, p_test, class_names=defaults.class_names)
        results[cond.name] = {
            "ids": test_ids,
            "y": sy,
            "pred": (p_test >= ev.threshold.threshold).astype(int),
            "eval": ev,
        }
    return _write_table(opts, results)


def _write_table(opts: AblationOptions, results: dict[str, dict]) -> str:
    base_name = next(iter(results))  # the first condition: original (spondylosis), roi (stenosis)
    base = results[base_name]
    rows = []
    for cond, r in results.items():
        t = r["eval"].test
        p_value = "-"
        if cond != base_name:
            common = sorted(set(r["ids"]) & set(base["ids"]))
            if common:  # keypoint-needing recipes may skip images: compare on the shared ones
                ia = {i: k for k, i in enumerate(base["ids"])}
                ib = {i: k for k, i in enumerate(r["ids"])}
                y = np.array([base["y"][ia[i]] for i in common])
                pa = np.array([base["pred"][ia[i]] for i in common])
                pb = np.array([r["pred"][ib[i]] for i in common])
                p_value = f"{metrics.mcnemar(y, pa, pb).p_value:.3g}"
        rows.append(
            {
                "condition": cond,
                "AUROC [95% CI]": report.format_estimate(t.auroc, t.auroc_ci),
                "sensitivity": report.format_estimate(t.sensitivity, t.sensitivity_ci),
                "specificity": report.format_estimate(t.specificity, t.specificity_ci),
                "balanced accuracy": report.format_estimate(t.balanced_accuracy),
                "accuracy": report.format_estimate(t.accuracy),
                f"McNemar p vs {base_name}": p_value,
            }
        )
    base_eval = base["eval"].majority_baseline
    rows.append(
        {
            "condition": "majority baseline",
            "AUROC [95% CI]": "0.500",
            "sensitivity": report.format_estimate(base_eval.sensitivity),
            "specificity": report.format_estimate(base_eval.specificity),
            "balanced accuracy": report.format_estimate(base_eval.balanced_accuracy),
            "accuracy": report.format_estimate(base_eval.accuracy),
            f"McNemar p vs {base_name}": "-",
        }
    )
    columns = list(rows[0].keys())
    table = report.format_table(rows, columns)
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "ablation.md").write_text(
        f"# Ablation ({opts.task}): the study's conditions\n\n"
        "Same patient-grouped split and seed for every condition; thresholds from each condition's "
        "validation set at sensitivity 0.95; McNemar's paired test on the shared test images.\n\n" + table + "\n",
        encoding="utf-8",
    )
    (opts.out / "ablation.json").write_text(
        json.dumps({c: report.to_jsonable(r["eval"]) for c, r in results.items()}, indent=2, allow_nan=False)
    )
    return table
