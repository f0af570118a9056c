"""Tests for trainer.synth.oblique: the synthetic oblique set must match docs/stenosis-data.md."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from screener.engine import preprocessing as pp
from tests.support.sheets import read_sheet
from trainer.synth import SynthResult
from trainer.synth import oblique as so
from trainer.synth.oblique import ImageInfo, describe_oblique, synthesize_oblique

N = 50  # >= 50: the set has a row without an image
SEED = 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> SynthResult:
    return synthesize_oblique(tmp_path_factory.mktemp("oblique") / "data", n=N, seed=SEED)


@pytest.fixture(scope="module")
def infos() -> list[ImageInfo]:
    return describe_oblique(n=N, seed=SEED)


def _records(root: Path) -> list[dict]:
    _, names, rows = read_sheet(root)
    idx = {
        k: next(i for i, n in enumerate(names) if n.startswith(p))
        for k, p in (
            ("number", "Number"),
            ("gender", "Gender"),
            ("age", "Age"),
            ("view", "View"),
            ("stenosis", "Stenosis"),
        )
    }
    return [{k: r[i] for k, i in idx.items()} for r in rows]


def _pngs(root: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted((root / "datasets-PNG").glob("*.png"))}


def _jsons(root: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted((root / "datasets-JSON").glob("*.json"))}


def _gray(path: Path) -> np.ndarray:
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    return pp.fix_polarity(pp.to_gray8(raw, "BGR"))[0]


def _rects(doc: dict) -> list[dict]:
    return [s for s in doc["shapes"] if s["label"] == "cspine" and s["shape_type"] == "rectangle"]


# --- layout, sheet, patients ---------------------------------------------------------------------


def test_layout_and_sheet_columns(dataset: SynthResult) -> None:
    root = dataset.root
    super_header, names, _ = read_sheet(root)
    assert any(v for v in super_header)  # row 1 is a super-header, row 2 the column names
    assert names[:5] == [
        "Number",
        "Gender:female-1,male-0",
        "Age",
        "View: L. left oblique; R. right oblique",
        "Stenosis: 1. Foraminal stenosis; 0. Normal",
    ]
    records = _records(root)
    assert [r["number"] for r in records] == list(range(1, len(records) + 1))
    pngs = _pngs(root)
    assert dataset.n_images == N == len(pngs)
    assert dataset.n_rows == len(records) == N + 1  # one row without an image (n >= 50)
    assert set(_jsons(root)) <= set(pngs)


def test_ids_join_on_number_and_rows_without_image(dataset: SynthResult) -> None:
    records = {r["number"]: r for r in _records(dataset.root)}
    stems = _pngs(dataset.root)
    for stem in stems:
        assert len(stem) == 7 and stem.isdigit()
        rec = records[int(stem[:4])]
        assert (int(stem[4]), int(stem[5:])) == (rec["gender"], rec["age"])
    assert len(set(records) - {int(s[:4]) for s in stems}) == 1


def test_patients_have_a_left_and_a_right_view(dataset: SynthResult) -> None:
    records = _records(dataset.root)
    assert {r["view"] for r in records} == {"L", "R"}
    runs: list[list[dict]] = []
    for r in records:
        if runs and (runs[-1][0]["gender"], runs[-1][0]["age"]) == (r["gender"], r["age"]):
            runs[-1].append(r)
        else:
            runs.append([r])
    for run in runs:  # one patient: at most one view of each side
        assert len(run) <= 2 and len({r["view"] for r in run}) == len(run)
    assert sum(len(run) == 2 for run in runs) >= 0.7 * len(runs)
    # over a larger plan, some patients have only one view
    _, rows = so._plan(200, 0, 0.35, 0.5)
    per_patient = Counter(r.patient for r in rows)
    assert 1 in per_patient.values() and 2 in per_patient.values()


def test_labels_and_positive_fraction(dataset: SynthResult) -> None:
    records = {r["number"]: r for r in _records(dataset.root)}
    labels = [records[int(s[:4])]["stenosis"] for s in _pngs(dataset.root)]
    assert set(labels) == {0, 1}
    assert sum(labels) == round(0.35 * N)
    assert dataset.n_healthy == labels.count(0)


# --- annotations and ROI --------------------------------------------------------------------------


def test_annotated_fraction_and_rectangles(dataset: SynthResult, infos: list[ImageInfo]) -> None:
    by_id = {i.file_id: i for i in infos}
    pngs, jsons = _pngs(dataset.root), _jsons(dataset.root)
    with_rect = without = 0
    for stem, path in jsons.items():
        doc = json.loads(path.read_text(encoding="utf-8"))
        h, w = cv2.imread(str(pngs[stem]), cv2.IMREAD_UNCHANGED).shape[:2]
        assert (doc["imageHeight"], doc["imageWidth"]) == (h, w)
        rects = _rects(doc)
        if not rects:
            without += 1
            assert by_id[stem].json_kind in ("empty", "other")
            continue
        with_rect += 1
        (ax, ay), (bx, by) = rects[0]["points"]
        x0, x1, y0, y1 = min(ax, bx), max(ax, bx), min(ay, by), max(ay, by)
        assert 0 <= x0 < x1 <= w - 1 and 0 <= y0 < y1 <= h - 1
        info = by_id[stem]
        assert np.allclose((x0, y0, x1, y1), info.box, atol=0.3 * info.u)  # the ROI, by a careful hand
    assert with_rect == round(0.5 * N)
    assert without == 2  # two JSON files without the rectangle
    assert sum(1 for i in infos if i.json_kind == "none") == N - with_rect - without


def test_roi_box_is_sensible_for_every_image(infos: list[ImageInfo]) -> None:
    for i in infos:
        x0, y0, x1, y1 = i.box
        assert 0 <= x0 < x1 <= i.width - 1 and 0 <= y0 < y1 <= i.height - 1
        pts = np.array(i.foramen_centres + i.body_centres)
        assert np.all(pts[:, 0] > x0) and np.all(pts[:, 0] < x1)
        assert np.all(pts[:, 1] > y0) and np.all(pts[:, 1] < y1)
        assert 1.8 * i.u < x1 - x0 < 4.5 * i.u  # bodies + foramina, not the whole neck
        assert 7.0 * i.u < y1 - y0 < 12.0 * i.u  # dens to C7
        assert (x1 - x0) * (y1 - y0) < 0.5 * i.width * i.height


def test_describe_matches_the_written_files(dataset: SynthResult, infos: list[ImageInfo]) -> None:
    assert [i.file_id for i in infos] == sorted(_pngs(dataset.root))
    assert {i.file_id for i in infos if i.json_kind != "none"} == set(_jsons(dataset.root))
    for i in infos[:8]:
        h, w = cv2.imread(str(dataset.root / "datasets-PNG" / f"{i.file_id}.png"), cv2.IMREAD_UNCHANGED).shape[:2]
        assert (h, w) == (i.height, i.width)


# --- geometry and pixels ---------------------------------------------------------------------------


def test_left_and_right_views_are_mirrored(infos: list[ImageInfo]) -> None:
    for i in infos:
        offset = np.mean(np.array(i.foramen_centres)[:, 0] - np.array(i.body_centres)[:-1, 0])
        assert abs(offset) > 0.5 * i.u
        assert np.sign(offset) == (1 if i.view == "L" else -1), i.file_id


def test_stenosis_narrows_foramina(infos: list[ImageInfo]) -> None:
    for i in infos:
        if i.label == 0:
            assert i.severity == 0 and min(i.foramen_area_ratio) > 0.85
        else:
            sev = [s for s in i.level_severity if s > 0]
            assert 1 <= len(sev) <= 3 and all(0.3 <= s <= 1.0 for s in sev)
            narrowed = [a for a, s in zip(i.foramen_area_ratio, i.level_severity) if s > 0]
            assert max(narrowed) < 0.85


def _disk_mean(g: np.ndarray, c: tuple[float, float], r: float) -> float:
    m = np.zeros(g.shape, np.uint8)
    cv2.circle(m, (int(round(c[0])), int(round(c[1]))), max(1, int(r)), 1, -1)
    return float(g[m > 0].mean())


def test_foramina_are_visible_and_narrowing_shows(dataset: SynthResult, infos: list[ImageInfo]) -> None:
    open_darker = open_total = 0
    for i in infos:
        g = _gray(dataset.root / "datasets-PNG" / f"{i.file_id}.png")
        ped = [_disk_mean(g, c, 0.1 * i.u) for c in i.pedicle_centres]
        for k, s in enumerate(i.level_severity):
            if s == 0:  # an open foramen is darker than the pedicles above and below it
                open_total += 1
                open_darker += _disk_mean(g, i.foramen_centres[k], 0.12 * i.u) < (ped[k] + ped[k + 1]) / 2
        if i.label:
            open_mean = np.mean(
                [_disk_mean(g, i.foramen_centres[k], 0.28 * i.u) for k, s in enumerate(i.level_severity) if s == 0]
            )
            for k, s in enumerate(i.level_severity):
                if s >= 0.6:  # a clearly narrowed foramen is filled with bone: brighter than the open ones
                    assert _disk_mean(g, i.foramen_centres[k], 0.28 * i.u) > open_mean, (i.file_id, k)
    assert open_darker >= 0.95 * open_total


def test_image_sizes_modes_and_polarity(dataset: SynthResult) -> None:
    dtypes, channels, sizes = Counter(), Counter(), []
    for path in _pngs(dataset.root).values():
        raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        dtypes[raw.dtype.name] += 1
        channels[1 if raw.ndim == 2 else raw.shape[2]] += 1
        sizes.extend(raw.shape[:2])
    assert 500 <= min(sizes) and max(sizes) <= 1200
    assert dtypes["uint16"] >= 1 and dtypes["uint8"] >= N // 2
    assert len(channels) >= 2


# --- determinism and arguments ---------------------------------------------------------------------


def test_deterministic(tmp_path: Path) -> None:
    a = synthesize_oblique(tmp_path / "a", n=10, seed=5)
    b = synthesize_oblique(tmp_path / "b", n=10, seed=5)
    for sub in ("datasets-PNG", "datasets-JSON"):
        fa = sorted((a.root / sub).iterdir())
        fb = sorted((b.root / sub).iterdir())
        assert [p.name for p in fa] == [p.name for p in fb] and fa
        for pa, pb in zip(fa, fb):
            assert pa.read_bytes() == pb.read_bytes(), pa.name
    assert _records(a.root) == _records(b.root)
    assert [i.box for i in describe_oblique(n=10, seed=5)] == [i.box for i in describe_oblique(n=10, seed=5)]
    assert [i.box for i in describe_oblique(n=10, seed=6)] != [i.box for i in describe_oblique(n=10, seed=5)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": 0}, "n must be >= 1"),
        ({"n": 2.5}, "n must be an integer"),
        ({"n": True}, "n must be an integer"),
        ({"n": 10000}, "too large"),
        ({"seed": -1}, "seed"),
        ({"seed": "1"}, "seed"),
        ({"positive_fraction": 0.0}, "positive_fraction"),
        ({"positive_fraction": 1.0}, "positive_fraction"),
        ({"positive_fraction": math.nan}, "positive_fraction"),
        ({"annotated_fraction": -0.1}, "annotated_fraction"),
        ({"annotated_fraction": 1.5}, "annotated_fraction"),
        ({"annotated_fraction": "half"}, "annotated_fraction"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        synthesize_oblique(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_annotated_fraction_extremes() -> None:
    assert all(i.json_kind == "rect" for i in describe_oblique(n=12, seed=1, annotated_fraction=1.0))
    kinds = Counter(i.json_kind for i in describe_oblique(n=30, seed=1, annotated_fraction=0.0))
    assert kinds == {"none": 28, "empty": 1, "other": 1}


def test_refuses_foreign_files(tmp_path: Path) -> None:
    (tmp_path / "datasets-PNG").mkdir()
    (tmp_path / "datasets-PNG" / "9999999.png").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="9999999.png"):
        synthesize_oblique(tmp_path, n=3, seed=0)
