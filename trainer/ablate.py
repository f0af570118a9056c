"""`trainer ablate`: the spondylosis study's Table 1 conditions on one patient-grouped split.

Every condition trains the same model with the same seed and split; each gets a
threshold from its own validation set; the table gives test AUROC with CI,
sensitivity, specificity, balanced accuracy and McNemar's paired test against
``original`` (the study used unpaired z-tests on one shared test set).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from screener import preprocessing as pp
from trainer import metrics, report
from trainer.augment import PRESETS
from trainer.build import load_prepared
from trainer.data import PreparedDataset
from trainer.model import build_classifier, pick_device
from trainer.splits import SplitSpec
from trainer.train import TrainConfig, predict_proba, train

STUDY_CONDITIONS = ("original", "crop", "wide_crop", "colour", "colour_crop", "colour_wide_crop")


@dataclass(frozen=True)
class AblationOptions:
    data: Path
    out: Path
    conditions: tuple[str, ...] | None = None
    image_size: int = 224
    epochs: int = 30
    batch_size: int = 16
    pretrained: Path | None = None
    split_seed: int = 20241122
    augment: str = "study"
    progress: bool = True


def run_ablation(opts: AblationOptions) -> str:
    conditions = opts.conditions or STUDY_CONDITIONS
    for c in conditions:
        pp.recipe(c)  # unknown names fail before any training
    spec = SplitSpec(seed=opts.split_seed)
    device = pick_device()
    results: dict[str, dict] = {}
    ids_ref: list[str] | None = None
    for cond in conditions:
        rcp = pp.recipe(cond, opts.image_size)
        data = load_prepared(opts.data, rcp, spec, opts.progress)
        tx, ty = data.part("train")
        vx, vy = data.part("validation")
        sx, sy = data.part("test")
        test_ids = [s.id for s, sp in zip(data.samples, data.splits) if sp == "test"]
        model, _ = build_classifier(opts.pretrained)
        norm = pp.IMAGENET if opts.pretrained else pp.channel_stats(tx)
        cfg = TrainConfig(epochs=opts.epochs, batch_size=opts.batch_size, seed=opts.split_seed % 10_000)
        train(model, PreparedDataset(tx, ty, norm, PRESETS[opts.augment], seed=cfg.seed),
              PreparedDataset(vx, vy, norm), cfg, opts.out / ".work" / cond, device, progress=opts.progress)
        p_val = predict_proba(model, PreparedDataset(vx, vy, norm), device)
        p_test = predict_proba(model, PreparedDataset(sx, sy, norm), device)
        ev = metrics.evaluate(vy, p_val, sy, p_test)
        results[cond] = {"ids": test_ids, "y": sy, "pred": (p_test >= ev.threshold.threshold).astype(int),
                         "eval": ev}
        if ids_ref is None:
            ids_ref = test_ids
    return _write_table(opts, results)


def _write_table(opts: AblationOptions, results: dict[str, dict]) -> str:
    base_name = "original" if "original" in results else next(iter(results))
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
        rows.append({
            "condition": cond,
            "AUROC [95% CI]": report.format_estimate(t.auroc, t.auroc_ci),
            "sensitivity": report.format_estimate(t.sensitivity, t.sensitivity_ci),
            "specificity": report.format_estimate(t.specificity, t.specificity_ci),
            "balanced accuracy": report.format_estimate(t.balanced_accuracy),
            "accuracy": report.format_estimate(t.accuracy),
            f"McNemar p vs {base_name}": p_value,
        })
    base_eval = base["eval"].majority_baseline
    rows.append({"condition": "majority baseline", "AUROC [95% CI]": "0.500",
                 "sensitivity": report.format_estimate(base_eval.sensitivity),
                 "specificity": report.format_estimate(base_eval.specificity),
                 "balanced accuracy": report.format_estimate(base_eval.balanced_accuracy),
                 "accuracy": report.format_estimate(base_eval.accuracy), f"McNemar p vs {base_name}": "-"})
    columns = list(rows[0].keys())
    table = report.format_table(rows, columns)
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "ablation.md").write_text(
        "# Ablation: the study's Table 1 conditions\n\n"
        "Same patient-grouped split and seed for every condition; thresholds from each condition's "
        "validation set at sensitivity 0.95; McNemar's paired test on the shared test images.\n\n"
        + table + "\n", encoding="utf-8")
    (opts.out / "ablation.json").write_text(json.dumps(
        {c: report.to_jsonable(r["eval"]) for c, r in results.items()}, indent=2, allow_nan=False))
    return table
