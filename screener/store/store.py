"""The node's durable state: a spool folder of received DICOM files plus an embedded SQLite database.

Layout under ``var_dir``::

    var_dir/screener.db          SQLite, WAL journal, synchronous=FULL
    var_dir/screener.lock        flock held by the owning process (the running node)
    var_dir/spool/<study_uid>/<sop_instance_uid>.dcm
    var_dir/sr/<study_uid>/<sr_sop_instance_uid>.dcm

The states, the transitions, who makes them and the invariant they keep are written down in
docs/state-machine.md; this docstring is the durability contract.

Durable before success
----------------------
`Store.store_instance` is the only way an instance enters the node. It writes the bytes to a
unique ``<sop_instance_uid>.dcm.<random>.part`` file in the study folder, fsyncs it,
``os.replace``-s it onto ``<sop_instance_uid>.dcm``, fsyncs the folder, and only then records the
instance and touches its study in one SQLite transaction committed with ``synchronous=FULL``.
When it returns, the instance survives a crash or power loss; the listener answers 0x0000 only
after that. (The ``.part`` name carries a random suffix so that two associations delivering the
same SOP Instance UID at the same moment never write into the same temporary file.)

The bytes written are those of pynetdicom's ``event.encoded_dataset()`` (preamble, ``DICM``, File
Meta Information, then the data set exactly as the peer sent it): a Part 10 file that
``pydicom.dcmread`` reads as is.

One transaction per transition
------------------------------
Every transition is a compare-and-set on the expected state (``UPDATE ... WHERE state = ?`` and a
check of the row count) and is committed together with all its side effects (instance states,
results, SR rows, outbox rows, the study's current SR) in one transaction, with one ``events`` row
per change (the audit trail). A transition whose expected state is gone (a late instance reopened
the study meanwhile) changes nothing and says so (returns False / None).

Node clock
----------
Deadlines (a study quiet for ``study_stable_s``, the next try of an outbox row, a screening retry)
are on the *node clock* `Store.node_time`: seconds of node uptime summed over runs, from
``time.monotonic`` while the process runs and persisted in ``meta.node_time`` by every write
transaction of the owner. A wall clock stepped back or forward does not move it; after a crash it
resumes from the last committed transaction, so a deadline is never earlier than it was set, only
later by the downtime not counted. Wall-clock timestamps (``*_at``) are kept for people and for
retention, which counts calendar days.

Crash recovery (`Store.recover`, run by `Store.open` in the process that obtains the lock)
-----------------------------------------------------------------------------------------
Idempotent and safe to run again at any time when no job is running:

* leftover ``*.part`` files are deleted (an interrupted write, never acknowledged);
* ``.dcm`` files in the spool without an instance row are deleted: the crash happened between the
  rename and the commit, so the instance was never acknowledged and the sender will retry;
* SR files under ``var/sr`` that no current or superseded SR row names are deleted (written but
  not committed, or deleted by retention whose unlink did not happen);
* instances in ``received`` whose file is missing are ``failed``;
* studies left in ``screening`` (or schema 1's ``screened``) go back to ``complete`` (the attempt
  stays counted), schema 1's ``screened`` instances back to ``received``;
* a ``reported`` study whose current SR file is missing, or any ``reported``/``sent`` study with an
  acknowledged instance that its current SR does not report, goes back to ``complete`` (its
  pending outbox rows are cancelled) so that it is screened again;
* outbox rows still pending for an SR that is no longer current are cancelled.

A second process opening the same ``var_dir`` while the node runs (``screener status``,
``screener resend``) does not get the lock (``Store.owner`` is False) and skips recovery, so it
never deletes a file that the running node is about to acknowledge.

Every state change logs one structlog event (``instance_state``, ``study_state``,
``outbox_state``) carrying UIDs and states only, never patient data. Paths in the database are
relative to ``var_dir``.
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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from screener.logs import get_logger
from screener.store import crash
from screener.store.files import atomic_write
from screener.store.schema import (
    _EVENT_COLS,
    _INSTANCE_COLS,
    _OUTBOX_COLS,
    _SR_COLS,
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
    InstanceResult,
    InstanceRow,
    OutboxRow,
    ResultRow,
    SRInfo,
    SRRow,
    StoreError,
    StoreOutcome,
    StudyRow,
    _result_row,
    is_valid_uid,
)

log = get_logger("screener.store")

SR_DIR = "sr"
# Studies in these states are about to be (re)screened: retention leaves their instances alone.
_OPEN_STUDY_STATES = ("receiving", "complete", "screening", "screened")


def _check(state: str, allowed: tuple[str, ...], what: str) -> None:
    if state not in allowed:
        raise ValueError(f"{what} state {state!r}: expected one of {', '.join(allowed)}")


@dataclass(frozen=True)
class Picked:
    """A study taken for screening by `Store.pick_for_screening`."""

    study_uid: str
    instances: tuple[InstanceRow, ...]  # the instances to screen (not failed or skipped)
    attempt: int  # this screening attempt's number (1 = first)
    sr_count: int  # SRs built before; the next one gets instance number sr_count + 1
    predecessors: tuple[SRRow, ...]  # the study's earlier SRs, oldest first


@dataclass(frozen=True)
class RetentionStats:
    instances: int = 0  # instances purged (rows and spool files)
    studies: int = 0  # studies with nothing left, purged
    sr_files: int = 0  # SR files deleted (superseded, or of a purged study)


@dataclass(frozen=True)
class RecoveryStats:
    part_files: int = 0
    orphans: int = 0
    sr_orphans: int = 0
    missing: int = 0
    resumed: int = 0
    rescreen: int = 0
    cancelled: int = 0


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
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.var_dir = var_dir
        self.spool_dir = var_dir / SPOOL_NAME
        self.sr_dir = var_dir / SR_DIR
        self.db_path = var_dir / DB_NAME
        self._conn = conn
        self._lock = threading.RLock()
        self._lock_fd = lock_fd
        self._clock = clock
        self._monotonic = monotonic
        self._closed = False
        self._nt_base = 0.0
        self._mono0 = monotonic()

    # -- opening / closing ----------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        var_dir: Path | str,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        recover: bool = True,
    ) -> Store:
        """Open (creating if needed) the store in `var_dir`, migrate the schema, and, if this process
        obtains the owner lock and `recover` is True, run crash recovery.

        `clock` gives wall-clock timestamps (records, retention), `monotonic` drives the node clock
        (deadlines); tests pass fakes."""
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
            store = cls(var_dir, conn, lock_fd, clock, monotonic)
            store._migrate()
            store._nt_base = float(conn.execute("SELECT value FROM meta WHERE key = 'node_time'").fetchone()[0])
            store._mono0 = monotonic()
        except BaseException:
            conn.close()
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        if store.owner and recover:
            try:
                store.recover()
            except BaseException:
                store.close()
                raise
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

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _migrate(self) -> None:
        with self._tx(persist_clock=False) as c:
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
    def _tx(self, persist_clock: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT), rolled back on any exception. The
        owner's transactions also persist the node clock."""
        with self._lock:
            if self._closed:
                raise StoreError("store is closed")
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                if persist_clock and self.owner:
                    self._conn.execute(
                        "UPDATE meta SET value = MAX(value, ?) WHERE key = 'node_time'", (self.node_time(),)
                    )
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK")
                raise

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            if self._closed:
                raise StoreError("store is closed")
            return self._conn.execute(sql, tuple(params)).fetchall()

    def _now(self, now: float | None = None) -> float:
        return self._clock() if now is None else now

    def node_time(self) -> float:
        """The node clock: seconds of node uptime summed over runs (module doc, "Node clock")."""
        return self._nt_base + max(0.0, self._monotonic() - self._mono0)

    def _nt(self, now_nt: float | None) -> float:
        return self.node_time() if now_nt is None else now_nt

    def persist_clock(self) -> None:
        """Record the node clock now (the owner's jobs call this on every pass)."""
        if self.owner:
            with self._tx():
                pass

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

    def sr_rel_path(self, study_uid: str, sr_sop_instance_uid: str) -> str:
        """Where the node keeps its copy of an SR (relative to var_dir)."""
        return f"{SR_DIR}/{study_uid}/{sr_sop_instance_uid}.dcm"

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
        nt = self.node_time()
        duplicate = reopened = new_study = False
        cancelled: list[int] = []
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
                    # A late instance: the study is screened again and its next SR supersedes the
                    # current one, whose deliveries still pending are cancelled here (a delivery on
                    # the wire right now may finish; it no longer changes the study).
                    reopened = True
                    c.execute(
                        "UPDATE studies SET state = 'receiving', reason = '', not_before_nt = 0, updated_at = ?"
                        " WHERE study_uid = ?",
                        (now, study_uid),
                    )
                    self._event(c, now, "study", study_uid, "receiving", f"new instance (was {study['state']})")
                    cancelled = self._cancel_outbox(c, now, study_uid, "superseded: the study received a new instance")
                c.execute(
                    "UPDATE studies SET last_received_at = ?, last_received_nt = ? WHERE study_uid = ?",
                    (now, nt, study_uid),
                )
                if not duplicate:
                    c.execute(
                        f"INSERT INTO instances ({_INSTANCE_COLS}) VALUES ({', '.join('?' * 15)})",
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
                            None,
                        ),
                    )
                else:
                    old_study, old_path = old["study_uid"], old["path"]
                    c.execute(
                        "UPDATE instances SET sop_class_uid = ?, study_uid = ?, series_uid = ?,"
                        " transfer_syntax = ?, path = ?, size = ?, calling_aet = ?, source_address = ?,"
                        " received_at = ?, n_received = n_received + 1, updated_at = ?,"
                        " state = CASE WHEN ? THEN 'received' ELSE state END,"
                        " reason = CASE WHEN ? THEN '' ELSE reason END,"
                        " sr_id = CASE WHEN ? THEN NULL ELSE sr_id END"
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
                crash.point("store.before_instance_commit")
        except BaseException:
            if not duplicate:
                self._unlink_if_unrecorded(sop_instance_uid, rel)
            raise
        crash.point("store.after_instance_commit")
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
        for oid in cancelled:
            log.info("outbox_state", outbox_id=oid, study_uid=study_uid, state="cancelled", reason="superseded")
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

    def get_sr(self, sr_id: int) -> SRRow | None:
        rows = self._query(f"SELECT {_SR_COLS} FROM srs WHERE id = ?", (sr_id,))
        return SRRow(**dict(rows[0])) if rows else None

    def srs_of(self, study_uid: str) -> list[SRRow]:
        """Every SR built for the study (current, superseded, deleted), oldest first."""
        rows = self._query(f"SELECT {_SR_COLS} FROM srs WHERE study_uid = ? ORDER BY id", (study_uid,))
        return [SRRow(**dict(r)) for r in rows]

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

    # -- generic compare-and-set transitions ----------------------------------------------------------

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
            if row is None:
                return False
            allowed = tuple(expect) if expect is not None else (row["state"],)
            if not self._cas_instance(c, now, sop_instance_uid, allowed, state, reason):
                return False
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
        """Move a study to `state`. With `expect`, only if the current state is one of those
        (compare-and-set). Returns False when the study is unknown or not in an expected state.
        The node's own transitions use the dedicated methods below, which carry their side effects;
        `sr_path` / `sr_sop_instance_uid` (the former API, kept for fixtures) record a new current SR."""
        _check(state, STUDY_STATES, "study")
        now = self._now()
        with self._tx() as c:
            row = c.execute("SELECT state, sr_count FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
            if row is None:
                return False
            allowed = tuple(expect) if expect is not None else (row["state"],)
            if not self._cas_study(c, now, study_uid, allowed, state, reason):
                return False
            if sr_path is not None:
                c.execute(
                    "UPDATE srs SET state = 'superseded', updated_at = ? WHERE study_uid = ? AND state = 'current'",
                    (now, study_uid),
                )
                number = int(row["sr_count"]) + 1
                cur = c.execute(
                    "INSERT INTO srs (study_uid, sop_instance_uid, path, instance_number, state, created_at,"
                    " updated_at) VALUES (?, ?, ?, ?, 'current', ?, ?)",
                    (study_uid, sr_sop_instance_uid or "", sr_path, number, now, now),
                )
                c.execute(
                    "UPDATE studies SET sr_id = ?, sr_count = ?, sr_path = ?, sr_sop_instance_uid = ?"
                    " WHERE study_uid = ?",
                    (cur.lastrowid, number, sr_path, sr_sop_instance_uid, study_uid),
                )
                c.execute(
                    "UPDATE instances SET sr_id = ? WHERE study_uid = ? AND state IN ('screened', 'reported')",
                    (cur.lastrowid, study_uid),
                )
        log.info("study_state", study_uid=study_uid, state=state, previous=row["state"], reason=reason)
        return True

    def _cas(
        self,
        c: sqlite3.Connection,
        now: float,
        kind: str,
        uid: str,
        expect: Sequence[str],
        state: str,
        reason: str,
        cols: dict[str, Any],
    ) -> bool:
        """UPDATE <kind>s ... WHERE state IN expect (the compare-and-set of every transition); True when
        the row changed, with its event in the same transaction. `kind`: study | instance."""
        table, key = {"study": ("studies", "study_uid"), "instance": ("instances", "sop_instance_uid")}[kind]
        sets = "".join(f", {k} = ?" for k in cols)
        cur = c.execute(
            f"UPDATE {table} SET state = ?, reason = ?, updated_at = ?{sets}"
            f" WHERE {key} = ? AND state IN ({', '.join('?' * len(expect))})",
            (state, reason, now, *cols.values(), uid, *expect),
        )
        if cur.rowcount != 1:
            return False
        self._event(c, now, kind, uid, state, reason)
        return True

    def _cas_study(
        self,
        c: sqlite3.Connection,
        now: float,
        study_uid: str,
        expect: Sequence[str],
        state: str,
        reason: str,
        **cols: Any,
    ) -> bool:
        return self._cas(c, now, "study", study_uid, expect, state, reason, cols)

    def _cas_instance(
        self,
        c: sqlite3.Connection,
        now: float,
        sop_instance_uid: str,
        expect: Sequence[str],
        state: str,
        reason: str,
        **cols: Any,
    ) -> bool:
        return self._cas(c, now, "instance", sop_instance_uid, expect, state, reason, cols)

    def _cancel_outbox(self, c: sqlite3.Connection, now: float, study_uid: str, reason: str) -> list[int]:
        """Cancel the study's pending and failed deliveries (their SR is being superseded)."""
        ids = [
            int(r[0])
            for r in c.execute(
                "SELECT id FROM outbox WHERE study_uid = ? AND state IN ('pending', 'failed')", (study_uid,)
            )
        ]
        for oid in ids:
            c.execute(
                "UPDATE outbox SET state = 'cancelled', last_error = ?, updated_at = ?"
                " WHERE id = ? AND state IN ('pending', 'failed')",
                (reason, now, oid),
            )
            self._event(c, now, "outbox", study_uid, "cancelled", f"id={oid}: {reason}")
        return ids

    def _quarantine(
        self, c: sqlite3.Connection, now: float, study_uid: str, expect: Sequence[str], reason: str
    ) -> bool:
        """Study -> failed with `reason`; its instances still waiting for an SR -> failed too."""
        if not self._cas_study(c, now, study_uid, expect, "failed", reason, not_before_nt=0):
            return False
        for r in c.execute(
            "SELECT sop_instance_uid FROM instances WHERE study_uid = ? AND state IN ('received', 'screened')",
            (study_uid,),
        ).fetchall():
            self._cas_instance(c, now, r[0], ("received", "screened"), "failed", reason)
        return True

    # -- receiving -> complete ----------------------------------------------------------------------

    def complete_studies(self, stable_s: float, now: float | None = None) -> list[str]:
        """Move `receiving` studies with no new instance for `stable_s` seconds of the node clock to
        `complete`; return them. `now` is a node-clock value (default: `node_time()`)."""
        nt = self._nt(now)
        wall = self._now()
        probe = "SELECT 1 FROM studies WHERE state = 'receiving' AND last_received_nt <= ? LIMIT 1"
        if not self._query(probe, (nt - stable_s,)):
            return []
        with self._tx() as c:
            uids = [
                r[0]
                for r in c.execute(
                    "SELECT study_uid FROM studies WHERE state = 'receiving' AND last_received_nt <= ?"
                    " ORDER BY last_received_nt, study_uid",
                    (nt - stable_s,),
                )
            ]
            uids = [
                u for u in uids if self._cas_study(c, wall, u, ("receiving",), "complete", f"stable {stable_s:g} s")
            ]
        for uid in uids:
            log.info("study_state", study_uid=uid, state="complete", previous="receiving")
        return uids

    def force_complete(self, study_uid: str) -> bool:
        """`screener complete`: a receiving study is complete now (no idle wait). False if it is not
        receiving."""
        return self.set_study_state(study_uid, "complete", "forced complete", expect=("receiving",))

    # -- complete -> screening -> reported | skipped | failed -------------------------------------------

    def pick_for_screening(self, max_images: int, max_attempts: int, now: float | None = None) -> list[Picked]:
        """Take complete studies for one screening batch (complete -> screening, attempt counted), in
        one transaction: oldest first, up to `max_images` images (a bigger study is taken alone).

        A study whose earlier attempt did not finish (the process died, or the job raised) is taken
        alone, so that it cannot take other studies down with it again; once it has used
        `max_attempts` attempts it is quarantined instead: failed, with its waiting instances,
        "quarantined after N screening attempts". A complete study with nothing left to screen is
        skipped."""
        nt = self._nt(now)
        wall = self._now()
        picked: list[Picked] = []
        changes: list[tuple[str, str, str]] = []
        if not self._query("SELECT 1 FROM studies WHERE state = 'complete' AND not_before_nt <= ? LIMIT 1", (nt,)):
            return []
        with self._tx() as c:
            rows = c.execute(
                "SELECT study_uid, screen_attempts, sr_count FROM studies WHERE state = 'complete'"
                " AND not_before_nt <= ? ORDER BY last_received_nt, study_uid",
                (nt,),
            ).fetchall()
            n = 0
            for r in rows:
                uid, attempts = r["study_uid"], int(r["screen_attempts"])
                if attempts >= max_attempts:
                    reason = f"quarantined after {attempts} screening attempts"
                    if self._quarantine(c, wall, uid, ("complete",), reason):
                        changes.append((uid, "failed", reason))
                    continue
                insts = [
                    InstanceRow(**dict(i))
                    for i in c.execute(
                        f"SELECT {_INSTANCE_COLS} FROM instances WHERE study_uid = ?"
                        " AND state NOT IN ('failed', 'skipped') ORDER BY received_at, sop_instance_uid",
                        (uid,),
                    )
                ]
                if not insts:
                    reason = "no instance left to screen"
                    if self._cas_study(c, wall, uid, ("complete",), "skipped", reason, screen_attempts=0):
                        changes.append((uid, "skipped", reason))
                    continue
                suspect = attempts > 0
                if picked and (suspect or picked[0].attempt > 1):
                    if suspect:
                        continue
                    break
                if picked and n + len(insts) > max_images:
                    break
                if not self._cas_study(
                    c, wall, uid, ("complete",), "screening", f"attempt {attempts + 1}", screen_attempts=attempts + 1
                ):
                    continue
                preds = tuple(
                    SRRow(**dict(s))
                    for s in c.execute(
                        f"SELECT {_SR_COLS} FROM srs WHERE study_uid = ? AND series_uid != '' ORDER BY id", (uid,)
                    )
                )
                picked.append(Picked(uid, tuple(insts), attempts + 1, int(r["sr_count"]), preds))
                changes.append((uid, "screening", f"attempt {attempts + 1}"))
                n += len(insts)
                if suspect:
                    break
        for uid, state, reason in changes:
            log.info("study_state", study_uid=uid, state=state, previous="complete", reason=reason)
        return picked

    def release_study(
        self,
        study_uid: str,
        reason: str,
        *,
        retry_in_s: float = 0.0,
        count_attempt: bool = True,
        max_attempts: int | None = None,
        now: float | None = None,
    ) -> str | None:
        """A screening pass did not finish: screening -> complete (screened again after `retry_in_s`
        of node clock), or -> failed (quarantined) when the study has used `max_attempts`.
        `count_attempt=False` gives the attempt back (an error of the node's environment, such as a
        full disk, that is not the study's fault). Returns the new state, None if the study was not
        in screening (a new instance reopened it)."""
        nt = self._nt(now)
        wall = self._now()
        with self._tx() as c:
            row = c.execute(
                "SELECT screen_attempts FROM studies WHERE study_uid = ? AND state = 'screening'", (study_uid,)
            ).fetchone()
            if row is None:
                return None
            attempts = int(row[0]) if count_attempt else max(0, int(row[0]) - 1)
            if count_attempt and max_attempts is not None and attempts >= max_attempts:
                state = "failed"
                why = f"quarantined after {attempts} screening attempts ({reason})"
                self._quarantine(c, wall, study_uid, ("screening",), why)
            else:
                state, why = "complete", reason
                self._cas_study(
                    c,
                    wall,
                    study_uid,
                    ("screening",),
                    "complete",
                    reason,
                    screen_attempts=attempts,
                    not_before_nt=nt + retry_in_s,
                )
        log.warning("study_state", study_uid=study_uid, state=state, previous="screening", reason=why)
        return state

    def release_stale_screening(self, in_flight: Iterable[str] = ()) -> list[str]:
        """Studies in `screening` that no job of this process is working on (`in_flight`) go back to
        `complete` (their attempt stays counted). The owner runs this on every pass, so a job that
        could not even record its failure (database full) strands nothing until the next start."""
        keep = set(in_flight)
        wall = self._now()
        if not any(r[0] not in keep for r in self._query("SELECT study_uid FROM studies WHERE state = 'screening'")):
            return []  # nothing to do: no write (a full disk cannot take one)
        with self._tx() as c:
            uids = [
                r[0]
                for r in c.execute("SELECT study_uid FROM studies WHERE state IN ('screening', 'screened')")
                if r[0] not in keep
            ]
            uids = [
                u
                for u in uids
                if self._cas_study(c, wall, u, ("screening", "screened"), "complete", "screening interrupted")
            ]
        for uid in uids:
            log.warning("study_state", study_uid=uid, state="complete", previous="screening", reason="interrupted")
        return uids

    def finish_study(
        self,
        study_uid: str,
        outcomes: Sequence[InstanceResult],
        sr: SRInfo | None,
        destinations: Sequence[str],
        *,
        reason: str = "",
        failed: bool = False,
        extra_paths: Sequence[str] = (),
    ) -> str | None:
        """The end of a screening pass, in one transaction: the study screening -> reported (with
        `sr`), skipped (no SR: nothing screened, `reason`) or failed (`failed=True`: the SR could not
        be built, `reason`); every outcome's results and instance state; the new SR row, which
        supersedes the current one (cancelling its remaining deliveries); an outbox row per
        destination. Returns the study's new state, or None when the study is no longer in
        screening (reopened by a new instance: nothing is recorded, the SR file is the caller's)."""
        wall = self._now()
        nt = self.node_time()
        if sr is not None:
            state = "reported"
        else:
            state = "failed" if failed else "skipped"
        moved: list[tuple[str, str, str]] = []
        oids: list[int] = []
        with self._tx() as c:
            if not self._cas_study(
                c, wall, study_uid, ("screening",), state, reason, screen_attempts=0, not_before_nt=0
            ):
                return None
            sr_id: int | None = None
            if sr is not None:
                c.execute(
                    "UPDATE srs SET state = 'superseded', updated_at = ? WHERE study_uid = ? AND state = 'current'",
                    (wall, study_uid),
                )
                self._cancel_outbox(c, wall, study_uid, "superseded by a newer SR")
                n_sources = sum(1 for o in outcomes if o.state == "reported")
                cur = c.execute(
                    "INSERT INTO srs (study_uid, sop_instance_uid, series_uid, sop_class_uid, instance_number, path,"
                    " state, n_sources, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, 'current', ?, ?, ?)",
                    (
                        study_uid,
                        sr.sop_instance_uid,
                        sr.series_uid,
                        sr.sop_class_uid,
                        sr.instance_number,
                        sr.path,
                        n_sources,
                        wall,
                        wall,
                    ),
                )
                sr_id = int(cur.lastrowid)  # type: ignore[arg-type]
                c.execute(
                    "UPDATE studies SET sr_id = ?, sr_count = MAX(sr_count, ?), sr_path = ?, sr_sop_instance_uid = ?"
                    " WHERE study_uid = ?",
                    (sr_id, sr.instance_number, sr.path, sr.sop_instance_uid, study_uid),
                )
                self._event(c, wall, "sr", study_uid, "current", f"id={sr_id} instance {sr.instance_number}")
                for d in destinations:
                    # The SR first, then its companion objects (report.companion), same SR id.
                    for path in (sr.path, *extra_paths):
                        cur = c.execute(
                            "INSERT INTO outbox (study_uid, sr_id, destination, sr_path, attempts, next_try_at,"
                            " due_nt, state, created_at, updated_at) VALUES (?, ?, ?, ?, 0, ?, ?, 'pending', ?, ?)",
                            (study_uid, sr_id, d, path, wall, nt, wall, wall),
                        )
                        oid = int(cur.lastrowid)  # type: ignore[arg-type]
                        oids.append(oid)
                        self._event(c, wall, "outbox", study_uid, "pending", f"id={oid} to {d}")
            for o in outcomes:
                c.execute("DELETE FROM results WHERE sop_instance_uid = ?", (o.sop_instance_uid,))
                for res in o.results:
                    self._insert_result(c, wall, o.sop_instance_uid, **res)
                inst_state, inst_reason = o.state, o.reason
                if inst_state == "reported" and sr_id is None:
                    inst_state, inst_reason = ("failed", reason) if failed else ("skipped", o.reason or reason)
                ok = self._cas_instance(
                    c,
                    wall,
                    o.sop_instance_uid,
                    ("received", "screened", "reported", "sent"),
                    inst_state,
                    inst_reason,
                    sr_id=sr_id if inst_state == "reported" else None,
                )
                if ok:
                    moved.append((o.sop_instance_uid, inst_state, inst_reason))
        for uid, s, why in moved:
            log.info("instance_state", sop_instance_uid=uid, study_uid=study_uid, state=s, reason=why)
        log.info("study_state", study_uid=study_uid, state=state, previous="screening", reason=reason)
        for oid in oids:
            log.info("outbox_state", outbox_id=oid, study_uid=study_uid, state="pending")
        return state

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
        `roi` is anything JSON-serialisable (e.g. {"x0":..,"y0":..,"x1":..,"y1":..}) or None.
        (The node records results inside `finish_study`; this is the single-result form.)"""
        now = self._now()
        with self._tx() as c:
            self._insert_result(
                c, now, sop_instance_uid, engine, engine_version, backend, probability, finding, threshold, roi, seconds
            )
        log.info(
            "result_recorded",
            sop_instance_uid=sop_instance_uid,
            engine=engine,
            engine_version=engine_version,
            finding=finding,
            probability=round(float(probability), 4),
        )

    def _insert_result(
        self,
        c: sqlite3.Connection,
        now: float,
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
        _check(finding, FINDINGS, "finding")
        roi_text = None if roi is None else json.dumps(roi, sort_keys=True)
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

    # -- outbox -----------------------------------------------------------------------------------

    def enqueue(self, study_uid: str, destination: str, sr_path: str | None = None, now: float | None = None) -> int:
        """Queue the study's current SR for one more destination; idempotent for an identical pending
        (study, destination, SR). (The node queues its SRs inside `finish_study`.)"""
        wall = self._now(now)
        nt = self.node_time()
        with self._tx() as c:
            st = c.execute("SELECT sr_id, sr_path FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
            if st is None:
                raise KeyError(f"study {study_uid} not found")
            sr_id, path = st["sr_id"], sr_path or st["sr_path"]
            row = c.execute(
                "SELECT id FROM outbox WHERE study_uid = ? AND destination = ? AND sr_path = ? AND state = 'pending'",
                (study_uid, destination, path),
            ).fetchone()
            if row is not None:
                return int(row[0])
            cur = c.execute(
                "INSERT INTO outbox (study_uid, sr_id, destination, sr_path, attempts, next_try_at, due_nt, state,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, 0, ?, ?, 'pending', ?, ?)",
                (study_uid, sr_id, destination, path, wall, nt, wall, wall),
            )
            oid = int(cur.lastrowid)  # type: ignore[arg-type]
            self._event(c, wall, "outbox", study_uid, "pending", f"id={oid} to {destination}")
        log.info("outbox_state", outbox_id=oid, study_uid=study_uid, destination=destination, state="pending")
        return oid

    def get_outbox(self, outbox_id: int) -> OutboxRow | None:
        rows = self._query(f"SELECT {_OUTBOX_COLS} FROM outbox WHERE id = ?", (outbox_id,))
        return OutboxRow(**dict(rows[0])) if rows else None

    def outbox_of(self, study_uid: str) -> list[OutboxRow]:
        rows = self._query(f"SELECT {_OUTBOX_COLS} FROM outbox WHERE study_uid = ? ORDER BY id", (study_uid,))
        return [OutboxRow(**dict(r)) for r in rows]

    def due_outbox(self, now: float | None = None, limit: int | None = None) -> list[OutboxRow]:
        """Pending entries due on the node clock (`now`, default `node_time()`), earliest first."""
        nt = self._nt(now)
        sql = f"SELECT {_OUTBOX_COLS} FROM outbox WHERE state = 'pending' AND due_nt <= ? ORDER BY due_nt, id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [OutboxRow(**dict(r)) for r in self._query(sql, (nt,))]

    def claim_send(self, outbox_id: int, backoff_s: float, max_backoff_s: float = 3600.0) -> OutboxRow | None:
        """Before a delivery: count the attempt and schedule the next try (backoff_s x 2^(attempt-1),
        at most `max_backoff_s`) in one transaction, so that whatever happens next (the delivery
        fails, recording its success fails, the process dies) the row is not tried again before
        then. Returns the claimed row, None if it is no longer pending."""
        wall = self._now()
        nt = self.node_time()
        with self._tx() as c:
            row = c.execute("SELECT attempts, study_uid FROM outbox WHERE id = ? AND state = 'pending'", (outbox_id,))
            r = row.fetchone()
            if r is None:
                return None
            attempts = int(r["attempts"]) + 1
            delay = min(max_backoff_s, backoff_s * (2 ** min(attempts - 1, 30)))
            c.execute(
                "UPDATE outbox SET attempts = ?, due_nt = ?, next_try_at = ?, updated_at = ?"
                " WHERE id = ? AND state = 'pending'",
                (attempts, nt + delay, wall + delay, wall, outbox_id),
            )
        return self.get_outbox(outbox_id)

    def mark_sent(self, outbox_id: int) -> bool:
        """Record a successful delivery (pending -> sent). When every delivery of the study's current SR
        is done, the study reported -> sent and its instances in that SR reported -> sent, in the same
        transaction; returns True in that case. A delivery of a cancelled (superseded) row is only
        noted: it never touches the study."""
        wall = self._now()
        study_done = False
        moved: list[str] = []
        with self._tx() as c:
            row = c.execute(
                "SELECT study_uid, destination, sr_id, state FROM outbox WHERE id = ?", (outbox_id,)
            ).fetchone()
            if row is None:
                raise KeyError(f"outbox entry {outbox_id} not found")
            study_uid = row["study_uid"]
            cur = c.execute(
                "UPDATE outbox SET state = 'sent', last_error = '', updated_at = ? WHERE id = ? AND state = 'pending'",
                (wall, outbox_id),
            )
            if cur.rowcount != 1:
                self._event(
                    c, wall, "outbox", study_uid, row["state"], f"id={outbox_id} delivered while {row['state']}"
                )
            else:
                self._event(c, wall, "outbox", study_uid, "sent", f"id={outbox_id} to {row['destination']}")
                st = c.execute("SELECT sr_id FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
                left = c.execute(
                    "SELECT COUNT(*) FROM outbox WHERE study_uid = ? AND sr_id IS ? AND state != 'sent'",
                    (study_uid, row["sr_id"]),
                ).fetchone()[0]
                if left == 0 and st is not None and st["sr_id"] == row["sr_id"]:
                    study_done = self._cas_study(c, wall, study_uid, ("reported",), "sent", "")
                    if study_done:
                        moved = [
                            r[0]
                            for r in c.execute(
                                "SELECT sop_instance_uid FROM instances WHERE study_uid = ? AND sr_id IS ?"
                                " AND state IN ('reported', 'screened')",
                                (study_uid, row["sr_id"]),
                            ).fetchall()
                        ]
                        for uid in moved:
                            self._cas_instance(c, wall, uid, ("reported", "screened"), "sent", "")
        state = "sent" if cur.rowcount == 1 else row["state"]
        log.info("outbox_state", outbox_id=outbox_id, study_uid=study_uid, destination=row["destination"], state=state)
        if study_done:
            log.info("study_state", study_uid=study_uid, state="sent", instances=len(moved))
        return study_done

    def send_failed(self, outbox_id: int, error: str, give_up: bool) -> None:
        """Record a failed delivery (its next try was scheduled by `claim_send`). give_up=True: the row
        becomes `failed`, and its study (if this is its current SR) reported -> failed with the reason
        (listed by `failures`, undone by `resend`). `error` is the node's own words (no header value)."""
        wall = self._now()
        failed_study = False
        with self._tx() as c:
            row = c.execute(
                "SELECT study_uid, destination, attempts, sr_id, state FROM outbox WHERE id = ?", (outbox_id,)
            ).fetchone()
            if row is None:
                raise KeyError(f"outbox entry {outbox_id} not found")
            state = "failed" if give_up else "pending"
            cur = c.execute(
                "UPDATE outbox SET last_error = ?, state = ?, updated_at = ? WHERE id = ? AND state = 'pending'",
                (error, state, wall, outbox_id),
            )
            if cur.rowcount != 1:
                return
            self._event(
                c, wall, "outbox", row["study_uid"], state, f"id={outbox_id} attempt {row['attempts']}: {error}"
            )
            reason = f"sending to {row['destination']} failed after {row['attempts']} attempt(s): {error}"
            if give_up:
                st = c.execute("SELECT sr_id FROM studies WHERE study_uid = ?", (row["study_uid"],)).fetchone()
                if st is not None and st["sr_id"] == row["sr_id"]:
                    failed_study = self._cas_study(c, wall, row["study_uid"], ("reported",), "failed", reason)
        log.warning(
            "outbox_state",
            outbox_id=outbox_id,
            study_uid=row["study_uid"],
            destination=row["destination"],
            state=state,
            attempts=row["attempts"],
            error=error,
        )
        if failed_study:
            log.warning("study_state", study_uid=row["study_uid"], state="failed", reason=reason)

    def mark_attempt_failed(self, outbox_id: int, error: str, next_try_at: float, give_up: bool) -> None:
        """The former API (kept for fixtures): count an attempt, retry at wall-clock `next_try_at`
        (converted to the node clock) or give up. The node uses `claim_send` + `send_failed`."""
        delay = max(0.0, next_try_at - self._now())
        with self._tx() as c:
            c.execute(
                "UPDATE outbox SET attempts = attempts + 1, due_nt = ?, next_try_at = ?, updated_at = ?"
                " WHERE id = ? AND state = 'pending'",
                (self.node_time() + delay, next_try_at, self._now(), outbox_id),
            )
        self.send_failed(outbox_id, error, give_up)

    def resend(self, study_uid: str | None = None) -> int:
        """`screener resend`, in one transaction: failed deliveries of a study's *current* SR go back to
        pending (zero attempts, due now) and their study failed -> reported; failed deliveries of a
        superseded SR are cancelled (never re-sent: the PACS would get a stale SR last); a failed
        study without an SR (screening failed or quarantined) goes back to complete with zero
        attempts and its failed instances back to received. Returns the number of items re-queued."""
        wall = self._now()
        n = 0
        logs: list[tuple[str, str]] = []
        with self._tx() as c:
            where, params = ("", ()) if study_uid is None else (" AND o.study_uid = ?", (study_uid,))
            rows = c.execute(
                "SELECT o.id, o.study_uid, o.sr_id = s.sr_id AS current FROM outbox o JOIN studies s USING (study_uid)"
                " WHERE o.state = 'failed'" + where,
                params,
            ).fetchall()
            for r in rows:
                if r["current"]:
                    c.execute(
                        "UPDATE outbox SET state = 'pending', attempts = 0, due_nt = 0, next_try_at = ?, updated_at = ?"
                        " WHERE id = ? AND state = 'failed'",
                        (wall, wall, r["id"]),
                    )
                    self._event(c, wall, "outbox", r["study_uid"], "pending", f"id={r['id']} requeued")
                    n += 1
                else:
                    c.execute(
                        "UPDATE outbox SET state = 'cancelled', updated_at = ? WHERE id = ? AND state = 'failed'",
                        (wall, r["id"]),
                    )
                    self._event(c, wall, "outbox", r["study_uid"], "cancelled", f"id={r['id']} superseded SR")
            for uid in sorted({r["study_uid"] for r in rows if r["current"]}):
                if self._cas_study(c, wall, uid, ("failed",), "reported", "requeued for sending"):
                    logs.append((uid, "reported"))
            where, params = ("", ()) if study_uid is None else (" AND study_uid = ?", (study_uid,))
            for r in c.execute("SELECT study_uid FROM studies WHERE state = 'failed'" + where, params).fetchall():
                uid = r[0]
                if self._cas_study(
                    c, wall, uid, ("failed",), "complete", "re-queued by screener resend", screen_attempts=0
                ):
                    for i in c.execute(
                        "SELECT sop_instance_uid FROM instances WHERE study_uid = ? AND state = 'failed'", (uid,)
                    ).fetchall():
                        self._cas_instance(c, wall, i[0], ("failed",), "received", "re-queued by screener resend")
                    logs.append((uid, "complete"))
                    n += 1
        for uid, state in logs:
            log.info("study_state", study_uid=uid, state=state, previous="failed", reason="resend")
        return n

    def requeue_failed(self, study_uid: str | None = None) -> int:
        """Former name of `resend`."""
        return self.resend(study_uid)

    def ensure_outbox(self, destinations: Sequence[str]) -> int:
        """Repair (at start): a reported study whose current SR has no delivery row at all (a database
        written by schema 1, which committed these separately) gets one per destination."""
        if not destinations:
            return 0
        wall = self._now()
        nt = self.node_time()
        n = 0
        with self._tx() as c:
            for r in c.execute(
                "SELECT study_uid, sr_id, sr_path FROM studies s WHERE state = 'reported' AND sr_id IS NOT NULL"
                " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.study_uid = s.study_uid AND o.sr_id = s.sr_id)"
            ).fetchall():
                for d in destinations:
                    c.execute(
                        "INSERT INTO outbox (study_uid, sr_id, destination, sr_path, attempts, next_try_at, due_nt,"
                        " state, created_at, updated_at) VALUES (?, ?, ?, ?, 0, ?, ?, 'pending', ?, ?)",
                        (r["study_uid"], r["sr_id"], d, r["sr_path"], wall, nt, wall, wall),
                    )
                    self._event(c, wall, "outbox", r["study_uid"], "pending", f"to {d} (repair)")
                    n += 1
        if n:
            log.warning("outbox_repaired", rows=n)
        return n

    # -- retention --------------------------------------------------------------------------------

    def retention(self, older_than_days: float, now: float | None = None) -> RetentionStats:
        """Delete what is done with, in one transaction, then the files:

        * instances `sent` or `skipped` (never `received`, `reported` or `failed`) whose state has not
          changed for `older_than_days` (wall clock: a calendar period), unless their study is about
          to be screened again; their results go with them;
        * studies `sent` or `skipped` with no instance left, with their SR rows, deliveries and the
          node's SR copies;
        * superseded SR files as soon as no delivery of theirs is pending (a newer SR replaces them;
          they hold patient data and nothing will send them).

        The ``events`` audit trail is kept. A crash between the commit and the unlinks leaves files
        that no row names; recovery deletes them."""
        wall = self._now(now)
        cutoff = wall - older_than_days * 86400.0
        paths: list[str] = []
        studies: list[str] = []
        n_inst = n_sr = 0
        with self._tx() as c:
            open_states = ", ".join("'" + s + "'" for s in _OPEN_STUDY_STATES)
            insts = c.execute(
                "SELECT i.sop_instance_uid, i.study_uid, i.path FROM instances i JOIN studies s USING (study_uid)"
                f" WHERE i.state IN ('sent', 'skipped') AND i.updated_at < ? AND s.state NOT IN ({open_states})",
                (cutoff,),
            ).fetchall()
            touched: dict[str, int] = {}
            for r in insts:
                c.execute("DELETE FROM instances WHERE sop_instance_uid = ?", (r["sop_instance_uid"],))
                paths.append(r["path"])
                touched[r["study_uid"]] = touched.get(r["study_uid"], 0) + 1
            n_inst = len(insts)
            for uid, k in sorted(touched.items()):
                c.execute(
                    "UPDATE studies SET n_instances = (SELECT COUNT(*) FROM instances WHERE study_uid = ?)"
                    " WHERE study_uid = ?",
                    (uid, uid),
                )
                self._event(c, wall, "purge", uid, "purged", f"{k} instance(s), retention {older_than_days:g} days")
            for r in c.execute(
                "SELECT study_uid FROM studies s WHERE state IN ('sent', 'skipped') AND updated_at < ?"
                " AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.study_uid = s.study_uid)",
                (cutoff,),
            ).fetchall():
                uid = r[0]
                for sr in c.execute(
                    "SELECT path FROM srs WHERE study_uid = ? AND state != 'deleted'", (uid,)
                ).fetchall():
                    paths.append(sr[0])
                    n_sr += 1
                paths += [r[0] for r in c.execute("SELECT DISTINCT sr_path FROM outbox WHERE study_uid = ?", (uid,))]
                # ON DELETE CASCADE removes results, SR rows and outbox rows.
                c.execute("DELETE FROM studies WHERE study_uid = ?", (uid,))
                self._event(c, wall, "purge", uid, "purged", f"study, retention {older_than_days:g} days")
                studies.append(uid)
            for r in c.execute(
                "SELECT id, study_uid, path FROM srs WHERE state = 'superseded' AND NOT EXISTS"
                " (SELECT 1 FROM outbox o WHERE o.sr_id = srs.id AND o.state = 'pending')"
            ).fetchall():
                c.execute("UPDATE srs SET state = 'deleted', updated_at = ? WHERE id = ?", (wall, r["id"]))
                self._event(c, wall, "sr", r["study_uid"], "deleted", f"id={r['id']} superseded SR file deleted")
                paths.append(r["path"])
                paths += [  # its companion objects
                    o[0]
                    for o in c.execute(
                        "SELECT DISTINCT sr_path FROM outbox WHERE sr_id = ? AND sr_path != ?", (r["id"], r["path"])
                    )
                ]
                n_sr += 1
        if paths:
            crash.point("store.after_retention_commit")
        self._unlink_all(paths)
        for uid in studies:
            log.info("study_state", study_uid=uid, state="purged")
        stats = RetentionStats(instances=n_inst, studies=len(studies), sr_files=n_sr)
        if n_inst or studies or n_sr:
            log.info("retention_done", instances=n_inst, studies=len(studies), sr_files=n_sr)
        return stats

    def _unlink_all(self, paths: Iterable[str]) -> None:
        folders: set[Path] = set()
        for p in paths:
            if not p or Path(p).is_absolute() or ".." in Path(p).parts:
                continue
            full = self.abs_path(p)
            folders.add(full.parent)
            with contextlib.suppress(FileNotFoundError):
                full.unlink()
        for folder in folders:
            if folder not in (self.var_dir, self.spool_dir, self.sr_dir):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty

    # -- crash recovery ---------------------------------------------------------------------------

    def recover(self) -> RecoveryStats:
        """Crash recovery (module doc). Only the owner may run it, and only while no job runs."""
        if not self.owner:
            raise StoreError("recovery needs the var folder's lock (the node must not be running)")
        wall = self._now()
        with self._lock:
            known = {r[0] for r in self._conn.execute("SELECT path FROM instances")}
            known_sr = {r[0] for r in self._conn.execute("SELECT path FROM srs WHERE state != 'deleted'")}
            known_sr |= {  # companion objects delivered with an SR
                r[0]
                for r in self._conn.execute(
                    "SELECT o.sr_path FROM outbox o JOIN srs ON o.sr_id = srs.id WHERE srs.state != 'deleted'"
                )
            }
        parts = orphans = sr_orphans = 0
        on_disk: set[str] = set()
        for root, is_sr in ((self.spool_dir, False), (self.sr_dir, True)):
            if not root.is_dir():
                continue
            for folder in sorted(p for p in root.iterdir() if p.is_dir()):
                for f in folder.iterdir():
                    rel = f.relative_to(self.var_dir).as_posix()
                    if f.name.endswith(".part"):
                        f.unlink(missing_ok=True)
                        parts += 1
                    elif is_sr and rel not in known_sr:
                        f.unlink(missing_ok=True)  # written but never recorded, or deleted by retention
                        sr_orphans += 1
                    elif not is_sr and f.name.endswith(".dcm") and rel not in known:
                        # Renamed but never recorded: never acknowledged, the sender retries.
                        f.unlink(missing_ok=True)
                        orphans += 1
                        log.warning("orphan_removed", sop_instance_uid=f.name[: -len(".dcm")], study_uid=folder.name)
                    else:
                        on_disk.add(rel)
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only succeeds when empty
        crash.point("store.after_recovery_files")
        missing = known - on_disk
        lost: list[tuple[str, str]] = []
        resumed: list[str] = []
        rescreen: list[str] = []
        cancelled = 0
        with self._tx() as c:
            if missing:
                for r in c.execute(
                    "SELECT sop_instance_uid, study_uid, path FROM instances WHERE state IN ('received', 'screened')"
                ).fetchall():
                    if r["path"] in missing:
                        lost.append((r["sop_instance_uid"], r["study_uid"]))
            for sop, _study in lost:
                self._cas_instance(c, wall, sop, ("received", "screened"), "failed", "spool file missing")
            for r in c.execute("SELECT sop_instance_uid FROM instances WHERE state = 'screened'").fetchall():
                self._cas_instance(c, wall, r[0], ("screened",), "received", "restart: schema 1 state")
            resumed = [
                r[0] for r in c.execute("SELECT study_uid FROM studies WHERE state IN ('screening', 'screened')")
            ]
            for uid in resumed:
                self._cas_study(c, wall, uid, ("screening", "screened"), "complete", "restart: screening interrupted")
            # Reported/sent studies that break the invariant are screened again.
            for r in c.execute(
                "SELECT s.study_uid, s.state, s.sr_path FROM studies s WHERE s.state IN ('reported', 'sent')"
            ).fetchall():
                uid = r["study_uid"]
                unreported = c.execute(
                    "SELECT COUNT(*) FROM instances i JOIN studies s USING (study_uid) WHERE i.study_uid = ?"
                    " AND i.state NOT IN ('failed', 'skipped') AND (i.sr_id IS NOT s.sr_id OR s.sr_id IS NULL)",
                    (uid,),
                ).fetchone()[0]
                file_gone = r["state"] == "reported" and (not r["sr_path"] or r["sr_path"] not in on_disk)
                if unreported or file_gone:
                    why = "restart: SR file missing" if file_gone else "restart: instances not in the current SR"
                    cancelled += len(self._cancel_outbox(c, wall, uid, why))
                    self._cas_study(c, wall, uid, ("reported", "sent"), "complete", why)
                    rescreen.append(uid)
            # Deliveries still pending for an SR that is not the current one are never sent.
            for r in c.execute(
                "SELECT o.id, o.study_uid FROM outbox o JOIN studies s USING (study_uid)"
                " WHERE o.state IN ('pending', 'failed') AND o.sr_id IS NOT s.sr_id"
            ).fetchall():
                c.execute("UPDATE outbox SET state = 'cancelled', updated_at = ? WHERE id = ?", (wall, r["id"]))
                self._event(c, wall, "outbox", r["study_uid"], "cancelled", f"id={r['id']}: restart: superseded SR")
                cancelled += 1
        crash.point("store.after_recovery_commit")
        for sop, study in lost:
            log.warning(
                "instance_state", sop_instance_uid=sop, study_uid=study, state="failed", reason="spool file missing"
            )
        for uid in resumed:
            log.info("study_state", study_uid=uid, state="complete", previous="screening", reason="restart")
        for uid in rescreen:
            log.warning("study_state", study_uid=uid, state="complete", reason="restart: screened again")
        stats = RecoveryStats(parts, orphans, sr_orphans, len(lost), len(resumed), len(rescreen), cancelled)
        log.info(
            "store_recovered",
            part_files=parts,
            orphans=orphans,
            sr_orphans=sr_orphans,
            missing=len(lost),
            resumed=len(resumed),
            rescreen=len(rescreen),
            cancelled=cancelled,
        )
        return stats

    # -- invariants -------------------------------------------------------------------------------

    def check_invariants(self) -> list[str]:
        """What docs/state-machine.md promises of every committed state; returns the violations
        (empty when all hold). Read-only; `screener status` and the tests call it."""
        q = self._query
        bad = [message.format(*r) for sql, message in _INVARIANT_QUERIES for r in q(sql)]
        for r in q("SELECT study_uid, sr_path FROM studies WHERE state = 'reported'"):
            if r[1] and not self.abs_path(r[1]).is_file():
                bad.append(f"study {r[0]} is reported but its SR file is missing")
        for r in q("SELECT sop_instance_uid, path FROM instances WHERE state IN ('received', 'reported')"):
            if not self.abs_path(r[1]).is_file():
                bad.append(f"instance {r[0]} has no spool file")
        return bad


# Each query lists the rows that break one promise of docs/state-machine.md; the message names them.
_INVARIANT_QUERIES: tuple[tuple[str, str], ...] = (
    (
        "SELECT i.sop_instance_uid, i.state, s.study_uid, s.state AS study_state FROM instances i"
        " JOIN studies s USING (study_uid) WHERE s.state IN ('reported', 'sent')"
        " AND i.state NOT IN ('failed', 'skipped') AND (i.sr_id IS NOT s.sr_id OR s.sr_id IS NULL)",
        "instance {0} ({1}) is not in the current SR of its {3} study {2}",
    ),
    (
        "SELECT i.sop_instance_uid, i.state FROM instances i JOIN studies s USING (study_uid)"
        " WHERE s.state = 'sent' AND i.state NOT IN ('sent', 'failed', 'skipped')",
        "instance {0} is {1} in a sent study",
    ),
    (
        "SELECT sop_instance_uid, state FROM instances WHERE state IN ('failed', 'skipped') AND reason = ''",
        "instance {0} is {1} without a reason",
    ),
    (
        "SELECT study_uid, state FROM studies WHERE state IN ('failed', 'skipped') AND reason = ''",
        "study {0} is {1} without a reason",
    ),
    (
        "SELECT o.id, o.study_uid FROM outbox o JOIN studies s USING (study_uid)"
        " WHERE o.state IN ('pending', 'failed') AND o.sr_id IS NOT s.sr_id",
        "outbox {0} of study {1} would deliver an SR that is not current",
    ),
    (
        "SELECT o.id, o.study_uid, s.state FROM outbox o JOIN studies s USING (study_uid)"
        " WHERE o.state = 'pending' AND s.state NOT IN ('reported', 'failed')",
        "outbox {0} pending while study {1} is {2}",
    ),
    (
        "SELECT s.study_uid FROM studies s WHERE s.state = 'sent' AND EXISTS"
        " (SELECT 1 FROM outbox o WHERE o.study_uid = s.study_uid AND o.sr_id IS s.sr_id AND o.state != 'sent')",
        "study {0} is sent with a delivery of its current SR not sent",
    ),
    (
        "SELECT s.study_uid, s.state FROM studies s WHERE s.state IN ('reported', 'sent') AND NOT EXISTS"
        " (SELECT 1 FROM srs WHERE srs.id = s.sr_id AND srs.state = 'current')",
        "study {0} is {1} without a current SR",
    ),
    (
        "SELECT study_uid, COUNT(*) FROM srs WHERE state = 'current' GROUP BY study_uid HAVING COUNT(*) > 1",
        "study {0} has {1} current SRs",
    ),
)
