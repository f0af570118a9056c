"""The running node: store + listener + engines + scheduled jobs.

Jobs (apscheduler, one thread each, never overlapping themselves):

- ``complete``: studies idle for ``study_stable_s`` become ``complete``.
- ``screen``: drains complete studies in batches of up to ``batch_max_size`` images
  (every ``batch_interval_s``, and at once when a study completes), writes one SR
  per study and queues it for every destination.
- ``send``: C-STORE of due outbox entries; failures retry with exponential
  backoff (``send_backoff_s`` x 2^attempt) until ``send_retries``, then the study
  is ``failed`` and stays visible (``screener resend`` re-queues it).
- ``retention``: deletes sent and skipped studies older than ``retention_days``.

Every state change goes through the store (persisted, logged, audited), so a
restart resumes where the node stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING

from screener import __version__, metrics
from screener.config import Settings
from screener.engine.runtime import LoadedEngine, load_engine
from screener.errors import ManifestError, UserError, safe_reason
from screener.logs import get_logger
from screener.screening import ImageOutcome, Screener
from screener.store import Store
from screener.store.files import atomic_write

if TYPE_CHECKING:
    from screener.http import HttpServer

log = get_logger(__name__)


def load_engines(settings: Settings, base: Path | None = None) -> dict[str, LoadedEngine]:
    """Load every enabled engine (hash-verified). ManifestError if one is missing or altered."""
    root = Path(settings.engines.dir)
    if base is not None and not root.is_absolute():
        root = base / root
    engines: dict[str, LoadedEngine] = {}
    for name in settings.engines.enabled:
        folder = root / name
        if not (folder / "manifest.json").is_file():
            raise ManifestError(
                f"engine '{name}' is enabled in the configuration but {folder} has no manifest.json; "
                f"build it with `trainer build-engine --task {name}` or remove it from engines.enabled"
            )
        engines[name] = load_engine(folder, settings.engines.backend)
        m = engines[name].manifest
        log.info(
            "engine_loaded",
            engine=name,
            version=m.version,
            backend=engines[name].backend.name,
            validated=m.validated,
            demo=m.demo,
        )
    return engines


@dataclass(frozen=True)
class StudyReport:
    study_uid: str
    sr_path: Path | None
    sr_uid: str
    n_findings: int
    reason: str = ""


def findings_for(outcomes: list[ImageOutcome], engines: Mapping[str, LoadedEngine]) -> list:
    """SR findings (screener.dicom.sr.Finding) for every engine result of every outcome."""
    from screener.dicom.sr import EngineInfo, Finding

    infos: dict[str, EngineInfo] = {}
    findings = []
    for out in outcomes:
        for r in out.results:
            if r.engine not in infos:
                infos[r.engine] = EngineInfo.from_manifest(engines[r.engine].manifest, r.backend)
            lat = out.route.laterality if (out.route and r.roi is not None and out.route.laterality) else None
            findings.append(
                Finding(
                    source=out.header,
                    engine=infos[r.engine],
                    probability=r.probability,
                    present=r.present,
                    roi=r.roi,
                    laterality=lat,
                )
            )
    return findings


def build_study_sr(outcomes: list[ImageOutcome], engines: Mapping[str, LoadedEngine], device_uid: str):
    """The SR dataset for one study's outcomes, or None if nothing was screened."""
    from screener.dicom.sr import build_sr

    findings = findings_for(outcomes, engines)
    if not findings:
        return None
    return build_sr(findings, software_version=__version__, device_uid=device_uid)


class Node:
    """Wires the store, listener, engines and scheduler together."""

    def __init__(
        self, settings: Settings, engines: Mapping[str, LoadedEngine] | None = None, base: Path | None = None
    ) -> None:
        from screener.dicom.sr import derive_uid

        self.settings = settings
        self.var = Path(settings.node.var_dir)
        if base is not None and not self.var.is_absolute():
            self.var = base / self.var
        self.engines = dict(engines) if engines is not None else load_engines(settings, base)
        self.store = Store.open(self.var)
        if not self.store.owner:
            self.store.close()
            raise UserError(f"{self.var}: another screener node is already using this folder")
        self.screener = Screener(
            self.engines, settings.routing, settings.schedule.batch_max_size, settings.pipeline, limits=settings.limits
        )
        self.device_uid = derive_uid("cspine-screener device", settings.node.ae_title)
        self._scheduler = None
        self.listener = None
        self.http: HttpServer | None = None  # while running
        self._screen_lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        from screener.dicom.listener import Listener

        self.listener = Listener(self.settings, self.store)
        self.listener.start()
        if self.settings.http.enabled:
            from screener.http import HttpServer

            try:
                self.http = HttpServer.start(self)
            except BaseException:
                if self.listener is not None:
                    self.listener.stop()
                self.listener = None
                raise
        sched = self.settings.schedule
        s = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30})
        tick = max(0.2, min(sched.batch_interval_s, sched.study_stable_s / 4))
        s.add_job(self.tick, "interval", seconds=tick, id="complete-and-screen", next_run_time=_now_dt())
        s.add_job(self.send_job, "interval", seconds=min(1.0, sched.send_backoff_s), id="send", next_run_time=_now_dt())
        s.add_job(self.apply_retention, "interval", hours=6, id="retention")
        logging.getLogger("apscheduler").setLevel(logging.ERROR)  # "skipped: already running" is normal
        s.start()
        self._scheduler = s
        log.info(
            "node_started",
            ae_title=self.settings.node.ae_title,
            port=self.port,
            engines={k: f"{v.manifest.version} ({v.backend.name})" for k, v in self.engines.items()},
            destinations=[f"{d.ae_title}@{d.host}:{d.port}" for d in self.settings.destinations],
        )

    @property
    def port(self) -> int:
        return self.listener.port if self.listener else self.settings.node.port

    @property
    def running(self) -> bool:
        """True while the scheduler runs the jobs (GET /healthz)."""
        return self._scheduler is not None and bool(self._scheduler.running)

    def stop(self) -> None:
        if self.http is not None:
            self.http.stop()
            self.http = None
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None
        if self.listener is not None:
            self.listener.stop()
            self.listener = None
        self.screener.close()  # the decode workers: no process outlives the node
        self.store.close()
        log.info("node_stopped")

    # ------------------------------------------------------------------ jobs
    def tick(self) -> None:
        """One scheduler pass: completion, screening when due, sending."""
        try:
            now = time.time()
            self.store.complete_studies(self.settings.schedule.study_stable_s, now)
            while self.screen_batch():
                pass
        except Exception:  # noqa: BLE001 - a job must never die; the next tick retries
            log.exception("job_failed", job="complete-and-screen")
            metrics.job_failed("complete-and-screen")

    def send_job(self) -> None:
        try:
            self.send_due()
        except Exception:  # noqa: BLE001
            log.exception("job_failed", job="send")
            metrics.job_failed("send")

    def screen_batch(self) -> int:
        """Screen up to batch_max_size images of complete studies; returns studies handled."""
        with self._screen_lock:
            limit = self.settings.schedule.batch_max_size
            picked: list[tuple[str, list[Path]]] = []
            n = 0
            for st in self.store.studies_in("complete"):
                insts = self.store.instances_of(st.study_uid)
                if picked and n + len(insts) > limit:
                    break
                if not self.store.set_study_state(st.study_uid, "screening", "", expect=("complete",)):
                    continue
                picked.append((st.study_uid, [self.store.abs_path(i.path) for i in insts]))
                n += len(insts)
            if not picked:
                return 0
            all_paths = [p for _, paths in picked for p in paths]
            t0 = time.perf_counter()
            try:
                outcomes = self.screener.screen(all_paths)
            except Exception as exc:  # noqa: BLE001
                log.exception("screening_failed", studies=[u for u, _ in picked])
                metrics.job_failed("screening")
                for uid, _ in picked:
                    self.store.set_study_state(uid, "failed", safe_reason(exc, "screening error"))
                    metrics.study_finished("failed")
                return len(picked)
            metrics.batch_screened(len(all_paths), time.perf_counter() - t0)
            metrics.results_recorded(outcomes)
            by_path = dict(zip(all_paths, outcomes))
            for uid, paths in picked:
                self._finish_study(uid, [by_path[p] for p in paths])
            return len(picked)

    def _finish_study(self, study_uid: str, outcomes: list[ImageOutcome]) -> None:
        from screener.dicom.sr import sr_to_bytes

        for out in outcomes:
            uid = out.sop_instance_uid or out.path.stem
            for r in out.results:
                self.store.record_result(
                    uid,
                    r.engine,
                    r.version,
                    r.backend,
                    r.probability,
                    "present" if r.present else "absent",
                    r.threshold,
                    roi=list(r.roi) if r.roi else None,
                    seconds=r.seconds,
                )
            reason = out.failed or out.skipped
            self.store.set_instance_state(uid, out.state, reason)
        try:
            sr = build_study_sr(outcomes, self.engines, self.device_uid)
        except ValueError as exc:
            self.store.set_study_state(study_uid, "failed", safe_reason(exc, "SR not built"))
            metrics.study_finished("failed")
            return
        if sr is None:
            reasons = sorted({o.failed or o.skipped for o in outcomes})
            self.store.set_study_state(study_uid, "skipped", "; ".join(reasons)[:500])
            metrics.study_finished("skipped")
            return
        sr_uid = str(sr.SOPInstanceUID)
        rel = Path("sr") / study_uid / f"{sr_uid}.dcm"
        data = sr_to_bytes(sr)
        atomic_write(self.var / rel, data)
        if self.settings.sr_folder:
            atomic_write(Path(self.settings.sr_folder) / f"{sr_uid}.dcm", data)
        companions = self._write_companions(outcomes, sr, rel.parent)  # [report] companion; [] by default
        if not self.store.set_study_state(
            study_uid, "reported", "", expect=("screening",), sr_path=str(rel), sr_sop_instance_uid=sr_uid
        ):
            log.info("sr_superseded", study_uid=study_uid, reason="new instances arrived while screening")
            return
        st = self.store.get_study(study_uid)
        metrics.study_finished("reported", st.last_received_at if st else None)
        for out in outcomes:
            if out.state == "screened":
                self.store.set_instance_state(out.sop_instance_uid, "reported", "")
        for d in self.settings.destinations:
            self.store.enqueue(study_uid, f"{d.ae_title}@{d.host}:{d.port}", str(rel))
            for extra in companions:  # after the SR: the SR is the result, companions only echo it
                self.store.enqueue(study_uid, f"{d.ae_title}@{d.host}:{d.port}", str(extra))
        log.info("sr_written", study_uid=study_uid, sr_uid=sr_uid, findings=sum(len(o.results) for o in outcomes))

    def _write_companions(self, outcomes: list[ImageOutcome], sr, folder: Path) -> list[Path]:
        """Secondary Capture / GSPS companions of the SR (issue 14), written next to it; relative paths."""
        kind = self.settings.report.companion
        if kind == "none":
            return []
        from screener.dicom.companion import companion_files

        sources = {o.sop_instance_uid: o.path for o in outcomes if o.results}
        files = companion_files(kind, findings_for(outcomes, self.engines), sr, sources, software_version=__version__)
        for name, blob in files:
            atomic_write(self.var / folder / name, blob)
            if self.settings.sr_folder:
                atomic_write(Path(self.settings.sr_folder) / name, blob)
        return [folder / name for name, _ in files]

    def send_due(self) -> int:
        from screener.dicom.sender import send_file

        sched = self.settings.schedule
        sent = 0
        for row in self.store.due_outbox(time.time()):
            ok, error = send_file(
                self.store.abs_path(row.sr_path),
                row.destination,
                self.settings.node.ae_title,
                timeout_s=self.settings.node.network_timeout_s,
                tls=self.settings.tls,
                known=self.settings.destinations,
            )
            metrics.send_attempt(row.destination, ok)
            if ok:
                self.store.mark_sent(row.id)
                sent += 1
                continue
            attempts = row.attempts + 1
            give_up = attempts >= sched.send_retries
            delay = sched.send_backoff_s * (2 ** (attempts - 1))
            self.store.mark_attempt_failed(row.id, error, time.time() + delay, give_up)
        return sent

    def apply_retention(self) -> None:
        try:
            # Sent studies, and studies with nothing to screen (e.g. chest films a PACS forwarded):
            # neither should keep images on this node beyond the retention period.
            self.store.retention(self.settings.schedule.retention_days, states=("sent", "skipped"))
        except Exception:  # noqa: BLE001
            log.exception("job_failed", job="retention")
            metrics.job_failed("retention")

    def wait(self, stop: threading.Event) -> None:
        while not stop.wait(0.5):
            pass


def _now_dt():
    from datetime import datetime

    return datetime.now(UTC)
