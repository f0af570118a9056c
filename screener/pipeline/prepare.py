"""What happens to one file before the engines: read, route, decode, preprocess.

``read_file`` is the reference path (header, routing, ``dataset_to_gray8``) used by the
serial Screener and by the workers. ``prepare_file`` runs in a worker: it reads the file
and returns only small arrays: each classifier's uint8 model image (S x S x 3, before
normalization, which is one vectorised step per batch in the engine process) and, when
a classifier crops to the ROI engine's box, the ROI engine's uint8 input plus the 8-bit
frame the crop is cut from (the box is known only after the ROI engine has run).

All functions are pure functions of their arguments (no globals), so a worker process
needs nothing but the ``Job``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from screener.config import LimitSettings, RoutingRule
from screener.dicom.image import (
    SCREENED_SOP_CLASSES,
    ImageDecodeError,
    dataset_to_gray8,
    header_attributes,
    pixel_spacing_mm,
    read_spooled,
)
from screener.engine import preprocessing as pp
from screener.errors import safe_reason
from screener.pipeline.decode import gray8_table
from screener.pipeline.outcome import ImageOutcome
from screener.routing import describe, route


@dataclass(frozen=True)
class EngineSpec:
    """What the data path needs to know about one loaded engine."""

    name: str
    kind: str  # classifier | roi
    recipe: pp.Recipe
    pixel_scale: pp.PixelScale | None = None  # the training images' scale (None: use images as they come)


@dataclass(frozen=True)
class Plan:
    """Routing rules and the loaded engines: everything a worker needs besides the file."""

    rules: tuple[RoutingRule, ...]
    engines: tuple[EngineSpec, ...]
    limits: LimitSettings = field(default_factory=LimitSettings)

    def spec(self, name: str) -> EngineSpec | None:
        return next((e for e in self.engines if e.name == name), None)


@dataclass(frozen=True)
class Job:
    path: str
    plan: Plan


@dataclass
class Prepared:
    """A worker's answer for one file."""

    outcome: ImageOutcome
    engines: list[str] = field(default_factory=list)  # classifiers to run
    inputs: dict[str, np.ndarray] = field(default_factory=dict)  # uint8 S x S x 3, engines without a box
    roi_input: np.ndarray | None = None  # uint8, the ROI engine's input
    gray: np.ndarray | None = None  # the 8-bit frame, only when an engine crops to the ROI box
    seconds: dict[str, float] = field(default_factory=dict)  # stage timings (read, decode, preprocess)


def read_file(
    path: Path, plan: Plan, indexed: bool = False
) -> tuple[ImageOutcome, np.ndarray | None, list[str], np.ndarray | None]:
    """Read, route and decode one file: (outcome, image or None, classifiers to run, table).

    The image is the 8-bit gray frame (``dataset_to_gray8``) and the table None; with
    `indexed`, where ``gray8_table`` covers the image, the stored values and their uint8
    table instead (see ``screener.pipeline.decode``)."""
    out = ImageOutcome(Path(path))
    t0 = time.perf_counter()
    try:
        # Bounded (size, inflate) and checked; pixel data is read only when used.
        ds = read_spooled(path, plan.limits)
    except ImageDecodeError as exc:
        out.failed = exc.reason
        return out, None, [], None
    out.sop_instance_uid = str(ds.get("SOPInstanceUID", ""))
    out.study_uid = str(ds.get("StudyInstanceUID", ""))
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in SCREENED_SOP_CLASSES:
        out.skipped = f"unsupported SOP class {sop_class or '(none)'}: only CR and DX images are screened"
        return out, None, [], None
    attrs = header_attributes(ds)
    out.route = route(attrs, list(plan.rules))
    if out.route is None:
        out.skipped = f"no routing rule matches ({describe(attrs)})"
        return out, None, [], None
    wanted = [e for e in out.route.engines if e != "roi"]
    missing = [e for e in wanted if plan.spec(e) is None]
    runnable = [e for e in wanted if plan.spec(e) is not None]
    for name in list(runnable):
        spec = plan.spec(name)
        if spec is not None and spec.recipe.needs_box and plan.spec("roi") is None:
            runnable.remove(name)
            missing.append(f"{name} (needs the ROI engine)")
    if not runnable:
        out.skipped = f"rule {out.route.rule}: engine(s) {', '.join(missing)} not loaded on this node"
        return out, None, [], None
    table = None
    try:
        if indexed:
            gray, table = gray8_table(ds, plan.limits)
        else:
            gray = dataset_to_gray8(ds, plan.limits)
    except ImageDecodeError as exc:
        out.failed = f"pixel data cannot be decoded: {exc.reason}"  # our words (image._short scrubs library text)
        return out, None, [], None
    if "PixelData" in ds:
        del ds.PixelData
    out.header = ds
    out.decode_seconds = time.perf_counter() - t0
    return out, gray, runnable, table


def mirror_for(outcome: ImageOutcome, rcp: pp.Recipe) -> bool:
    return bool(outcome.route and rcp.mirrors(outcome.route.laterality))


def prepare_gray(
    outcome: ImageOutcome, gray: np.ndarray, engines: list[str], plan: Plan, table: np.ndarray | None = None
) -> Prepared:
    """The small model images of one decoded frame (see the module doc). With `table`, `gray`
    holds stored values and ``table[gray]`` is the 8-bit frame (mapped only where read)."""
    prep = Prepared(outcome, list(engines))
    needs_box = False
    for name in engines:
        spec = plan.spec(name)
        assert spec is not None
        if spec.recipe.needs_box:
            needs_box = True
            continue
        try:
            mirror = mirror_for(outcome, spec.recipe)
            factor = pp.scale_factor(gray.shape[0], pixel_spacing_mm(outcome.header), spec.pixel_scale)
            if factor != 1.0:  # to the training images' scale first (see preprocessing.to_training_scale)
                frame = gray if table is None else table[gray]
                frame, _, _ = pp.to_training_scale(frame, None, spec.pixel_scale, pixel_spacing_mm(outcome.header))
                prep.inputs[name] = pp.prepare(frame, spec.recipe, None, mirror=mirror)
            elif table is None:
                prep.inputs[name] = pp.prepare(gray, spec.recipe, None, mirror=mirror)
            else:
                prep.inputs[name] = pp.prepare_indexed(gray, table, spec.recipe, None, mirror=mirror)
        except ValueError as exc:
            outcome.failed = safe_reason(exc, f"{name}: preprocessing failed")
            return prep
    if needs_box:
        if table is not None:
            gray = table[gray]
        roi = plan.spec("roi")
        assert roi is not None
        try:
            prep.roi_input = pp.prepare(gray, roi.recipe, None)
        except ValueError as exc:
            outcome.failed = safe_reason(exc, "roi: preprocessing failed")
            return prep
        prep.gray = gray
    return prep


def prepare_file(job: Job) -> Prepared:
    """Worker task: one file to its small model inputs (or a skipped/failed outcome)."""
    t0 = time.perf_counter()
    outcome, gray, engines, table = read_file(Path(job.path), job.plan, indexed=True)
    t1 = time.perf_counter()
    if gray is None or outcome.failed:
        return Prepared(outcome, seconds={"read_decode": t1 - t0})
    prep = prepare_gray(outcome, gray, engines, job.plan, table)
    prep.seconds = {"read_decode": t1 - t0, "preprocess": time.perf_counter() - t1}
    return prep


def prepare_file_reference(job: Job) -> Prepared:
    """As ``prepare_file``, on the reference order (whole frame through ``dataset_to_gray8``)."""
    t0 = time.perf_counter()
    outcome, gray, engines, _table = read_file(Path(job.path), job.plan)
    t1 = time.perf_counter()
    if gray is None or outcome.failed:
        return Prepared(outcome, seconds={"read_decode": t1 - t0})
    prep = prepare_gray(outcome, gray, engines, job.plan)
    prep.seconds = {"read_decode": t1 - t0, "preprocess": time.perf_counter() - t1}
    return prep
