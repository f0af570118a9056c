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
        from pydicom.datadict import keyword_for_tag
    except ImportError:  # pragma: no cover - pydicom is a node dependency
        return ""
    for m in _TAG_PATTERN.finditer(text):
        kw = keyword_for_tag(int(m.group(1) + m.group(2), 16))
        if kw:
            return str(kw)
    for m in _KEYWORD_PATTERN.finditer(text):
        if _is_keyword(m.group(1)):
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


_QUOTE = re.compile(r"""['"`]""")
_MESSAGE_MAX = 160
_WORD = re.compile(r"^[a-z]+(?:-[a-z]+)*$")
_SAFE_UPPER = frozenset({"DICOM", "UID", "VR", "VM", "SR", "TLS", "ID", "LUT", "VOI", "IOD", "SOP", "JPEG", "RLE"})


def _safe_token(token: str, first: bool) -> bool:
    word = token.strip(".,;:()[]!?")
    if not word:
        return True
    if _WORD.match(word) or word in _VRS or word in _SAFE_UPPER:
        return True
    if first and word.isalpha() and word[0].isupper() and word[1:].islower():
        return True  # a sentence's first word
    return word.isalpha() and _is_keyword(word)  # a DICOM keyword such as PatientBirthDate


def _is_keyword(word: str) -> bool:
    try:
        from pydicom.datadict import tag_for_keyword
    except ImportError:  # pragma: no cover - pydicom is a node dependency
        return False
    return tag_for_keyword(word) is not None


def scrub_message(text: str) -> str:
    """A library message reduced to words that cannot be patient data: cut at the first quote
    (values are usually quoted), then every token that is not a lower-case word, a DICOM keyword, a
    VR or a short technical acronym (names, IDs, dates, numbers, ...) replaced by '…'; at most 160
    characters, plus the attribute keyword and VR when the message names them."""
    first_line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    m = _QUOTE.search(first_line)
    head = first_line[: m.start()] if m else first_line
    kept: list[str] = []
    for i, token in enumerate(head.split()):
        piece = token if _safe_token(token, i == 0) else "…"
        if piece == "…" and kept and kept[-1] == "…":
            continue
        kept.append(piece)
    cleaned = " ".join(kept).strip(" .,;:-")[:_MESSAGE_MAX]
    problem = describe_problem(str(text))
    return f"{cleaned} [{problem}]" if problem else cleaned
