"""The node's durable state: a spool folder of received DICOM files plus an embedded SQLite database.

Layout under ``var_dir``::

    var_dir/screener.db          SQLite, WAL journal, synchronous=FULL
    var_dir/screener.lock        flock held by the owning process (the running node)
    var_dir/spool/<study_uid>/<sop_instance_uid>.dcm

Durable before success
----------------------
`Store.store_instance` is the only way an instance enters the node. It writes the bytes to a
unique ``<sop_instance_uid>.dcm.<random>.part`` file in the study folder, fsyncs it,
``os.replace``-s it onto ``<sop_instance_uid>.dcm``, fsyncs the folder, and only then records the
instance and touches its study in one SQLite transaction committed with ``synchronous=FULL``.
When it returns, the instance survives a crash or power loss; the listener answers 0x0000 only
after that. (The ``.part`` name carries a random suffix so that two associations delivering the
same SOP Instance UID at the same moment never write into the same temporary file.)

The bytes written are those of pynetdicom's ``event.encoded_dataset()``, which in pynetdicom 3.0
(``include_meta=True``, the default) returns the 128-byte preamble, ``DICM``, the encoded File
Meta Information (transfer syntax = the accepted presentation context's, media storage SOP
class/instance from the C-STORE request) and then the data set exactly as the peer sent it, with no
decode and re-encode. The spool file is therefore a proper DICOM Part 10 file that
``pydicom.dcmread`` reads as is (tests/test_listener.py checks this).

Crash recovery (on `Store.open`, by the process that obtains the ``screener.lock`` flock)
---------------------------------------------------------------------------------------
* leftover ``*.part`` files are deleted (an interrupted write, never acknowledged);
* ``.dcm`` files in the spool without an instance row are deleted: the crash happened between the
  rename and the commit, so the instance was never acknowledged and the sender will retry;
* instances in state ``received`` whose file is missing are marked ``failed``;
* studies left in ``screening`` go back to ``complete`` so that the scheduler screens them again.

A second process opening the same ``var_dir`` while the node runs (``screener status``,
``screener resend``) does not get the lock (``Store.owner`` is False) and skips recovery, so it
never deletes a file that the running node is about to acknowledge.

States
------
instances: received -> screened -> reported -> sent, or skipped / failed (with a reason).
studies:   receiving -> complete -> screening -> screened -> reported -> sent, or skipped / failed.
A study in any state other than ``receiving`` that receives a new instance goes back to
``receiving`` (so it is screened again once it is stable). A repeated SOP Instance UID is
idempotent: the file is replaced atomically, the row is kept (``n_received`` counts receipts) and
the instance keeps its state, except that a repeat of a ``failed`` instance resets it to
``received`` (a sender re-sending after a fix gets a new attempt).

Every state change appends a row to ``events`` (the audit trail) in the same transaction and logs
one structlog event (``instance_state``, ``study_state``, ``outbox_state``) carrying UIDs and states
only, never patient data.

Timestamps are Unix seconds (float, UTC). Paths in the database are relative to ``var_dir``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from screener.logs import get_logger
from screener.store.files import atomic_write
from screener.store.schema import (
    _EVENT_COLS,
    _INSTANCE_COLS,
    _OUTBOX_COLS,
    _STUDY_COLS,
    BUSY_TIMEOUT_S,
    DB_NAME,
    FINDINGS,
    INSTANCE_STATES,
    LOCK_NAME,
    MIGRATIONS,
    OUTBOX_STATES,
    SCHEMA_VERSION,
    SPOOL_NAME,
    STUDY_STATES,
    EventRow,
    Failure,
    InstanceRow,
    OutboxRow,
    ResultRow,
    StoreError,
    StoreOutcome,
    StudyRow,
    _result_row,
    is_valid_uid,
)

log = get_logger("screener.store")


def _check(state: str, allowed: tuple[str, ...], what: str) -> None:
    if state not in allowed:
        raise ValueError(f"{what} state {state!r}: expected one of {', '.join(allowed)}")


# ---------------------------------------------------------------------------------------------
# Store
# ---------------------------------------------------------------------------------------------


class Store:
    """Spool + SQLite. Thread-safe: one connection guarded by a re-entrant lock; file writes and
    fsyncs in `store_instance` run outside the lock so that concurrent associations overlap."""

    def __init__(
        self,
        var_dir: Path,
        conn: sqlite3.Connection,
        lock_fd: int | None,
        clock: Callable[[], float],
    ) -> None:
        self.var_dir = var_dir
        self.spool_dir = var_dir / SPOOL_NAME
        self.db_path = var_dir / DB_NAME
        self._conn = conn
        self._lock = threading.RLock()
        self._lock_fd = lock_fd
        self._clock = clock
        self._closed = False

    # -- opening / closing ----------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        var_dir: Path | str,
        *,
        clock: Callable[[], float] = time.time,
        recover: bool = True,
    ) -> Store:
        """Open (creating if needed) the store in `var_dir`, migrate the schema, and, if this process
        obtains the owner lock and `recover` is True, run crash recovery."""
        var_dir = Path(var_dir).resolve()
        (var_dir / SPOOL_NAME).mkdir(parents=True, exist_ok=True)
        lock_fd: int | None = os.open(var_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # type: ignore[arg-type]
        except BlockingIOError:
            os.close(lock_fd)  # type: ignore[arg-type]
            lock_fd = None
        conn = sqlite3.connect(var_dir / DB_NAME, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
            store = cls(var_dir, conn, lock_fd, clock)
            store._migrate()
        except BaseException:
            conn.close()
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        if store.owner and recover:
            store._recover()
        return store

    @property
    def owner(self) -> bool:
        """True when this Store holds the var_dir lock (the node process)."""
        return self._lock_fd is not None

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._conn.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _migrate(self) -> None:
        with self._tx() as c:
            version = c.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.db_path}: schema version {version} is newer than this program's "
                    f"({SCHEMA_VERSION}); upgrade cspine-screener"
                )
            for v in range(version, SCHEMA_VERSION):
                for stmt in MIGRATIONS[v]:
                    c.execute(stmt)
                c.execute(f"PRAGMA user_version={v + 1}")

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT), rolled back on any exception."""
        with self._lock:
            if self._closed:
                raise StoreError("store is closed")
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            if self._closed:
                raise StoreError("store is closed")
            return self._conn.execute(sql, tuple(params)).fetchall()

    def _now(self, now: float | None = None) -> float:
        return self._clock() if now is None else now

    @staticmethod
    def _event(c: sqlite3.Connection, at: float, kind: str, uid: str, state: str, detail: str = "") -> None:
        c.execute(
            "INSERT INTO events (at, kind, uid, state, detail) VALUES (?, ?, ?, ?, ?)",
            (at, kind, uid, state, detail),
        )

    # -- paths / disk -----------------------------------------------------------------------------

    def abs_path(self, rel: str | Path) -> Path:
        """Absolute path of a path stored in the database (relative to var_dir)."""
        return self.var_dir / rel

    def spool_path(self, study_uid: str, sop_instance_uid: str) -> Path:
        return self.spool_dir / study_uid / f"{sop_instance_uid}.dcm"

    def free_space_ok(self, min_free_mb: float) -> bool:
        """True when the file system holding var_dir has at least `min_free_mb` MiB free."""
        return shutil.disk_usage(self.var_dir).free >= min_free_mb * 1024 * 1024

    def _write_atomic(self, dest: Path, data: bytes) -> None:
        atomic_write(dest, data)

    # -- receiving --------------------------------------------------------------------------------

    def store_instance(
        self,
        encoded: bytes,
        sop_class_uid: str,
        sop_instance_uid: str,
        study_uid: str,
        series_uid: str,
        transfer_syntax: str,
        calling_aet: str,
        address: str,
    ) -> StoreOutcome:
        """Durably store one received instance (Part 10 bytes); return once file and row are on disk.

        Raises OSError (disk) or sqlite3.Error (database); in both cases nothing was acknowledged and
        a newly written file is removed again. ValueError for a malformed UID.
        """
        for what, uid in (("study", study_uid), ("SOP instance", sop_instance_uid)):
            if not is_valid_uid(uid):
                raise ValueError(f"invalid {what} UID")
        dest = self.spool_path(study_uid, sop_instance_uid)
        rel = dest.relative_to(self.var_dir).as_posix()
        self._write_atomic(dest, encoded)
        now = self._now()
        duplicate = reopened = new_study = False
        old_study: str | None = None
        old_path: str | None = None
        try:
            with self._tx() as c:
                old = c.execute(
                    "SELECT study_uid, path, state FROM instances WHERE sop_instance_uid = ?",
                    (sop_instance_uid,),
                ).fetchone()
                duplicate = old is not None
                moved = duplicate and old["study_uid"] != study_uid
                retry = duplicate and old["state"] == "failed"
                counts_as_new = not duplicate or moved or retry
                study = c.execute("SELECT state FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
                if study is None:
                    new_study = True
                    c.execute(
                        "INSERT INTO studies (study_uid, state, first_received_at, last_received_at,"
                        " n_instances, updated_at) VALUES (?, 'receiving', ?, ?, 0, ?)",
                        (study_uid, now, now, now),
                    )
                    self._event(c, now, "study", study_uid, "receiving", "first instance")
                elif counts_as_new and study["state"] != "receiving":
                    reopened = True
                    c.execute(
                        "UPDATE studies SET state = 'receiving', reason = '', updated_at = ? WHERE study_uid = ?",
                        (now, study_uid),
                    )
                    self._event(c, now, "study", study_uid, "receiving", f"new instance (was {study['state']})")
                c.execute("UPDATE studies SET last_received_at = ? WHERE study_uid = ?", (now, study_uid))
                if not duplicate:
                    c.execute(
                        f"INSERT INTO instances ({_INSTANCE_COLS}) VALUES ({', '.join('?' * 14)})",
                        (
                            sop_instance_uid,
                            sop_class_uid,
                            study_uid,
                            series_uid,
                            transfer_syntax,
                            rel,
                            len(encoded),
                            calling_aet,
                            address,
                            now,
                            1,
                            "received",
                            "",
                            now,
                        ),
                    )
                else:
                    old_study, old_path = old["study_uid"], old["path"]
                    c.execute(
                        "UPDATE instances SET sop_class_uid = ?, study_uid = ?, series_uid = ?,"
                        " transfer_syntax = ?, path = ?, size = ?, calling_aet = ?, source_address = ?,"
                        " received_at = ?, n_received = n_received + 1, updated_at = ?,"
                        " state = CASE WHEN ? THEN 'received' ELSE state END,"
                        " reason = CASE WHEN ? THEN '' ELSE reason END"
                        " WHERE sop_instance_uid = ?",
                        (
                            sop_class_uid,
                            study_uid,
                            series_uid,
                            transfer_syntax,
                            rel,
                            len(encoded),
                            calling_aet,
                            address,
                            now,
                            now,
                            counts_as_new,
                            counts_as_new,
                            sop_instance_uid,
                        ),
                    )
                detail = "new" if not duplicate else ("moved study" if moved else "duplicate")
                self._event(c, now, "instance", sop_instance_uid, "received", detail)
                for s in {study_uid, old_study} - {None}:
                    c.execute(
                        "UPDATE studies SET n_instances = (SELECT COUNT(*) FROM instances WHERE study_uid = ?)"
                        " WHERE study_uid = ?",
                        (s, s),
                    )
        except BaseException:
            if not duplicate:
                self._unlink_if_unrecorded(sop_instance_uid, rel)
            raise
        if old_path is not None and old_path != rel:
            with contextlib.suppress(OSError):
                self.abs_path(old_path).unlink()
        log.info(
            "instance_state",
            sop_instance_uid=sop_instance_uid,
            study_uid=study_uid,
            series_uid=series_uid,
            state="received",
            duplicate=duplicate,
            size=len(encoded),
            transfer_syntax=transfer_syntax,
            calling_aet=calling_aet,
        )
        if new_study or reopened:
            log.info("study_state", study_uid=study_uid, state="receiving", reopened=reopened)
        return StoreOutcome(sop_instance_uid, study_uid, dest, len(encoded), duplicate, reopened, new_study)

    def _unlink_if_unrecorded(self, sop_instance_uid: str, rel: str) -> None:
        try:
            with self._lock:
                row = self._conn.execute(
                    "SELECT 1 FROM instances WHERE sop_instance_uid = ? AND path = ?", (sop_instance_uid, rel)
                ).fetchone()
        except sqlite3.Error:
            row = None
        if row is None:
            with contextlib.suppress(OSError):
                self.abs_path(rel).unlink()

    # -- reads ------------------------------------------------------------------------------------

    def get_instance(self, sop_instance_uid: str) -> InstanceRow | None:
        rows = self._query(f"SELECT {_INSTANCE_COLS} FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,))
        return InstanceRow(**dict(rows[0])) if rows else None

    def get_study(self, study_uid: str) -> StudyRow | None:
        rows = self._query(f"SELECT {_STUDY_COLS} FROM studies WHERE study_uid = ?", (study_uid,))
        return StudyRow(**dict(rows[0])) if rows else None

    def instances_of(self, study_uid: str, state: str | None = None) -> list[InstanceRow]:
        sql = f"SELECT {_INSTANCE_COLS} FROM instances WHERE study_uid = ?"
        params: list[Any] = [study_uid]
        if state is not None:
            sql += " AND state = ?"
            params.append(state)
        rows = self._query(sql + " ORDER BY received_at, sop_instance_uid", params)
        return [InstanceRow(**dict(r)) for r in rows]

    def studies_in(self, state: str | Iterable[str], limit: int | None = None) -> list[StudyRow]:
        """Studies in `state` (or any of several), oldest last_received_at first."""
        states = [state] if isinstance(state, str) else list(state)
        for s in states:
            _check(s, STUDY_STATES, "study")
        sql = (
            f"SELECT {_STUDY_COLS} FROM studies WHERE state IN ({', '.join('?' * len(states))})"
            " ORDER BY last_received_at, study_uid"
        )
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [StudyRow(**dict(r)) for r in self._query(sql, states)]

    def results_of(self, study_uid: str) -> list[ResultRow]:
        rows = self._query(
            "SELECT r.* FROM results r JOIN instances i USING (sop_instance_uid)"
            " WHERE i.study_uid = ? ORDER BY r.sop_instance_uid, r.engine",
            (study_uid,),
        )
        return [_result_row(r) for r in rows]

    def events_of(self, uid: str) -> list[EventRow]:
        rows = self._query(f"SELECT {_EVENT_COLS} FROM events WHERE uid = ? ORDER BY id", (uid,))
        return [EventRow(**dict(r)) for r in rows]

    def recent_events(self, limit: int = 100) -> list[EventRow]:
        rows = self._query(f"SELECT {_EVENT_COLS} FROM events ORDER BY id DESC LIMIT ?", (int(limit),))
        return [EventRow(**dict(r)) for r in rows]

    def counts(self) -> dict[str, dict[str, int]]:
        """{'instances': {state: n}, 'studies': {...}, 'outbox': {...}}, every known state present."""
        out: dict[str, dict[str, int]] = {}
        for table, states in (("instances", INSTANCE_STATES), ("studies", STUDY_STATES), ("outbox", OUTBOX_STATES)):
            found = {r[0]: r[1] for r in self._query(f"SELECT state, COUNT(*) FROM {table} GROUP BY state")}
            out[table] = {s: int(found.get(s, 0)) for s in states}
        return out

    def failures(self, limit: int = 50) -> list[Failure]:
        """Failed studies, instances and outbox entries with their reasons, newest first."""
        rows = self._query(
            "SELECT 'study' AS kind, study_uid AS uid, state, reason, updated_at, '' AS destination,"
            "  NULL AS outbox_id FROM studies WHERE state = 'failed'"
            " UNION ALL SELECT 'instance', sop_instance_uid, state, reason, updated_at, '', NULL"
            "  FROM instances WHERE state = 'failed'"
            " UNION ALL SELECT 'outbox', study_uid, state, last_error, updated_at, destination, id"
            "  FROM outbox WHERE state = 'failed'"
            " ORDER BY updated_at DESC LIMIT ?",
            (int(limit),),
        )
        return [Failure(**dict(r)) for r in rows]

    # -- state transitions ------------------------------------------------------------------------

    def set_instance_state(
        self, sop_instance_uid: str, state: str, reason: str = "", *, expect: Iterable[str] | None = None
    ) -> bool:
        """Move an instance to `state`. With `expect`, only if its current state is one of those.
        Returns False when the instance is unknown or not in an expected state."""
        _check(state, INSTANCE_STATES, "instance")
        now = self._now()
        with self._tx() as c:
            row = c.execute(
                "SELECT state, study_uid FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
            if row is None or (expect is not None and row["state"] not in set(expect)):
                return False
            c.execute(
                "UPDATE instances SET state = ?, reason = ?, updated_at = ? WHERE sop_instance_uid = ?",
                (state, reason, now, sop_instance_uid),
            )
            self._event(c, now, "instance", sop_instance_uid, state, reason)
        log.info(
            "instance_state",
            sop_instance_uid=sop_instance_uid,
            study_uid=row["study_uid"],
            state=state,
            previous=row["state"],
            reason=reason,
        )
        return True

    def set_study_state(
        self,
        study_uid: str,
        state: str,
        reason: str = "",
        *,
        expect: Iterable[str] | None = None,
        sr_path: str | None = None,
        sr_sop_instance_uid: str | None = None,
    ) -> bool:
        """Move a study to `state` (optionally recording its SR). With `expect`, only if the current
        state is one of those (compare-and-set: a scheduler finishing a study uses
        ``expect=('screening',)`` so that a study reopened by a new instance is not overwritten).
        Returns False when the study is unknown or not in an expected state."""
        _check(state, STUDY_STATES, "study")
        now = self._now()
        with self._tx() as c:
            ok, previous = self._set_study_state(c, now, study_uid, state, reason, expect, sr_path, sr_sop_instance_uid)
        if ok:
            log.info("study_state", study_uid=study_uid, state=state, previous=previous, reason=reason)
        return ok

    def _set_study_state(
        self,
        c: sqlite3.Connection,
        now: float,
        study_uid: str,
        state: str,
        reason: str,
        expect: Iterable[str] | None = None,
        sr_path: str | None = None,
        sr_sop_instance_uid: str | None = None,
    ) -> tuple[bool, str | None]:
        row = c.execute("SELECT state FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
        if row is None or (expect is not None and row["state"] not in set(expect)):
            return False, None if row is None else row["state"]
        c.execute(
            "UPDATE studies SET state = ?, reason = ?, updated_at = ?,"
            " sr_path = COALESCE(?, sr_path), sr_sop_instance_uid = COALESCE(?, sr_sop_instance_uid)"
            " WHERE study_uid = ?",
            (state, reason, now, sr_path, sr_sop_instance_uid, study_uid),
        )
        self._event(c, now, "study", study_uid, state, reason)
        return True, row["state"]

    def complete_studies(self, stable_s: float, now: float | None = None) -> list[str]:
        """Move `receiving` studies with no instance for `stable_s` seconds to `complete`; return them."""
        now = self._now(now)
        with self._tx() as c:
            uids = [
                r[0]
                for r in c.execute(
                    "SELECT study_uid FROM studies WHERE state = 'receiving' AND last_received_at <= ?"
                    " ORDER BY last_received_at, study_uid",
                    (now - stable_s,),
                )
            ]
            for uid in uids:
                self._set_study_state(c, now, uid, "complete", f"stable for {stable_s:g} s")
        for uid in uids:
            log.info("study_state", study_uid=uid, state="complete", previous="receiving")
        return uids

    def force_complete(self, study_uid: str) -> bool:
        """Mark a receiving study complete now (no idle wait). False if it is not receiving."""
        return self.set_study_state(study_uid, "complete", "forced complete", expect=("receiving",))

    # -- results ----------------------------------------------------------------------------------

    def record_result(
        self,
        sop_instance_uid: str,
        engine: str,
        engine_version: str,
        backend: str,
        probability: float,
        finding: str,
        threshold: float,
        roi: Any = None,
        seconds: float = 0.0,
    ) -> None:
        """Record (or replace, on re-screening) one engine's result for one instance.
        `roi` is anything JSON-serialisable (e.g. {"x0":..,"y0":..,"x1":..,"y1":..}) or None."""
        _check(finding, FINDINGS, "finding")
        now = self._now()
        roi_text = None if roi is None else json.dumps(roi, sort_keys=True)
        with self._tx() as c:
            c.execute(
                "INSERT INTO results (sop_instance_uid, engine, engine_version, backend, probability, finding,"
                " threshold, roi, seconds, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (sop_instance_uid, engine) DO UPDATE SET engine_version = excluded.engine_version,"
                " backend = excluded.backend, probability = excluded.probability, finding = excluded.finding,"
                " threshold = excluded.threshold, roi = excluded.roi, seconds = excluded.seconds,"
                " created_at = excluded.created_at",
                (
                    sop_instance_uid,
                    engine,
                    engine_version,
                    backend,
                    float(probability),
                    finding,
                    float(threshold),
                    roi_text,
                    float(seconds),
                    now,
                ),
            )
            self._event(c, now, "result", sop_instance_uid, finding, f"{engine} {engine_version} p={probability:.4f}")
        log.info(
            "result_recorded",
            sop_instance_uid=sop_instance_uid,
            engine=engine,
            engine_version=engine_version,
            finding=finding,
            probability=round(float(probability), 4),
        )

    # -- outbox -----------------------------------------------------------------------------------

    def enqueue(self, study_uid: str, destination: str, sr_path: str, now: float | None = None) -> int:
        """Queue an SR for sending; idempotent for an identical pending (study, destination, sr_path)."""
        now = self._now(now)
        with self._tx() as c:
            row = c.execute(
                "SELECT id FROM outbox WHERE study_uid = ? AND destination = ? AND sr_path = ? AND state = 'pending'",
                (study_uid, destination, sr_path),
            ).fetchone()
            if row is not None:
                return int(row[0])
            cur = c.execute(
                "INSERT INTO outbox (study_uid, destination, sr_path, attempts, next_try_at, state, created_at,"
                " updated_at) VALUES (?, ?, ?, 0, ?, 'pending', ?, ?)",
                (study_uid, destination, sr_path, now, now, now),
            )
            oid = int(cur.lastrowid)  # type: ignore[arg-type]
            self._event(c, now, "outbox", study_uid, "pending", f"id={oid} to {destination}")
        log.info("outbox_state", outbox_id=oid, study_uid=study_uid, destination=destination, state="pending")
        return oid

    def get_outbox(self, outbox_id: int) -> OutboxRow | None:
        rows = self._query(f"SELECT {_OUTBOX_COLS} FROM outbox WHERE id = ?", (outbox_id,))
        return OutboxRow(**dict(rows[0])) if rows else None

    def outbox_of(self, study_uid: str) -> list[OutboxRow]:
        rows = self._query(f"SELECT {_OUTBOX_COLS} FROM outbox WHERE study_uid = ? ORDER BY id", (study_uid,))
        return [OutboxRow(**dict(r)) for r in rows]

    def due_outbox(self, now: float | None = None, limit: int | None = None) -> list[OutboxRow]:
        """Pending entries whose next_try_at has come, oldest first."""
        now = self._now(now)
        sql = f"SELECT {_OUTBOX_COLS} FROM outbox WHERE state = 'pending' AND next_try_at <= ? ORDER BY next_try_at, id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [OutboxRow(**dict(r)) for r in self._query(sql, (now,))]

    def mark_sent(self, outbox_id: int) -> bool:
        """Record a successful send. When every outbox entry of the study is sent, the study and its
        screened/reported instances move to `sent`; returns True in that case."""
        now = self._now()
        study_done = False
        moved: list[str] = []
        with self._tx() as c:
            row = c.execute("SELECT study_uid, destination, attempts FROM outbox WHERE id = ?", (outbox_id,)).fetchone()
            if row is None:
                raise KeyError(f"outbox entry {outbox_id} not found")
            study_uid = row["study_uid"]
            c.execute(
                "UPDATE outbox SET state = 'sent', attempts = attempts + 1, last_error = '', updated_at = ? "
                "WHERE id = ?",
                (now, outbox_id),
            )
            self._event(c, now, "outbox", study_uid, "sent", f"id={outbox_id} to {row['destination']}")
            left = c.execute(
                "SELECT COUNT(*) FROM outbox WHERE study_uid = ? AND state != 'sent'", (study_uid,)
            ).fetchone()[0]
            if left == 0:
                study_done, _ = self._set_study_state(c, now, study_uid, "sent", "")
                moved = [
                    r[0]
                    for r in c.execute(
                        "SELECT sop_instance_uid FROM instances "
                        "WHERE study_uid = ? AND state IN ('screened', 'reported')",
                        (study_uid,),
                    )
                ]
                for uid in moved:
                    c.execute(
                        "UPDATE instances SET state = 'sent', reason = '', updated_at = ? WHERE sop_instance_uid = ?",
                        (now, uid),
                    )
                    self._event(c, now, "instance", uid, "sent", "")
        log.info("outbox_state", outbox_id=outbox_id, study_uid=study_uid, destination=row["destination"], state="sent")
        if study_done:
            log.info("study_state", study_uid=study_uid, state="sent", instances=len(moved))
        return study_done

    def mark_attempt_failed(self, outbox_id: int, error: str, next_try_at: float, give_up: bool) -> None:
        """Record a failed send. give_up=False: retry at `next_try_at`. give_up=True: the entry becomes
        `failed` and its study `failed` with the reason (visible in `failures`, undone by `requeue_failed`)."""
        now = self._now()
        with self._tx() as c:
            row = c.execute("SELECT study_uid, destination, attempts FROM outbox WHERE id = ?", (outbox_id,)).fetchone()
            if row is None:
                raise KeyError(f"outbox entry {outbox_id} not found")
            attempts = row["attempts"] + 1
            state = "failed" if give_up else "pending"
            c.execute(
                "UPDATE outbox SET attempts = ?, last_error = ?, next_try_at = ?, state = ?, updated_at = ? "
                "WHERE id = ?",
                (attempts, error, next_try_at, state, now, outbox_id),
            )
            self._event(c, now, "outbox", row["study_uid"], state, f"id={outbox_id} attempt {attempts}: {error}")
            if give_up:
                reason = f"sending to {row['destination']} failed after {attempts} attempt(s): {error}"
                self._set_study_state(c, now, row["study_uid"], "failed", reason)
        log.warning(
            "outbox_state",
            outbox_id=outbox_id,
            study_uid=row["study_uid"],
            destination=row["destination"],
            state=state,
            attempts=attempts,
            error=error,
        )
        if give_up:
            log.warning("study_state", study_uid=row["study_uid"], state="failed", reason=reason)

    def requeue_failed(self, study_uid: str | None = None) -> int:
        """`screener resend`: failed outbox entries (all, or one study's) go back to pending with zero
        attempts, due now; their failed studies go back to `reported`. Returns the number requeued."""
        now = self._now()
        sql = "SELECT id, study_uid FROM outbox WHERE state = 'failed'"
        params: tuple[Any, ...] = ()
        if study_uid is not None:
            sql += " AND study_uid = ?"
            params = (study_uid,)
        with self._tx() as c:
            rows = c.execute(sql, params).fetchall()
            for r in rows:
                c.execute(
                    "UPDATE outbox SET state = 'pending', attempts = 0, next_try_at = ?, updated_at = ? WHERE id = ?",
                    (now, now, r["id"]),
                )
                self._event(c, now, "outbox", r["study_uid"], "pending", f"id={r['id']} requeued")
            studies = sorted({r["study_uid"] for r in rows})
            for s in studies:
                self._set_study_state(c, now, s, "reported", "requeued for sending", expect=("failed",))
        for r in rows:
            log.info("outbox_state", outbox_id=r["id"], study_uid=r["study_uid"], state="pending", requeued=True)
        return len(rows)

    # -- retention --------------------------------------------------------------------------------

    def retention(self, older_than_days: float, now: float | None = None, states: Iterable[str] = ("sent",)) -> int:
        """Delete studies in `states` (default: sent) not updated for `older_than_days`: rows first
        (instances, results, outbox; events are kept as the audit trail), then their spool files and
        the node's own SR copy (an ``sr_path`` relative to var_dir; a copy in ``sr_folder`` is never
        touched). A crash in between leaves unreferenced spool files, which the next recovery
        removes. Returns the number of studies purged."""
        now = self._now(now)
        states = list(states)
        for s in states:
            _check(s, STUDY_STATES, "study")
        cutoff = now - older_than_days * 86400.0
        with self._tx() as c:
            uids = [
                r[0]
                for r in c.execute(
                    f"SELECT study_uid FROM studies WHERE state IN ({', '.join('?' * len(states))}) AND updated_at < ?",
                    (*states, cutoff),
                )
            ]
            paths: list[str] = []
            for uid in uids:
                paths += [r[0] for r in c.execute("SELECT path FROM instances WHERE study_uid = ?", (uid,))]
                sr = c.execute("SELECT sr_path FROM studies WHERE study_uid = ?", (uid,)).fetchone()[0]
                if sr and not Path(sr).is_absolute() and ".." not in Path(sr).parts:
                    paths.append(sr)
                # ON DELETE CASCADE removes instances, results and outbox rows.
                c.execute("DELETE FROM studies WHERE study_uid = ?", (uid,))
                self._event(c, now, "purge", uid, "purged", f"retention {older_than_days:g} days")
        folders: set[Path] = set()
        for p in paths:
            full = self.abs_path(p)
            folders.add(full.parent)
            with contextlib.suppress(FileNotFoundError):
                full.unlink()
        for folder in folders:
            if folder != self.var_dir and folder != self.spool_dir:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty
        for uid in uids:
            log.info("study_state", study_uid=uid, state="purged")
        return len(uids)

    # -- crash recovery ---------------------------------------------------------------------------

    def _recover(self) -> None:
        now = self._now()
        with self._lock:
            known = {r[0] for r in self._conn.execute("SELECT path FROM instances")}
        parts = orphans = 0
        on_disk: set[str] = set()
        for folder in sorted(p for p in self.spool_dir.iterdir() if p.is_dir()):
            for f in folder.iterdir():
                rel = f.relative_to(self.var_dir).as_posix()
                if f.name.endswith(".part"):
                    f.unlink(missing_ok=True)
                    parts += 1
                elif f.name.endswith(".dcm") and rel not in known:
                    # Renamed but never recorded: never acknowledged, the sender retries.
                    f.unlink(missing_ok=True)
                    orphans += 1
                    log.warning("orphan_removed", sop_instance_uid=f.name[: -len(".dcm")], study_uid=folder.name)
                else:
                    on_disk.add(rel)
            with contextlib.suppress(OSError):
                folder.rmdir()  # only succeeds when empty
        missing = known - on_disk
        lost: list[tuple[str, str]] = []
        resumed: list[str] = []
        with self._tx() as c:
            if missing:
                for r in c.execute(
                    "SELECT sop_instance_uid, study_uid, path FROM instances WHERE state = 'received'"
                ).fetchall():
                    if r["path"] in missing:
                        lost.append((r["sop_instance_uid"], r["study_uid"]))
            for sop, _study in lost:
                c.execute(
                    "UPDATE instances SET state = 'failed', reason = 'spool file missing', updated_at = ?"
                    " WHERE sop_instance_uid = ?",
                    (now, sop),
                )
                self._event(c, now, "instance", sop, "failed", "spool file missing")
            resumed = [r[0] for r in c.execute("SELECT study_uid FROM studies WHERE state = 'screening'")]
            for uid in resumed:
                self._set_study_state(c, now, uid, "complete", "restart: screening interrupted")
        for sop, study in lost:
            log.warning(
                "instance_state", sop_instance_uid=sop, study_uid=study, state="failed", reason="spool file missing"
            )
        for uid in resumed:
            log.info("study_state", study_uid=uid, state="complete", previous="screening", reason="restart")
        log.info("store_recovered", part_files=parts, orphans=orphans, missing=len(lost), resumed=len(resumed))
