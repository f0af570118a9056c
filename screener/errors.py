"""Exceptions that carry a message meant for a person, not a traceback; failure reasons that carry
no patient data (`safe_reason`)."""

from __future__ import annotations

import re


class UserError(Exception):
    """A mistake in input or configuration: the CLI prints the message and exits non-zero."""


class ConfigError(UserError):
    """config.toml (or an override) is invalid; the message names the key."""


class ManifestError(UserError):
    """An engine folder's manifest is missing, malformed, or does not match its files."""


class DataError(UserError):
    """A data set cannot be read; the message names the file."""


# --------------------------------------------------------------------------------- safe reasons

# Two-letter DICOM value representations: a VR named in a library message is not patient data.
_VRS = frozenset(
    "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
_VR_PATTERNS = (
    re.compile(r"\bto '([A-Z]{2})'"),  # pydicom: Unable to convert '...' to 'DA'
    re.compile(r"\bVR '?([A-Z]{2})\b'?"),  # 'VR DA', "VR 'DA'"
    re.compile(r"\b([A-Z]{2}) value\b"),
)
_TAG_PATTERN = re.compile(r"\(([0-9A-Fa-f]{4}),\s*([0-9A-Fa-f]{4})\)")
_KEYWORD_PATTERN = re.compile(r"\b([A-Z][a-z]+(?:[A-Z][a-z0-9]*)+)\b")  # CamelCase words, checked below


def _dicom_keyword(text: str) -> str:
    """An attribute keyword named in `text` (by keyword or by tag), if pydicom knows it."""
    try:
        from pydicom.datadict import dictionary_VR, keyword_for_tag
    except ImportError:  # pragma: no cover - pydicom is a node dependency
        return ""
    for m in _TAG_PATTERN.finditer(text):
        kw = keyword_for_tag(int(m.group(1) + m.group(2), 16))
        if kw:
            return str(kw)
    for m in _KEYWORD_PATTERN.finditer(text):
        try:
            dictionary_VR(m.group(1))
        except KeyError:
            continue
        return m.group(1)
    return ""


def describe_problem(text: str) -> str:
    """What kind of problem a library message describes, in our words: the attribute keyword and
    the VR when the message names them, never any value from it ('' when nothing is recognised)."""
    parts = []
    keyword = _dicom_keyword(text)
    if keyword:
        parts.append(keyword)
    for pattern in _VR_PATTERNS:
        m = pattern.search(text)
        if m and m.group(1) in _VRS:
            parts.append(f"invalid {m.group(1)} value")
            break
    return ", ".join(parts)


def safe_reason(exc: BaseException, what: str, keyword: str = "") -> str:
    """A failure reason for the database, logs and status output, made of our own words: `what`
    failed, the exception's type, the attribute keyword (given, or recognised in the message) and
    the kind of problem (e.g. 'invalid DA value'). Never the exception's text, which can quote an
    element's value (pydicom: "Unable to convert '1923-04-05X' to 'DA'"). Our own `UserError`
    subclasses and OS errors keep their message, which we write (OS: the strerror only)."""
    if isinstance(exc, OSError) and not isinstance(exc, UserError):
        return f"{what}: {type(exc).__name__}" + (f" ({exc.strerror})" if exc.strerror else "")
    detail = describe_problem(str(exc))
    if keyword and keyword not in detail:
        detail = f"{keyword}, {detail}" if detail else keyword
    return f"{what}: {type(exc).__name__}" + (f" ({detail})" if detail else "")


_VALUE_START = re.compile(r"""['"`]|:\s|=|\bfor value\b|\bvalue of\b""", re.IGNORECASE)
_MESSAGE_MAX = 120


def scrub_message(text: str) -> str:
    """A library message without any value it may quote: cut at the first quote, ': ' or '=',
    digits runs of 4+ removed, at most 120 characters, plus the attribute keyword and VR when the
    message names them (`screener.errors.describe_problem`)."""
    first_line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    m = _VALUE_START.search(first_line)
    head = first_line[: m.start()] if m else first_line
    head = re.sub(r"\d{4,}", "#", head).strip(" .,;:-")[:_MESSAGE_MAX]
    problem = describe_problem(str(text))
    return f"{head} [{problem}]" if problem else head
