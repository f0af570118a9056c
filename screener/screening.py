"""Screening: DICOM files -> routing -> decode -> shared preprocessing -> engines -> findings.

Used by the node's scheduler and by `screener replay`: one path for both. I/O is
limited to reading the files; the caller persists outcomes.

Per image: read the header and pixels (pydicom), route by attributes, decode to
8-bit gray (modality LUT, VOI LUT/window, MONOCHROME1, bits stored), preprocess
with each engine's manifest recipe and normalization, and batch through the
engines (``batch_size`` images per call). Engines whose recipe needs a box get
it from the ROI engine; when none is loaded the image is skipped with a reason.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from screener.config import RoutingRule
from screener.dicom.image import SCREENED_SOP_CLASSES, ImageDecodeError, dataset_to_gray8, header_attributes
from screener.engine import preprocessing as pp
from screener.engine.runtime import LoadedEngine
from screener.errors import safe_reason, scrub_message
from screener.logs import get_logger
from screener.routing import Route, describe, route

log = get_logger(__name__)


@dataclass(frozen=True)
class EngineResult:
    engine: str  # task name: spondylosis | stenosis
    version: str
    backend: str
    probability: float
    present: bool
    threshold: float
    roi: tuple[float, float, float, float] | None
    seconds: float  # inference time per image (batch time / batch size)


@dataclass
class ImageOutcome:
    path: Path
    sop_instance_uid: str = ""
    study_uid: str = ""
    header: pydicom.Dataset | None = None  # no pixel data
    route: Route | None = None
    results: list[EngineResult] = field(default_factory=list)
    skipped: str = ""  # reason the image was not screened (not an error of the node)
    failed: str = ""  # reason the image could not be screened (bad data)
    decode_seconds: float = 0.0

    @property
    def state(self) -> str:
        if self.failed:
            return "failed"
        if self.skipped:
            return "skipped"
        return "screened"


@dataclass
class _Pending:
    outcome: ImageOutcome
    gray: np.ndarray
    engines: list[str]


@dataclass
class ReadBatch:
    outcomes: list[ImageOutcome] = field(default_factory=list)
    pending: list[_Pending] = field(default_factory=list)


class Screener:
    """Runs the configured engines on DICOM files."""

    def __init__(self, engines: Mapping[str, LoadedEngine], rules: Sequence[RoutingRule], batch_size: int = 32):
        self.engines = dict(engines)
        self.rules = list(rules)
        self.batch_size = max(1, batch_size)

    # ----------------------------------------------------------------- decode
    def read(self, path: Path) -> tuple[ImageOutcome, np.ndarray | None, list[str]]:
        """Read, route and decode one file. Returns (outcome, gray image or None, engines to run)."""
        out = ImageOutcome(Path(path))
        t0 = time.perf_counter()
        try:
            # Large elements (pixel data) are read only when used: skipped files cost a header read.
            ds = pydicom.dcmread(str(path), defer_size="1 MB")
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            out.failed = f"not a readable DICOM file ({exc.__class__.__name__})"
            return out, None, []
        out.sop_instance_uid = str(ds.get("SOPInstanceUID", ""))
        out.study_uid = str(ds.get("StudyInstanceUID", ""))
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class not in SCREENED_SOP_CLASSES:
            out.skipped = f"unsupported SOP class {sop_class or '(none)'}: only CR and DX images are screened"
            return out, None, []
        attrs = header_attributes(ds)
        out.route = route(attrs, self.rules)
        if out.route is None:
            out.skipped = f"no routing rule matches ({describe(attrs)})"
            return out, None, []
        wanted = [e for e in out.route.engines if e != "roi"]
        missing = [e for e in wanted if e not in self.engines]
        runnable = [e for e in wanted if e in self.engines]
        for name in list(runnable):
            if self.engines[name].manifest.preprocessing.needs_box and "roi" not in self.engines:
                runnable.remove(name)
                missing.append(f"{name} (needs the ROI engine)")
        if not runnable:
            out.skipped = f"rule {out.route.rule}: engine(s) {', '.join(missing)} not loaded on this node"
            return out, None, []
        try:
            gray = dataset_to_gray8(ds)
        except ImageDecodeError as exc:
            out.failed = f"pixel data cannot be decoded: {scrub_message(exc.reason)}"
            return out, None, []
        if "PixelData" in ds:
            del ds.PixelData
        out.header = ds
        out.decode_seconds = time.perf_counter() - t0
        return out, gray, runnable

    # ----------------------------------------------------------------- screen
    def screen(self, paths: Sequence[Path]) -> list[ImageOutcome]:
        """Screen files; one outcome per file, in order."""
        return self.infer(self.read_many(paths))

    def read_many(self, paths: Sequence[Path]) -> ReadBatch:
        """Read, route and decode files (the I/O and CPU part that can overlap inference)."""
        batch = ReadBatch()
        for p in paths:
            out, gray, engines = self.read(p)
            batch.outcomes.append(out)
            if gray is not None:
                batch.pending.append(_Pending(out, gray, engines))
        return batch

    def infer(self, batch: ReadBatch) -> list[ImageOutcome]:
        """Run the engines on a decoded batch; fills in each outcome's results."""
        pending = batch.pending
        boxes = self._roi_boxes(pending)
        for name, engine in self.engines.items():
            if engine.manifest.kind != "classifier":
                continue
            items = [pe for pe in pending if name in pe.engines and not pe.outcome.failed]
            for start in range(0, len(items), self.batch_size):
                self._run_classifier(name, engine, items[start : start + self.batch_size], boxes)
        return batch.outcomes

    def _roi_boxes(self, pending: list[_Pending]) -> dict[int, pp.Box]:
        """Boxes from the ROI engine for images whose engines need one (id(pending) -> box)."""
        roi = self.engines.get("roi")
        need = [pe for pe in pending if any(self.engines[e].manifest.preprocessing.needs_box for e in pe.engines)]
        if roi is None or not need:
            return {}
        from screener.engine.roi import predict_boxes  # the ROI engine's own pre/post-processing

        boxes: dict[int, pp.Box] = {}
        for start in range(0, len(need), self.batch_size):
            chunk = need[start : start + self.batch_size]
            for pe, box in zip(chunk, predict_boxes(roi, [pe.gray for pe in chunk])):
                boxes[id(pe)] = box
        return boxes

    def _run_classifier(
        self, name: str, engine: LoadedEngine, items: list[_Pending], boxes: Mapping[int, pp.Box]
    ) -> None:
        if not items:
            return
        man = engine.manifest
        rcp, norm = man.preprocessing, man.normalization
        tensors, used = [], []
        for pe in items:
            box = boxes.get(id(pe)) if rcp.needs_box else None
            mirror = bool(pe.outcome.route and rcp.mirrors(pe.outcome.route.laterality))
            try:
                tensors.append(pp.preprocess(pe.gray, rcp, norm, box, mirror=mirror))
            except ValueError as exc:
                pe.outcome.failed = safe_reason(exc, f"{name}: preprocessing failed")
                continue
            used.append((pe, box))
        if not tensors:
            return
        t0 = time.perf_counter()
        probs = np.asarray(engine.predict(np.stack(tensors)), dtype=np.float64).reshape(len(tensors), -1)[:, -1]
        per_image = (time.perf_counter() - t0) / len(tensors)
        thr = float(man.threshold.value) if man.threshold else 0.5
        for (pe, box), p in zip(used, probs):
            pe.outcome.results.append(
                EngineResult(
                    engine=name,
                    version=man.version,
                    backend=engine.backend.name,
                    probability=float(p),
                    present=bool(p >= thr),
                    threshold=thr,
                    roi=tuple(float(v) for v in box) if box else None,
                    seconds=per_image,
                )
            )
