"""Durable state: the spool folder and the SQLite database.

``schema`` holds the migrations and the typed rows, ``files`` the one atomic-file writer, ``store``
the `Store` (its module docstring is the durability contract), ``crash`` the named crash points.
The state machine: docs/state-machine.md."""

from screener.store.files import atomic_write, fsync_dir
from screener.store.schema import (
    BUSY_TIMEOUT_S,
    DB_NAME,
    FINDINGS,
    INSTANCE_STATES,
    LOCK_NAME,
    MIGRATIONS_V1_FOR_TESTS,
    OUTBOX_STATES,
    SCHEMA_VERSION,
    SPOOL_NAME,
    SR_STATES,
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
    is_valid_uid,
)
from screener.store.store import Picked, RecoveryStats, RetentionStats, Store

__all__ = [
    "Store",
    "atomic_write",
    "fsync_dir",
    "INSTANCE_STATES",
    "STUDY_STATES",
    "OUTBOX_STATES",
    "FINDINGS",
    "DB_NAME",
    "LOCK_NAME",
    "SPOOL_NAME",
    "BUSY_TIMEOUT_S",
    "StoreError",
    "is_valid_uid",
    "SCHEMA_VERSION",
    "InstanceRow",
    "StudyRow",
    "ResultRow",
    "OutboxRow",
    "EventRow",
    "Failure",
    "StoreOutcome",
    "SR_STATES",
    "MIGRATIONS_V1_FOR_TESTS",
    "SRRow",
    "SRInfo",
    "InstanceResult",
    "Picked",
    "RetentionStats",
    "RecoveryStats",
]
