"""What the status page shows, read from the node (store, engines, health) into typed values.

Everything comes from the Store's query methods (the same as ``screener status``) and the loaded
engines' manifests; no patient data is read, except `patient_data` which the study page calls only
for an authenticated user when ``http.show_patient_data`` is set.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from screener.config import Settings
from screener.http.health import Check, Echoer, readiness
from screener.store import STUDY_STATES, EventRow, Failure, InstanceRow, OutboxRow, ResultRow, Store, StudyRow


@dataclass
class NodeView:
    """The parts of a running node the HTTP side reads (screener.node.Node or a test double)."""

    settings: Settings
    store: Store
    engines: Mapping[str, Any]  # name -> screener.engine.runtime.LoadedEngine
    version: str
    listener_up: Callable[[], bool]
    scheduler_up: Callable[[], bool]
    dicom_port: Callable[[], int]
    echoer: Echoer
    started_at: float = field(default_factory=time.time)
    hostname: str = field(default_factory=socket.gethostname)

    @classmethod
    def of_node(cls, node: Any) -> NodeView:
        from screener import __version__

        s = node.settings
        echoer = Echoer(s.destinations, s.node.ae_title, s.http.echo_interval_s, s.http.echo_timeout_s)
        return cls(
            settings=s,
            store=node.store,
            engines=node.engines,
            version=__version__,
            listener_up=lambda: node.listener is not None and bool(node.listener.running),
            scheduler_up=lambda: bool(node.running),
            dicom_port=lambda: int(node.port),
            echoer=echoer,
        )

    def ready(self) -> tuple[bool, dict[str, Check]]:
        return readiness(
            self.settings,
            self.listener_up(),
            self.store.db_path,
            self.store.var_dir,
            self.engines,
            self.echoer.results(),
        )


@dataclass(frozen=True)
class EngineView:
    name: str
    version: str
    backend: str
    validated: bool
    validated_by: str
    demo: bool
    threshold: float | None


@dataclass(frozen=True)
class EngineFinding:
    """One engine's verdict on a study: present if any image is, with the highest probability."""

    engine: str
    present: bool
    probability: float


@dataclass(frozen=True)
class StudySummary:
    study: StudyRow
    findings: list[EngineFinding]


@dataclass(frozen=True)
class Throughput:
    """Counts per bin over the last `window_s` seconds, oldest bin first."""

    end: float
    bin_s: int
    received: list[int]
    reported: list[int]
    sent: list[int]
    partial: bool  # the event window read did not reach back to the start


@dataclass(frozen=True)
class Overview:
    ae_title: str
    version: str
    hostname: str
    dicom_port: int
    started_at: float
    ready: bool
    checks: dict[str, Check]
    engines: list[EngineView]
    counts: dict[str, dict[str, int]]
    throughput: Throughput
    failures: list[Failure]
    studies: list[StudySummary]
    n_studies: int
    state_filter: str
    destinations: list[str]


@dataclass(frozen=True)
class InstanceView:
    row: InstanceRow
    results: list[ResultRow]


@dataclass(frozen=True)
class StudyDetail:
    study: StudyRow
    instances: list[InstanceView]
    outbox: list[OutboxRow]
    events: list[EventRow]
    findings: list[EngineFinding]
    sr_file: str  # absolute path of the node's copy of the SR, '' if none
    sr_folder_file: str  # the copy in settings.sr_folder, '' if none
    patient: dict[str, str] | None = None


def engine_views(engines: Mapping[str, Any]) -> list[EngineView]:
    out = []
    for name, e in sorted(engines.items()):
        m = e.manifest
        out.append(
            EngineView(
                name=name,
                version=m.version,
                backend=e.backend.name,
                validated=bool(m.validated),
                validated_by=m.validated_by,
                demo=bool(m.demo),
                threshold=m.threshold.value if m.threshold else None,
            )
        )
    return out


def study_findings(results: list[ResultRow]) -> list[EngineFinding]:
    per: dict[str, EngineFinding] = {}
    for r in results:
        old = per.get(r.engine)
        present = r.finding == "present" or (old is not None and old.present)
        prob = max(r.probability, old.probability if old else 0.0)
        per[r.engine] = EngineFinding(r.engine, present, prob)
    return [per[k] for k in sorted(per)]


def throughput(events: list[EventRow], now: float, window_s: int = 3600, bin_s: int = 300) -> Throughput:
    """Images received, studies reported and SRs sent per `bin_s` over the last `window_s` seconds,
    from the audit events (newest first, as Store.recent_events returns them)."""
    n = window_s // bin_s
    start = now - n * bin_s
    received, reported, sent = [0] * n, [0] * n, [0] * n
    for e in events:
        if e.at < start or e.at > now:
            continue
        i = min(n - 1, int((e.at - start) // bin_s))
        if e.kind == "instance" and e.state == "received":
            received[i] += 1
        elif e.kind == "study" and e.state == "reported":
            reported[i] += 1
        elif e.kind == "outbox" and e.state == "sent":
            sent[i] += 1
    partial = bool(events) and events[-1].at > start and len(events) >= EVENT_WINDOW
    return Throughput(now, bin_s, received, reported, sent, partial)


EVENT_WINDOW = 20_000  # events read for the chart (a busy hour has a few per image)
STUDIES_SHOWN = 50


def overview(view: NodeView, state_filter: str = "", now: float | None = None) -> Overview:
    now = time.time() if now is None else now
    store = view.store
    ready, checks = view.ready()
    states = [state_filter] if state_filter in STUDY_STATES else list(STUDY_STATES)
    rows = sorted(store.studies_in(states), key=lambda s: (s.updated_at, s.study_uid), reverse=True)
    studies = [StudySummary(s, study_findings(store.results_of(s.study_uid))) for s in rows[:STUDIES_SHOWN]]
    return Overview(
        ae_title=view.settings.node.ae_title,
        version=view.version,
        hostname=view.hostname,
        dicom_port=view.dicom_port(),
        started_at=view.started_at,
        ready=ready,
        checks=checks,
        engines=engine_views(view.engines),
        counts=store.counts(),
        throughput=throughput(store.recent_events(EVENT_WINDOW), now),
        failures=store.failures(20),
        studies=studies,
        n_studies=len(rows),
        state_filter=state_filter if state_filter in STUDY_STATES else "",
        destinations=[f"{d.ae_title}@{d.host}:{d.port}" for d in view.settings.destinations],
    )


def study_detail(view: NodeView, study_uid: str, with_patient: bool = False) -> StudyDetail | None:
    store = view.store
    study = store.get_study(study_uid)
    if study is None:
        return None
    results = store.results_of(study_uid)
    by_sop: dict[str, list[ResultRow]] = {}
    for r in results:
        by_sop.setdefault(r.sop_instance_uid, []).append(r)
    instances = [InstanceView(i, by_sop.get(i.sop_instance_uid, [])) for i in store.instances_of(study_uid)]
    sr_file = str(store.abs_path(study.sr_path)) if study.sr_path else ""
    folder = view.settings.sr_folder
    sr_folder_file = (
        str(Path(folder) / f"{study.sr_sop_instance_uid}.dcm") if folder and study.sr_sop_instance_uid else ""
    )
    patient = patient_data(store, instances) if with_patient else None
    return StudyDetail(
        study=study,
        instances=instances,
        outbox=store.outbox_of(study_uid),
        events=store.events_of(study_uid)[-50:],
        findings=study_findings(results),
        sr_file=sr_file,
        sr_folder_file=sr_folder_file,
        patient=patient,
    )


def patient_data(store: Store, instances: list[InstanceView]) -> dict[str, str] | None:
    """Patient name, ID and birth date from the first readable spool file of the study (header only).
    Only for an authenticated user with ``http.show_patient_data``; never logged."""
    import pydicom

    for inst in instances:
        try:
            ds = pydicom.dcmread(
                store.abs_path(inst.row.path),
                stop_before_pixels=True,
                specific_tags=["PatientName", "PatientID", "PatientBirthDate"],
            )
        except Exception:  # noqa: BLE001 - missing or unreadable: try the next one
            continue
        return {
            "name": str(ds.get("PatientName", "")),
            "id": str(ds.get("PatientID", "")),
            "birth_date": str(ds.get("PatientBirthDate", "")),
        }
    return None
