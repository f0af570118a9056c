"""Synthetic cervical spine data set in the exact CSXA layout (see shared/reference/csxa-format.md).

`synthesize(out, n, seed)` writes::

    out/datasets-PNG/<ID>.png     n lateral cervical spine "radiographs"
    out/datasets-JSON/<ID>.json   LabelMe files with the 23 vertebral-body keypoints
    out/datasets.xlsx             "Sheet1": row 1 a super-header, row 2 the column names

IDs are ``NNNNGAA`` (sheet Number zero-padded to 4, gender digit, two-digit age). Patients are
runs of consecutive rows with the same (gender, age); about 0.75 % of rows have no image and no
JSON; one JSON repeats "C3 top right" and one file name carries an age that differs from the sheet
(both only when ``n >= 50``), as in the real CSXA release.

Images are rendered from a simple physical model: soft tissue, bone and air attenuations are summed
and mapped through ``1 - exp(-A)``. Spondylosis (sheet code 1) shows as osteophytes at body corners,
narrowed discs and endplate sclerosis at 1-4 disc levels, with a per-patient severity; healthy spines
(code 2) have none of these. Everything is drawn from ``numpy.random.Generator`` streams seeded from
``(seed, stream, index)``, so a given ``(n, seed, healthy_fraction)`` gives byte-identical PNG and JSON
files (the xlsx carries a save timestamp; its cell values are identical).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from trainer.synth.drawing import (
    DISCS,
    LEVELS,
    MAX_ROWS,
    SHIFT,
    Anatomy,
    Spine,
    SynthResult,
    View,
    bezier,
    bone_texture,
    build_spine,
    check_no_foreign_files,
    draw_head_bones,
    draw_ruler,
    draw_vertebra,
    encode,
    fixed,
    grain,
    jaw_angle,
    n_missing,
    pixel_bounds,
    rounded_outline,
    sample_anatomy,
    sample_style,
    shift_spine,
    soft_tissue,
    spine_length_units,
    write_png,
)

__all__ = [
    "KEYPOINT_LABELS",
    "SHEET_COLUMNS",
    "SynthResult",
    "synthesize",
]

KEYPOINT_LABELS: tuple[str, ...] = (
    "C2 centroid",
    "C2 bottom left",
    "C2 bottom right",
    *(f"C{v} {side}" for v in range(3, 8) for side in ("top left", "top right", "bottom left", "bottom right")),
)

SUPER_HEADER = ("Cervical Spine X-ray Atlas measurements: basic information", "Sagittal parameters (pixel / degree)")
COL_NUMBER = "Number"
COL_GENDER = "Gender:female-1,male-0"
COL_AGE = "Age"
COL_DISEASE = "Disease classification: 1. Cervical spondylosis; 2. Healthy"
COL_CURVATURE = "Curvature: 1.Lordotic, 2.Straight, 3.Sigmoid1, 4.Sigmoid2, 5.Kyphotic"
COL_PIXEL_EQ = "Pixel equivalent (mm/pixel)"
MEASURE_COLUMNS: tuple[str, ...] = (
    "C2-7Cobb",
    "CCI",
    "C2-7 SVA (pixel)",
    "C2 slope (degree)",
    "C7 slope (degree)",
    *(f"{d} disc height (pixel)" for d in DISCS),
    "C3-7 posterior height (pixel)",
)
SHEET_COLUMNS: tuple[str, ...] = (
    COL_NUMBER,
    COL_GENDER,
    COL_AGE,
    COL_DISEASE,
    COL_CURVATURE,
    *MEASURE_COLUMNS,
    COL_PIXEL_EQ,
)

DISEASE_SPONDYLOSIS = 1
DISEASE_HEALTHY = 2


# Generator streams: (seed, stream, index) -> independent, reproducible draws.
_STREAM_PLAN, _STREAM_PATIENT, _STREAM_ROW = 1, 2, 3


# --------------------------------------------------------------------------------------------------
# Public result
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Plan: patients and sheet rows
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Patient:
    index: int
    gender: int
    age: int
    healthy: bool
    n_images: int
    anatomy: Anatomy


@dataclass(frozen=True)
class RowPlan:
    number: int
    patient: int
    gender: int
    age: int
    disease: int
    has_image: bool
    file_age: int  # age written into the file name (differs from `age` for one quirk row)
    duplicate_label: bool  # the JSON repeats "C3 top right"

    @property
    def file_id(self) -> str:
        return f"{self.number:04d}{self.gender}{self.file_age:02d}"


def _validate(n: int, seed: int, healthy_fraction: float) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise ValueError(f"n must be an integer number of images, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1 (number of images), got {n}")
    if n + n_missing(int(n)) > MAX_ROWS:
        raise ValueError(f"n={n} is too large: the 4-digit Number allows at most {MAX_ROWS} sheet rows")
    if (
        isinstance(healthy_fraction, bool)
        or not isinstance(healthy_fraction, (int, float, np.floating))
        or not 0.0 < float(healthy_fraction) < 1.0
    ):
        raise ValueError(f"healthy_fraction must be strictly between 0 and 1, got {healthy_fraction!r}")


def _patient_sizes(rng: np.random.Generator, n: int) -> list[int]:
    sizes: list[int] = []
    total = 0
    while total < n:
        s = int(rng.choice(5, p=[0.22, 0.24, 0.22, 0.17, 0.15])) + 1
        s = min(s, n - total)
        sizes.append(s)
        total += s
    return sizes


def _choose_healthy(rng: np.random.Generator, sizes: Sequence[int], fraction: float, n: int) -> list[bool]:
    """Mark whole patients healthy until about `fraction` of the images are healthy.

    With n >= 10 there is at least one healthy and one diseased patient."""
    target = round(fraction * n)
    if n >= 10:
        target = min(max(target, 1), n - 1)
    healthy = [False] * len(sizes)
    remaining = target
    for i in rng.permutation(len(sizes)):
        if remaining <= 0:
            break
        if sizes[i] <= remaining:
            healthy[i] = True
            remaining -= sizes[i]
    if target > 0 and not any(healthy):
        healthy[int(np.argmin(sizes))] = True
    if n >= 10 and all(healthy):  # cannot happen with target <= n - 1, kept as a guard
        healthy[int(np.argmax(sizes))] = False
    return healthy


def _plan(n: int, seed: int, healthy_fraction: float) -> tuple[list[Patient], list[RowPlan]]:
    """Patients (with anatomy) and the sheet rows in order, deterministic in (n, seed, fraction)."""
    rng = np.random.default_rng([seed, _STREAM_PLAN, n])
    sizes = _patient_sizes(rng, n)
    healthy = _choose_healthy(rng, sizes, healthy_fraction, n)
    patients: list[Patient] = []
    prev: tuple[int, int] | None = None
    for i, (size, ok) in enumerate(zip(sizes, healthy)):
        while True:
            gender = int(rng.integers(2))
            age = int(rng.integers(20, 50)) if ok else int(rng.integers(28, 83))
            if (gender, age) != prev:
                break
        prev = (gender, age)
        anatomy = sample_anatomy(np.random.default_rng([seed, _STREAM_PATIENT, i]), ok)
        patients.append(Patient(i, gender, age, ok, size, anatomy))

    extra = np.zeros(len(patients), dtype=int)
    for p in rng.integers(len(patients), size=n_missing(n)):
        extra[p] += 1
    flags: list[tuple[int, bool]] = []
    for pat in patients:
        f = np.ones(pat.n_images + extra[pat.index], dtype=bool)
        if extra[pat.index]:
            f[rng.choice(len(f), size=extra[pat.index], replace=False)] = False
        flags.extend((pat.index, bool(x)) for x in f)

    image_rows = [r for r, (_, has) in enumerate(flags) if has]
    age_quirk = dup_quirk = -1
    if n >= 50:
        age_quirk, dup_quirk = (int(x) for x in rng.choice(image_rows, size=2, replace=False))
    rows: list[RowPlan] = []
    for r, (pi, has) in enumerate(flags):
        pat = patients[pi]
        file_age = pat.age
        if r == age_quirk:
            file_age = min(max(pat.age + int(rng.choice([-2, -1, 1, 2])), 10), 99)
            if file_age == pat.age:
                file_age = pat.age - 1
        rows.append(
            RowPlan(
                number=r + 1,
                patient=pi,
                gender=pat.gender,
                age=pat.age,
                disease=DISEASE_HEALTHY if pat.healthy else DISEASE_SPONDYLOSIS,
                has_image=has,
                file_age=file_age,
                duplicate_label=(r == dup_quirk),
            )
        )
    return patients, rows


# --------------------------------------------------------------------------------------------------
# Geometry: one view of one spine
# --------------------------------------------------------------------------------------------------


def sample_view(rng: np.random.Generator, anat: Anatomy) -> View:
    """Image size, scale, position and pose of one radiograph of a patient."""
    h = int(rng.integers(460, 1201))
    w = int(np.clip(round(h * rng.uniform(0.7, 1.25)), 400, 1200))
    if rng.random() < 0.08:  # some small images, under 500 px on a side
        h, w = int(rng.integers(400, 520)), int(rng.integers(400, 560))
    length = spine_length_units(anat)
    u = rng.uniform(0.5, 0.78) * h / length
    u = min(u, w / 8.5)
    tilt = math.radians(rng.normal(5.0, 5.0))
    probe = build_spine(anat, u, np.zeros(2), tilt, 1.0, np.random.default_rng(0))
    pts = np.concatenate([probe.dens, *probe.outlines])
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    centre = np.array([w * (0.47 + rng.normal(0, 0.07)), h * (0.5 + rng.normal(0, 0.06))])
    origin = centre - (lo + hi) / 2
    spine = build_spine(anat, u, origin, tilt, rng.uniform(0.85, 1.15), rng)
    # keep every keypoint (and the dens) inside the image with a margin
    pts = np.concatenate([spine.keypoints, spine.dens])
    margin = 0.25 * u + 3
    size = np.array([w, h])
    shift = np.maximum(0, margin - pts.min(axis=0)) - np.maximum(0, pts.max(axis=0) - (size - margin))
    if np.any(shift):
        spine = shift_spine(spine, shift)
    mm = 15.5 * rng.normal(1, 0.06) / (np.mean(anat.depths[1:5]) * u)
    return View(h, w, spine, float(mm))


# --------------------------------------------------------------------------------------------------
# Rendering (attenuation map A; image = 1 - exp(-A))
# --------------------------------------------------------------------------------------------------


def _draw_posterior(att: np.ndarray, spine: Spine, mu: float, rng: np.random.Generator) -> None:
    """Faint articular pillars and spinous processes behind each body, plus C1 arches, drawn into one
    layer (filled shapes at `mu`-ish, slightly brighter outlines) that is blurred once and added."""
    u = spine.u
    shapes: list[tuple[np.ndarray, float]] = []  # (polygon, attenuation)
    for i in range(6):
        d, p = spine.axes(i)
        c = spine.corners[i]
        wall = (c[1] + c[2]) / 2
        h = np.linalg.norm(c[2] - c[1])
        pc = wall + p * u * rng.uniform(0.7, 0.9) + d * 0.15 * u
        pw = 0.4 * u
        pillar = np.array(
            [
                pc - p * pw - d * 0.55 * h,
                pc + p * pw - d * 0.62 * h,
                pc + p * pw + d * 0.6 * h,
                pc - p * pw + d * 0.68 * h,
            ]
        )
        pol, _ = rounded_outline(pillar, 0.15 * u, (0.05, 0.05, 0.05, 0.05))
        shapes.append((pol, mu * rng.uniform(0.8, 1.1)))
        length = u * (1.3 + 0.12 * i + (0.9 if i in (0, 5) else 0.0)) * rng.uniform(0.85, 1.15)
        root = pc + p * 0.3 * u
        tip = root + p * length + d * (0.25 + 0.07 * i) * length
        half = (0.35 if i == 0 else 0.24) * u
        mid = (root + tip) / 2
        spinous = np.concatenate(
            [
                bezier(root - d * half, mid - d * half * 0.5, tip - d * 0.1 * u, 8),
                bezier(tip + d * 0.12 * u, mid + d * half * 0.4, root + d * half, 8),
            ]
        )
        shapes.append((spinous, mu * rng.uniform(0.8, 1.05)))
    d, p = spine.axes(0)
    dens_mid = spine.dens.mean(axis=0)
    ant = dens_mid - p * (0.62 * u) - d * 0.15 * u
    post = dens_mid + p * (2.1 * u) - d * 0.3 * u
    t = np.linspace(0, 2 * np.pi, 24)[:, None]
    shapes.append((ant + p * 0.2 * u * np.cos(t) + d * 0.3 * u * np.sin(t), mu * 1.4))
    shapes.append((post + p * 0.75 * u * np.cos(t) + d * 0.2 * u * np.sin(t), mu * 1.1))

    sigma = 0.08 * u
    box = pixel_bounds(np.concatenate([s for s, _ in shapes]), 3 * sigma + 2, att.shape)
    if box is None:
        return
    x0, y0, x1, y1 = box
    off = np.array([x0, y0], dtype=np.float64)
    layer = np.zeros((y1 - y0, x1 - x0), np.float32)
    edge = max(1, int(0.06 * u))
    for poly, value in shapes:  # shapes overlap (pillars): later ones are drawn over earlier ones
        outline = fixed(poly, off)
        cv2.fillPoly(layer, [outline], value, cv2.LINE_8, SHIFT)
        cv2.polylines(layer, [outline], True, value * 1.35, edge, cv2.LINE_8, SHIFT)
    att[y0:y1, x0:x1] += cv2.GaussianBlur(layer, (0, 0), max(0.7, sigma))


def render(view: View, rng: np.random.Generator) -> np.ndarray:
    """Float32 image in [0, 1] (bright = bone) of one view, before overlays and output mode."""
    h, w, sp, u = view.height, view.width, view.spine, view.spine.u
    f = 4
    jaw = jaw_angle(rng, sp)
    low = soft_tissue(rng, view, jaw, f)
    att = cv2.resize(low, (w, h), interpolation=cv2.INTER_LINEAR)
    if rng.random() < 0.85:
        draw_head_bones(att, sp, jaw, rng)
    _draw_posterior(att, sp, rng.uniform(0.12, 0.22), rng)
    texture = bone_texture(rng, sp, (h, w))
    mu_body, mu_rim = rng.uniform(0.28, 0.42), rng.uniform(0.28, 0.45)
    rim_px = max(1.0, 0.06 * u * rng.uniform(0.8, 1.2))
    for i in range(6):
        draw_vertebra(att, texture, sp, i, mu_body * rng.uniform(0.93, 1.07), mu_rim, rim_px, rng)
    img: np.ndarray = 1.0 - cv2.exp(-att)
    # film grain (signal dependent), then the unsharpness of the system blurs image and grain alike
    img += rng.uniform(0.012, 0.04) * (0.4 + img) * grain(rng, (h, w))
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.6, 1.1) * max(1.0, u / 60))
    # exposure window and gamma, heel effect
    lo, hi = rng.uniform(-0.06, 0.06), rng.uniform(0.9, 1.02)
    img = cv2.pow(np.clip((img - lo) * (1.0 / (hi - lo)), 0, 1), rng.uniform(0.75, 1.3))
    img *= 1.0 + rng.uniform(-0.06, 0.06) * np.linspace(-1, 1, h, dtype=np.float32)[:, None]
    return np.clip(img, 0, 1).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Overlays, output modes, files
# --------------------------------------------------------------------------------------------------

_TEXTS = (
    "R",
    "L",
    "LAT",
    "C-SPINE LAT",
    "RADIOLOGY DEPT",
    "CITY GENERAL HOSP",
    "NECK LATERAL",
    "kVp 70  mAs 16",
    "SID 180cm",
    "DR-1",
    "STANDING",
)


def _draw_text(m: np.ndarray, rng: np.random.Generator) -> None:
    """Burn 1-3 strings (side markers, dates, department/device labels) near the corners of mask `m`."""
    h, w = m.shape
    scale = max(h, w) / 900
    font = int(rng.choice([cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_PLAIN, cv2.FONT_HERSHEY_DUPLEX]))
    for _ in range(int(rng.integers(1, 4))):
        kind = rng.random()
        if kind < 0.35:
            s = str(rng.choice(["R", "L"]))
            fs = scale * rng.uniform(1.2, 2.2)
        elif kind < 0.6:
            s = f"{rng.integers(2008, 2023)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}"
            fs = scale * rng.uniform(0.5, 0.9)
        else:
            s = str(rng.choice(_TEXTS))
            if rng.random() < 0.4:
                s += f" {rng.integers(100000, 999999)}"
            fs = scale * rng.uniform(0.5, 0.9)
        thick = max(1, int(round(fs * rng.uniform(1.2, 2.2))))
        (tw, th), _ = cv2.getTextSize(s, font, fs, thick)
        left = int(rng.integers(5, max(6, w // 10)))
        right = max(5, w - tw - int(rng.integers(5, max(6, w // 10))))
        x = int(rng.choice([left, right]))
        y = int(
            rng.choice(
                [rng.integers(th + 5, th + 5 + max(1, h // 10)), max(th + 5, h - int(rng.integers(5, max(6, h // 10))))]
            )
        )
        cv2.putText(m, s, (x, y), font, fs, 255, thick, cv2.LINE_AA)


def _overlay(rng: np.random.Generator, h: int, w: int, mm_per_px: float, text: bool, ruler: bool) -> np.ndarray:
    """uint8 mask of burned-in text and/or a ruler (255 = fully burned in)."""
    m = np.zeros((h, w), np.uint8)
    if text:
        _draw_text(m, rng)
    if ruler:
        draw_ruler(m, rng, mm_per_px)
    return m


def _collimate(img: np.ndarray, rng: np.random.Generator, spine: Spine) -> np.ndarray:
    """Dark shutter borders outside a rectangle that still contains the spine."""
    h, w = img.shape
    pts = np.concatenate([spine.keypoints, spine.dens])
    lo, hi = pts.min(axis=0) - spine.u, pts.max(axis=0) + spine.u
    x0 = int(rng.uniform(0, max(1.0, min(lo[0], w * 0.12))))
    y0 = int(rng.uniform(0, max(1.0, min(lo[1], h * 0.08))))
    x1 = w - int(rng.uniform(0, max(1.0, min(w - hi[0], w * 0.12))))
    y1 = h - int(rng.uniform(0, max(1.0, min(h - hi[1], h * 0.08))))
    out = img * np.float32(rng.uniform(0.05, 0.3))
    out[y0:y1, x0:x1] = img[y0:y1, x0:x1]
    return out


def labelme(view: View, file_id: str, rng: np.random.Generator, duplicate_label: bool) -> dict[str, Any]:
    """LabelMe document with the 23 keypoints (plus a displaced second "C3 top right" if asked)."""
    kp = view.spine.keypoints + rng.normal(0, 0.012 * view.spine.u, (23, 2))
    kp = np.clip(kp, 0.0, [view.width - 1.0, view.height - 1.0])
    shapes: list[dict[str, Any]] = []
    for label, (x, y) in zip(KEYPOINT_LABELS, kp):
        shapes.append(
            {
                "label": label,
                "points": [[round(float(x), 4), round(float(y), 4)]],
                "group_id": None,
                "shape_type": "polygon" if rng.random() < 0.04 else "point",
                "flags": {},
            }
        )
    if duplicate_label:
        src = shapes[KEYPOINT_LABELS.index("C3 top right")]
        ((x, y),) = src["points"]
        dx, dy = rng.uniform(1.5, 4.0, 2) * rng.choice([-1, 1], 2)
        x2 = float(np.clip(x + dx, 0, view.width - 1))
        y2 = float(np.clip(y + dy, 0, view.height - 1))
        shapes.append({**src, "points": [[round(x2, 4), round(y2, 4)]], "shape_type": "point"})
    if rng.random() < 0.25:
        shapes = [shapes[i] for i in rng.permutation(len(shapes))]
    return {
        "version": "4.5.6",
        "flags": {},
        "shapes": shapes,
        "imagePath": f"..\\datasets-PNG\\{file_id}.png",
        "imageData": None,
        "imageHeight": view.height,
        "imageWidth": view.width,
    }


def measurements(view: View) -> dict[str, float]:
    """Sheet measurements derived from the view's keypoints (pixels and degrees)."""
    kp = view.spine.keypoints
    name = {k: i for i, k in enumerate(KEYPOINT_LABELS)}

    def pt(label: str) -> np.ndarray:
        return kp[name[label]]

    def slope(level: str) -> float:
        v = pt(f"{level} bottom right") - pt(f"{level} bottom left")
        return math.degrees(math.atan2(-v[1], v[0]))  # + = endplate rising towards posterior

    # lordosis: the endplates fan open anteriorly, C7's rising more towards posterior (positive Cobb)
    cobb = slope("C7") - slope("C2")
    a, b = pt("C2 bottom right"), pt("C7 bottom right")
    ab = b - a
    length = float(np.linalg.norm(ab))
    cci = 0.0
    for lv in ("C3", "C4", "C5", "C6"):
        q = pt(f"{lv} bottom right") - a
        cci += (ab[0] * q[1] - ab[1] * q[0]) / length  # > 0 when the point lies anterior (image-left)
    cci = cci / length * 100 if length > 0 else 0.0
    out = {
        "C2-7Cobb": cobb,
        "CCI": cci,
        "C2-7 SVA (pixel)": float(pt("C7 top right")[0] - pt("C2 centroid")[0]),
        "C2 slope (degree)": slope("C2"),
        "C7 slope (degree)": slope("C7"),
    }
    for i, disc in enumerate(DISCS):
        upper, lower = LEVELS[i], LEVELS[i + 1]
        ant = np.linalg.norm(pt(f"{lower} top left") - pt(f"{upper} bottom left"))
        post = np.linalg.norm(pt(f"{lower} top right") - pt(f"{upper} bottom right"))
        out[f"{disc} disc height (pixel)"] = float((ant + post) / 2)
    out["C3-7 posterior height (pixel)"] = float(np.linalg.norm(pt("C7 bottom right") - pt("C3 top right")))
    return {k: round(v, 2) for k, v in out.items()}


def write_sheet(
    path: Path,
    rows: Sequence[RowPlan],
    anatomies: Sequence[Anatomy],
    values: Sequence[dict[str, float]],
    mm: Sequence[float],
) -> None:
    """datasets.xlsx: super-header (merged groups) on row 1, column names on row 2, data below."""
    from openpyxl import Workbook

    wb = Workbook()
    ws = wb.active
    ws.title = "Sheet1"
    n_basic = 5
    ws.cell(row=1, column=1, value=SUPER_HEADER[0])
    ws.cell(row=1, column=n_basic + 1, value=SUPER_HEADER[1])
    ws.merge_cells(start_row=1, start_column=1, end_row=1, end_column=n_basic)
    ws.merge_cells(start_row=1, start_column=n_basic + 1, end_row=1, end_column=len(SHEET_COLUMNS))
    for j, name in enumerate(SHEET_COLUMNS, start=1):
        ws.cell(row=2, column=j, value=name)
    for r, (row, anat, vals, px) in enumerate(zip(rows, anatomies, values, mm), start=3):
        record = [
            row.number,
            row.gender,
            row.age,
            row.disease,
            anat.curvature,
            *(vals[c] for c in MEASURE_COLUMNS),
            round(px, 4),
        ]
        for j, v in enumerate(record, start=1):
            ws.cell(row=r, column=j, value=v)
    wb.save(path)


def _write_image(row: RowPlan, view: View, rng: np.random.Generator, png_dir: Path, json_dir: Path) -> None:
    """Render, encode and write one PNG and its LabelMe JSON."""
    style = sample_style(rng)
    img = render(view, rng)
    if style.collimated:
        img = _collimate(img, rng, view.spine)
    if style.text or style.ruler:
        ov = _overlay(rng, view.height, view.width, view.mm_per_px, style.text, style.ruler)
    else:
        ov = np.zeros(img.shape, np.uint8)
    write_png(png_dir / f"{row.file_id}.png", encode(img, ov, style), style.mode)
    doc = labelme(view, row.file_id, rng, row.duplicate_label)
    (json_dir / f"{row.file_id}.json").write_text(json.dumps(doc, indent=2), encoding="utf-8")


def synthesize(
    out: Path, n: int = 200, seed: int = 0, healthy_fraction: float = 0.04, progress: bool = False
) -> SynthResult:
    """Write a synthetic CSXA-layout data set of `n` images under `out` and describe it.

    `n` counts images; the sheet has n + ~0.75 % rows (rows without image). About
    `healthy_fraction` of the images are healthy (whole patients are assigned), with at least one
    healthy and one spondylosis patient when n >= 10. Same (n, seed, healthy_fraction) gives
    byte-identical PNG and JSON files. Raises ValueError on bad arguments and FileExistsError when
    the PNG or JSON folder holds files this data set would not write (re-running the same arguments
    into the same folder, e.g. after an interruption, overwrites in place)."""
    _validate(n, seed, healthy_fraction)
    n = int(n)
    out = Path(out)
    png_dir, json_dir = out / "datasets-PNG", out / "datasets-JSON"
    patients, rows = _plan(n, int(seed), float(healthy_fraction))
    ids = [r.file_id for r in rows if r.has_image]
    check_no_foreign_files(png_dir, {f"{i}.png" for i in ids})
    check_no_foreign_files(json_dir, {f"{i}.json" for i in ids})
    png_dir.mkdir(parents=True, exist_ok=True)
    json_dir.mkdir(parents=True, exist_ok=True)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="synthesizing CSXA-style images", unit="img")
    values: list[dict[str, float]] = []
    mms: list[float] = []
    try:
        for row in rows:
            rng = np.random.default_rng([int(seed), _STREAM_ROW, row.number])
            view = sample_view(rng, patients[row.patient].anatomy)
            values.append(measurements(view))
            mms.append(view.mm_per_px)
            if row.has_image:  # rows without image still get plausible measurements
                _write_image(row, view, rng, png_dir, json_dir)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    write_sheet(out / "datasets.xlsx", rows, [patients[r.patient].anatomy for r in rows], values, mms)
    n_healthy = sum(1 for r in rows if r.has_image and r.disease == DISEASE_HEALTHY)
    return SynthResult(root=out, n_images=n, n_rows=len(rows), n_healthy=n_healthy, n_patients=len(patients))
