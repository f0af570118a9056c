"""Routing rules: which engines run on an image, chosen from its DICOM attributes.

A rule matches when every attribute list it gives contains the image's value
(upper-cased; ``""`` in a list matches an absent attribute) and, if given, the
series description contains one of the listed substrings. The first matching
rule wins. An image no rule matches is skipped with the reason recorded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from screener.config import RoutingRule

ATTRIBUTES = {
    "modality": "Modality",
    "body_part": "BodyPartExamined",
    "view_position": "ViewPosition",
    "laterality": "Laterality",
}


@dataclass(frozen=True)
class Route:
    rule: str
    engines: tuple[str, ...]
    mirror: bool
    laterality: str  # "L", "R" or "" (for the SR's finding site modifier)


def _matches(rule: RoutingRule, attrs: Mapping[str, str]) -> bool:
    for field_name, attr in ATTRIBUTES.items():
        allowed = getattr(rule, field_name)
        if allowed and attrs.get(attr, "").upper() not in {a.upper() for a in allowed}:
            return False
    if rule.series_description_contains:
        desc = attrs.get("SeriesDescription", "").upper()
        if not any(s.upper() in desc for s in rule.series_description_contains):
            return False
    return True


def laterality_of(attrs: Mapping[str, str], mirror: bool) -> str:
    lat = attrs.get("Laterality", "").upper()
    if lat in ("L", "R"):
        return lat
    view = attrs.get("ViewPosition", "").upper()
    if view[:1] in ("L", "R") and view.endswith("O"):  # LAO, LPO, RAO, RPO
        return view[0]
    return "R" if mirror else ""


def route(attrs: Mapping[str, str], rules: Sequence[RoutingRule]) -> Route | None:
    """The first rule matching `attrs` (from `dicom_image.header_attributes`), or None."""
    for rule in rules:
        if _matches(rule, attrs):
            return Route(rule.name, tuple(rule.engines), rule.mirror, laterality_of(attrs, rule.mirror))
    return None


def describe(attrs: Mapping[str, str]) -> str:
    """A PHI-free description of the routing attributes, for skip reasons."""
    keys = ("Modality", "BodyPartExamined", "ViewPosition", "Laterality")
    return ", ".join(f"{k}={attrs.get(k, '') or '-'}" for k in keys)
