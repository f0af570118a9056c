"""Structured logging for both packages (structlog).

Events carry UIDs and states only. Patient name, ID and birth date must never be
logged: `scrub_phi` drops keys that look like PHI as a last line of defence.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

PHI_KEYS = frozenset(
    {
        "patient_name",
        "patientname",
        "patient_id",
        "patientid",
        "patient_birth_date",
        "patientbirthdate",
        "birth_date",
        "name",
        "other_patient_ids",
    }
)


def scrub_phi(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: replace values of PHI-looking keys."""
    for key in list(event_dict):
        if key.lower() in PHI_KEYS:
            event_dict[key] = "[removed]"
    return event_dict


class _Stderr:
    """Writes to whatever sys.stderr is at the time of writing (not at configure time)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(renderer: str = "console", level: str = "info", stream: Any = None) -> None:
    """Configure structlog once per process. renderer: 'console' or 'json'."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    final: Any
    if renderer == "json":
        final = structlog.processors.JSONRenderer(sort_keys=True)
    else:
        final = structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            scrub_phi,
            final,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=stream or _Stderr()),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
