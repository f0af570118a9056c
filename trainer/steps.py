"""The steps every engine build shares, whatever it trains (classifier or ROI regressor).

A build is: options -> data -> (train | given weights) -> evaluate -> export and gate -> finish.
The two training loops differ (`trainer.train`, `trainer.roi.train`); what is around them is here:

* `work_dir`: the resumable checkpoint folder ``<out>/.work/<task>``, cleared when the data or
  the settings differ from last time (so a resume never mixes runs);
* `load_weights`: ``--checkpoint`` weights instead of training;
* `start_building`: an empty ``<out>/.<task>.building`` folder, where the engine is assembled;
* `export_and_gate`: the backend files, one manifest `Backend` record each, every file checked
  against the torch module; int8 is kept only when its test score stays within a tolerance of
  fp32 (`Gate`). A new backend is one more step appending its record(s) to the list;
* `finish`: the manifest (fields common to every engine filled from the options), written and
  checked with the node's own loader, then swapped into ``<out>/<task>`` (`manifest.install`).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import screener
from screener.engine import manifest as mf
from screener.engine import preprocessing as pp
from screener.errors import UserError
from screener.logs import get_logger
from trainer import export
from trainer.options import BuildOptions

log = get_logger(__name__)

INT8_TOLERANCE = 0.01  # keep int8 only if its test score is within this of fp32
CALIBRATION_IMAGES = 64  # training images that calibrate the int8 quantizer


# --------------------------------------------------------------------------- checkpoints


def checkpoint_dir(work: Path, meta: dict[str, Any]) -> Path:
    """The checkpoint folder of a build, with `meta` (data fingerprint, recipe, settings) in
    ``meta.json``. A folder whose meta differs is cleared, so a resume never mixes runs."""
    meta = json.loads(json.dumps(meta))  # as it reads back from the file (tuples become lists)
    meta_file = work / "meta.json"
    if meta_file.is_file():
        try:
            same = json.loads(meta_file.read_text()) == meta
        except json.JSONDecodeError:
            same = False
        if not same:
            log.info("checkpoints_reset", reason="data or settings changed", dir=str(work))
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    meta_file.write_text(json.dumps(meta, indent=2))
    return work


def work_dir(opts: BuildOptions, meta: dict[str, Any]) -> Path:
    """``<out>/.work/<task>``: the build's checkpoints, kept only while `meta` stays the same."""
    return checkpoint_dir(Path(opts.out) / ".work" / opts.task, meta)


def load_weights(model: nn.Module, path: Path, what: str) -> dict[str, str]:
    """Load ``--checkpoint`` weights (a state dict, or a training checkpoint with a "model" entry)
    into `model`; returns the manifest's record of them. `what` names the model in errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--checkpoint {path}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
    except Exception as exc:  # noqa: BLE001 - any unreadable or foreign file is a user error here
        raise UserError(f"--checkpoint {path}: not a checkpoint of {what} ({exc.__class__.__name__})") from None
    return {"file": path.name, "sha256": mf.sha256_file(path)}


# --------------------------------------------------------------------------- export and gate


def start_building(opts: BuildOptions) -> Path:
    """An empty ``<out>/.<task>.building`` folder (a failed earlier attempt is removed)."""
    building = Path(opts.out) / f".{opts.task}.building"
    if building.exists():
        shutil.rmtree(building)
    building.mkdir(parents=True)
    return building


def calibration_indices(n_train: int) -> np.ndarray:
    """The training images that calibrate int8: a fixed-seed sample of `CALIBRATION_IMAGES`."""
    return np.random.default_rng(0).permutation(n_train)[:CALIBRATION_IMAGES]


@dataclass(frozen=True)
class Gate:
    """How a build scores a backend on the test split, and how the score is recorded.

    `key` names the score in the build info (``onnx_fp32_test_<key>``) and the log (``int8_<key>``);
    `label` in the int8 note. `record_score`: the score also goes into the backend record's
    ``test_auroc`` (classifiers); otherwise the fp32 record notes it (``test <label> 0.xxxx``)."""

    key: str  # "auroc" | "mean_iou"
    label: str  # "AUROC" | "mean IoU"
    score: Callable[[np.ndarray], float]  # the backend's outputs on the test inputs -> score
    record_score: bool = False
    tolerance: float = INT8_TOLERANCE

    def fields(self, value: float) -> dict[str, Any]:
        return {"test_auroc": value} if self.record_score else {}


def export_and_gate(
    module: nn.Module,
    folder: Path,
    image_size: int,
    requested: str,
    gate: Gate,
    test_inputs: np.ndarray,
    calibration: np.ndarray,
    torch_score: float | None,
    output_name: str = "probability",
) -> tuple[list[mf.Backend], dict[str, Any]]:
    """The engine's backend files in `folder` and what was measured on them.

    `requested`: onnx | tensorrt | all. ONNX fp32 + int8 (int8 kept only within the gate's
    tolerance of fp32), then TensorRT when asked and possible. `test_inputs`: normalized test
    tensors (N, 3, S, S); `calibration`: normalized training tensors for the int8 quantizer."""
    backends: list[mf.Backend] = []
    info: dict[str, Any] = {f"torch_test_{gate.key}": torch_score}
    if requested in ("onnx", "all"):
        backends += _onnx_backends(module, folder, image_size, gate, test_inputs, calibration, output_name, info)
    trt = export.tensorrt_backend(module, folder, image_size, requested, info)
    if trt is not None:
        backends.append(trt)
    return backends, info


def _onnx_backends(
    module: nn.Module,
    folder: Path,
    image_size: int,
    gate: Gate,
    test_inputs: np.ndarray,
    calibration: np.ndarray,
    output_name: str,
    info: dict[str, Any],
) -> list[mf.Backend]:
    probe = test_inputs[: min(16, len(test_inputs))]
    fp32 = export.export_onnx(module, folder / "model.onnx", image_size, output_name=output_name)
    diff = export.compare_with_torch(module, fp32, probe)
    s32 = gate.score(export.onnx_predict(fp32, test_inputs))
    note32 = "" if gate.record_score else f"test {gate.label} {s32:.4f}"
    records = [
        export.backend_record(
            "onnx-fp32", fp32, folder, "fp32", max_abs_diff_vs_torch=diff, note=note32, **gate.fields(s32)
        )
    ]
    int8 = export.quantize_int8(fp32, folder / "model.int8.onnx", calibration)
    diff8 = export.compare_with_torch(module, int8, probe)
    s8 = gate.score(export.onnx_predict(int8, test_inputs))
    keep = bool(math.isfinite(s8) and math.isfinite(s32) and s8 >= s32 - gate.tolerance)
    tol = gate.tolerance
    note = (
        f"kept: test {gate.label} {s8:.4f} within {tol} of fp32 {s32:.4f}"
        if keep
        else f"not kept: test {gate.label} {s8:.4f} more than {tol} below fp32 {s32:.4f}"
    )
    records.append(
        export.backend_record(
            "onnx-int8", int8, folder, "int8", kept=keep, max_abs_diff_vs_torch=diff8, note=note, **gate.fields(s8)
        )
    )
    info.update(
        {
            f"onnx_fp32_test_{gate.key}": s32,
            "onnx_fp32_max_abs_diff": diff,
            f"onnx_int8_test_{gate.key}": s8,
            "onnx_int8_max_abs_diff": diff8,
            "onnx_int8_kept": keep,
        }
    )
    log.info("onnx_exported", max_abs_diff=diff, **{f"int8_{gate.key}": s8, f"fp32_{gate.key}": s32}, int8_kept=keep)
    return records


# --------------------------------------------------------------------------- finish


def new_version(opts: BuildOptions, fingerprint: str) -> tuple[str, str]:
    """(created, version): now in UTC, and ``--version`` or ``YYYY.MM.DD+<fingerprint[:8]>``."""
    created = datetime.now(UTC).replace(microsecond=0).isoformat()
    return created, opts.version or f"{created[:10].replace('-', '.')}+{fingerprint[:8]}"


def base_notes(opts: BuildOptions, pretrained_source: str) -> list[str]:
    """The manifest notes every engine may carry: random initialisation, demo."""
    notes = []
    if pretrained_source == "random-init":
        notes.append("trained from random initialisation (no --pretrained weights)")
    if opts.demo:
        notes.append("demo engine built from synthetic data: not for clinical use")
    return notes


def finish(
    opts: BuildOptions,
    building: Path,
    *,
    kind: str,
    created: str,
    version: str,
    recipe: pp.Recipe,
    normalization: pp.Normalization,
    output_name: str,
    class_names: list[str],
    threshold: mf.Threshold | None,
    metrics: dict[str, Any],
    data: dict[str, Any],
    training: dict[str, Any],
    backends: list[mf.Backend],
    notes: list[str],
    t_start: float,
    summary: dict[str, Any],
) -> Path:
    """Write the manifest into `building`, check it with the node's loader and install the engine
    as ``<out>/<task>``; logs ``engine_built`` with `summary` (e.g. the test score). Returns the folder."""
    manifest = mf.Manifest(
        task=opts.task,
        version=version,
        created=created,
        kind=kind,
        input_size=recipe.image_size,
        input_name="image",
        output_name=output_name,
        preprocessing=recipe,
        normalization=normalization,
        class_names=class_names,
        threshold=threshold,
        metrics=metrics,
        data=data,
        training=training,
        backends=backends,
        validated=bool(opts.validated_by),
        validated_by=opts.validated_by,
        demo=opts.demo,
        software_version=screener.__version__,
        notes=notes,
    )
    final = mf.install(manifest, building, Path(opts.out))
    log.info(
        "engine_built",
        task=opts.task,
        version=version,
        folder=str(final),
        **summary,
        seconds=round(time.perf_counter() - t_start, 1),
    )
    return final
