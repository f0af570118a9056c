"""`trainer build-engine`: data -> split -> train -> evaluate -> export -> manifest.

The engine is assembled in ``<out>/.<task>.building`` and swapped into
``<out>/<task>`` only when complete, so a failed build never replaces a working
engine. Training checkpoints live in ``<out>/.work/<task>`` so an interrupted
build resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

import screener
from screener.engine import manifest as mf
from screener.engine import metrics, report
from screener.engine import preprocessing as pp
from screener.errors import UserError
from screener.logs import get_logger
from trainer import csxa, export
from trainer.augment import PRESETS
from trainer.data import PreparedDataset, fingerprint, prepare_samples
from trainer.model import ProbabilityHead, build_classifier, pick_device
from trainer.splits import SplitSpec, split_counts, split_groups
from trainer.train import TrainConfig, checkpoint_dir, predict_proba, train

log = get_logger(__name__)

INT8_TOLERANCE = 0.01  # keep int8 only if its test AUROC is within this of fp32


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


@dataclass(frozen=True)
class BuildOptions:
    task: str
    data: Path
    out: Path
    recipe: str = ""  # "" = the task's default
    image_size: int = 0  # 0 = the recipe's default
    epochs: int = 30
    batch_size: int = 0  # 0 = the task's default
    extra_data: tuple[Path, ...] = ()  # roi: more data roots (lateral and oblique)
    roi_engine: Path | None = None  # stenosis: boxes for unannotated images
    optimizer: str = ""  # "" = the task's (study's) default: adam | sgd
    lr: float = 0.0  # 0 = the task's default
    pretrained: Path | None = None
    checkpoint: Path | None = None
    backend: str = "onnx"  # onnx | tensorrt | all
    split_seed: int = 20241122
    target_sensitivity: float = 0.95
    augment: str = "study"
    balance: str = "weights"
    patience: int = 8
    validated_by: str = ""
    version: str = ""
    demo: bool = False
    progress: bool = True
    n_boot: int = 2000
    stn: bool = False


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
    from trainer.oblique import load_oblique

    samples, report = load_oblique(data)
    if not rcp.needs_box:
        return samples, report
    unannotated = [s for s in samples if s.box is None]
    if unannotated and roi_engine is not None:
        from screener.engine.roi import predict_boxes
        from screener.engine.runtime import load_engine
        from trainer.data import read_gray8

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


def _work_dir(opts: BuildOptions, rcp: pp.Recipe, fp: str, cfg: TrainConfig) -> Path:
    """Checkpoint folder; cleared when data, recipe or training settings differ from last time."""
    work = opts.out / ".work" / opts.task
    train_cfg = {k: v for k, v in cfg.to_dict().items() if k not in ("epochs", "patience")}  # extendable
    meta = {
        "fingerprint": fp,
        "recipe": rcp.to_dict(),
        "train": train_cfg,
        "stn": opts.stn,
        "pretrained": str(opts.pretrained or ""),
        "augment": opts.augment,
        "split_seed": opts.split_seed,
    }
    return checkpoint_dir(work, meta)


def build_engine(opts: BuildOptions) -> Path:
    """Build one engine folder; returns its path."""
    if opts.task == "roi":
        from trainer.roi import build_roi_engine

        return build_roi_engine(opts)
    if opts.task not in TASKS:
        raise UserError(f"--task {opts.task}: expected spondylosis, stenosis or roi")
    defaults = TASKS[opts.task]
    if opts.backend not in ("onnx", "tensorrt", "all"):
        raise UserError(f"--backend {opts.backend}: expected onnx, tensorrt or all")
    if opts.augment not in PRESETS:
        raise UserError(f"--augment {opts.augment}: expected one of {', '.join(PRESETS)}")
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
        if not opts.checkpoint.is_file():
            raise UserError(f"--checkpoint {opts.checkpoint}: file not found")
        try:
            state = torch.load(opts.checkpoint, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
        except Exception as exc:  # noqa: BLE001
            raise UserError(
                f"--checkpoint {opts.checkpoint}: not a checkpoint of this model ({exc.__class__.__name__})"
            ) from None
        training["checkpoint"] = {"file": opts.checkpoint.name, "sha256": mf.sha256_file(opts.checkpoint)}
        model.to(device)
    else:
        work = _work_dir(opts, rcp, data.fingerprint, cfg)
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

    building = opts.out / f".{opts.task}.building"
    if building.exists():
        shutil.rmtree(building)
    building.mkdir(parents=True)
    head = ProbabilityHead(model.to("cpu").eval())
    backends, backend_metrics = _export_backends(
        head, building, rcp, opts, train_x, test_x, test_y, norm, evaluation.test.auroc
    )
    created = datetime.now(UTC).replace(microsecond=0).isoformat()
    version = opts.version or f"{created[:10].replace('-', '.')}+{data.fingerprint[:8]}"
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
    notes = []
    if pre_info.source == "random-init":
        notes.append("trained from random initialisation (no --pretrained weights)")
    if opts.demo:
        notes.append("demo engine built from synthetic data: not for clinical use")
    manifest = mf.Manifest(
        task=opts.task,
        version=version,
        created=created,
        kind="classifier",
        input_size=rcp.image_size,
        input_name="image",
        output_name="probability",
        preprocessing=rcp,
        normalization=norm,
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
        validated=bool(opts.validated_by),
        validated_by=opts.validated_by,
        demo=opts.demo,
        software_version=screener.__version__,
        notes=notes,
    )
    final = mf.install(manifest, building, opts.out)
    log.info(
        "engine_built",
        task=opts.task,
        version=version,
        folder=str(final),
        test_auroc=evaluation.test.auroc,
        seconds=round(time.perf_counter() - t_start, 1),
    )
    return final


def _export_backends(
    head: torch.nn.Module,
    folder: Path,
    rcp: pp.Recipe,
    opts: BuildOptions,
    train_x: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    norm: pp.Normalization,
    torch_auroc: float | None,
) -> tuple[list[mf.Backend], dict[str, Any]]:
    """ONNX fp32 + int8 (and TensorRT when asked and possible), each checked against torch."""

    def tensors(x: np.ndarray) -> np.ndarray:
        return (
            np.stack([pp.normalize(img, norm) for img in x])
            if len(x)
            else np.zeros((0, 3, rcp.image_size, rcp.image_size), np.float32)
        )

    test_t = tensors(test_x)
    probe = test_t[: min(16, len(test_t))]
    backends: list[mf.Backend] = []
    info: dict[str, Any] = {"torch_test_auroc": torch_auroc}
    if opts.backend in ("onnx", "all"):
        fp32 = export.export_onnx(head, folder / "model.onnx", rcp.image_size)
        diff = export.compare_with_torch(head, fp32, probe)
        p32 = export.onnx_predict(fp32, test_t)
        auc32 = metrics.roc_auc(test_y, p32)
        backends.append(
            export.backend_record("onnx-fp32", fp32, folder, "fp32", max_abs_diff_vs_torch=diff, test_auroc=auc32)
        )
        calib = tensors(train_x[np.random.default_rng(0).permutation(len(train_x))[:64]])
        int8 = export.quantize_int8(fp32, folder / "model.int8.onnx", calib)
        diff8 = export.compare_with_torch(head, int8, probe)
        auc8 = metrics.roc_auc(test_y, export.onnx_predict(int8, test_t))
        keep = bool(np.isfinite(auc8) and np.isfinite(auc32) and auc8 >= auc32 - INT8_TOLERANCE)
        note = (
            f"kept: test AUROC {auc8:.4f} within {INT8_TOLERANCE} of fp32 {auc32:.4f}"
            if keep
            else f"not kept: test AUROC {auc8:.4f} more than {INT8_TOLERANCE} below fp32 {auc32:.4f}"
        )
        backends.append(
            export.backend_record(
                "onnx-int8", int8, folder, "int8", kept=keep, max_abs_diff_vs_torch=diff8, test_auroc=auc8, note=note
            )
        )
        info.update(
            {
                "onnx_fp32_test_auroc": auc32,
                "onnx_fp32_max_abs_diff": diff,
                "onnx_int8_test_auroc": auc8,
                "onnx_int8_max_abs_diff": diff8,
                "onnx_int8_kept": keep,
            }
        )
        log.info("onnx_exported", max_abs_diff=diff, int8_auroc=auc8, fp32_auroc=auc32, int8_kept=keep)
    try:  # the node's `torch` backend (GPU hosts without TensorRT)
        pt2 = export.export_torch_program(head, folder / "model.pt2", rcp.image_size)
        backends.append(export.backend_record("torch", pt2, folder, "fp32"))
    except Exception as exc:  # noqa: BLE001 - an unexportable model keeps its ONNX engines
        info["torch"] = f"torch.export program not written: {exc.__class__.__name__}"
        log.warning("torch_export_failed", error=exc.__class__.__name__)
    trt = export.tensorrt_backend(head, folder, rcp.image_size, opts.backend, info)
    if trt is not None:
        backends.append(trt)
    return backends, info
