"""Tests for trainer.synth: the synthetic data set must match the CSXA layout (csxa-format.md)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from tests.conftest import HEADER
from tests.support.sheets import read_sheet
from trainer.synth import KEYPOINT_LABELS, SynthResult, drawing, synthesize
from trainer.synth import lateral as synth

N = 60
SEED = 7


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> SynthResult:
    return synthesize(tmp_path_factory.mktemp("csxa") / "data", n=N, seed=SEED)


def _sheet(root: Path) -> tuple[list[str], list[tuple]]:
    _, names, rows = read_sheet(root)
    return names, rows


def _col(names: list[str], prefix: str) -> int:
    return next(i for i, n in enumerate(names) if n.startswith(prefix))


def _records(root: Path) -> list[dict[str, int]]:
    names, rows = _sheet(root)
    idx = {
        k: _col(names, p)
        for k, p in (("number", "Number"), ("gender", "Gender"), ("age", "Age"), ("disease", "Disease"))
    }
    return [{k: int(r[i]) for k, i in idx.items()} for r in rows]


def _pngs(root: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted((root / "datasets-PNG").glob("*.png"))}


def _jsons(root: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted((root / "datasets-JSON").glob("*.json"))}


# --- layout and counts ---------------------------------------------------------------------------


def test_layout_and_counts(dataset: SynthResult) -> None:
    root = dataset.root
    assert (root / "datasets.xlsx").is_file()
    pngs, jsons = _pngs(root), _jsons(root)
    assert dataset.n_images == N == len(pngs)
    assert set(pngs) == set(jsons)
    assert dataset.n_rows == len(_records(root)) > N  # at least one row without an image when n >= 50
    assert 1 <= dataset.n_patients <= dataset.n_rows


def test_ids_are_7_digits_and_join_on_number(dataset: SynthResult) -> None:
    records = {r["number"]: r for r in _records(dataset.root)}
    age_mismatch = 0
    for stem in _pngs(dataset.root):
        assert len(stem) == 7 and stem.isdigit()
        rec = records[int(stem[:4])]
        assert int(stem[4]) == rec["gender"]
        age_mismatch += int(stem[5:]) != rec["age"]
    assert age_mismatch == 1  # the known quirk: one file name's age differs from the sheet


def test_rows_without_image(dataset: SynthResult) -> None:
    numbers_with_image = {int(s[:4]) for s in _pngs(dataset.root)}
    missing = [r for r in _records(dataset.root) if r["number"] not in numbers_with_image]
    assert len(missing) == dataset.n_rows - N >= 1
    assert [r["number"] for r in _records(dataset.root)] == list(range(1, dataset.n_rows + 1))


def test_sheet_header(dataset: SynthResult) -> None:
    first, names, rows = read_sheet(dataset.root)
    assert isinstance(first[0], str) and first[0]  # super-header, not the column names
    assert "Number" not in first
    for required in (*HEADER, "CCI"):  # the real CSXA column names the loaders match
        assert required in names
    assert any(n.startswith("Pixel equivalent") for n in names)
    extra = [n for n in names if n not in synth.SHEET_COLUMNS[:7] and not n.startswith("Pixel")]
    assert 5 <= len(extra) <= 10
    for r in rows:
        assert all(isinstance(v, (int, float)) for v in r)
    disease = {r[_col(names, "Disease")] for r in rows}
    assert disease <= {1, 2}
    assert {r[_col(names, "Curvature")] for r in rows} <= {1, 2, 3, 4, 5}
    assert all(0.02 < r[_col(names, "Pixel")] < 2.0 for r in rows)


def test_lordotic_cobb_is_positive(dataset: SynthResult) -> None:
    names, rows = _sheet(dataset.root)
    curv, cobb = _col(names, "Curvature"), names.index("C2-7Cobb")
    lordotic = [r[cobb] for r in rows if r[curv] == 1]
    kyphotic = [r[cobb] for r in rows if r[curv] == 5]
    assert lordotic and np.median(lordotic) > 5
    assert all(c < 0 for c in kyphotic)


# --- annotations ---------------------------------------------------------------------------------


def test_labelme_keypoints(dataset: SynthResult) -> None:
    duplicates = []
    for stem, path in _jsons(dataset.root).items():
        doc = json.loads(path.read_text(encoding="utf-8"))
        assert set(doc) >= {"version", "flags", "shapes", "imagePath", "imageData", "imageHeight", "imageWidth"}
        assert doc["imageData"] is None and stem in doc["imagePath"]
        with Image.open(_pngs(dataset.root)[stem]) as im:
            assert (doc["imageWidth"], doc["imageHeight"]) == im.size
            assert 400 <= min(im.size) and max(im.size) <= 1200
        labels = Counter(s["label"] for s in doc["shapes"])
        assert set(labels) == set(KEYPOINT_LABELS)
        if len(doc["shapes"]) != 23:
            duplicates.append((stem, doc))
        for s in doc["shapes"]:
            assert s["shape_type"] in ("point", "polygon") and len(s["points"]) == 1
            x, y = s["points"][0]
            assert isinstance(x, float) and 0 <= x < doc["imageWidth"] and 0 <= y < doc["imageHeight"]
    assert len(duplicates) == 1
    _, doc = duplicates[0]
    pts = [s["points"][0] for s in doc["shapes"] if s["label"] == "C3 top right"]
    assert len(pts) == 2 and 0 < np.hypot(pts[0][0] - pts[1][0], pts[0][1] - pts[1][1]) < 8


def test_keypoint_geometry_is_anatomical(dataset: SynthResult) -> None:
    for path in list(_jsons(dataset.root).values())[:20]:
        doc = json.loads(path.read_text(encoding="utf-8"))
        p = {s["label"]: np.array(s["points"][0]) for s in doc["shapes"]}
        for v in range(3, 8):  # left = anterior is image-left; top above bottom
            assert p[f"C{v} top left"][0] < p[f"C{v} top right"][0]
            assert p[f"C{v} top left"][1] < p[f"C{v} bottom left"][1]
        for v in range(3, 7):  # each level lies below the previous one
            assert p[f"C{v} bottom right"][1] < p[f"C{v + 1} top right"][1]
        assert p["C2 centroid"][1] < p["C2 bottom left"][1]


def test_keypoints_on_body_corners_and_spurs_outside() -> None:
    rng = np.random.default_rng(3)
    for k in range(10):
        anat = drawing.sample_anatomy(np.random.default_rng([11, k]), healthy=False)
        view = synth.sample_view(rng, anat)
        sp = view.spine
        for i in range(6):
            outline = sp.outlines[i].astype(np.float32)
            for c in sp.corner_points[i]:
                assert abs(cv2.pointPolygonTest(outline, (float(c[0]), float(c[1])), True)) < 0.5
        assert sp.spurs
        for body, poly in sp.spurs:
            outline = sp.outlines[body].astype(np.float32)
            reach = max(-cv2.pointPolygonTest(outline, (float(x), float(y)), True) for x, y in poly)
            assert reach > 0.08 * sp.u  # the osteophyte protrudes beyond the body


def test_healthy_anatomy_has_no_lesions() -> None:
    for k in range(20):
        anat = drawing.sample_anatomy(np.random.default_rng([5, k]), healthy=True)
        assert anat.lesions == () and anat.severity == 0.0
        sick = drawing.sample_anatomy(np.random.default_rng([5, k]), healthy=False)
        assert 1 <= len(sick.lesions) <= 4 and 0.3 <= sick.severity <= 1.0


# --- determinism, modes, quirks ------------------------------------------------------------------


def test_deterministic(tmp_path: Path) -> None:
    a = synthesize(tmp_path / "a", n=12, seed=3)
    b = synthesize(tmp_path / "b", n=12, seed=3)
    c = synthesize(tmp_path / "c", n=12, seed=4)
    for folder in ("datasets-PNG", "datasets-JSON"):
        fa = sorted((a.root / folder).iterdir())
        fb = sorted((b.root / folder).iterdir())
        assert [p.name for p in fa] == [p.name for p in fb]
        assert all(x.read_bytes() == y.read_bytes() for x, y in zip(fa, fb))
    assert _sheet(a.root) == _sheet(b.root)
    pa = sorted((a.root / "datasets-PNG").iterdir())
    pc = sorted((c.root / "datasets-PNG").iterdir())
    assert [p.read_bytes() for p in pa] != [p.read_bytes() for p in pc]


def test_modes_present(dataset: SynthResult) -> None:
    modes = Counter()
    for p in _pngs(dataset.root).values():
        with Image.open(p) as im:
            modes[im.mode] += 1
            if im.mode == "RGBA":
                assert np.asarray(im)[..., 3].min() == 255
    assert {"L", "RGB", "RGBA", "I;16"} <= set(modes)
    assert modes["L"] > N / 3


def test_style_frequencies() -> None:
    styles = [drawing.sample_style(np.random.default_rng([1, i])) for i in range(3000)]
    frac = lambda f: sum(map(f, styles)) / len(styles)  # noqa: E731
    assert 0.06 < frac(lambda s: s.inverted) < 0.10
    assert 0.17 < frac(lambda s: s.text) < 0.23
    assert 0.12 < frac(lambda s: s.ruler) < 0.18
    for mode in ("RGB", "RGBA", "I;16"):
        assert 0.08 < frac(lambda s, m=mode: s.mode == m) < 0.12


def test_bone_brighter_than_soft_tissue() -> None:
    """In the rendered (pre-polarity) image a body centre is brighter than the tissue in front of it."""
    for k in range(8):
        anat = drawing.sample_anatomy(np.random.default_rng([9, k]), healthy=k % 2 == 0)
        rng = np.random.default_rng([9, k, 1])
        view = synth.sample_view(rng, anat)
        img = synth.render(view, rng)
        assert img.shape == (view.height, view.width) and img.dtype == np.float32
        assert 0.0 <= img.min() and img.max() <= 1.0
        c = view.spine.corners[2]  # C4
        centre = c.mean(axis=0)
        front = (c[0] + c[3]) / 2 - (c[1] - c[0]) * 0.9
        x, y = int(centre[0]), int(centre[1])
        fx, fy = int(np.clip(front[0], 2, view.width - 3)), int(front[1])
        assert img[y - 2 : y + 3, x - 2 : x + 3].mean() > img[fy - 2 : fy + 3, fx - 2 : fx + 3].mean() + 0.03


# --- patients and labels -------------------------------------------------------------------------


def test_patients_recoverable_by_consecutive_gender_age(dataset: SynthResult) -> None:
    records = _records(dataset.root)
    groups: list[list[dict[str, int]]] = []
    for r in records:
        if groups and (groups[-1][-1]["gender"], groups[-1][-1]["age"]) == (r["gender"], r["age"]):
            groups[-1].append(r)
        else:
            groups.append([r])
    assert len(groups) == dataset.n_patients
    with_image = {int(s[:4]) for s in _pngs(dataset.root)}
    for g in groups:
        assert len({r["disease"] for r in g}) == 1  # all images of a patient share the label
        assert 1 <= sum(r["number"] in with_image for r in g) <= 5


def test_healthy_fraction(dataset: SynthResult) -> None:
    records = _records(dataset.root)
    with_image = {int(s[:4]) for s in _pngs(dataset.root)}
    healthy = sum(1 for r in records if r["number"] in with_image and r["disease"] == 2)
    assert healthy == dataset.n_healthy >= 1
    assert healthy < N
    for seed in range(5):
        for fraction in (0.04, 0.3, 0.6):
            patients, rows = synth._plan(400, seed, fraction)
            imgs = [r for r in rows if r.has_image]
            got = sum(r.disease == 2 for r in imgs) / len(imgs)
            assert abs(got - fraction) < 0.03
            assert any(p.healthy for p in patients) and not all(p.healthy for p in patients)


def test_small_n_has_both_classes_from_10() -> None:
    for n in (10, 11, 17, 30):
        patients, rows = synth._plan(n, 0, 0.04)
        assert sum(r.has_image for r in rows) == n
        assert any(p.healthy for p in patients) and not all(p.healthy for p in patients)
        assert len(rows) == n  # no rows without image below n = 50


# --- arguments -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 0},
        {"n": -3},
        {"n": 2.5},
        {"healthy_fraction": 0.0},
        {"healthy_fraction": 1.0},
        {"healthy_fraction": -0.2},
        {"healthy_fraction": float("nan")},
        {"seed": -1},
        {"n": 20000},
    ],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        synthesize(tmp_path / "x", **kwargs)


def test_refuses_folder_with_foreign_files(tmp_path: Path) -> None:
    (tmp_path / "datasets-PNG").mkdir()
    (tmp_path / "datasets-PNG" / "old.png").write_bytes(b"x")
    with pytest.raises(FileExistsError):
        synthesize(tmp_path, n=2)
    assert (tmp_path / "datasets-PNG" / "old.png").read_bytes() == b"x"  # nothing deleted


def test_rerun_same_arguments_overwrites(tmp_path: Path) -> None:
    first = synthesize(tmp_path, n=3, seed=1)
    png = sorted((tmp_path / "datasets-PNG").iterdir())[0]
    png.write_bytes(b"truncated")  # as if interrupted mid-write
    again = synthesize(tmp_path, n=3, seed=1)
    assert again == first and png.read_bytes() != b"truncated"
    with pytest.raises(FileExistsError):
        synthesize(tmp_path, n=2, seed=1)  # a smaller set would leave stale images behind


def test_progress_bar_and_tiny_n(tmp_path: Path) -> None:
    res = synthesize(tmp_path / "t", n=1, seed=0, progress=True)
    assert res.n_images == 1 and res.n_rows == 1 and res.n_patients == 1
    assert len(_pngs(res.root)) == 1
