"""Structured logging for both packages (structlog).

Events carry UIDs and states only. Patient name, ID and birth date must never be
logged: `scrub_phi` drops keys that look like PHI as a last line of defence.

Libraries speak too: pydicom and highdicom issue Python warnings ("Invalid value for VR DA:
'1923-04-05X'", a patient name that breaks the PN rules, ...) and log through the standard
`logging` module. `configure` routes both into structlog as ``library_warning`` / ``library_log``
events whose message is cut before the first value it could quote (`scrub_message`), so that
nothing a library prints reaches stderr (the journal) verbatim.
"""

from __future__ import annotations

import logging
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import structlog

from screener.errors import describe_problem, scrub_message

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
        "accession_number",
        "accessionnumber",
        "patient_birthdate",
    }
)


def scrub_phi(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: replace values of PHI-looking keys."""
    for key in list(event_dict):
        if key.lower() in PHI_KEYS:
            event_dict[key] = "[removed]"
    return event_dict


def _show_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    module = filename.replace("\\", "/").rsplit("site-packages/", 1)[-1]
    structlog.get_logger("screener.warnings").warning(
        "library_warning", category=category.__name__, source=f"{module}:{lineno}", message=scrub_message(str(message))
    )


class _LibraryLogBridge(logging.Handler):
    """Standard-library log records (pydicom, highdicom, pynetdicom, ...) as scrubbed structlog events,
    without tracebacks (an exception text can quote a value)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = scrub_message(record.getMessage())
        except Exception:  # noqa: BLE001 - a broken record must not break the caller
            text = "(unprintable message)"
        structlog.get_logger("screener.libraries").log(
            record.levelno if record.levelno in (10, 20, 30, 40, 50) else logging.WARNING,
            "library_log",
            library=record.name,
            level_name=record.levelname.lower(),
            message=text,
            error_type=record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else None,
        )


_BRIDGE = _LibraryLogBridge(level=logging.WARNING)


def capture_library_output() -> None:
    """Route Python warnings and standard-library logging (WARNING and above) into scrubbed
    structlog events. Idempotent."""
    warnings.showwarning = _show_warning
    warnings.simplefilter("default")  # each distinct warning once per location, not once per image
    root = logging.getLogger()
    if _BRIDGE not in root.handlers:
        root.addHandler(_BRIDGE)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    # Libraries that attach their own stream handler would bypass the bridge.
    for name in ("pydicom", "highdicom", "pynetdicom"):
        lib = logging.getLogger(name)
        for h in list(lib.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                lib.removeHandler(h)
        lib.propagate = True


def scrub_exception(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: an exception is logged as its type, the attribute and kind of problem
    when recognised, and where it was raised (file:line of the last frames), never as its text or a
    rendered traceback (library messages quote element values)."""
    exc_info = event_dict.pop("exc_info", None)
    event_dict.pop("exception", None)
    if not exc_info:
        return event_dict
    if exc_info is True:
        exc_info = sys.exc_info()
    elif isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    etype, exc, tb = exc_info
    if etype is None:
        return event_dict
    event_dict["error_type"] = etype.__name__
    detail = describe_problem(str(exc))
    if detail:
        event_dict["error_detail"] = detail
    frames = traceback.extract_tb(tb)[-3:]
    event_dict["where"] = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames))
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
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        scrub_phi,
        scrub_exception,
        final,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=stream or _Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    capture_library_output()


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
