"""`trainer build-engine --task roi`: data -> split -> train -> evaluate -> export and gate -> manifest.

The steps around the training loop (checkpoints, export and int8 gate, manifest and install)
are the classifier build's (`trainer.steps`).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from screener.engine import preprocessing as pp
from screener.engine.report import to_jsonable
from screener.errors import DataError, UserError
from trainer import steps
from trainer.model import pick_device
from trainer.options import BuildOptions
from trainer.roi.data import (
    AUGMENT_PRESETS,
    RoiData,
    RoiDataset,
    gray_normalization,
    prepare_roi_data,
    roi_items_from,
    root_kind,
    tensors,
)
from trainer.roi.evaluate import (
    TARGET_CONTAINMENT,
    TARGET_MEAN_IOU,
    bootstrap_mean_ci,
    box_metrics,
    by_view,
    examples_figure,
    fmt,
    iou_histogram,
    per_image_iou,
    to_source,
    write_roi_report,
)
from trainer.roi.model import BoxRegressor, load_pretrained_resnet18
from trainer.roi.train import DEFAULT_BATCH, RoiTrainConfig, predict_normalized, train_roi
from trainer.splits import SPLITS, SplitSpec

RECIPE_NAME = "roi_input"
CLASS_NAMES = ["cspine"]


def _roots(opts: BuildOptions) -> tuple[list[Path], list[Path], list[dict[str, str]]]:
    lateral: list[Path] = []
    oblique: list[Path] = []
    described: list[dict[str, str]] = []
    for r in opts.roots:
        if not r.is_dir():
            raise UserError(f"--data {r}: data folder not found")
        try:
            kind = root_kind(r)
        except DataError as exc:
            raise UserError(str(exc)) from None
        (oblique if kind == "oblique" else lateral).append(r)
        described.append({"name": r.name, "kind": kind})
    return lateral, oblique, described


def _split_counts(data: RoiData) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for s in SPLITS:
        idx = data.index(s)
        views: dict[str, int] = {}
        for i in idx:
            views[data.items[i].view] = views.get(data.items[i].view, 0) + 1
        out[s] = {"n": int(len(idx)), **{f"view_{k}": v for k, v in sorted(views.items())}}
    return out


def _recipe(opts: BuildOptions) -> pp.Recipe:
    recipe_name = opts.recipe or RECIPE_NAME
    if recipe_name in ("original",):  # the pre-task-defaults CLI default: not a choice for the ROI engine
        recipe_name = RECIPE_NAME
    try:
        rcp = pp.recipe(recipe_name, opts.image_size or None)
    except ValueError as exc:
        raise UserError(f"--recipe: {exc}") from None
    if rcp.crop != "full" or rcp.colour != "gray":
        raise UserError(
            f"--recipe {recipe_name}: the ROI engine takes the whole image (crop 'full', gray); use {RECIPE_NAME}"
        )
    if rcp.image_size % 32:
        raise UserError(f"--image-size {rcp.image_size}: the ROI engine needs a multiple of 32 (e.g. 128, 256)")
    return rcp


def build_roi_engine(opts: BuildOptions) -> Path:
    """Build ``<out>/roi`` from `opts` (task "roi").

    Data: ``opts.data`` plus ``opts.extra_data``; a root whose sheet has a ``View`` column is
    read as oblique views, any other as CSXA lateral views. Used options: recipe ("" or
    "roi_input"), image_size (0: the recipe's 256), epochs, batch_size (0: 32), pretrained (a
    ResNet18 state dict), checkpoint, backend, split_seed, augment (study | light | none: the ROI
    presets of the same names), patience, validated_by, version, demo, progress, n_boot. The
    classifier options (balance, target_sensitivity, roi_engine, optimizer, lr) do not apply;
    ``stn`` is refused.
    """
    if opts.task != "roi":
        raise UserError(f"build_roi_engine builds --task roi, not {opts.task}")
    if opts.backend not in ("onnx", "tensorrt", "all"):
        raise UserError(f"--backend {opts.backend}: expected onnx, tensorrt or all")
    if opts.stn:
        raise UserError("--stn applies to the classifiers, not to the ROI engine")
    opts.check(tuple(AUGMENT_PRESETS))
    rcp = _recipe(opts)
    t_start = time.perf_counter()
    lateral, oblique, described = _roots(opts)
    spec = SplitSpec(seed=opts.split_seed)
    try:
        items, problems = roi_items_from(lateral, oblique, spec=spec)
    except DataError as exc:
        raise UserError(str(exc)) from None
    if not items:
        raise UserError("no annotated image in " + ", ".join(str(r) for r in lateral + oblique))
    data = prepare_roi_data(items, rcp, problems, progress=opts.progress)
    counts = _split_counts(data)
    for s in SPLITS:
        if counts[s]["n"] == 0:
            raise UserError(
                f"the {s} split has no annotated image ({len(data.items)} in all); "
                "the data set is too small to train and evaluate honestly"
            )
    tr, va, te = data.index("train"), data.index("validation"), data.index("test")

    model = BoxRegressor()
    pre_info = load_pretrained_resnet18(model, opts.pretrained)
    norm = pp.IMAGENET if opts.pretrained else gray_normalization(data.images[tr])
    cfg = RoiTrainConfig(
        epochs=opts.epochs,
        batch_size=opts.batch_size or DEFAULT_BATCH,
        patience=opts.patience,
        seed=opts.split_seed % 10_000,
    )
    aug = AUGMENT_PRESETS[opts.augment]
    device = pick_device()
    training: dict[str, Any] = {
        "config": cfg.to_dict(),
        "augment": opts.augment,
        "augment_params": aug.to_dict(),
        "device": str(device),
        "pretrained": pre_info,
        "loss": f"{cfg.l1_weight} x smooth L1 (beta {cfg.l1_beta}) + {cfg.giou_weight} x (1 - GIoU)",
        "optimizer": "adam, cosine schedule",
        "architecture": "torchvision resnet18 + integral-regression head "
        "(layer4 upsampled onto layer3, one softmax map "
        "per box edge) -> box (x0, y0, x1, y1) normalized to the letterboxed input",
    }
    if opts.checkpoint:
        training["checkpoint"] = steps.load_weights(model, opts.checkpoint, "the ROI model")
        model.to(device)
    else:
        meta = {
            "fingerprint": data.fingerprint,
            "recipe": rcp.to_dict(),
            "train": cfg.to_dict(),
            "augment": aug.to_dict(),
            "pretrained": str(opts.pretrained or ""),
            "split_seed": opts.split_seed,
            "normalization": norm.to_dict(),
        }
        train_ds = RoiDataset(data.images[tr], data.targets[tr], norm, aug, seed=cfg.seed)
        result = train_roi(
            model,
            train_ds,
            data.images[va],
            data.shapes[va],
            data.boxes[va],
            rcp,
            cfg,
            steps.work_dir(opts, meta),
            device,
            progress=opts.progress,
        )
        training["result"] = dataclasses.asdict(result)

    out_val = predict_normalized(model, data.images[va], norm, device)
    out_test = predict_normalized(model, data.images[te], norm, device)
    pred_val = to_source(out_val, data.shapes[va], rcp)
    pred_test = to_source(out_test, data.shapes[te], rcp)
    val_m = box_metrics(pred_val, data.boxes[va], data.shapes[va])
    test_m = box_metrics(pred_test, data.boxes[te], data.shapes[te])
    test_ious = per_image_iou(pred_test, data.boxes[te])
    test_m["mean_iou_ci"] = bootstrap_mean_ci(test_ious, opts.n_boot)
    test_by_view = by_view(data, te, pred_test)

    building = steps.start_building(opts)
    model = model.to("cpu").eval()

    def mean_iou(outputs: np.ndarray) -> float:
        pred = to_source(outputs, data.shapes[te], rcp)
        return float(box_metrics(pred, data.boxes[te], data.shapes[te])["mean_iou"])

    backends, backend_metrics = steps.export_and_gate(
        model,
        building,
        rcp.image_size,
        opts.backend,
        steps.Gate("mean_iou", "mean IoU", mean_iou),
        tensors(data.images[te], norm),
        tensors(data.images[tr[steps.calibration_indices(len(tr))]], norm),
        test_m["mean_iou"],
        output_name="box",
    )
    created, version = steps.new_version(opts, data.fingerprint)
    n_total = len(data.items)
    checks = {
        "mean IoU": {
            "value": test_m["mean_iou"],
            "target": f">= {TARGET_MEAN_IOU}",
            "passed": bool(test_m["mean_iou"] is not None and test_m["mean_iou"] >= TARGET_MEAN_IOU),
            "note": ""
            if n_total >= 2000
            else f"the target is set for synthetic sets of >= 2,000 images; this set has {n_total}",
        },
        "wide_crop containment": {
            "value": test_m["wide_crop_containment"],
            "target": f">= {TARGET_CONTAINMENT}",
            "passed": bool(
                test_m["wide_crop_containment"] is not None and test_m["wide_crop_containment"] >= TARGET_CONTAINMENT
            ),
        },
    }
    data_info = {
        "fingerprint": data.fingerprint,
        "root_name": Path(opts.data).name,
        "roots": described,
        "n_images": n_total,
        "splits": counts,
        "split_seed": opts.split_seed,
        "split_method": "per data set: grouped by patient (consecutive sheet rows with equal gender and age), "
        "stratified by the data set's class label, over the samples its loader returns; "
        "unannotated oblique images are then dropped",
        "problems": problems,
    }
    extra = {
        "task": "roi",
        "engine_version": version,
        "recipe": rcp.to_dict(),
        "data": data_info,
        "backends": backend_metrics,
        "training": training,
        "validated": bool(opts.validated_by),
        "demo": opts.demo,
    }
    figures = {
        "examples": examples_figure(
            building / "roi_examples.png", data.images[te], data.shapes[te], data.boxes[te], pred_test, test_ious, rcp
        ),
        "iou_histogram": iou_histogram(building / "iou_histogram.png", test_ious),
    }
    write_roi_report(
        building,
        f"roi engine {version}: evaluation on the held-out test split",
        test_m,
        val_m,
        test_by_view,
        checks,
        extra,
        figures,
    )
    notes = steps.base_notes(opts, pre_info["source"])
    for name, c in checks.items():
        if not c["passed"]:
            notes.append(f"{name} {fmt(c['value'])} misses the target {c['target']}")
    return steps.finish(
        opts,
        building,
        kind="roi",
        created=created,
        version=version,
        recipe=rcp,
        normalization=norm,
        output_name="box",
        class_names=list(CLASS_NAMES),
        threshold=None,
        metrics=to_jsonable(
            {
                "test": test_m,
                "validation": val_m,
                "test_by_view": test_by_view,
                "checks": checks,
                "backends": backend_metrics,
            }
        ),
        data=to_jsonable(data_info),
        training=to_jsonable(training),
        backends=backends,
        notes=notes,
        t_start=t_start,
        summary={"test_mean_iou": test_m["mean_iou"]},
    )
