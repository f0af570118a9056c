"""The database schema (migrations) and the typed rows the Store returns."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from screener.errors import UserError

# States (docs/state-machine.md). "screened" is kept for databases written by schema 1: recovery
# moves such rows on (a screened instance back to received, a screened study back to complete).
INSTANCE_STATES = ("received", "screened", "reported", "sent", "skipped", "failed")
STUDY_STATES = ("receiving", "complete", "screening", "screened", "reported", "sent", "failed", "skipped")
_OUTBOX_STATES_V1 = ("pending", "sent", "failed")
OUTBOX_STATES = ("pending", "sent", "failed", "cancelled")
SR_STATES = ("current", "superseded", "deleted")
FINDINGS = ("present", "absent")
# Terminal instance states: nothing more happens to the instance unless it is received again.
INSTANCE_DONE = ("sent", "skipped", "failed")

DB_NAME = "screener.db"
LOCK_NAME = "screener.lock"
SPOOL_NAME = "spool"
BUSY_TIMEOUT_S = 30.0

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class StoreError(UserError):
    """The database cannot be used (e.g. it was written by a newer version)."""


def is_valid_uid(uid: str | None) -> bool:
    """A DICOM UID: digits and dots, 1 to 64 characters. Safe to use as a file or folder name."""
    return bool(uid) and len(uid) <= 64 and _UID_RE.match(uid) is not None  # type: ignore[arg-type]


def _in(states: Iterable[str]) -> str:
    return ", ".join("'" + s + "'" for s in states)


# Each migration is a list of statements; migration i brings user_version from i to i + 1.
MIGRATIONS: list[list[str]] = [
    [
        f"""
        CREATE TABLE studies (
            study_uid           TEXT PRIMARY KEY,
            state               TEXT NOT NULL CHECK (state IN ({_in(STUDY_STATES)})),
            first_received_at   REAL NOT NULL,
            last_received_at    REAL NOT NULL,
            n_instances         INTEGER NOT NULL DEFAULT 0,
            reason              TEXT NOT NULL DEFAULT '',
            sr_path             TEXT,
            sr_sop_instance_uid TEXT,
            updated_at          REAL NOT NULL
        )""",
        "CREATE INDEX studies_state ON studies (state, last_received_at)",
        f"""
        CREATE TABLE instances (
            sop_instance_uid TEXT PRIMARY KEY,
            sop_class_uid    TEXT NOT NULL,
            study_uid        TEXT NOT NULL REFERENCES studies (study_uid) ON DELETE CASCADE,
            series_uid       TEXT NOT NULL,
            transfer_syntax  TEXT NOT NULL,
            path             TEXT NOT NULL,
            size             INTEGER NOT NULL,
            calling_aet      TEXT NOT NULL,
            source_address   TEXT NOT NULL,
            received_at      REAL NOT NULL,
            n_received       INTEGER NOT NULL DEFAULT 1,
            state            TEXT NOT NULL CHECK (state IN ({_in(INSTANCE_STATES)})),
            reason           TEXT NOT NULL DEFAULT '',
            updated_at       REAL NOT NULL
        )""",
        "CREATE INDEX instances_study ON instances (study_uid)",
        "CREATE INDEX instances_state ON instances (state)",
        f"""
        CREATE TABLE results (
            sop_instance_uid TEXT NOT NULL REFERENCES instances (sop_instance_uid) ON DELETE CASCADE,
            engine           TEXT NOT NULL,
            engine_version   TEXT NOT NULL,
            backend          TEXT NOT NULL,
            probability      REAL NOT NULL CHECK (probability >= 0 AND probability <= 1),
            finding          TEXT NOT NULL CHECK (finding IN ({_in(FINDINGS)})),
            threshold        REAL NOT NULL,
            roi              TEXT,
            seconds          REAL NOT NULL,
            created_at       REAL NOT NULL,
            PRIMARY KEY (sop_instance_uid, engine)
        )""",
        f"""
        CREATE TABLE outbox (
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            study_uid   TEXT NOT NULL REFERENCES studies (study_uid) ON DELETE CASCADE,
            destination TEXT NOT NULL,
            sr_path     TEXT NOT NULL,
            attempts    INTEGER NOT NULL DEFAULT 0,
            next_try_at REAL NOT NULL,
            state       TEXT NOT NULL CHECK (state IN ({_in(_OUTBOX_STATES_V1)})),
            last_error  TEXT NOT NULL DEFAULT '',
            created_at  REAL NOT NULL,
            updated_at  REAL NOT NULL
        )""",
        "CREATE INDEX outbox_due ON outbox (state, next_try_at)",
        "CREATE INDEX outbox_study ON outbox (study_uid)",
        """
        CREATE TABLE events (
            id     INTEGER PRIMARY KEY AUTOINCREMENT,
            at     REAL NOT NULL,
            kind   TEXT NOT NULL,
            uid    TEXT NOT NULL,
            state  TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX events_uid ON events (uid)",
    ],
    # 2: the transactional state machine (docs/state-machine.md).
    #  - meta.node_time: the node clock (seconds of node uptime, summed over runs), persisted by every
    #    write transaction of the owner; deadlines below are on this clock, not the wall clock.
    #  - srs: every SR the node built for a study (the study's current one and the ones it superseded),
    #    with what the next SR needs to reference it (series, SOP class, instance number).
    #  - studies: current SR id, SR count, screening attempts, not-before for a retry after an error.
    #  - instances.sr_id: the SR that reports the instance.
    #  - outbox: rebuilt for the 'cancelled' state, the SR it carries and its due time on the node clock.
    [
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value REAL NOT NULL)",
        "INSERT INTO meta (key, value) VALUES ('node_time', 0)",
        f"""
        CREATE TABLE srs (
            id               INTEGER PRIMARY KEY AUTOINCREMENT,
            study_uid        TEXT NOT NULL REFERENCES studies (study_uid) ON DELETE CASCADE,
            sop_instance_uid TEXT NOT NULL,
            series_uid       TEXT NOT NULL DEFAULT '',
            sop_class_uid    TEXT NOT NULL DEFAULT '',
            instance_number  INTEGER NOT NULL DEFAULT 1,
            path             TEXT NOT NULL,
            state            TEXT NOT NULL CHECK (state IN ({_in(SR_STATES)})),
            n_sources        INTEGER NOT NULL DEFAULT 0,
            created_at       REAL NOT NULL,
            updated_at       REAL NOT NULL
        )""",
        "CREATE INDEX srs_study ON srs (study_uid)",
        "ALTER TABLE studies ADD COLUMN last_received_nt REAL NOT NULL DEFAULT 0",
        "ALTER TABLE studies ADD COLUMN sr_id INTEGER",
        "ALTER TABLE studies ADD COLUMN sr_count INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE studies ADD COLUMN screen_attempts INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE studies ADD COLUMN not_before_nt REAL NOT NULL DEFAULT 0",
        "ALTER TABLE instances ADD COLUMN sr_id INTEGER",
        # Schema 1 SRs become the current SR of their study (series and class unknown: not referenced).
        "INSERT INTO srs (study_uid, sop_instance_uid, path, state, created_at, updated_at)"
        " SELECT study_uid, COALESCE(sr_sop_instance_uid, ''), sr_path, 'current', updated_at, updated_at"
        " FROM studies WHERE sr_path IS NOT NULL",
        "UPDATE studies SET sr_id = (SELECT id FROM srs WHERE srs.study_uid = studies.study_uid), sr_count = 1"
        " WHERE sr_path IS NOT NULL",
        "UPDATE instances SET sr_id = (SELECT sr_id FROM studies s WHERE s.study_uid = instances.study_uid)"
        " WHERE state IN ('reported', 'sent')",
        f"""
        CREATE TABLE outbox2 (
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            study_uid   TEXT NOT NULL REFERENCES studies (study_uid) ON DELETE CASCADE,
            sr_id       INTEGER,
            destination TEXT NOT NULL,
            sr_path     TEXT NOT NULL,
            attempts    INTEGER NOT NULL DEFAULT 0,
            next_try_at REAL NOT NULL,
            due_nt      REAL NOT NULL DEFAULT 0,
            state       TEXT NOT NULL CHECK (state IN ({_in(OUTBOX_STATES)})),
            last_error  TEXT NOT NULL DEFAULT '',
            created_at  REAL NOT NULL,
            updated_at  REAL NOT NULL
        )""",
        "INSERT INTO outbox2 (id, study_uid, sr_id, destination, sr_path, attempts, next_try_at, due_nt, state,"
        " last_error, created_at, updated_at)"
        " SELECT o.id, o.study_uid, (SELECT id FROM srs WHERE srs.study_uid = o.study_uid AND srs.path = o.sr_path),"
        " o.destination, o.sr_path, o.attempts, o.next_try_at, 0, o.state, o.last_error, o.created_at, o.updated_at"
        " FROM outbox o",
        "DROP TABLE outbox",
        "ALTER TABLE outbox2 RENAME TO outbox",
        "CREATE INDEX outbox_due ON outbox (state, due_nt)",
        "CREATE INDEX outbox_study ON outbox (study_uid)",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)
# Schema 1 as the first release created it (tests build old databases with it).
MIGRATIONS_V1_FOR_TESTS: list[str] = list(MIGRATIONS[0])


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceRow:
    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    path: str  # relative to var_dir; see Store.abs_path
    size: int
    calling_aet: str
    source_address: str
    received_at: float
    n_received: int
    state: str
    reason: str
    updated_at: float
    sr_id: int | None = None  # the SR that reports this instance (srs.id)


@dataclass(frozen=True)
class StudyRow:
    study_uid: str
    state: str
    first_received_at: float
    last_received_at: float
    n_instances: int
    reason: str
    sr_path: str | None
    sr_sop_instance_uid: str | None
    updated_at: float
    last_received_nt: float = 0.0  # node clock (see Store.node_time)
    sr_id: int | None = None  # the current SR (srs.id)
    sr_count: int = 0  # SRs built for this study so far (the next one gets instance number sr_count + 1)
    screen_attempts: int = 0  # screening passes started since the last success (quarantine counter)
    not_before_nt: float = 0.0  # node clock: not screened before this (retry after an error)


@dataclass(frozen=True)
class ResultRow:
    sop_instance_uid: str
    engine: str
    engine_version: str
    backend: str
    probability: float
    finding: str  # present | absent
    threshold: float
    roi: Any  # parsed JSON (dict/list) or None
    seconds: float
    created_at: float


@dataclass(frozen=True)
class OutboxRow:
    id: int
    study_uid: str
    destination: str  # AET@HOST:PORT, or folder:PATH for sr_folder
    sr_path: str
    attempts: int
    next_try_at: float  # wall clock, for display; the schedule is due_nt
    state: str
    last_error: str
    created_at: float
    updated_at: float
    sr_id: int | None = None
    due_nt: float = 0.0  # node clock


@dataclass(frozen=True)
class SRRow:
    """One SR the node built for a study."""

    id: int
    study_uid: str
    sop_instance_uid: str
    series_uid: str
    sop_class_uid: str
    instance_number: int
    path: str  # relative to var_dir
    state: str  # current | superseded | deleted
    n_sources: int
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class SRInfo:
    """What `Store.finish_study` records about a newly written SR."""

    sop_instance_uid: str
    series_uid: str
    sop_class_uid: str
    instance_number: int
    path: str  # relative to var_dir


@dataclass(frozen=True)
class InstanceResult:
    """One instance's screening outcome as `Store.finish_study` records it."""

    sop_instance_uid: str
    state: str  # reported (in the SR) | skipped | failed
    reason: str = ""
    results: tuple[dict[str, Any], ...] = ()  # record_result keyword arguments (engine, probability, ...)


@dataclass(frozen=True)
class EventRow:
    id: int
    at: float
    kind: str  # instance | study | outbox | result | purge | recovery
    uid: str
    state: str
    detail: str


@dataclass(frozen=True)
class Failure:
    kind: str  # study | instance | outbox
    uid: str  # study or SOP instance UID; for outbox the study UID
    state: str
    reason: str
    updated_at: float
    destination: str = ""
    outbox_id: int | None = None


@dataclass(frozen=True)
class StoreOutcome:
    sop_instance_uid: str
    study_uid: str
    path: Path  # absolute path of the spool file
    size: int
    duplicate: bool  # the SOP Instance UID was already known
    study_reopened: bool  # the study was in a later state and went back to receiving
    new_study: bool


_INSTANCE_COLS = ", ".join(InstanceRow.__dataclass_fields__)
_STUDY_COLS = ", ".join(StudyRow.__dataclass_fields__)
_OUTBOX_COLS = ", ".join(OutboxRow.__dataclass_fields__)
_SR_COLS = ", ".join(SRRow.__dataclass_fields__)
_EVENT_COLS = ", ".join(EventRow.__dataclass_fields__)


def _result_row(row: sqlite3.Row) -> ResultRow:
    d = dict(row)
    d["roi"] = json.loads(d["roi"]) if d["roi"] is not None else None
    return ResultRow(**d)
