"""The ROI training loop: smooth L1 + GIoU, Adam with a cosine schedule, early stopping on
validation mean IoU (in source pixels), best checkpoint kept, resumable."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from screener.engine import preprocessing as pp
from screener.logs import get_logger
from trainer.checkpoints import Checkpoints, RunState
from trainer.progress import bar as progress_bar
from trainer.progress import write as progress_write
from trainer.roi.data import RoiDataset, tensors
from trainer.roi.evaluate import box_metrics, to_source
from trainer.roi.model import BoxRegressor

log = get_logger(__name__)

DEFAULT_BATCH = 32


def _giou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Generalized IoU per row of two (N, 4) x0y0x1y1 tensors."""
    area_p = (pred[:, 2] - pred[:, 0]).clamp(min=0) * (pred[:, 3] - pred[:, 1]).clamp(min=0)
    area_t = (target[:, 2] - target[:, 0]).clamp(min=0) * (target[:, 3] - target[:, 1]).clamp(min=0)
    lt = torch.maximum(pred[:, :2], target[:, :2])
    rb = torch.minimum(pred[:, 2:], target[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    union = area_p + area_t - inter
    iou_ = inter / union.clamp(min=1e-7)
    lt_c = torch.minimum(pred[:, :2], target[:, :2])
    rb_c = torch.maximum(pred[:, 2:], target[:, 2:])
    hull = (rb_c - lt_c).clamp(min=0).prod(dim=1)
    return iou_ - (hull - union) / hull.clamp(min=1e-7)


@dataclass(frozen=True)
class RoiTrainConfig:
    epochs: int = 30
    batch_size: int = DEFAULT_BATCH
    lr: float = 1e-3
    min_lr_fraction: float = 0.01  # cosine schedule from lr down to lr * this
    l1_weight: float = 5.0
    l1_beta: float = 0.02
    giou_weight: float = 2.0
    patience: int = 8
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RoiTrainResult:
    best_epoch: int
    best_val_mean_iou: float
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"


@torch.no_grad()
def predict_normalized(
    model: nn.Module,
    images: np.ndarray,
    norm: pp.Normalization,
    device: torch.device,
    batch_size: int = 32,
    progress: bool = False,
) -> np.ndarray:
    """Normalized boxes (N, 4) for stored gray squares (no augmentation)."""
    model.eval()
    out = []
    for i in progress_bar(range(0, len(images), batch_size), "predict", "batch", progress):
        x = torch.from_numpy(tensors(images[i : i + batch_size], norm)).to(device)
        out.append(model(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 4), np.float32)


def train_roi(
    model: BoxRegressor,
    train_ds: RoiDataset,
    val_images: np.ndarray,
    val_shapes: np.ndarray,
    val_boxes: np.ndarray,
    rcp: pp.Recipe,
    cfg: RoiTrainConfig,
    work_dir: Path,
    device: torch.device,
    resume: bool = True,
    progress: bool = True,
) -> RoiTrainResult:
    """Train with early stopping on validation mean IoU (in source pixels).

    ``work_dir/last.pt`` holds everything needed to resume; ``best.pt`` the best weights."""
    torch.manual_seed(cfg.seed)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=max(1, cfg.epochs), eta_min=cfg.lr * cfg.min_lr_fraction
    )
    ckpt = Checkpoints(work_dir, best_key="best", score_name="val_mean_iou")
    run = ckpt.resume(model, opt, sched, cfg.to_dict(), device) if resume else RunState()
    t0 = time.perf_counter()
    stopped = False
    for epoch in range(run.next_epoch, cfg.epochs):
        if run.bad_epochs >= cfg.patience:
            stopped = True
            break
        model.train()
        train_ds.epoch = epoch
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        loader = DataLoader(
            train_ds,
            batch_size=cfg.batch_size,
            shuffle=True,
            generator=gen,
            num_workers=0,
            drop_last=len(train_ds) > cfg.batch_size,
        )
        total = 0.0
        n = 0
        bar = progress_bar(loader, f"epoch {epoch + 1}/{cfg.epochs}", "batch", progress)
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            opt.zero_grad(set_to_none=True)
            pred = model(x)
            giou = _giou(pred, y)
            loss = (
                cfg.l1_weight * nn.functional.smooth_l1_loss(pred, y, beta=cfg.l1_beta)
                + cfg.giou_weight * (1.0 - giou).mean()
            )
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(y)
            n += len(y)
            bar.set_postfix(loss=f"{total / max(n, 1):.4f}")
        sched.step()
        val_pred = to_source(predict_normalized(model, val_images, train_ds.norm, device), val_shapes, rcp)
        val = box_metrics(val_pred, val_boxes, val_shapes)
        val_iou = float(val["mean_iou"]) if val["mean_iou"] is not None else 0.0
        row = {
            "epoch": epoch + 1,
            "train_loss": total / max(n, 1),
            "val_mean_iou": val_iou,
            "val_share_iou_ge_0_7": val["share_iou_ge_0_7"] or 0.0,
            "val_wide_crop_containment": val["wide_crop_containment"] or 0.0,
            "lr": opt.param_groups[0]["lr"],
        }
        improved = run.record(epoch, row, val_iou)
        ckpt.save(model, opt, sched, run, cfg.to_dict(), improved)
        msg = (
            f"epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f}, val mean IoU {val_iou:.4f}, "
            f"IoU>=0.7 {row['val_share_iou_ge_0_7']:.3f}"
        )
        if progress:
            progress_write(msg + (" (best)" if improved else ""))
        log.info("epoch_done", **row, best=improved)
    ckpt.restore_best(model, device)
    return RoiTrainResult(
        run.best_epoch,
        run.best_or_nan,
        len(run.history),
        stopped,
        run.history,
        time.perf_counter() - t0,
        str(device),
    )
