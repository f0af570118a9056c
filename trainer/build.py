"""`trainer build-engine`: data -> split -> train -> evaluate -> export -> manifest.

The classifier builds (spondylosis, stenosis) are here; ``--task roi`` goes to
`trainer.roi.build`. Both take one `BuildOptions` and share the steps around their
training loops (`trainer.steps`, `trainer.checkpoints`): the engine is assembled in
``<out>/.<task>.building`` and swapped into ``<out>/<task>`` only when complete, so a
failed build never replaces a working engine; training checkpoints live in
``<out>/.work/<task>`` so an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from screener.engine import manifest as mf
from screener.engine import metrics, report
from screener.engine import preprocessing as pp
from screener.errors import UserError
from screener.logs import get_logger
from trainer import steps
from trainer.augment import PRESETS
from trainer.data import csxa
from trainer.data.prepare import PreparedDataset, fingerprint, prepare_samples
from trainer.model import ProbabilityHead, build_classifier, pick_device
from trainer.options import BuildOptions
from trainer.splits import SplitSpec, split_counts, split_groups
from trainer.train import TrainConfig, predict_proba, train

log = get_logger(__name__)

__all__ = ["TASKS", "BuildOptions", "PreparedData", "build_engine", "load_prepared", "load_samples"]


@dataclass(frozen=True)
class TaskDefaults:
    recipe: str
    class_names: tuple[str, str]
    optimizer: str
    lr: float
    step_epochs: int
    gamma: float
    batch_size: int


# The studies' training set-ups: Adam 3e-4 halved every 5 epochs (spondylosis); SGD momentum 0.9,
# lr 1e-3 x0.1 every 7 epochs, batch 4 (foraminal stenosis).
TASKS: dict[str, TaskDefaults] = {
    "spondylosis": TaskDefaults("original", ("healthy", "spondylosis"), "adam", 3e-4, 5, 0.5, 16),
    "stenosis": TaskDefaults("roi_he", ("normal", "stenosis"), "sgd", 1e-3, 7, 0.1, 4),
}


@dataclass
class PreparedData:
    samples: list[csxa.Sample]
    images: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    load_report: csxa.LoadReport
    fingerprint: str

    def part(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        idx = np.flatnonzero(self.splits == name)
        return self.images[idx], self.labels[idx]


def load_samples(task: str, data: Path, rcp: pp.Recipe, roi_engine: Path | None = None) -> tuple[list, csxa.LoadReport]:
    """The task's samples: CSXA lateral (spondylosis) or the oblique layout (stenosis).

    Oblique images without an annotated ROI get the ROI engine's box when one is given,
    otherwise they are skipped and counted."""
    if task != "stenosis":
        return csxa.load(data, need_keypoints=rcp.needs_box)
    from trainer.data.oblique import load_oblique

    samples, report = load_oblique(data)
    if not rcp.needs_box:
        return samples, report
    unannotated = [s for s in samples if s.box is None]
    if unannotated and roi_engine is not None:
        from screener.engine.roi import predict_boxes
        from screener.engine.runtime import load_engine
        from trainer.data.prepare import read_gray8

        engine = load_engine(roi_engine, "onnx-fp32")
        boxes = {}
        for s in unannotated:
            try:
                boxes[s.image_path] = predict_boxes(engine, [read_gray8(s.image_path)[0]])[0]
            except ValueError as exc:
                report.skip(s.image_path, str(exc))
        samples = [
            dataclasses.replace(s, box=boxes[s.image_path]) if s.box is None and s.image_path in boxes else s
            for s in samples
        ]
    kept = []
    for s in samples:
        if s.box is None:
            report.skip(s.image_path, "no ROI annotation (pass --roi-engine to use predicted boxes)")
        else:
            kept.append(s)
    return kept, report


def load_prepared(
    data: Path,
    rcp: pp.Recipe,
    spec: SplitSpec,
    progress: bool,
    task: str = "spondylosis",
    roi_engine: Path | None = None,
) -> PreparedData:
    """Read the data set, split by patient and prepare every image with the shared preprocessing."""
    samples, load_report = load_samples(task, data, rcp, roi_engine)
    if not samples:
        raise UserError(f"{data}: no usable images for {task} ({len(load_report.skipped)} skipped)")
    splits_all = split_groups([s.group for s in samples], [s.label for s in samples], spec)
    by_id = {s.image_path: sp for s, sp in zip(samples, splits_all)}
    kept, images = prepare_samples(samples, rcp, load_report, progress=progress)
    if not kept:
        raise UserError(f"{data}: no image could be read")
    labels = np.array([s.label for s in kept], dtype=np.int64)
    splits = np.array([by_id[s.image_path] for s in kept])
    for name in ("train", "validation", "test"):
        part = labels[splits == name]
        if len(part) == 0 or part.min() == part.max():
            raise UserError(
                f"{data}: the {name} split has {len(part)} images and not both classes; "
                "the data set is too small or too imbalanced to train and evaluate honestly"
            )
    return PreparedData(kept, images, labels, splits, load_report, fingerprint(kept, Path(data)))


def _meta(opts: BuildOptions, rcp: pp.Recipe, fp: str, cfg: TrainConfig) -> dict[str, Any]:
    """What the checkpoints depend on: a change starts training afresh (more epochs or patience resume)."""
    train_cfg = {k: v for k, v in cfg.to_dict().items() if k not in ("epochs", "patience")}  # extendable
    return {
        "fingerprint": fp,
        "recipe": rcp.to_dict(),
        "train": train_cfg,
        "stn": opts.stn,
        "pretrained": str(opts.pretrained or ""),
        "augment": opts.augment,
        "split_seed": opts.split_seed,
    }


def build_engine(opts: BuildOptions) -> Path:
    """Build one engine folder; returns its path."""
    if opts.task == "roi":
        from trainer.roi import build_roi_engine

        return build_roi_engine(opts)
    opts.check(tuple(PRESETS))
    defaults = TASKS[opts.task]
    t_start = time.perf_counter()
    try:
        rcp = pp.recipe(opts.recipe or defaults.recipe, opts.image_size or None)
    except ValueError as exc:
        raise UserError(f"--recipe: {exc}") from None
    spec = SplitSpec(seed=opts.split_seed)
    data = load_prepared(opts.data, rcp, spec, opts.progress, opts.task, opts.roi_engine)
    train_x, train_y = data.part("train")
    val_x, val_y = data.part("validation")
    test_x, test_y = data.part("test")

    model, pre_info = build_classifier(opts.pretrained, stn=opts.stn)
    norm = pp.IMAGENET if opts.pretrained else pp.channel_stats(train_x)
    cfg = TrainConfig(
        epochs=opts.epochs,
        batch_size=opts.batch_size or defaults.batch_size,
        balance=opts.balance,
        optimizer=opts.optimizer or defaults.optimizer,
        lr=opts.lr or defaults.lr,
        step_epochs=defaults.step_epochs,
        gamma=defaults.gamma,
        patience=opts.patience,
        seed=opts.split_seed % 10_000,
    )
    device = pick_device()
    train_ds = PreparedDataset(train_x, train_y, norm, PRESETS[opts.augment], seed=cfg.seed)
    val_ds = PreparedDataset(val_x, val_y, norm)
    test_ds = PreparedDataset(test_x, test_y, norm)

    training: dict[str, Any] = {
        "config": cfg.to_dict(),
        "augment": opts.augment,
        "augment_params": PRESETS[opts.augment].to_dict(),
        "device": str(device),
        "pretrained": dataclasses.asdict(pre_info),
        "stn": opts.stn,
        "architecture": "torchvision resnet50, 2-class head",
    }
    if opts.checkpoint:
        training["checkpoint"] = steps.load_weights(model, opts.checkpoint, "this model")
        model.to(device)
    else:
        work = steps.work_dir(opts, _meta(opts, rcp, data.fingerprint, cfg))
        result = train(model, train_ds, val_ds, cfg, work, device, progress=opts.progress)
        training["result"] = dataclasses.asdict(result)

    p_val = predict_proba(model, val_ds, device)
    p_test = predict_proba(model, test_ds, device)
    evaluation = metrics.evaluate(
        val_y,
        p_val,
        test_y,
        p_test,
        target_sensitivity=opts.target_sensitivity,
        n_boot=opts.n_boot,
        seed=0,
        class_names=defaults.class_names,
    )
    thr = evaluation.threshold

    building = steps.start_building(opts)
    head = ProbabilityHead(model.to("cpu").eval())
    gate = steps.Gate("auroc", "AUROC", lambda outputs: metrics.roc_auc(test_y, outputs), record_score=True)
    backends, backend_metrics = steps.export_and_gate(
        head,
        building,
        rcp.image_size,
        opts.backend,
        gate,
        _tensors(test_x, norm, rcp),
        _tensors(train_x[steps.calibration_indices(len(train_x))], norm, rcp),
        evaluation.test.auroc,
    )
    created, version = steps.new_version(opts, data.fingerprint)
    counts = split_counts(list(data.splits), list(data.labels))
    extra = {
        "task": opts.task,
        "engine_version": version,
        "recipe": rcp.to_dict(),
        "data_fingerprint": data.fingerprint,
        "split_seed": opts.split_seed,
        "splits": counts,
        "data_problems": data.load_report.summary(),
        "pretrained": pre_info.source,
        "backends": backend_metrics,
        "validated": bool(opts.validated_by),
        "demo": opts.demo,
    }
    report.write_report(
        building,
        evaluation,
        extra=extra,
        y_test=test_y,
        p_test=p_test,
        title=f"{opts.task} engine {version}: evaluation on the held-out test split",
    )
    return steps.finish(
        opts,
        building,
        kind="classifier",
        created=created,
        version=version,
        recipe=rcp,
        normalization=norm,
        output_name="probability",
        class_names=list(defaults.class_names),
        threshold=mf.Threshold(
            value=float(thr.threshold),
            method=thr.method,
            split=thr.split,
            target_sensitivity=thr.target_sensitivity,
            achieved_sensitivity=thr.achieved_sensitivity,
            achieved_specificity=thr.achieved_specificity,
        ),
        metrics={
            "test": report.to_jsonable(evaluation.test),
            "validation_auroc": evaluation.validation.auroc,
            "majority_baseline": report.to_jsonable(evaluation.majority_baseline),
            "brier_score": evaluation.brier_score,
            "backends": backend_metrics,
        },
        data={
            "fingerprint": data.fingerprint,
            "root_name": Path(opts.data).name,
            "n_images": len(data.labels),
            "splits": counts,
            "split_seed": opts.split_seed,
            "split_method": "stratified by label, grouped by patient (consecutive rows with equal gender and age)",
            "roi_boxes": "annotated"
            if opts.roi_engine is None
            else f"annotated, else ROI engine {opts.roi_engine.name}",
            "problems": data.load_report.summary(),
        },
        training=training,
        backends=backends,
        notes=steps.base_notes(opts, pre_info.source),
        t_start=t_start,
        summary={"test_auroc": evaluation.test.auroc},
    )


def _tensors(x: np.ndarray, norm: pp.Normalization, rcp: pp.Recipe) -> np.ndarray:
    """Prepared uint8 images -> normalized model inputs (N, 3, S, S)."""
    if not len(x):
        return np.zeros((0, 3, rcp.image_size, rcp.image_size), np.float32)
    return np.stack([pp.normalize(img, norm) for img in x])
