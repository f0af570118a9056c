"""Prometheus metrics of the node (served at ``GET /metrics`` by screener.http).

Two kinds:

* Events counted where they happen (listener, scheduler jobs, sender): the counters and histograms
  below, in the process-wide `REGISTRY`. The node and the listener call the small functions at the
  end of this module; they never raise.
* State read from the store when Prometheus scrapes (`NodeCollector`): studies and instances per
  state, outbox entries per destination, spool size, free disk, engines, destinations' C-ECHO.
  Read through the Store's query methods, so the numbers are those of ``screener status``.

Names follow the Prometheus conventions: a ``screener_`` prefix, ``_total`` for counters, base units
(``_seconds``, ``_bytes``), ``_info`` for constant label sets. Labels never carry patient data: only
states, status codes, engine names and versions, backends, destinations (``AET@host:port``) and job
names, all bounded by the configuration or the code.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric

from screener.logs import get_logger

log = get_logger(__name__)

# The *_created series double the output and no dashboard here uses them.
disable_created_metrics()

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

# -- receiving (screener.dicom.listener) -------------------------------------------------------------
INSTANCES_RECEIVED = Counter(
    "screener_instances_received", "C-STORE requests answered 0x0000 (stored durably)", registry=REGISTRY
)
RECEIVED_BYTES = Counter("screener_received_bytes", "Bytes of instances stored", registry=REGISTRY)
INSTANCES_REFUSED = Counter(
    "screener_instances_refused",
    "C-STORE requests answered with a failure status, by status code (e.g. 0xA700 out of resources)",
    ["status"],
    registry=REGISTRY,
)
ASSOCIATIONS = Counter("screener_associations", "DICOM associations accepted", registry=REGISTRY)
ASSOCIATION_REFUSALS = Counter(
    "screener_association_refusals",
    "DICOM associations rejected, by reason (source address, AE titles, association limit)",
    ["reason"],
    registry=REGISTRY,
)

# -- screening (screener.node) -----------------------------------------------------------------------
BATCH_IMAGES = Histogram(
    "screener_batch_images",
    "Images per screening batch",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
    registry=REGISTRY,
)
BATCH_SECONDS = Histogram(
    "screener_batch_duration_seconds",
    "Wall time of one screening batch (decode, route, every engine)",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
    registry=REGISTRY,
)
SCREENING_LATENCY = Histogram(
    "screener_screening_latency_seconds",
    "Per study: from its last instance received to its SR written (includes the study_stable_s wait)",
    buckets=(1, 5, 15, 30, 60, 90, 120, 180, 300, 600, 1800, 3600, 7200),
    registry=REGISTRY,
)
INFERENCE_SECONDS = Histogram(
    "screener_engine_inference_seconds",
    "Inference time per image, by engine and backend",
    ["engine", "backend"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    registry=REGISTRY,
)
FINDINGS = Counter(
    "screener_findings", "Engine results recorded, by engine and finding", ["engine", "finding"], registry=REGISTRY
)
STUDIES_FINISHED = Counter(
    "screener_studies_finished",
    "Studies that left screening, by the state they reached (reported, skipped, failed)",
    ["state"],
    registry=REGISTRY,
)

# -- sending and jobs (screener.node) ----------------------------------------------------------------
SEND_ATTEMPTS = Counter(
    "screener_send_attempts",
    "C-STORE attempts of SRs, by destination and result (ok, error)",
    ["destination", "result"],
    registry=REGISTRY,
)
JOB_FAILURES = Counter(
    "screener_job_failures",
    "Scheduler jobs that raised (the job runs again on its next tick), by job",
    ["job"],
    registry=REGISTRY,
)


def _safe(fn: Callable[..., None]) -> Callable[..., None]:
    """Metrics must never break the node: log and go on."""

    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            log.warning("metric_failed", metric=fn.__name__, error_type=type(exc).__name__)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def slug(text: str) -> str:
    """A label value from a reason text: 'source address not allowed' -> 'source_address_not_allowed'."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or "other"


@_safe
def instance_stored(size: int) -> None:
    INSTANCES_RECEIVED.inc()
    RECEIVED_BYTES.inc(max(0, size))


@_safe
def instance_refused(status: int) -> None:
    INSTANCES_REFUSED.labels(status=f"0x{status:04X}").inc()


@_safe
def association_accepted() -> None:
    ASSOCIATIONS.inc()


@_safe
def association_refused(reason: str) -> None:
    ASSOCIATION_REFUSALS.labels(reason=slug(reason)).inc()


@_safe
def association_rejected(result: Any, source: Any, diagnostic: Any) -> None:
    """A rejection by pynetdicom itself (after our own checks): the association limit or negotiation."""
    limit = result == 0x02 and source == 0x03 and diagnostic == 0x02
    ASSOCIATION_REFUSALS.labels(reason="association_limit" if limit else "negotiation").inc()


@_safe
def batch_screened(n_images: int, seconds: float) -> None:
    BATCH_IMAGES.observe(n_images)
    BATCH_SECONDS.observe(max(0.0, seconds))


@_safe
def results_recorded(outcomes: Iterable[Any]) -> None:
    """Engine inference time and findings of screened images (screener.screening.ImageOutcome)."""
    for out in outcomes:
        for r in out.results:
            INFERENCE_SECONDS.labels(engine=r.engine, backend=r.backend).observe(max(0.0, float(r.seconds)))
            FINDINGS.labels(engine=r.engine, finding="present" if r.present else "absent").inc()


@_safe
def study_finished(state: str, last_received_at: float | None = None, now: float | None = None) -> None:
    STUDIES_FINISHED.labels(state=state).inc()
    if state == "reported" and last_received_at is not None:
        SCREENING_LATENCY.observe(max(0.0, (time.time() if now is None else now) - last_received_at))


@_safe
def send_attempt(destination: str, ok: bool) -> None:
    SEND_ATTEMPTS.labels(destination=destination, result="ok" if ok else "error").inc()


@_safe
def job_failed(job: str) -> None:
    JOB_FAILURES.labels(job=job).inc()


# -- state read at scrape time -----------------------------------------------------------------------


@dataclass(frozen=True)
class EchoResult:
    """The last C-ECHO of one destination (screener.http.health.Echoer)."""

    destination: str
    ok: bool
    detail: str
    at: float


class SpoolSize:
    """Bytes and files under the spool folder, recomputed at most every `max_age_s` seconds
    (walking a large spool at every scrape would be wasteful)."""

    def __init__(self, folder: Path, max_age_s: float = 30.0) -> None:
        self.folder = folder
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._at = -1e18
        self._value = (0, 0)

    def get(self) -> tuple[int, int]:
        with self._lock:
            if time.monotonic() - self._at >= self.max_age_s:
                self._value = _walk_size(self.folder)
                self._at = time.monotonic()
            return self._value


def _walk_size(folder: Path) -> tuple[int, int]:
    total = files = 0
    stack = [str(folder)]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                            files += 1
                    except OSError:
                        continue  # removed while walking (retention, a .part renamed)
        except OSError:
            continue
    return total, files


class NodeCollector:
    """Gauges computed at scrape time from a node's store and configuration.

    `source` is anything with ``settings``, ``store``, ``engines`` (name -> LoadedEngine) and
    ``version``; `echo` returns the last C-ECHO per destination; `ready` returns (ready, checks)."""

    def __init__(
        self,
        source: Any,
        echo: Callable[[], Mapping[str, EchoResult]],
        ready: Callable[[], tuple[bool, Mapping[str, Any]]] | None = None,
        spool: SpoolSize | None = None,
    ) -> None:
        self.source = source
        self.echo = echo
        self.ready = ready
        self.spool = spool or SpoolSize(source.store.spool_dir)

    def collect(self) -> Iterator[Metric]:
        for part in (self._info, self._states, self._outbox, self._disk, self._destinations, self._ready):
            try:
                yield from part()
            except Exception as exc:  # noqa: BLE001 - one broken part must not hide the others
                log.warning("metrics_collect_failed", part=part.__name__, error_type=type(exc).__name__)

    def _info(self) -> Iterator[Metric]:
        s = self.source
        info = GaugeMetricFamily("screener_build_info", "Software version and AE title", labels=["version", "ae_title"])
        info.add_metric([s.version, s.settings.node.ae_title], 1)
        yield info
        eng = GaugeMetricFamily(
            "screener_engine_info",
            "Loaded engines: version, backend, validated, demo",
            labels=["engine", "version", "backend", "validated", "demo"],
        )
        for name, e in sorted(s.engines.items()):
            m = e.manifest
            eng.add_metric([name, m.version, e.backend.name, str(m.validated).lower(), str(m.demo).lower()], 1)
        yield eng

    def _states(self) -> Iterator[Metric]:
        counts = self.source.store.counts()
        for table, name, what in (
            ("studies", "screener_studies", "Studies per state"),
            ("instances", "screener_instances", "Instances per state"),
        ):
            g = GaugeMetricFamily(name, what, labels=["state"])
            for state, n in counts.get(table, {}).items():
                g.add_metric([state], n)
            yield g

    def _outbox(self) -> Iterator[Metric]:
        store = self.source.store
        per: dict[tuple[str, str], int] = {}
        for d in self.source.settings.destinations:
            key = f"{d.ae_title}@{d.host}:{d.port}"
            per[(key, "pending")] = per[(key, "failed")] = 0
        now = time.time()
        oldest: dict[str, float] = {}
        for row in store.due_outbox(float("inf")):
            per[(row.destination, "pending")] = per.get((row.destination, "pending"), 0) + 1
            oldest[row.destination] = max(oldest.get(row.destination, 0.0), now - row.created_at)
        for f in store.failures(100_000):
            if f.kind == "outbox":
                per[(f.destination, "failed")] = per.get((f.destination, "failed"), 0) + 1
        g = GaugeMetricFamily(
            "screener_outbox_entries",
            "SRs waiting to be sent (pending) or given up (failed)",
            labels=["destination", "state"],
        )
        for (dest, state), n in sorted(per.items()):
            g.add_metric([dest, state], n)
        yield g
        age = GaugeMetricFamily(
            "screener_outbox_oldest_pending_age_seconds",
            "Age of the oldest SR still waiting to be sent (0 when none)",
            labels=["destination"],
        )
        for dest in sorted({d for d, _ in per}):
            age.add_metric([dest], oldest.get(dest, 0.0))
        yield age

    def _disk(self) -> Iterator[Metric]:
        import shutil

        store = self.source.store
        nbytes, files = self.spool.get()
        yield GaugeMetricFamily("screener_spool_bytes", "Bytes of received images kept in the spool", value=nbytes)
        yield GaugeMetricFamily("screener_spool_files", "Files in the spool", value=files)
        usage = shutil.disk_usage(store.var_dir)
        yield GaugeMetricFamily(
            "screener_disk_free_bytes", "Free bytes on the file system of var_dir", value=usage.free
        )
        yield GaugeMetricFamily("screener_disk_total_bytes", "Size of the file system of var_dir", value=usage.total)
        yield GaugeMetricFamily(
            "screener_disk_min_free_bytes",
            "Watermark (node.min_free_mb): below it every C-STORE is refused with 0xA700",
            value=self.source.settings.node.min_free_mb * 1024 * 1024,
        )

    def _destinations(self) -> Iterator[Metric]:
        results = self.echo()
        up = GaugeMetricFamily(
            "screener_destination_up", "1 when the destination answered the last C-ECHO", labels=["destination"]
        )
        at = GaugeMetricFamily(
            "screener_destination_last_echo_timestamp_seconds",
            "Unix time of the last C-ECHO of the destination",
            labels=["destination"],
        )
        for dest, r in sorted(results.items()):
            up.add_metric([dest], 1 if r.ok else 0)
            at.add_metric([dest], r.at)
        yield up
        yield at

    def _ready(self) -> Iterator[Metric]:
        if self.ready is None:
            return
        ok, _ = self.ready()
        yield GaugeMetricFamily("screener_ready", "1 when GET /readyz answers 200", value=1 if ok else 0)


class Exposition:
    """Several collectors seen as one registry by prometheus_client.generate_latest."""

    def __init__(self, *collectors: Any) -> None:
        self.collectors = collectors

    def collect(self) -> Iterator[Metric]:
        for c in self.collectors:
            yield from c.collect()
