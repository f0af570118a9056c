"""A training run's checkpoints, shared by the classifier and ROI training loops.

In the build's work folder (`trainer.steps.work_dir`): ``last.pt`` holds everything needed
to resume (weights, optimizer, scheduler, `RunState`, the training config) and ``best.pt``
the weights of the best validation score so far. A run that finds a ``last.pt`` written with
a config it may resume (`Checkpoints.resume`) goes on from the epoch after it.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from screener.logs import get_logger

log = get_logger(__name__)


@dataclass
class RunState:
    """Where a run stands: the next epoch to train, the best validation score and its epoch,
    the per-epoch history and the epochs since the last improvement (early stopping)."""

    next_epoch: int = 0
    best: float = -math.inf
    best_epoch: int = -1
    history: list[dict[str, float]] = field(default_factory=list)
    bad_epochs: int = 0

    def record(self, epoch: int, row: dict[str, float], score: float) -> bool:
        """Add epoch `epoch`'s history row; True when `score` is a new best."""
        self.history.append(row)
        self.next_epoch = epoch + 1
        if score > self.best:
            self.best, self.best_epoch, self.bad_epochs = score, epoch + 1, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def best_or_nan(self) -> float:
        return float(self.best if self.best > -math.inf else float("nan"))


class Checkpoints:
    """``last.pt`` / ``best.pt`` in `work_dir`. `best_key` names the best score in ``last.pt``
    and `score_name` in the log (each loop keeps the names its earlier checkpoints used)."""

    def __init__(self, work_dir: Path, best_key: str, score_name: str) -> None:
        work_dir.mkdir(parents=True, exist_ok=True)
        self.last, self.best = work_dir / "last.pt", work_dir / "best.pt"
        self.best_key, self.score_name = best_key, score_name

    def resume(
        self,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        sched: Any,
        config: dict[str, Any],
        device: torch.device,
        resumable: Callable[[dict[str, Any], dict[str, Any]], bool] = operator.eq,
    ) -> RunState:
        """The saved run, loaded into `model`, `opt` and `sched`, when ``last.pt`` exists and its
        config may be resumed with `config`; otherwise a fresh `RunState`. A run resumed with more
        epochs starts its early-stopping count afresh."""
        if not self.last.is_file():
            return RunState()
        saved = torch.load(self.last, map_location=device, weights_only=False)
        if not resumable(saved.get("config", {}), config):
            log.warning("checkpoint_ignored", reason="training configuration changed", file=str(self.last))
            return RunState()
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        state = RunState(
            saved["epoch"] + 1, saved[self.best_key], saved["best_epoch"], saved["history"], saved["bad_epochs"]
        )
        if saved["config"].get("epochs") != config.get("epochs"):
            state.bad_epochs = 0  # extended run: give the new epochs a fair chance
        log.info("training_resumed", epoch=state.next_epoch, **{f"best_{self.score_name}": state.best})
        return state

    def save(
        self,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        sched: Any,
        state: RunState,
        config: dict[str, Any],
        improved: bool,
    ) -> None:
        """After an epoch: the best weights when `improved`, then everything needed to resume."""
        if improved:
            torch.save(model.state_dict(), self.best)
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "epoch": state.next_epoch - 1,
                self.best_key: state.best,
                "best_epoch": state.best_epoch,
                "history": state.history,
                "bad_epochs": state.bad_epochs,
                "config": config,
            },
            self.last,
        )

    def restore_best(self, model: nn.Module, device: torch.device) -> None:
        """Load the best weights into `model` (when an epoch was ever saved)."""
        if self.best.is_file():
            model.load_state_dict(torch.load(self.best, map_location=device, weights_only=True))
