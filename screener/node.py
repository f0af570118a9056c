"""The running node: store + listener + engines + three job threads.

Jobs (one thread each; every transition goes through the store, docs/state-machine.md):

- ``screen`` (every ``batch_interval_s``, at most ``study_stable_s`` / 4): studies quiet for
  ``study_stable_s`` of node clock become ``complete``; complete studies are taken in batches of up
  to ``batch_max_size`` images from several studies (`Store.pick_for_screening`), screened through
  `Screener.screen`, and each study is finished in one transaction (`Store.finish_study`: results,
  instance states, the SR row superseding the previous one, an outbox row per destination). Any
  exception after a study was picked returns it to ``complete`` with a counted attempt and a reason
  (`Store.release_study`); a study that used ``screen_attempts`` is quarantined (``failed``).
- ``send`` (every second at most): delivers due outbox rows, at least once: the attempt is counted
  and the next try scheduled with exponential backoff *before* the C-STORE (`Store.claim_send`), so
  neither a failed delivery nor a failure to record a successful one is retried before its time;
  a destination that failed is not tried again in the same pass (no head-of-line blocking of the
  others); after ``send_retries`` the row and its study are ``failed`` (``screener resend``).
  ``sr_folder``, when set, is one more destination (``folder:PATH``): it receives an SR only while
  that SR is current, and loses the copies of the SRs it superseded.
- ``retention``: within 30 s of the start, then every ``retention_interval_s`` (`Store.retention`).

Stop (`Node.stop`): the listener stops accepting associations first, then each job finishes the unit
in flight (the screening batch, the delivery) and starts nothing new; whatever is left waits for the
next start. Bounded by ``stop_timeout_s``.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from screener import __version__, metrics
from screener.config import Settings
from screener.engine.runtime import LoadedEngine, load_engine
from screener.errors import ManifestError, UserError, safe_reason
from screener.logs import get_logger
from screener.screening import ImageOutcome, Screener
from screener.store import InstanceResult, OutboxRow, Picked, SRInfo, Store, crash
from screener.store.files import atomic_write

if TYPE_CHECKING:
    from screener.http import HttpServer

log = get_logger(__name__)

FOLDER_PREFIX = "folder:"
# errno values that mean "the node's disk is full", not "this study is bad".
_ENV_ERRNOS = {28, 122}  # ENOSPC, EDQUOT

Sender = Callable[..., tuple[bool, str]]


_PACKAGE_DIR = str(Path(__file__).resolve().parent) + "/"


def exc_fields(exc: BaseException) -> dict[str, Any]:
    """Log fields for a job failure: the exception type, its message when it cannot carry patient data
    (raised by the node's own code, or a SQLite or OS error), and the traceback as
    ``file:line in function`` frames. The message of an exception raised inside a library (pydicom,
    highdicom, ...) is left out: it can quote a header value."""
    tb = traceback.extract_tb(exc.__traceback__)
    own = bool(tb) and str(Path(tb[-1].filename).resolve()).startswith(_PACKAGE_DIR)
    if isinstance(exc, sqlite3.Error):
        message = str(exc)
    elif isinstance(exc, OSError):
        message = exc.strerror or ""
    elif own:
        message = str(exc)
    else:
        message = "(not logged: raised inside a library)"
    frames = [f"{f.filename}:{f.lineno} in {f.name}" for f in tb]
    return {"error_type": type(exc).__name__, "error": message, "traceback": frames}


def is_environment_error(exc: BaseException) -> bool:
    """A failure of the node's environment (disk full, database locked or full), not of the study:
    retried after ``screen_retry_s`` without using up one of its screening attempts."""
    if isinstance(exc, sqlite3.OperationalError):
        return True
    return isinstance(exc, OSError) and exc.errno in _ENV_ERRNOS


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
        engines[name] = load_engine(
            folder,
            settings.engines.backend,
            nice=settings.pipeline.nice,
            sessions=settings.engines.cpu_sessions or None,
        )
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
            if out.header is None:
                raise ValueError("a screened image has no header")
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


def build_study_sr(
    outcomes: list[ImageOutcome],
    engines: Mapping[str, LoadedEngine],
    device_uid: str,
    *,
    predecessors: Sequence[Any] = (),
    instance_number: int = 1,
):
    """The SR dataset for one study's outcomes, or None if nothing was screened. `predecessors`
    (screener.dicom.sr.SRReference) are the study's earlier SRs, which this one supersedes."""
    from screener.dicom.sr import build_sr

    findings = findings_for(outcomes, engines)
    if not findings:
        return None
    return build_sr(
        findings,
        software_version=__version__,
        device_uid=device_uid,
        predecessors=list(predecessors),
        instance_number=instance_number,
    )


def retention_first_delay(sched: Any) -> float:
    """Retention's first run after a start: soon (30 s), so that a node restarted more often than
    ``retention_interval_s`` still purges."""
    return min(30.0, float(sched.retention_interval_s))


class Node:
    """Wires the store, listener, engines and job threads together.

    `screener` and `sender` can be replaced (tests drive the jobs with fakes): the screener needs
    ``screen(paths) -> list[ImageOutcome]``, the sender has `screener.dicom.sender.send_file`'s
    signature; `clock` and `monotonic` are the store's (wall clock, node clock source)."""

    def __init__(
        self,
        settings: Settings,
        engines: Mapping[str, LoadedEngine] | None = None,
        base: Path | None = None,
        *,
        screener: Any = None,
        sender: Sender | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        from screener.dicom.sr import derive_uid

        self.settings = settings
        self.var = Path(settings.node.var_dir)
        if base is not None and not self.var.is_absolute():
            self.var = base / self.var
        self.engines = dict(engines) if engines is not None else load_engines(settings, base)
        self.store = Store.open(self.var, clock=clock, monotonic=monotonic)
        if not self.store.owner:
            self.store.close()
            raise UserError(f"{self.var}: another screener node is already using this folder")
        self.screener = (
            screener
            if screener is not None
            else Screener(
                self.engines,
                settings.routing,
                settings.schedule.batch_max_size,
                settings.pipeline,
                limits=settings.limits,
            )
        )
        if sender is None:
            from screener.dicom.sender import send_file

            sender = send_file
        self.sender: Sender = sender
        self.device_uid = derive_uid("cspine-screener device", settings.node.ae_title)
        self.destinations = [str(d) for d in settings.destinations]
        if settings.sr_folder:
            self.destinations.append(FOLDER_PREFIX + str(Path(settings.sr_folder).resolve()))
        self.listener: Any = None
        self._stopping = threading.Event()
        self._send_wake = threading.Event()  # set when an SR is queued: the send job runs now, not at its next tick
        self._threads: list[threading.Thread] = []
        self.http: HttpServer | None = None  # while running
        self._screen_lock = threading.Lock()
        self._in_flight: set[str] = set()
        self.store.ensure_outbox(self.destinations)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
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
        tick = max(0.05, min(sched.batch_interval_s, sched.study_stable_s / 4))
        loops = [
            ("screen", self.tick, tick, 0.0, None),
            ("send", self.send_job, min(1.0, sched.send_backoff_s), 0.0, self._send_wake),
            ("retention", self.apply_retention, sched.retention_interval_s, retention_first_delay(sched), None),
        ]
        for name, fn, interval, first, wake in loops:
            t = threading.Thread(target=self._loop, args=(fn, interval, first, wake), name=f"job-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info(
            "node_started",
            ae_title=self.settings.node.ae_title,
            port=self.port,
            engines={k: f"{v.manifest.version} ({v.backend.name})" for k, v in self.engines.items()},
            destinations=self.destinations,
        )

    def _loop(
        self, fn: Callable[[], bool], interval: float, first_delay: float, wake: threading.Event | None = None
    ) -> None:
        """Run a job every `interval`, or as soon as `wake` is set (new work; stop sets it too); after
        a failed pass (it logged why) wait longer, doubling up to 30 s, so that a full disk or a broken
        database does not flood the log (a wake-up does not shorten that wait)."""
        if self._stopping.wait(first_delay):
            return
        failures = 0
        while not self._stopping.is_set():
            if wake is not None:
                wake.clear()
            failures = 0 if fn() else failures + 1
            wait = interval if not failures else min(30.0, max(interval, 0.5) * 2 ** min(failures - 1, 6))
            if wake is None or failures:
                self._stopping.wait(wait)
            else:
                wake.wait(wait)

    @property
    def port(self) -> int:
        return self.listener.port if self.listener else self.settings.node.port

    @property
    def running(self) -> bool:
        """True while the job threads run (GET /healthz)."""
        return bool(self._threads) and not self._stopping.is_set() and all(t.is_alive() for t in self._threads)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self, timeout_s: float | None = None) -> bool:
        """Graceful stop: stop accepting associations, let each job finish what it is doing (the
        screening batch, the delivery) and start nothing new, then close the store. Returns False when
        a job was still busy after `timeout_s` (default ``schedule.stop_timeout_s``): the store is
        left open and the caller ends the process; the unfinished batch is recovered at the next start."""
        timeout_s = self.settings.schedule.stop_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        if self.listener is not None:
            self.listener.stop()  # first: no new association, open ones aborted (unacknowledged: resent)
            self.listener = None
        if self.http is not None:
            self.http.stop()
            self.http = None
        self._stopping.set()
        self._send_wake.set()
        busy = []
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                busy.append(t.name)
        if busy:
            log.warning("node_stop_timeout", busy=busy, timeout_s=timeout_s)
            return False
        self._threads = []
        close = getattr(self.screener, "close", None)  # the decode workers: no process outlives the node
        if callable(close):
            close()
        self.store.close()
        log.info("node_stopped")
        return True

    def wait(self, stop: threading.Event) -> None:
        while not stop.wait(0.5):
            pass

    # ------------------------------------------------------------------ screen job
    def tick(self) -> bool:
        """One pass of the screen job: release what no job holds, complete quiet studies, screen
        batches until none is left (or the node stops). False when the pass failed (logged)."""
        try:
            with self._screen_lock:
                self.store.release_stale_screening(self._in_flight)
            while not self._stopping.is_set():
                if self.store.complete_studies(self.settings.schedule.study_stable_s):
                    crash.point("node.after_complete")
                if not self.screen_batch():
                    break
        except Exception as exc:  # noqa: BLE001 - a job must never die; the next pass retries
            log.error("job_failed", job="screen", **exc_fields(exc))
            metrics.job_failed("complete-and-screen")
            return False
        return True

    def screen_batch(self) -> int:
        """Pick complete studies (up to batch_max_size images), screen them, finish each study.
        Returns the number of studies picked. Never leaves a picked study in `screening`."""
        sched = self.settings.schedule
        with self._screen_lock:
            picks = self.store.pick_for_screening(sched.batch_max_size, sched.screen_attempts)
            if not picks:
                return 0
            self._in_flight = {p.study_uid for p in picks}
            try:
                crash.point("node.after_pick")
                paths = [self.store.abs_path(i.path) for p in picks for i in p.instances]
                t0 = time.perf_counter()
                try:
                    outcomes = self.screener.screen(paths)
                    if len(outcomes) != len(paths):
                        raise RuntimeError(f"screener returned {len(outcomes)} outcomes for {len(paths)} images")
                except Exception as exc:  # noqa: BLE001
                    log.error("job_failed", job="screen", studies=[p.study_uid for p in picks], **exc_fields(exc))
                    metrics.job_failed("screening")
                    for p in picks:
                        self._release(p, exc, "screening failed")
                    return len(picks)
                crash.point("node.after_screen")
                metrics.batch_screened(len(paths), time.perf_counter() - t0)
                metrics.results_recorded(outcomes)
                k = 0
                for p in picks:
                    mine = outcomes[k : k + len(p.instances)]
                    k += len(p.instances)
                    try:
                        self._finish(p, list(mine))
                    except Exception as exc:  # noqa: BLE001
                        log.error("job_failed", job="screen", study_uid=p.study_uid, **exc_fields(exc))
                        self._release(p, exc, "finishing failed")
                return len(picks)
            finally:
                self._in_flight = set()

    def _release(self, pick: Picked, exc: BaseException, what: str) -> None:
        """Return a picked study to `complete` after an exception (or quarantine it)."""
        sched = self.settings.schedule
        env = is_environment_error(exc)
        reason = f"{what} ({type(exc).__name__})"
        try:
            self.store.release_study(
                pick.study_uid,
                reason,
                retry_in_s=sched.screen_retry_s if env else 0.0,
                count_attempt=not env,
                max_attempts=sched.screen_attempts,
            )
        except Exception as exc2:  # noqa: BLE001 - e.g. the database is full: the next pass releases it
            log.error("job_failed", job="screen", study_uid=pick.study_uid, **exc_fields(exc2))

    def _finish(self, pick: Picked, outcomes: list[ImageOutcome]) -> None:
        from screener.dicom.sr import SRReference

        results: list[InstanceResult] = []
        screened: list[ImageOutcome] = []
        for inst, out in zip(pick.instances, outcomes):
            reason = out.failed or out.skipped
            state = out.state
            if state == "screened" and not out.results:
                state, reason = "skipped", "no engine result"
            if state == "screened":
                state = "reported"
                screened.append(out)
            rows = tuple(
                dict(
                    engine=r.engine,
                    engine_version=r.version,
                    backend=r.backend,
                    probability=r.probability,
                    finding="present" if r.present else "absent",
                    threshold=r.threshold,
                    roi=list(r.roi) if r.roi else None,
                    seconds=r.seconds,
                )
                for r in out.results
            )
            results.append(InstanceResult(inst.sop_instance_uid, state, reason, rows))
        uid = pick.study_uid
        if not screened:
            reasons = sorted({r.reason for r in results if r.reason}) or ["nothing to screen"]
            if self.store.finish_study(uid, results, None, [], reason="; ".join(reasons)[:500]):
                metrics.study_finished("skipped")
            return
        number = pick.sr_count + 1
        refs = [SRReference(s.study_uid, s.series_uid, s.sop_class_uid, s.sop_instance_uid) for s in pick.predecessors]
        try:
            info, data = self.build_sr(screened, refs, number)
        except Exception as exc:  # noqa: BLE001 - any failure to build the SR is terminal, with a reason
            reason = safe_reason(exc, "SR could not be built")  # type, attribute keyword; never a value
            log.error("sr_failed", study_uid=uid, **exc_fields(exc))
            if self.store.finish_study(uid, results, None, [], reason=reason, failed=True):
                metrics.study_finished("failed")
            return
        rel = self.store.sr_rel_path(uid, info.sop_instance_uid)
        info = SRInfo(info.sop_instance_uid, info.series_uid, info.sop_class_uid, number, rel)
        atomic_write(self.store.abs_path(rel), data)
        extras = self._write_companions(screened, data, Path(rel).parent)  # [report] companion; none by default
        crash.point("node.after_sr_file")
        outcome = self.store.finish_study(uid, results, info, self.destinations, extra_paths=extras)
        if outcome is None:
            # Reopened by a new instance while screening: this SR is already out of date.
            for path in (rel, *extras):
                self.store.abs_path(path).unlink(missing_ok=True)
            log.info("sr_superseded", study_uid=uid, sr_uid=info.sop_instance_uid, reason="new instance")
            return
        crash.point("node.after_finish")
        self._send_wake.set()
        metrics.study_finished("reported", max((i.received_at for i in pick.instances), default=None))
        log.info(
            "sr_written",
            study_uid=uid,
            sr_uid=info.sop_instance_uid,
            instance_number=number,
            predecessors=len(refs),
            findings=sum(len(r.results) for r in results),
        )

    def _write_companions(self, screened: list[ImageOutcome], sr_data: Any, folder: Path) -> list[str]:
        """Secondary Capture / GSPS companions of the SR (``report.companion``), written next to it and
        delivered after it (same SR id in the outbox); relative paths. One that cannot be built is
        left out (logged): the SR is the result."""
        kind = self.settings.report.companion
        if kind == "none":
            return []
        import io

        import pydicom

        from screener.dicom.companion import companion_files

        try:
            sr = pydicom.dcmread(io.BytesIO(sr_data)) if isinstance(sr_data, bytes) else sr_data
            sources = {o.sop_instance_uid: o.path for o in screened if o.results}
            files = companion_files(
                kind, findings_for(screened, self.engines), sr, sources, software_version=__version__
            )
        except Exception as exc:  # noqa: BLE001
            log.error("companion_not_built", **exc_fields(exc))
            return []
        out = []
        for name, blob in files:
            atomic_write(self.store.abs_path(folder / name), blob)
            out.append((folder / name).as_posix())
        return out

    def build_sr(self, screened: list[ImageOutcome], predecessors: list[Any], number: int) -> tuple[SRInfo, bytes]:
        """The SR of one study (path left empty) and its Part 10 bytes."""
        from screener.dicom.sr import sr_to_bytes

        sr = build_study_sr(screened, self.engines, self.device_uid, predecessors=predecessors, instance_number=number)
        data = sr_to_bytes(sr)
        return SRInfo(str(sr.SOPInstanceUID), str(sr.SeriesInstanceUID), str(sr.SOPClassUID), number, ""), data

    # ------------------------------------------------------------------ send job
    def send_job(self) -> bool:
        try:
            self.send_due()
        except Exception as exc:  # noqa: BLE001
            log.error("job_failed", job="send", **exc_fields(exc))
            metrics.job_failed("send")
            return False
        return True

    def send_due(self) -> int:
        """Deliver due outbox rows (module doc); returns the number delivered."""
        sched = self.settings.schedule
        sent = 0
        failed_destinations: set[str] = set()
        for row in self.store.due_outbox(limit=200):
            if self._stopping.is_set():
                break
            if row.destination in failed_destinations:
                continue  # tried again after its own backoff, not in this pass
            claimed = self.store.claim_send(row.id, sched.send_backoff_s)  # raises: the pass ends
            if claimed is None:
                continue
            crash.point("node.after_claim")
            ok, error = self._deliver(claimed)
            try:
                if ok:
                    self.store.mark_sent(row.id)
                    crash.point("node.after_mark_sent")
                    sent += 1
                else:
                    failed_destinations.add(row.destination)
                    self.store.send_failed(row.id, error, give_up=claimed.attempts >= sched.send_retries)
            except Exception as exc:  # noqa: BLE001 - the next try is already scheduled: no re-send storm
                log.error("job_failed", job="send", outbox_id=row.id, delivered=ok, **exc_fields(exc))
        return sent

    def _deliver(self, row: OutboxRow) -> tuple[bool, str]:
        if row.destination.startswith(FOLDER_PREFIX):
            return self._copy_to_folder(row)
        try:
            ok, error = self.sender(
                self.store.abs_path(row.sr_path),
                row.destination,
                self.settings.node.ae_title,
                timeout_s=self.settings.node.network_timeout_s,
                tls=self.settings.tls,
                known=self.settings.destinations,
            )
        except Exception as exc:  # noqa: BLE001
            log.error("job_failed", job="send", outbox_id=row.id, **exc_fields(exc))
            ok, error = False, f"send error ({type(exc).__name__})"
        metrics.send_attempt(row.destination, ok)
        if ok:
            crash.point("node.after_cstore")
        return ok, error

    def _copy_to_folder(self, row: OutboxRow) -> tuple[bool, str]:
        folder = Path(row.destination[len(FOLDER_PREFIX) :])
        try:
            data = self.store.abs_path(row.sr_path).read_bytes()
            atomic_write(folder / Path(row.sr_path).name, data)
            for old in self.store.srs_of(row.study_uid):
                if old.id != row.sr_id:
                    (folder / f"{old.sop_instance_uid}.dcm").unlink(missing_ok=True)
        except OSError as exc:
            return False, f"writing to sr_folder failed ({type(exc).__name__}: {exc.strerror or 'I/O error'})"
        crash.point("node.after_folder_copy")
        return True, ""

    # ------------------------------------------------------------------ retention job
    def apply_retention(self) -> bool:
        try:
            self.store.retention(self.settings.schedule.retention_days)
        except Exception as exc:  # noqa: BLE001
            log.error("job_failed", job="retention", **exc_fields(exc))
            metrics.job_failed("retention")
            return False
        return True
