"""Routing as modalities send it (issue 10 item 6): View Position defined terms, View Code Sequence
codes, description patterns; side of the view decides mirroring; `screener route`."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from pydicom.dataset import Dataset

from screener import config
from screener.cli import main
from screener.config import RoutingRule, default_routing
from screener.dicom.image import header_attributes
from screener.engine import preprocessing as pp
from screener.routing import route, view_side
from tests.support.dicom_factory import make_dx, make_study_ids, save

RULES = default_routing()
STENOSIS = pp.RECIPES["roi_he"]


def attrs(view: str = "", code: str = "", desc: str = "", protocol: str = "", lat: str = "", modality: str = "DX"):
    return {
        "Modality": modality,
        "BodyPartExamined": "CSPINE",
        "ViewPosition": view,
        "Laterality": lat,
        "SeriesDescription": desc.upper(),
        "ProtocolName": protocol.upper(),
        "ViewCode": code,
        "ViewCodeMeaning": "",
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.1",
    }


@pytest.mark.parametrize(
    ("view", "rule", "side"),
    [
        ("LL", "lateral", ""),
        ("RL", "lateral", ""),
        ("LLO", "oblique", "L"),
        ("RLO", "oblique", "R"),
        ("LAO", "oblique", "L"),
        ("LPO", "oblique", "L"),
        ("RAO", "oblique", "R"),
        ("RPO", "oblique", "R"),
    ],
)
def test_view_position_defined_terms_and_aliases(view, rule, side):
    r = route(attrs(view), RULES)
    assert r is not None and r.rule == rule and r.laterality == side
    assert r.engines == (("spondylosis",) if rule == "lateral" else ("roi", "stenosis"))
    # mirroring follows the side of the view, not a rule flag
    assert STENOSIS.mirrors(r.laterality) == (side == "R")


@pytest.mark.parametrize("view", ["AP", "PA", "RLD", "LLD"])
def test_other_views_not_routed(view):
    assert route(attrs(view), RULES) is None
    assert route(attrs(view, desc="C-SPINE LAT"), RULES) is None  # a present View Position is believed


@pytest.mark.parametrize(
    ("code", "rule", "side"),
    [
        ("399067008", "lateral-by-view-code", ""),
        ("399173006", "lateral-by-view-code", ""),
        ("399198007", "lateral-by-view-code", ""),
        ("260421001", "oblique-by-view-code", "L"),
        ("260424009", "oblique-by-view-code", "R"),
        ("399184004", "oblique-by-view-code", "L"),
        ("399236003", "oblique-by-view-code", "R"),
    ],
)
def test_view_code_sequence(code, rule, side):
    r = route(attrs(code=code), RULES)
    assert r is not None and r.rule == rule and r.laterality == side
    assert "ViewCode" in r.why


@pytest.mark.parametrize(
    ("desc", "protocol", "rule", "side"),
    [
        ("C-SPINE LAT", "", "lateral-by-description", ""),
        ("", "XR CERVICAL SPINE LATERAL", "lateral-by-description", ""),
        ("C-SPINE OBL LEFT", "", "left-oblique-by-description", "L"),
        ("C SPINE RT OBLIQUE", "", "right-oblique-by-description", "R"),
        ("C-SPINE RPO", "", "right-oblique-by-description", "R"),
        ("C-SPINE LAT OBL", "", None, ""),  # an oblique without a side is not guessed
        ("C-SPINE AP", "", None, ""),
    ],
)
def test_description_patterns(desc, protocol, rule, side):
    r = route(attrs(desc=desc, protocol=protocol), RULES)
    assert (r.rule if r else None) == rule
    if r:
        assert r.laterality == side


def test_modality_must_be_cr_or_dx():
    assert route(attrs("LL", modality="CT"), RULES) is None
    assert route(attrs("LL", modality="CR"), RULES).rule == "lateral"


def test_side_order_and_configurable_rules():
    # view term beats image laterality; laterality is used when the view has no side
    assert view_side(attrs("RLO", lat="L"))[0] == "R"
    rule = RoutingRule("custom", ["roi", "stenosis"], view_position=["OBLIQUE"])
    assert route(attrs("OBLIQUE", lat="R"), [rule]).laterality == "R"
    assert route(attrs("OBLIQUE"), [rule]).laterality == ""
    forced = dataclasses.replace(rule, side="L")
    assert route(attrs("OBLIQUE", lat="R"), [forced]).laterality == "L"
    legacy = dataclasses.replace(rule, mirror=True)  # older configurations
    assert route(attrs("OBLIQUE"), [legacy]).laterality == "R"
    # the aliases are configurable: a site that removes them
    strict = [dataclasses.replace(RULES[1], view_position=["LLO", "RLO"])]
    assert route(attrs("LAO"), strict) is None


def test_bad_rules_rejected():
    with pytest.raises(config.ConfigError, match="description_pattern"):
        RoutingRule("x", ["spondylosis"], description_pattern=["(unclosed"])
    with pytest.raises(config.ConfigError, match="side"):
        RoutingRule("x", ["spondylosis"], side="LEFT")


def test_config_toml_lists_the_built_in_rules():
    assert config.load("config.toml").routing == default_routing()
    everything = {"engines": {"enabled": ["spondylosis", "roi", "stenosis"]}}
    assert config.parse(everything).routing == default_routing()
    # without [[routing]], the built-in rules serve the engines that are enabled
    assert [r.name for r in config.parse({}).routing] == ["lateral", "lateral-by-view-code", "lateral-by-description"]


def test_header_view_code_sequence_routes():
    ds = make_dx(np.zeros((8, 8), np.uint8), make_study_ids(), "")
    del ds.ViewPosition
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "260424009", "SCT", "right lateral oblique"
    ds.ViewCodeSequence = [item]
    r = route(header_attributes(ds), RULES)
    assert r.rule == "oblique-by-view-code" and r.laterality == "R"


def test_screener_route_cli(tmp_path, capsys):
    study = make_study_ids()
    files = []
    for name, view in (("lat", "LL"), ("rlo", "RLO"), ("ap", "AP")):
        ds = make_dx(np.zeros((8, 8), np.uint8), study, view)
        p = tmp_path / f"{name}.dcm"
        save(ds, p)
        files.append(str(p))
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    assert main(["route", "--config", "config.toml", *files]) == 0
    capsys.readouterr()
    assert main(["route", "--config", "config.toml", *files, str(junk)]) == 1  # a file it cannot read
    out = capsys.readouterr().out.splitlines()
    assert "rule lateral -> engines spondylosis" in out[0]
    assert "rule oblique -> engines roi, stenosis" in out[1] and "side: R (ViewPosition RLO)" in out[1]
    assert "skipped: no routing rule matches" in out[2] and "ViewPosition=AP" in out[2]
    assert "failed: not a readable DICOM file" in out[3]
    text = "\n".join(out)
    for phi in ("Test^Patient", "PID-TEST-1", "19700101", "ACC001", "C-SPINE"):
        assert phi not in text
