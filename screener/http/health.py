"""Liveness, readiness and the periodic C-ECHO of the destinations.

``GET /healthz`` (liveness): the process answers HTTP and its scheduler runs. A failure means
"restart me". ``GET /readyz`` (readiness): the node can take and finish work now:

* ``listener``: the DICOM listener is accepting associations;
* ``database``: SQLite takes a write lock (``BEGIN IMMEDIATE``, 2 s timeout; rolled back);
* ``disk``: free space in var_dir is above ``node.min_free_mb`` (below it C-STORE answers 0xA700);
* ``engines``: every engine in ``engines.enabled`` is loaded;
* ``destinations``: each destination answered its last C-ECHO (sent every ``http.echo_interval_s``
  by `Echoer`; not yet checked counts as fine). Left out of the verdict when
  ``http.ready_requires_destinations`` is false.

Both answer JSON with 200 when fine and 503 otherwise, which load balancers and probes understand.
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from screener.config import Destination, Settings
from screener.logs import get_logger
from screener.metrics import EchoResult

log = get_logger(__name__)


def destination_key(d: Destination) -> str:
    return f"{d.ae_title}@{d.host}:{d.port}"


def echo(d: Destination, calling_aet: str, timeout_s: float) -> tuple[bool, str]:
    """One C-ECHO: (ok, detail). Never raises."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    ae.add_requested_context(Verification)
    try:
        assoc = ae.associate(d.host, d.port, ae_title=d.ae_title)
    except Exception as exc:  # noqa: BLE001 - a bad host name, a refused socket
        return False, f"association failed: {type(exc).__name__}"
    if not assoc.is_established:
        if assoc.is_rejected:
            return False, "association rejected"
        return False, "no association (connection refused, aborted or timed out)"
    try:
        status = assoc.send_c_echo()
        if status is None or "Status" not in status:
            return False, "no C-ECHO response"
        code = int(status.Status)
        return code == 0, "C-ECHO ok" if code == 0 else f"C-ECHO status 0x{code:04X}"
    except Exception as exc:  # noqa: BLE001
        return False, f"C-ECHO failed: {type(exc).__name__}"
    finally:
        if assoc.is_established:
            assoc.release()


class Echoer:
    """A daemon thread that C-ECHOes every destination every `interval_s` and keeps the last result."""

    def __init__(
        self,
        destinations: list[Destination],
        calling_aet: str,
        interval_s: float = 60.0,
        timeout_s: float = 5.0,
        probe: Callable[[Destination, str, float], tuple[bool, str]] = echo,
    ) -> None:
        self.destinations = list(destinations)
        self.calling_aet = calling_aet
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.probe = probe
        self._results: dict[str, EchoResult] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Echoer:
        if self.destinations and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="screener-echo", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s * 3 + 1)
            self._thread = None

    def results(self) -> dict[str, EchoResult]:
        with self._lock:
            return dict(self._results)

    def check_now(self) -> dict[str, EchoResult]:
        for d in self.destinations:
            key = destination_key(d)
            ok, detail = self.probe(d, self.calling_aet, self.timeout_s)
            with self._lock:
                before = self._results.get(key)
                self._results[key] = EchoResult(key, ok, detail, time.time())
            if before is None or before.ok != ok:
                (log.info if ok else log.warning)("destination_echo", destination=key, ok=ok, detail=detail)
        return self.results()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check_now()
            except Exception as exc:  # noqa: BLE001 - the thread must live on
                log.warning("destination_echo_failed", error_type=type(exc).__name__)
            self._stop.wait(self.interval_s)


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail}


def database_writable(db_path: Any, timeout_s: float = 2.0) -> Check:
    """Take SQLite's write lock on a separate connection and roll back: proves the file, its folder
    and its lock are usable for writing without changing anything."""
    try:
        conn = sqlite3.connect(db_path, timeout=timeout_s, isolation_level=None)
    except sqlite3.Error as exc:
        return Check(False, f"cannot open the database: {type(exc).__name__}")
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return Check(True, "writable")
    except sqlite3.Error as exc:
        return Check(False, f"not writable: {exc}")
    finally:
        conn.close()


def disk_space(var_dir: Any, min_free_mb: int) -> Check:
    try:
        free = shutil.disk_usage(var_dir).free
    except OSError as exc:
        return Check(False, f"cannot stat {var_dir}: {exc.strerror or exc}")
    mb = free / (1024 * 1024)
    if free >= min_free_mb * 1024 * 1024:
        return Check(True, f"{mb:.0f} MB free (watermark {min_free_mb} MB)")
    return Check(False, f"only {mb:.0f} MB free, below the watermark of {min_free_mb} MB: C-STORE answers 0xA700")


def engines_loaded(settings: Settings, engines: Mapping[str, Any]) -> Check:
    missing = [n for n in settings.engines.enabled if n not in engines]
    if missing:
        return Check(False, f"not loaded: {', '.join(missing)}")
    return Check(True, ", ".join(f"{n} {engines[n].manifest.version}" for n in settings.engines.enabled) or "none")


def destinations_reachable(settings: Settings, results: Mapping[str, EchoResult]) -> Check:
    if not settings.destinations:
        return Check(True, "no destination configured")
    bad, unknown = [], []
    for d in settings.destinations:
        key = destination_key(d)
        r = results.get(key)
        if r is None:
            unknown.append(key)
        elif not r.ok:
            bad.append(f"{key}: {r.detail}")
    if bad:
        return Check(False, "; ".join(bad))
    if unknown:
        return Check(True, f"not checked yet: {', '.join(unknown)}")
    return Check(True, "every destination answered C-ECHO")


def readiness(
    settings: Settings,
    listener_up: bool,
    db_path: Any,
    var_dir: Any,
    engines: Mapping[str, Any],
    echo_results: Mapping[str, EchoResult],
) -> tuple[bool, dict[str, Check]]:
    checks = {
        "listener": Check(True, "accepting associations") if listener_up else Check(False, "not listening"),
        "database": database_writable(db_path),
        "disk": disk_space(var_dir, settings.node.min_free_mb),
        "engines": engines_loaded(settings, engines),
        "destinations": destinations_reachable(settings, echo_results),
    }
    counted = [k for k in checks if k != "destinations" or settings.http.ready_requires_destinations]
    return all(checks[k].ok for k in counted), checks
