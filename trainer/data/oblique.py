"""Reader for the oblique-view layout (docs/stenosis-data.md): foraminal stenosis and the oblique ROI.

Like `trainer.data.csxa.load`, with one sheet row per image: images found recursively and joined to the
sheet on the first four digits of the 7-character stem, the super-header row skipped, columns matched
by prefix (Number, Gender, Age, View, Stenosis), rows without images counted, patients grouped by
consecutive rows with the same gender and age (a patient's left and right obliques share a group).
The ROI is the LabelMe rectangle labelled ``cspine``; images without one are kept with ``box=None``
(the build gives them the ROI engine's box or skips them). Problems with single rows or files are
skipped and counted in the `LoadReport`; a folder that cannot be read at all raises DataError naming
the file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from screener.errors import DataError
from screener.logs import get_logger
from trainer.data.csxa import (
    LoadReport,
    as_int,
    find_sheet,
    group_patients,
    index_files,
    read_sheet,
    report_images_without_row,
)
from trainer.data.csxa import match_columns as csxa_match_columns

log = get_logger(__name__)

REQUIRED_PREFIXES = {"number": "Number", "gender": "Gender", "age": "Age", "view": "View", "stenosis": "Stenosis"}
CLASS_NAMES = ("normal", "stenosis")  # label 0, label 1 (positive)
STENOSIS_CODES = {0: 0, 1: 1}  # sheet value -> label
ROI_LABEL = "cspine"
VIEWS = {
    "l": "L",
    "left": "L",
    "lao": "L",
    "lpo": "L",
    "left oblique": "L",
    "r": "R",
    "right": "R",
    "rao": "R",
    "rpo": "R",
    "right oblique": "R",
}

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class ObliqueSample:
    id: str  # the 7-character stem, kept as a string
    number: int
    image_path: Path
    json_path: Path | None
    label: int  # 1 = foraminal stenosis (positive), 0 = normal
    view: str  # "L" (canonical orientation) or "R" (mirrored to look like "L")
    gender: int
    age: int
    group: str  # patient group: consecutive rows with the same gender and age
    box: Box | None  # the annotated ``cspine`` rectangle (x0, y0, x1, y1), original pixels

    @property
    def mirror(self) -> bool:
        """True for right obliques: flip horizontally to the canonical (left) orientation."""
        return self.view == "R"


def parse_view(value: Any) -> str | None:
    """'L' / 'R' from the sheet's View cell (L, R, left, right, LAO, LPO, RAO, RPO, any case); else None."""
    if value is None:
        return None
    text = " ".join(str(value).strip().lower().replace("_", " ").split()).rstrip(".").strip()
    return VIEWS.get(text)


def match_columns(names: list[str], path: Path) -> dict[str, int]:
    """Column index per required field of the oblique sheet, matched by prefix."""
    return csxa_match_columns(names, path, REQUIRED_PREFIXES, " for oblique views")


def _finite(v: Any) -> float:
    if isinstance(v, bool):
        raise TypeError("boolean coordinate")
    f = float(v)
    if not math.isfinite(f):
        raise ValueError("non-finite coordinate")
    return f


def read_rectangle(path: Path, report: LoadReport) -> Box | None:
    """The ``cspine`` rectangle of a LabelMe file as (x0, y0, x1, y1), corners sorted.

    Any two opposite corners are accepted; other labels and shape types are ignored (None, not
    reported: the image is simply unannotated). An unreadable file or a malformed ``cspine``
    rectangle (not two finite points, zero area) is reported in `report.skipped` and gives None.
    With several ``cspine`` rectangles the first well-formed one wins."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        shapes = data["shapes"]
        if not isinstance(shapes, list):
            raise TypeError("shapes is not a list")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        report.skip(path, f"unreadable LabelMe JSON ({exc.__class__.__name__})")
        return None
    problem = ""
    for shape in shapes:
        if not isinstance(shape, dict):
            continue
        if str(shape.get("label", "")).strip().lower() != ROI_LABEL:
            continue
        if str(shape.get("shape_type", "")).strip().lower() != "rectangle":
            continue
        try:
            pts = shape["points"]
            if not isinstance(pts, list) or len(pts) != 2:
                raise ValueError(f"{len(pts) if isinstance(pts, list) else 'no'} points instead of 2")
            if not all(isinstance(q, (list, tuple)) and len(q) == 2 for q in pts):
                raise ValueError("a point is not [x, y]")
            (ax, ay), (bx, by) = ((_finite(q[0]), _finite(q[1])) for q in pts)
        except (KeyError, TypeError, ValueError) as exc:
            problem = problem or f"malformed {ROI_LABEL!r} rectangle ({exc})"
            continue
        x0, x1 = sorted((ax, bx))
        y0, y1 = sorted((ay, by))
        if x1 - x0 < 1.0 or y1 - y0 < 1.0:
            problem = problem or f"degenerate {ROI_LABEL!r} rectangle ({x0:g}, {y0:g}, {x1:g}, {y1:g})"
            continue
        return (x0, y0, x1, y1)
    if problem:
        report.skip(path, problem)
    return None


def load_oblique(root: Path) -> tuple[list[ObliqueSample], LoadReport]:
    """Read an oblique-view folder: one sample per image with a sheet row, a view and a label.

    Samples keep sheet order (a patient's views stay together). Images without a ``cspine``
    rectangle get ``box=None``; a malformed rectangle is reported and treated the same way."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    report = LoadReport(root=str(root))
    sheet = find_sheet(root)
    names, rows = read_sheet(sheet)
    cols = match_columns(names, sheet)

    table: list[tuple[int, int, int, Any, Any, int]] = []  # number, gender, age, view, stenosis, sheet row
    for r_index, row in enumerate(rows, start=3):
        if not any(v is not None and str(v).strip() for v in row):
            continue
        cell = {k: (row[i] if i < len(row) else None) for k, i in cols.items()}
        number, gender, age = as_int(cell["number"]), as_int(cell["gender"]), as_int(cell["age"])
        if number is None:
            report.skip(f"{sheet.name}:row {r_index}", "no Number")
            continue
        if gender is None or age is None:
            report.skip(f"{sheet.name}:row {r_index}", "missing gender or age value")
            continue
        table.append((number, gender, age, cell["view"], cell["stenosis"], r_index))
    report.n_rows = len(table)
    if not table:
        raise DataError(f"{sheet}: the sheet has no data rows")
    groups = group_patients([(n, g, a) for n, g, a, *_ in table])

    images, jsons = index_files(root, report)

    samples: list[ObliqueSample] = []
    seen: set[int] = set()
    unannotated = 0
    for number, gender, age, view_cell, sten_cell, _r_index in table:
        if number in seen:
            report.skip(f"{sheet.name}:Number {number}", "duplicate Number in the sheet; first row kept")
            continue
        seen.add(number)
        paths = images.get(number)
        if not paths:
            report.rows_without_image += 1
            continue
        view = parse_view(view_cell)
        if view is None:
            report.skip(paths[0], f"unknown view {view_cell!r} (expected L/R, left/right, LAO/LPO/RAO/RPO)")
            continue
        code = as_int(sten_cell)
        if code not in STENOSIS_CODES:
            report.skip(paths[0], f"unknown stenosis value {sten_cell!r} (expected 1 stenosis or 0 normal)")
            continue
        for img in paths:
            jpath = jsons.get(img.stem)
            box = read_rectangle(jpath, report) if jpath is not None else None
            unannotated += box is None
            samples.append(
                ObliqueSample(
                    img.stem, number, img, jpath, STENOSIS_CODES[code], view, gender, age, groups[number], box
                )
            )
    report_images_without_row(report, images, seen)
    report.n_samples = len(samples)
    if not samples:
        raise DataError(
            f"{root}: no usable images (rows: {len(table)}, skipped: {len(report.skipped)}; sheet {sheet.name})"
        )
    log.info(
        "oblique_dataset_loaded",
        root=str(root),
        samples=len(samples),
        rows=len(table),
        unannotated=unannotated,
        skipped=len(report.skipped),
        rows_without_image=report.rows_without_image,
    )
    return samples, report
