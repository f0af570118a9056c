"""Tests for trainer.data.oblique: the oblique-view loader (docs/stenosis-data.md)."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from screener.errors import DataError
from tests.conftest import write_sheet
from trainer.data.csxa import LoadReport
from trainer.data.oblique import ObliqueSample, load_oblique, parse_view, read_rectangle
from trainer.splits import SplitSpec, split_groups
from trainer.synth.oblique import describe_oblique, synthesize_oblique

N = 20
SEED = 11
HEADER = [
    "Number",
    "Gender:female-1,male-0",
    "Age",
    "View: L. left oblique; R. right oblique",
    "Stenosis: 1. Foraminal stenosis; 0. Normal",
]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize_oblique(tmp_path_factory.mktemp("obl") / "data", n=N, seed=SEED).root


def _rect_doc(points, label="cspine", shape_type="rectangle") -> dict:
    return {
        "version": "5.0.1",
        "flags": {},
        "imageData": None,
        "imageHeight": 80,
        "imageWidth": 60,
        "shapes": [{"label": label, "points": points, "shape_type": shape_type, "group_id": None, "flags": {}}],
    }


def _mini(root: Path, rows, docs: dict | None = None, header=HEADER, missing=()) -> Path:
    """rows: (number, gender, age, view, stenosis); a PNG for each unless number in `missing`."""
    (root / "datasets-PNG").mkdir(parents=True)
    (root / "datasets-JSON").mkdir(parents=True)
    write_sheet(root / "datasets.xlsx", rows, header, super_header="Oblique views")
    for number, gender, age, *_ in rows:
        if number in missing:
            continue
        stem = f"{number:04d}{gender}{age:02d}"
        cv2.imwrite(str(root / "datasets-PNG" / f"{stem}.png"), np.full((80, 60), 40, np.uint8))
    for stem, doc in (docs or {}).items():
        text = doc if isinstance(doc, str) else json.dumps(doc)
        (root / "datasets-JSON" / f"{stem}.json").write_text(text, encoding="utf-8")
    return root


# --- on the synthetic set -----------------------------------------------------------------------------


def test_loads_the_synthetic_set(synthetic: Path) -> None:
    samples, report = load_oblique(synthetic)
    infos = {i.file_id: i for i in describe_oblique(n=N, seed=SEED)}
    assert len(samples) == report.n_samples == N
    assert report.n_rows == N and report.rows_without_image == 0 and not report.skipped
    assert all(isinstance(s, ObliqueSample) for s in samples)
    for s in samples:
        info = infos[s.id]
        assert (s.view, s.label, s.number) == (info.view, info.label, info.number)
        assert s.mirror == (s.view == "R")
        if info.json_kind == "rect":
            assert s.box is not None and np.allclose(s.box, info.rect, atol=0.01)
        else:
            assert s.box is None
    assert Counter(s.view for s in samples).keys() == {"L", "R"}
    assert sum(s.label for s in samples) == round(0.35 * N)
    assert sum(s.box is not None for s in samples) == round(0.5 * N)


def test_left_and_right_of_a_patient_share_a_group(synthetic: Path) -> None:
    samples, _ = load_oblique(synthetic)
    infos = {i.file_id: i for i in describe_oblique(n=N, seed=SEED)}
    by_patient: dict[int, set[str]] = {}
    for s in samples:
        by_patient.setdefault(infos[s.id].patient, set()).add(s.group)
    assert all(len(g) == 1 for g in by_patient.values())
    assert len({next(iter(g)) for g in by_patient.values()}) == len(by_patient)  # one group per patient
    assert any(Counter(s.group for s in samples)[g] == 2 for g in {s.group for s in samples})
    splits = split_groups([s.group for s in samples], [s.label for s in samples], SplitSpec())
    where: dict[str, set[str]] = {}
    for s, split in zip(samples, splits):
        where.setdefault(s.group, set()).add(split)
    assert all(len(v) == 1 for v in where.values())
    replaced = dataclasses.replace(samples[0], box=(1.0, 2.0, 3.0, 4.0))  # how the build adds ROI boxes
    assert replaced.box == (1.0, 2.0, 3.0, 4.0)


# --- read_rectangle ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "points", [[[10, 20], [50, 70]], [[50, 70], [10, 20]], [[10, 70], [50, 20]], [[50.0, 20.0], [10.0, 70.0]]]
)
def test_rectangle_any_two_opposite_corners(tmp_path: Path, points) -> None:
    p = tmp_path / "a.json"
    p.write_text(json.dumps(_rect_doc(points)))
    report = LoadReport(root=str(tmp_path))
    assert read_rectangle(p, report) == (10.0, 20.0, 50.0, 70.0)
    assert not report.skipped


def test_rectangle_other_shapes_are_ignored(tmp_path: Path) -> None:
    doc = _rect_doc([[1, 2], [3, 4]], label="marker")
    doc["shapes"].append({"label": "cspine", "points": [[5, 5], [9, 9], [7, 2]], "shape_type": "polygon"})
    doc["shapes"].append({"label": "CSpine ", "points": [[5, 6], [30, 60]], "shape_type": "rectangle"})
    p = tmp_path / "a.json"
    p.write_text(json.dumps(doc))
    report = LoadReport(root=str(tmp_path))
    assert read_rectangle(p, report) == (5.0, 6.0, 30.0, 60.0)
    p.write_text(json.dumps({**doc, "shapes": doc["shapes"][:2]}))
    assert read_rectangle(p, report) is None and not report.skipped  # unannotated, not an error


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        json.dumps({"no": "shapes"}),
        json.dumps(_rect_doc([[10, 20]])),
        json.dumps(_rect_doc([[10, 20], [30]])),
        json.dumps(_rect_doc([["a", 20], [30, 40]])),
        json.dumps(_rect_doc([[10, 20], [10, 60]])),
        json.dumps(_rect_doc(None)),
        json.dumps(_rect_doc([[10, 20], [float("inf"), 40]])),
    ],
)
def test_rectangle_malformed_is_reported(tmp_path: Path, content: str) -> None:
    p = tmp_path / "a.json"
    p.write_text(content)
    report = LoadReport(root=str(tmp_path))
    assert read_rectangle(p, report) is None
    assert len(report.skipped) == 1 and report.skipped[0]["file"] == str(p)


# --- views -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("L", "L"),
        ("r", "R"),
        (" left ", "L"),
        ("RIGHT", "R"),
        ("LAO", "L"),
        ("lpo", "L"),
        ("RAO", "R"),
        ("Rpo", "R"),
        ("L.", "L"),
        ("left oblique", "L"),
        ("X", None),
        ("", None),
        (None, None),
        (1, None),
        ("lateral", None),
    ],
)
def test_parse_view(value, expected) -> None:
    assert parse_view(value) == expected


# --- bad input ---------------------------------------------------------------------------------------


def test_folder_without_sheet(tmp_path: Path) -> None:
    (tmp_path / "datasets-PNG").mkdir()
    with pytest.raises(DataError, match="datasets.xlsx"):
        load_oblique(tmp_path)
    with pytest.raises(DataError, match="not found"):
        load_oblique(tmp_path / "nope")


def test_unknown_column_layout(tmp_path: Path) -> None:
    header = [
        "Number",
        "Gender:female-1,male-0",
        "Age",
        "Disease classification: 1. Cervical spondylosis; 2. Healthy",
        "Curvature",
    ]
    root = _mini(tmp_path / "d", [(1, 0, 40, 1, 1)], header=header)
    with pytest.raises(DataError, match=r"datasets\.xlsx.*'View'"):
        load_oblique(root)


def test_bad_rows_are_skipped_and_counted(tmp_path: Path) -> None:
    rows = [
        (1, 0, 40, "L", 1),
        (2, 0, 40, "R", 0),
        (3, 1, 55, "AP", 1),
        (4, 1, 55, "R", 2),
        (5, 0, 61, "left", 0),
        (6, 0, 61, "RPO", "1"),
        (7, 1, 30, "L", 0),
        (8, None, 30, "R", 0),
    ]
    docs = {"0001040": _rect_doc([[5, 6], [40, 70]]), "0002040": "{broken", "0005061": _rect_doc([[5, 6]])}
    root = _mini(tmp_path / "d", rows, docs, missing=(7, 8))
    samples, report = load_oblique(root)
    assert [s.number for s in samples] == [1, 2, 5, 6]
    assert [s.view for s in samples] == ["L", "R", "L", "R"]
    assert [s.label for s in samples] == [1, 0, 0, 1]
    assert samples[0].box == (5.0, 6.0, 40.0, 70.0)
    assert samples[1].box is None and samples[2].box is None  # malformed JSON: kept, unannotated
    assert samples[0].group == samples[1].group != samples[2].group == samples[3].group
    assert report.rows_without_image == 1
    reasons = " | ".join(f"{s['file']}: {s['reason']}" for s in report.skipped)
    assert "0003155.png: unknown view 'AP'" in reasons
    assert "0004155.png: unknown stenosis value 2" in reasons
    assert "0002040.json: unreadable LabelMe JSON" in reasons
    assert "0005061.json: malformed 'cspine' rectangle" in reasons
    assert "row 10: missing gender or age" in reasons
    assert len(report.skipped) == 5


def test_no_usable_images(tmp_path: Path) -> None:
    root = _mini(tmp_path / "d", [(1, 0, 40, "sideways", 1), (2, 0, 40, "R", 1)], missing=(2,))
    with pytest.raises(DataError, match="no usable images"):
        load_oblique(root)


def test_images_found_recursively_and_unmatched_images_reported(tmp_path: Path) -> None:
    root = _mini(tmp_path / "d", [(1, 0, 40, "L", 0), (2, 0, 40, "R", 1)])
    nested = root / "datasets-PNG"
    target = root / "zip-top" / "datasets-PNG"
    target.parent.mkdir()
    nested.rename(target)
    cv2.imwrite(str(target / "0009040.png"), np.zeros((8, 8), np.uint8))
    cv2.imwrite(str(target / "scan.png"), np.zeros((8, 8), np.uint8))
    samples, report = load_oblique(root)
    assert [s.id for s in samples] == ["0001040", "0002040"]
    assert len(report.images_without_row) == 1 and len(report.skipped) == 2
