"""The training loop: study defaults, class balance inside the training split only,
early stopping on validation AUROC, best checkpoint kept, resumable."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler

from screener.engine.metrics import roc_auc
from screener.logs import get_logger
from trainer.checkpoints import Checkpoints, RunState
from trainer.data.prepare import PreparedDataset
from trainer.progress import bar as progress_bar
from trainer.progress import write as progress_write

log = get_logger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 16
    optimizer: str = "adam"  # adam (spondylosis study) | sgd (stenosis study)
    lr: float = 3e-4
    momentum: float = 0.9
    step_epochs: int = 5
    gamma: float = 0.5
    balance: str = "weights"  # weights | oversample | none
    patience: int = 8
    seed: int = 0
    num_workers: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    best_epoch: int
    best_val_auroc: float
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"


# A run may be resumed with more epochs or another patience; anything else starts afresh.
_EXTENDABLE = ("epochs", "patience")


def _resumable(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    strip = lambda d: {k: v for k, v in d.items() if k not in _EXTENDABLE}  # noqa: E731
    return strip(saved) == strip(current)


def class_weights(labels: np.ndarray) -> torch.Tensor:
    """Inverse-frequency weights (mean 1) from the training labels only."""
    counts = np.bincount(labels, minlength=2).astype(np.float64)
    counts[counts == 0] = 1.0
    w = counts.sum() / (2.0 * counts)
    return torch.tensor(w, dtype=torch.float32)


@torch.inference_mode()
def predict_proba(
    model: nn.Module, dataset: PreparedDataset, device: torch.device, batch_size: int = 32, progress: bool = False
) -> np.ndarray:
    """Probability of the positive class for every item of a dataset (no augmentation)."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    out: list[np.ndarray] = []
    for x, _ in progress_bar(loader, "predict", "batch", progress):
        logits = model(x.to(device))
        out.append(torch.softmax(logits.float(), dim=1)[:, -1].cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr)


def train(
    model: nn.Module,
    train_ds: PreparedDataset,
    val_ds: PreparedDataset,
    cfg: TrainConfig,
    work_dir: Path,
    device: torch.device,
    resume: bool = True,
    progress: bool = True,
) -> TrainResult:
    """Train with early stopping on validation AUROC.

    Files in `work_dir`: ``last.pt`` (everything needed to resume) and ``best.pt``
    (model weights of the best validation AUROC). A run that finds ``last.pt`` resumes.
    """
    torch.manual_seed(cfg.seed)
    model.to(device)
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_epochs, gamma=cfg.gamma)
    labels = train_ds.labels
    weight = class_weights(labels).to(device) if cfg.balance == "weights" else None
    criterion = nn.CrossEntropyLoss(weight=weight)
    sampler = None
    if cfg.balance == "oversample":
        per_item = class_weights(labels).numpy()[labels]
        sampler = WeightedRandomSampler(
            [float(w) for w in per_item], len(labels), generator=torch.Generator().manual_seed(cfg.seed)
        )

    ckpt = Checkpoints(work_dir, best_key="best_auc", score_name="val_auroc")
    run = ckpt.resume(model, opt, sched, cfg.to_dict(), device, _resumable) if resume else RunState()

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
            shuffle=sampler is None,
            sampler=sampler,
            generator=gen,
            num_workers=cfg.num_workers,
            drop_last=len(train_ds) > cfg.batch_size,
        )
        total, n = 0.0, 0
        bar = progress_bar(loader, f"epoch {epoch + 1}/{cfg.epochs}", "batch", progress)
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            opt.zero_grad(set_to_none=True)
            loss = criterion(model(x), y)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(y)
            n += len(y)
            bar.set_postfix(loss=f"{total / max(n, 1):.4f}")
        sched.step()
        p_val = predict_proba(model, val_ds, device)
        val_auc = roc_auc(val_ds.labels, p_val)
        val_auc = float(val_auc) if not math.isnan(val_auc) else 0.0
        row = {
            "epoch": epoch + 1,
            "train_loss": total / max(n, 1),
            "val_auroc": val_auc,
            "lr": opt.param_groups[0]["lr"],
        }
        improved = run.record(epoch, row, val_auc)
        ckpt.save(model, opt, sched, run, cfg.to_dict(), improved)
        msg = f"epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f}, val AUROC {val_auc:.4f}"
        if progress:
            progress_write(msg + (" (best)" if improved else ""))
        log.info("epoch_done", **row, best=improved)
    ckpt.restore_best(model, device)
    return TrainResult(
        run.best_epoch,
        run.best_or_nan,
        len(run.history),
        stopped,
        run.history,
        time.perf_counter() - t0,
        str(device),
    )
