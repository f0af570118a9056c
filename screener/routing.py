"""Routing rules: which engines run on an image, chosen from its DICOM attributes.

A rule matches when every attribute list it gives contains the image's value (upper-cased;
``""`` in a list matches an absent attribute): Modality, Body Part Examined, View Position,
Laterality and the code value of the first View Code Sequence (0054,0220) item; if given, the
series description contains one of ``series_description_contains`` and one of the
``description_pattern`` regular expressions is found (case-insensitive) in the Series Description
or the Protocol Name. The first matching rule wins. An image no rule matches is skipped with the
reason recorded. The built-in rules (`screener.config.default_routing`) route by View Position's
defined terms, then View Code Sequence codes, then description patterns.

The side of the view ("L" or "R": which oblique it is) decides whether an engine whose recipe
mirrors right views (stenosis) flips the image, and is the SR's finding-site laterality. It comes,
first found, from: the rule's ``side``; the View Position term (LLO, LAO, LPO -> L; RLO, RAO, RPO
-> R); the View Code (260421001 left lateral oblique, 399184004 left oblique -> L; 260424009,
399236003 -> R); Image Laterality / Laterality; an older rule's ``mirror = true`` (-> R).
Lateral views (LL, RL) carry no side: the lateral engine is not lateralised.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from screener.config import RoutingRule

ATTRIBUTES = {
    "modality": "Modality",
    "body_part": "BodyPartExamined",
    "view_position": "ViewPosition",
    "laterality": "Laterality",
    "view_code": "ViewCode",
}

VIEW_POSITION_SIDES = {"LLO": "L", "LAO": "L", "LPO": "L", "RLO": "R", "RAO": "R", "RPO": "R"}
VIEW_CODE_SIDES = {"260421001": "L", "399184004": "L", "260424009": "R", "399236003": "R"}


@dataclass(frozen=True)
class Route:
    rule: str
    engines: tuple[str, ...]
    mirror: bool
    laterality: str  # "L", "R" or "": the side of the view (mirroring, SR finding site modifier)
    why: str = ""  # which attributes matched and where the side came from (no header values but codes)


def _matches(rule: RoutingRule, attrs: Mapping[str, str]) -> str | None:
    """None when `rule` does not match; else a short PHI-free explanation of the match."""
    why = []
    for field_name, attr in ATTRIBUTES.items():
        allowed = getattr(rule, field_name)
        if not allowed:
            continue
        value = attrs.get(attr, "").upper()
        if value not in {a.upper() for a in allowed}:
            return None
        why.append(f"{attr}={value}" if value else f"{attr} absent")
    if rule.series_description_contains:
        desc = attrs.get("SeriesDescription", "").upper()
        hit = next((s for s in rule.series_description_contains if s.upper() in desc), None)
        if hit is None:
            return None
        why.append(f"SeriesDescription contains {hit.upper()!r}")
    if rule.description_pattern:
        hit = _description_hit(rule.description_pattern, attrs)
        if hit is None:
            return None
        why.append(hit)
    return ", ".join(why) or "rule has no conditions"


def _description_hit(patterns: Sequence[str], attrs: Mapping[str, str]) -> str | None:
    for keyword in ("SeriesDescription", "ProtocolName"):
        text = attrs.get(keyword, "")
        if not text:
            continue
        for pattern in patterns:
            if re.search(pattern, text, re.IGNORECASE):
                return f"{keyword} matches /{pattern}/"
    return None


def view_side(attrs: Mapping[str, str], rule: RoutingRule | None = None) -> tuple[str, str]:
    """(side, where it came from): see the module doc for the order."""
    if rule is not None and rule.side:
        return rule.side.upper(), f"rule {rule.name} side"
    view = attrs.get("ViewPosition", "").upper()
    if view in VIEW_POSITION_SIDES:
        return VIEW_POSITION_SIDES[view], f"ViewPosition {view}"
    code = attrs.get("ViewCode", "")
    if code in VIEW_CODE_SIDES:
        return VIEW_CODE_SIDES[code], f"ViewCodeSequence {code}"
    lat = attrs.get("Laterality", "").upper()
    if lat in ("L", "R"):
        return lat, "ImageLaterality/Laterality"
    if rule is not None and rule.mirror:
        return "R", f"rule {rule.name} mirror"
    return "", "no side"


def laterality_of(attrs: Mapping[str, str], mirror: bool) -> str:
    """The side of the view (kept for callers of the older API)."""
    side, _ = view_side(attrs, RoutingRule("", [], mirror=mirror))
    return side


def route(attrs: Mapping[str, str], rules: Sequence[RoutingRule]) -> Route | None:
    """The first rule matching `attrs` (from `dicom_image.header_attributes`), or None."""
    for rule in rules:
        why = _matches(rule, attrs)
        if why is not None:
            side, source = view_side(attrs, rule)
            return Route(rule.name, tuple(rule.engines), side == "R", side, f"{why}; side: {side or '-'} ({source})")
    return None


def describe(attrs: Mapping[str, str]) -> str:
    """A PHI-free description of the routing attributes, for skip reasons (coded values only)."""
    keys = ("Modality", "BodyPartExamined", "ViewPosition", "Laterality", "ViewCode")
    return ", ".join(f"{k}={attrs.get(k, '') or '-'}" for k in keys)


def explain_file(path: str, rules: Sequence[RoutingRule], limits: object | None = None) -> str:
    """One line for `screener route FILE`: the rule and engines the file gets, and why; coded
    attribute values only (no names, IDs, dates or descriptions)."""
    from screener.dicom.image import SCREENED_SOP_CLASSES, ImageDecodeError, header_attributes, read_spooled

    try:
        ds = read_spooled(path, limits)  # type: ignore[arg-type]
    except ImageDecodeError as exc:
        return f"{path}: failed: {exc.reason}"
    attrs = header_attributes(ds)
    if attrs["SOPClassUID"] not in SCREENED_SOP_CLASSES:
        return f"{path}: skipped: SOP class {attrs['SOPClassUID']} is not CR or DX"
    r = route(attrs, rules)
    if r is None:
        return f"{path}: skipped: no routing rule matches ({describe(attrs)})"
    return f"{path}: rule {r.rule} -> engines {', '.join(r.engines)}; because {r.why}"
