"""Screening: DICOM files -> routing -> decode -> shared preprocessing -> engines -> findings.

Used by the node's scheduler and by `screener replay`: one path for both. I/O is
limited to reading the files; the caller persists outcomes.

Per image: read the header and pixels (pydicom), route by attributes, decode to
8-bit gray (modality LUT, VOI LUT/window, MONOCHROME1, bits stored), preprocess
with each engine's manifest recipe and normalization, and batch through the
engines (``batch_size`` images per call). Engines whose recipe needs a box get
it from the ROI engine; when none is loaded the image is skipped with a reason.

The parallel path (default): a long-lived pool of isolated worker processes
(``screener.pipeline.pool``, sized by ``[pipeline]``) does everything up to the
small uint8 model images (``screener.pipeline.prepare.prepare_file``); the calling
thread normalizes each batch and runs the engines while the workers decode the next
batches (``stream``). A worker that crashes, runs out of memory or overruns fails
that image with a reason; the others go on. ``serial=True`` runs the same functions
in-process (the reference path; results are identical, tested). The pool starts on
first use and stops with ``close()`` (or the ``with`` block).
"""

from __future__ import annotations

import math
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from screener.config import LimitSettings, PipelineSettings, RoutingRule
from screener.dicom.image import pixel_spacing_mm
from screener.engine import preprocessing as pp
from screener.engine.runtime import LoadedEngine
from screener.errors import safe_reason
from screener.logs import get_logger
from screener.pipeline.outcome import EngineResult, ImageOutcome
from screener.pipeline.pool import Failure, WorkerPool
from screener.pipeline.prepare import EngineSpec, Job, Plan, Prepared, mirror_for, prepare_file, prepare_gray, read_file

log = get_logger(__name__)

__all__ = ["EngineResult", "ImageOutcome", "ReadBatch", "Screener"]


@dataclass
class ReadBatch:
    """Files read and preprocessed, waiting for the engines (in file order)."""

    outcomes: list[ImageOutcome] = field(default_factory=list)
    prepared: list[Prepared] = field(default_factory=list)


_END = object()


class Screener:
    """Runs the configured engines on DICOM files."""

    def __init__(
        self,
        engines: Mapping[str, LoadedEngine],
        rules: Sequence[RoutingRule],
        batch_size: int = 32,
        pipeline: PipelineSettings | None = None,
        *,
        limits: LimitSettings | None = None,
        serial: bool = False,
        task: Callable[[Job], Prepared] = prepare_file,
    ):
        self.engines = dict(engines)
        self.rules = list(rules)
        self.batch_size = max(1, batch_size)
        self.settings = pipeline or PipelineSettings()
        self.serial = serial
        self.task = task  # tests swap in a crashing wrapper; always a module-level function
        self.limits = limits or LimitSettings()
        self.plan = Plan(
            tuple(self.rules),
            tuple(
                EngineSpec(n, e.manifest.kind, e.manifest.preprocessing, e.manifest.pixel_scale)
                for n, e in self.engines.items()
            ),
            self.limits,
        )
        self._pool: WorkerPool | None = None
        self._pool_lock = threading.Lock()
        self._finalizer: weakref.finalize | None = None
        self.stage_seconds: dict[str, float] = {}  # cumulative, for benchmarks and metrics

    # ----------------------------------------------------------------- lifecycle
    @property
    def pool(self) -> WorkerPool:
        with self._pool_lock:
            if self._pool is None:
                s = self.settings
                preload = ("screener.pipeline.prepare", "screener.replay", self.task.__module__)
                self._pool = WorkerPool(
                    s.worker_count, s.memory_limit_mb, s.image_timeout_s, preload=preload, nice=s.nice
                )
                self._finalizer = weakref.finalize(self, self._pool.close)
            return self._pool

    def close(self) -> None:
        """Stop the worker pool (no process outlives it). The Screener can be used again after."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None
        if pool is not None:
            pool.close()

    def __enter__(self) -> Screener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- decode (in-process, reference)
    def read(self, path: Path) -> tuple[ImageOutcome, np.ndarray | None, list[str]]:
        """Read, route and decode one file. Returns (outcome, gray image or None, engines to run)."""
        out, gray, engines, _table = read_file(Path(path), self.plan)
        return out, gray, engines

    def read_many(self, paths: Sequence[Path]) -> ReadBatch:
        """Read, route, decode and preprocess files in this process."""
        batch = ReadBatch()
        for p in paths:
            prep = self.task(Job(str(p), self.plan))
            prep.outcome.path = Path(p)
            self._add_seconds(prep.seconds)
            batch.outcomes.append(prep.outcome)
            batch.prepared.append(prep)
        return batch

    # ----------------------------------------------------------------- screen
    def screen(self, paths: Sequence[Path]) -> list[ImageOutcome]:
        """Screen files; one outcome per file, in order."""
        paths = list(paths)
        if not paths:
            return []
        # Smaller inference chunks inside one call let the engines start while the rest decodes.
        chunk = max(1, min(self.batch_size, max(8, math.ceil(len(paths) / 4))))
        return [o for outs in self.stream(paths, chunk) for o in outs]

    def infer(self, batch: ReadBatch) -> list[ImageOutcome]:
        """Run the engines on a prepared batch; fills in each outcome's results."""
        self._infer(batch.prepared)
        return batch.outcomes

    def stream(self, paths: Sequence[Path], chunk: int | None = None) -> Iterator[list[ImageOutcome]]:
        """Screen files `chunk` at a time (default ``batch_size``), in order; decoding of the next
        chunks (up to ``prefetch_batches``) overlaps the engines' work on this one."""
        paths = [Path(p) for p in paths]
        chunk = max(1, chunk or self.batch_size)
        if self.serial:
            for i in range(0, len(paths), chunk):
                yield self.infer(self.read_many(paths[i : i + chunk]))
            return
        q: queue.Queue[Any] = queue.Queue(maxsize=max(1, self.settings.prefetch_batches))
        stop = threading.Event()
        _ = self.pool  # started here, not in the prefetch thread
        producer = threading.Thread(
            target=self._produce, args=(paths, chunk, q, stop), name="screener-prefetch", daemon=True
        )
        producer.start()
        try:
            while True:
                item = q.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                self._infer(item)
                yield [p.outcome for p in item]
        finally:
            stop.set()
            while producer.is_alive():
                try:
                    q.get(timeout=0.05)
                except queue.Empty:
                    pass
            producer.join()

    def _produce(self, paths: list[Path], chunk: int, q: queue.Queue[Any], stop: threading.Event) -> None:
        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            ready: dict[int, Prepared] = {}
            emitted = 0
            jobs = (Job(str(p), self.plan) for p in paths)
            results = self.pool.map(self.task, jobs)
            try:
                for idx, res in results:
                    if isinstance(res, Failure):
                        crashed = res.kind in ("died", "timeout")
                        res = Prepared(ImageOutcome(paths[idx], failed=res.reason, crashed=crashed))
                    res.outcome.path = paths[idx]
                    self._add_seconds(res.seconds)
                    ready[idx] = res
                    while all(i in ready for i in range(emitted, min(emitted + chunk, len(paths)))):
                        end = min(emitted + chunk, len(paths))
                        if emitted >= end:
                            break
                        if not put([ready.pop(i) for i in range(emitted, end)]):
                            return
                        emitted = end
                    if stop.is_set():
                        return
            finally:
                results.close()  # type: ignore[attr-defined]
            put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread
            put(exc)

    def _add_seconds(self, seconds: Mapping[str, float]) -> None:
        for k, v in seconds.items():
            self.stage_seconds[k] = self.stage_seconds.get(k, 0.0) + v

    # ----------------------------------------------------------------- engines
    def _infer(self, prepared: list[Prepared]) -> None:
        boxes = self._roi_boxes(prepared)
        for name, engine in self.engines.items():
            if engine.manifest.kind != "classifier":
                continue
            items = [p for p in prepared if name in p.engines and not p.outcome.failed]
            for start in range(0, len(items), self.batch_size):
                self._run_classifier(name, engine, items[start : start + self.batch_size], boxes)
        for p in prepared:  # the full frames are not needed any more
            p.gray = None

    def _roi_boxes(self, prepared: list[Prepared]) -> dict[int, pp.Box]:
        """Boxes from the ROI engine for images whose engines need one (id(prepared) -> box)."""
        roi = self.engines.get("roi")
        need = [p for p in prepared if p.roi_input is not None and p.gray is not None and not p.outcome.failed]
        if roi is None or not need:
            return {}
        from screener.engine.roi import box_from_output  # the ROI engine's own post-processing

        man = roi.manifest
        boxes: dict[int, pp.Box] = {}
        for start in range(0, len(need), self.batch_size):
            part = need[start : start + self.batch_size]
            t0 = time.perf_counter()
            x = pp.normalize_batch(np.stack([p.roi_input for p in part]), man.normalization)  # type: ignore[misc]
            out = np.asarray(roi.predict(x), dtype=np.float64)
            self._add_seconds({"roi_engine": time.perf_counter() - t0})
            if out.ndim != 2 or out.shape != (len(part), 4):
                raise ValueError(f"ROI engine {man.task} returned shape {out.shape}, expected ({len(part)}, 4)")
            for p, row in zip(part, out):
                boxes[id(p)] = box_from_output(row, p.gray.shape, man.preprocessing)  # type: ignore[union-attr]
        return boxes

    def _run_classifier(
        self, name: str, engine: LoadedEngine, items: list[Prepared], boxes: Mapping[int, pp.Box]
    ) -> None:
        if not items:
            return
        man = engine.manifest
        rcp, norm = man.preprocessing, man.normalization
        t0 = time.perf_counter()
        images, used = [], []
        for p in items:
            box = boxes.get(id(p)) if rcp.needs_box else None
            img = p.inputs.get(name)
            if img is None:
                try:
                    if p.gray is None:
                        raise ValueError("no image")
                    # to the training images' scale first (a no-op for images already at it)
                    spacing = pixel_spacing_mm(p.outcome.header)
                    gray, box, _ = pp.to_training_scale(p.gray, box, man.pixel_scale, spacing)
                    img = pp.prepare(gray, rcp, box, mirror=mirror_for(p.outcome, rcp))
                except ValueError as exc:
                    p.outcome.failed = safe_reason(exc, f"{name}: preprocessing failed")
                    continue
            images.append(img)
            used.append((p, box))
        if not images:
            return
        on_device = getattr(engine.runtime, "predict_uint8", None)
        if on_device is not None and getattr(engine.runtime, "cuda", False):
            u8 = np.stack(images)  # normalized on the GPU: a quarter of the bytes cross the bus
            t1 = time.perf_counter()
            out = on_device(u8, norm.mean, norm.std)
        else:
            x = pp.normalize_batch(np.stack(images), norm)
            t1 = time.perf_counter()
            out = engine.predict(x)
        probs = np.asarray(out, dtype=np.float64).reshape(len(images), -1)[:, -1]
        t2 = time.perf_counter()
        self._add_seconds({"normalize": t1 - t0, "classifier_engine": t2 - t1})
        per_image = (t2 - t1) / len(images)
        thr = float(man.threshold.value) if man.threshold else 0.5
        for (p, box), prob in zip(used, probs):
            p.outcome.results.append(
                EngineResult(
                    engine=name,
                    version=man.version,
                    backend=engine.backend.name,
                    probability=float(prob),
                    present=bool(prob >= thr),
                    threshold=thr,
                    roi=(float(box[0]), float(box[1]), float(box[2]), float(box[3])) if box else None,
                    seconds=per_image,
                )
            )


def prepare_reference(path: Path, plan: Plan) -> Prepared:
    """The reference path for one file: the whole frame through ``dataset_to_gray8`` and
    ``preprocessing.prepare`` (what the trainer-identity tests pin), in this process."""
    out, gray, engines, _table = read_file(path, plan)
    if gray is None or out.failed:
        return Prepared(out)
    return prepare_gray(out, gray, engines, plan)
