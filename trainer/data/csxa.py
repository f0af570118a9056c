"""Reader for the CSXA layout (see shared/reference/csxa-format.md).

Handles every known quirk: images found recursively, joined to the sheet on the
first four digits of the 7-character stem (never the full stem), the sheet's
super-header row, columns matched by prefix, rows without images, duplicate
keypoint labels (the first occurrence wins; each one is reported), LabelMe
points stored as "point" or one-point "polygon". Problems with single files are
skipped and counted; a data set that cannot be read at all raises DataError with
the file named.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from screener.errors import DataError
from screener.logs import get_logger

log = get_logger(__name__)

SHEET_NAME = "datasets.xlsx"
KEYPOINT_LABELS: tuple[str, ...] = (
    "C2 centroid",
    "C2 bottom left",
    "C2 bottom right",
    *(f"C{v} {side}" for v in range(3, 8) for side in ("top left", "top right", "bottom left", "bottom right")),
)
CLASS_NAMES = ("healthy", "spondylosis")  # label 0, label 1 (positive)
DISEASE_CODES = {1: 1, 2: 0}  # sheet code -> label
STEM_RE = re.compile(r"^\d{7}$")
REQUIRED_PREFIXES = {"number": "Number", "gender": "Gender", "age": "Age", "disease": "Disease"}


@dataclass(frozen=True)
class Sample:
    id: str  # the 7-character stem, kept as a string
    number: int
    image_path: Path
    json_path: Path | None
    label: int  # 1 = spondylosis (positive), 0 = healthy
    gender: int
    age: int
    group: str  # patient group (consecutive rows with the same gender and age)
    keypoints: dict[str, tuple[float, float]] | None = None

    @property
    def box(self) -> tuple[float, float, float, float] | None:
        if not self.keypoints:
            return None
        pts = np.array(list(self.keypoints.values()), dtype=np.float64)
        return float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max())


@dataclass
class LoadReport:
    root: str
    n_rows: int = 0
    n_samples: int = 0
    rows_without_image: int = 0
    images_without_row: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"file", "reason"}
    duplicate_labels: list[dict[str, str]] = field(default_factory=list)
    missing_keypoints: list[str] = field(default_factory=list)
    modes: dict[str, int] = field(default_factory=dict)

    def skip(self, file: str | Path, reason: str) -> None:
        self.skipped.append({"file": str(file), "reason": reason})
        log.warning("sample_skipped", file=str(file), reason=reason)

    def summary(self) -> dict[str, Any]:
        return {
            "rows": self.n_rows,
            "samples": self.n_samples,
            "rows_without_image": self.rows_without_image,
            "images_without_row": len(self.images_without_row),
            "skipped": len(self.skipped),
            "skipped_files": self.skipped[:50],
            "duplicate_keypoint_labels": self.duplicate_labels[:50],
            "missing_keypoints": len(self.missing_keypoints),
            "image_modes": self.modes,
        }


def find_sheet(root: Path) -> Path:
    direct = root / SHEET_NAME
    if direct.is_file():
        return direct
    found = sorted(root.rglob("*.xlsx"))
    if not found:
        raise DataError(f"{root}: no {SHEET_NAME} found (expected the CSXA sheet at {direct})")
    return found[0]


def _cell_text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def read_sheet(path: Path) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Rows of the first sheet as (column names, data rows); finds the header row itself."""
    try:
        from openpyxl import load_workbook

        wb = load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to open is a data error
        raise DataError(f"{path}: cannot read the spreadsheet ({exc.__class__.__name__}: {exc})") from None
    try:
        ws = wb["Sheet1"] if "Sheet1" in wb.sheetnames else wb.worksheets[0]
        rows = [tuple(r) for r in ws.iter_rows(values_only=True)]
    finally:
        wb.close()
    for i, row in enumerate(rows[:10]):
        names = [_cell_text(v) for v in row]
        if any(n.lower() == "number" for n in names):
            return names, rows[i + 1 :]
    raise DataError(f"{path}: no header row with a 'Number' column in the first 10 rows (unknown layout)")


def match_columns(
    names: list[str], path: Path, prefixes: dict[str, str] | None = None, layout: str = ""
) -> dict[str, int]:
    """Column index per required field, matched by prefix (case-insensitive; first match wins)."""
    found: dict[str, int] = {}
    for key, prefix in (prefixes or REQUIRED_PREFIXES).items():
        for i, name in enumerate(names):
            if name.strip().lower().startswith(prefix.lower()):
                found[key] = i
                break
        else:
            raise DataError(
                f"{path}: no column starting with {prefix!r} (unknown column layout{layout}; columns: "
                f"{', '.join(n for n in names if n)[:300]})"
            )
    return found


def as_int(value: Any) -> int | None:
    """A whole number from a sheet cell (int, float or text), else None."""
    try:
        f = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(f) or f != int(f):
        return None
    return int(f)


def read_keypoints(path: Path, report: LoadReport) -> dict[str, tuple[float, float]] | None:
    """The 23 named points of a LabelMe file; None (reported) if unreadable or incomplete."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        shapes = data["shapes"]
        if not isinstance(shapes, list):
            raise TypeError("shapes is not a list")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        report.skip(path, f"unreadable LabelMe JSON ({exc.__class__.__name__})")
        return None
    points: dict[str, tuple[float, float]] = {}
    for shape in shapes:
        try:
            label = str(shape["label"]).strip()
            x, y = shape["points"][0]
            pt = (float(x), float(y))
        except (KeyError, IndexError, TypeError, ValueError):
            continue
        if label not in KEYPOINT_LABELS:
            continue
        if label in points:  # known CSXA defect (e.g. 2548130.json): first occurrence wins
            report.duplicate_labels.append({"file": path.name, "label": label, "rule": "first kept"})
            log.info("duplicate_keypoint_label", file=path.name, label=label, rule="first kept")
            continue
        points[label] = pt
    missing = [k for k in KEYPOINT_LABELS if k not in points]
    if missing:
        report.missing_keypoints.append(path.name)
        report.skip(path, f"missing {len(missing)} keypoint(s): {', '.join(missing[:4])}")
        return None
    return points


def index_files(root: Path, report: LoadReport) -> tuple[dict[int, list[Path]], dict[str, Path]]:
    """PNGs by sheet Number (the first four digits of the 7-digit ID) and LabelMe JSONs by stem,
    found recursively (zips may add a top-level folder)."""
    images: dict[int, list[Path]] = {}
    for p in sorted(root.rglob("*.png")):
        if not STEM_RE.match(p.stem):
            report.skip(p, "file name is not a 7-digit ID (NNNNGAA)")
            continue
        images.setdefault(int(p.stem[:4]), []).append(p)
    jsons = {p.stem: p for p in sorted(root.rglob("*.json")) if STEM_RE.match(p.stem)}
    return images, jsons


def report_images_without_row(report: LoadReport, images: dict[int, list[Path]], numbers: set[int]) -> None:
    report.images_without_row = [str(p) for n, ps in images.items() if n not in numbers for p in ps]
    for p in report.images_without_row:
        report.skip(p, "no row in the sheet for this Number")


def group_patients(rows: list[tuple[int, int, int]]) -> dict[int, str]:
    """Patient group per sheet Number: consecutive rows (sheet order) with equal gender and age.

    CSXA has no patient ID; this rule is the stated inference (csxa-format.md)."""
    groups: dict[int, str] = {}
    prev: tuple[int, int] | None = None
    current = ""
    for number, gender, age in rows:
        key = (gender, age)
        if key != prev:
            current = f"P{number:04d}"
            prev = key
        groups[number] = current
    return groups


def load(root: Path, need_keypoints: bool = False) -> tuple[list[Sample], LoadReport]:
    """Read a CSXA-style folder. With `need_keypoints`, samples without 23 points are skipped."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    report = LoadReport(root=str(root))
    sheet = find_sheet(root)
    names, rows = read_sheet(sheet)
    cols = match_columns(names, sheet)

    table: list[tuple[int, int, int, int]] = []  # number, gender, age, disease code
    for r_index, row in enumerate(rows, start=3):
        if not any(v is not None and _cell_text(v) for v in row):
            continue
        vals = {k: as_int(row[i]) if i < len(row) else None for k, i in cols.items()}
        if vals["number"] is None:
            report.skip(f"{sheet.name}:row {r_index}", "no Number")
            continue
        if None in vals.values():
            report.skip(f"{sheet.name}:row {r_index}", "missing gender, age or disease value")
            continue
        table.append((vals["number"], vals["gender"], vals["age"], vals["disease"]))  # type: ignore[arg-type]
    report.n_rows = len(table)
    if not table:
        raise DataError(f"{sheet}: the sheet has no data rows")
    groups = group_patients([(n, g, a) for n, g, a, _ in table])

    images, jsons = index_files(root, report)

    samples: list[Sample] = []
    seen_numbers: set[int] = set()
    for number, gender, age, code in table:
        if number in seen_numbers:
            report.skip(f"{sheet.name}:Number {number}", "duplicate Number in the sheet; first row kept")
            continue
        seen_numbers.add(number)
        paths = images.get(number)
        if not paths:
            report.rows_without_image += 1
            continue
        if code not in DISEASE_CODES:
            report.skip(paths[0], f"unknown disease code {code}")
            continue
        for img in paths:
            jpath = jsons.get(img.stem)
            kps = read_keypoints(jpath, report) if jpath else None
            if jpath is None and need_keypoints:
                report.skip(img, "no LabelMe JSON with keypoints")
                continue
            if kps is None and need_keypoints:
                continue  # already reported
            samples.append(Sample(img.stem, number, img, jpath, DISEASE_CODES[code], gender, age, groups[number], kps))
    report_images_without_row(report, images, seen_numbers)
    report.n_samples = len(samples)
    if not samples:
        raise DataError(f"{root}: no usable images (rows: {len(table)}, skipped: {len(report.skipped)})")
    log.info(
        "dataset_loaded",
        root=str(root),
        samples=len(samples),
        rows=len(table),
        skipped=len(report.skipped),
        rows_without_image=report.rows_without_image,
    )
    return samples, report


def count_modes(report: LoadReport, modes: Counter[str]) -> None:
    report.modes = dict(sorted(modes.items()))
