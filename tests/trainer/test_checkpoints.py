"""The shared training checkpoints (last.pt / best.pt) and build options."""

from pathlib import Path

import pytest
import torch
from torch import nn

from screener.errors import UserError
from trainer.checkpoints import Checkpoints, RunState
from trainer.options import BuildOptions
from trainer.train import _resumable


def _parts(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    return model, opt, sched


def _run_epochs(ckpt, model, opt, sched, run, cfg, scores):
    for epoch, score in zip(range(run.next_epoch, cfg["epochs"]), scores):
        with torch.no_grad():
            model.weight.add_(score)  # stands in for an epoch of training
        opt.step()
        sched.step()
        improved = run.record(epoch, {"epoch": epoch + 1, "score": score}, score)
        ckpt.save(model, opt, sched, run, cfg, improved)
    return run


def test_resume_goes_on_after_the_last_epoch(tmp_path: Path) -> None:
    cfg = {"epochs": 3, "lr": 0.1}
    ckpt = Checkpoints(tmp_path / "work", best_key="best", score_name="val_score")
    model, opt, sched = _parts()
    start = ckpt.resume(model, opt, sched, cfg, torch.device("cpu"))
    run = _run_epochs(ckpt, model, opt, sched, start, cfg, [0.5, 0.7])
    assert (run.next_epoch, run.best, run.best_epoch, run.bad_epochs) == (2, 0.7, 2, 0)
    saved = torch.load(ckpt.last, weights_only=False)
    assert saved["epoch"] == 1 and saved["best"] == 0.7 and saved["config"] == cfg

    model2, opt2, sched2 = _parts(seed=1)
    again = ckpt.resume(model2, opt2, sched2, cfg, torch.device("cpu"))
    assert (again.next_epoch, again.best, again.best_epoch, len(again.history)) == (2, 0.7, 2, 2)
    assert torch.equal(model2.weight, model.weight)
    assert sched2.last_epoch == sched.last_epoch

    _run_epochs(ckpt, model2, opt2, sched2, again, cfg, [0.6])
    assert again.bad_epochs == 1 and again.best_epoch == 2
    best = nn.Linear(3, 2)
    ckpt.restore_best(best, torch.device("cpu"))
    assert torch.allclose(best.weight, model2.weight - 0.6)  # epoch 3 did not improve: best.pt is epoch 2's


def test_changed_config_starts_afresh_and_more_epochs_resets_patience(tmp_path: Path) -> None:
    ckpt = Checkpoints(tmp_path, best_key="best_auc", score_name="val_auroc")
    model, opt, sched = _parts()
    cfg = {"epochs": 3, "lr": 0.1, "patience": 1}
    _run_epochs(ckpt, model, opt, sched, RunState(), cfg, [0.9, 0.8, 0.7])
    assert torch.load(ckpt.last, weights_only=False)["best_auc"] == 0.9

    fresh = ckpt.resume(model, opt, sched, {**cfg, "lr": 0.2}, torch.device("cpu"), _resumable)
    assert fresh == RunState()
    longer = ckpt.resume(model, opt, sched, {**cfg, "epochs": 6}, torch.device("cpu"), _resumable)
    assert longer.next_epoch == 3 and longer.bad_epochs == 0 and longer.best == 0.9
    exact = ckpt.resume(model, opt, sched, {**cfg, "epochs": 6}, torch.device("cpu"))  # ROI: configs must match
    assert exact == RunState()


def test_build_options_roots_and_checks(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    opts = BuildOptions(task="roi", data=a, out=tmp_path, extra_data=(b, a))
    assert opts.roots == [a, b]
    opts.check(("study", "light", "none"))
    for bad, word in (({"task": "x"}, "--task"), ({"backend": "x"}, "--backend"), ({"augment": "x"}, "--augment")):
        with pytest.raises(UserError, match=word):
            BuildOptions(**{"task": "spondylosis", "data": a, "out": tmp_path, **bad}).check(("study",))
