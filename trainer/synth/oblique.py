"""Synthetic oblique cervical spine data set in the layout of docs/stenosis-data.md.

`synthesize_oblique(out, n, seed)` writes::

    out/datasets-PNG/<ID>.png     n oblique cervical spine "radiographs" (left and right obliques)
    out/datasets-JSON/<ID>.json   LabelMe files with one ``cspine`` rectangle, for ~annotated_fraction
    out/datasets.xlsx             "Sheet1": row 1 a super-header, row 2 the column names

One sheet row per image. Patients are runs of consecutive rows with the same (gender, age): most have a
left and a right oblique, about 10 % only one view. About 0.75 % of rows have no image (at least one when
``n >= 50``), as in CSXA; they are the missing second view of a one-view patient.

Images reuse the lateral generator's physical model and helpers (`trainer.synth.drawing`): soft tissue, mandible
and skull base, C2-C7 bodies with cortical rims and cancellous texture, film grain, exposure, output
modes, polarity and burned-in extras. On top of that an oblique view shows the posterior elements seen
obliquely: pedicles as bright oval rings, the intervertebral foramina C2-3..C6-7 as dark ovals between
them, the articular pillars with their facet joints and the laminae behind, C1, T1, the clavicle and the
first rib. Everything is drawn in the canonical (left oblique) orientation, anterior = image-left and
the foramina image-right of the bodies; a right oblique is that picture mirrored, foramina image-left,
before the side marker and text are burned in. So mirroring a right view makes it look like a left one.

Foraminal stenosis (label 1) narrows one to three foramina (mostly C5-6, C4-5, C6-7) with a severity in
0.3..1.0: the foramen shrinks and flattens, a dense uncovertebral osteophyte bulges into it from the
body side (sometimes facet hypertrophy from behind) and the disc below the level loses some height.
Normal views (label 0) have open, regular foramina with natural variation in size and a slight kidney
shape. Left and right views of a patient share the spine and may differ in label, as in the study.

Determinism: everything is drawn from ``numpy.random.Generator`` streams seeded from
``(seed, stream, index)``; the geometry of an image (including its ROI box) is drawn from its own stream,
separately from the rendering, so `describe_oblique` recomputes it without rendering. A given
``(n, seed, positive_fraction, annotated_fraction)`` gives byte-identical PNG and JSON files (the xlsx
carries a save timestamp; its cell values are identical).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from trainer.synth import drawing
from trainer.synth.drawing import SynthResult

__all__ = [
    "FORAMINA",
    "SHEET_COLUMNS",
    "ImageInfo",
    "describe_oblique",
    "render_oblique",
    "synthesize_oblique",
]

FORAMINA: tuple[str, ...] = drawing.DISCS  # "C2-3" .. "C6-7"
ROI_LABEL = "cspine"

SUPER_HEADER = ("Cervical oblique radiographs: basic information", "Foraminal stenosis (MRI-confirmed)")
COL_NUMBER = "Number"
COL_GENDER = "Gender:female-1,male-0"
COL_AGE = "Age"
COL_VIEW = "View: L. left oblique; R. right oblique"
COL_STENOSIS = "Stenosis: 1. Foraminal stenosis; 0. Normal"
COL_LEVELS = "Levels (narrowed foramina)"
COL_PIXEL_EQ = "Pixel equivalent (mm/pixel)"
SHEET_COLUMNS: tuple[str, ...] = (COL_NUMBER, COL_GENDER, COL_AGE, COL_VIEW, COL_STENOSIS, COL_LEVELS, COL_PIXEL_EQ)

SINGLE_VIEW_FRACTION = 0.1
LEVEL_WEIGHTS = (0.06, 0.16, 0.30, 0.33, 0.15)  # which foramina narrow: C5-6 and C4-5 most often

# Generator streams: (seed, stream, index) -> independent, reproducible draws.
_STREAM_PLAN, _STREAM_PATIENT, _STREAM_GEOM, _STREAM_RENDER = 11, 12, 13, 14


# --------------------------------------------------------------------------------------------------
# Plan: patients and sheet rows
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObliquePatient:
    index: int
    gender: int
    age: int
    anatomy: drawing.Anatomy  # shared by both views (bodies, discs, curve)
    degen_levels: tuple[int, ...]  # foramina that can narrow (patients with a positive view)
    degen_severity: float  # 0 when none


@dataclass(frozen=True)
class ObliqueRow:
    number: int
    patient: int
    gender: int
    age: int
    view: str  # "L" or "R"
    label: int  # 1 stenosis, 0 normal
    has_image: bool
    json_kind: str  # "rect" (annotated), "none" (no JSON), "empty" (no shapes), "other" (no cspine shape)

    @property
    def file_id(self) -> str:
        return f"{self.number:04d}{self.gender}{self.age:02d}"

    @property
    def annotated(self) -> bool:
        return self.json_kind == "rect"


def _is_int(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, np.integer))


def _is_real(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(v)


def _validate(n: Any, seed: Any, positive_fraction: Any, annotated_fraction: Any) -> None:
    if not _is_int(n):
        raise ValueError(f"n must be an integer number of images, got {n!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1 (number of images), got {n}")
    if n + drawing.n_missing(int(n)) > drawing.MAX_ROWS:
        raise ValueError(f"n={n} is too large: the 4-digit Number allows at most {drawing.MAX_ROWS} sheet rows")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not _is_real(positive_fraction) or not 0.0 < float(positive_fraction) < 1.0:
        raise ValueError(f"positive_fraction must be strictly between 0 and 1, got {positive_fraction!r}")
    if not _is_real(annotated_fraction) or not 0.0 <= float(annotated_fraction) <= 1.0:
        raise ValueError(f"annotated_fraction must be between 0 and 1 (inclusive), got {annotated_fraction!r}")


def _oblique_anatomy(rng: np.random.Generator, degenerate: bool) -> drawing.Anatomy:
    """The lateral generator's anatomy seen at 45 degrees: bodies foreshortened, the curve flatter;
    older spines get small anterior osteophytes (either label: a confounder, not the finding)."""
    anat = drawing.sample_anatomy(rng, healthy=True)
    lesions: list[drawing.Lesion] = []
    if rng.random() < (0.45 if degenerate else 0.2):
        for d in sorted(int(x) for x in rng.choice(5, size=int(rng.integers(1, 3)), replace=False)):
            lesions.append(
                drawing.Lesion(
                    disc=d,
                    narrowing=1.0,
                    spur_upper_ant=float(rng.uniform(0.08, 0.22)),
                    spur_lower_ant=float(rng.uniform(0.0, 0.15)),
                    spur_upper_post=0.0,
                    spur_lower_post=0.0,
                    sclerosis=0.0,
                )
            )
    return dataclasses.replace(
        anat, depths=tuple(d * 0.78 for d in anat.depths), curve_deg=anat.curve_deg * 0.7, lesions=tuple(lesions)
    )


def _view_labels(rng: np.random.Generator, sizes: Sequence[int], fraction: float, n: int) -> list[list[int]]:
    """Per patient, the labels of its views; exactly round(fraction * n) positive images (at least one
    positive and one normal when n >= 10). Stenosis is often bilateral, not always."""
    target = round(fraction * n)
    if n >= 10:
        target = min(max(target, 1), n - 1)
    labels = [[0] * s for s in sizes]
    remaining = target
    for i in rng.permutation(len(sizes)):
        if remaining <= 0:
            break
        if sizes[i] == 2 and remaining >= 2 and rng.random() < 0.55:
            labels[i] = [1, 1]
            remaining -= 2
        else:
            labels[i][int(rng.integers(sizes[i]))] = 1
            remaining -= 1
    return labels


def _new_key(rng: np.random.Generator, avoid: set[tuple[int, int]], older: bool) -> tuple[int, int]:
    while True:
        key = (int(rng.integers(2)), int(rng.integers(42, 84)) if older else int(rng.integers(22, 76)))
        if key not in avoid:
            return key


def _plan(
    n: int, seed: int, positive_fraction: float, annotated_fraction: float
) -> tuple[list[ObliquePatient], list[ObliqueRow]]:
    rng = np.random.default_rng([seed, _STREAM_PLAN, n])
    sizes: list[int] = []
    total = 0
    while total < n:
        s = min(1 if rng.random() < SINGLE_VIEW_FRACTION else 2, n - total)
        sizes.append(s)
        total += s
    labels = _view_labels(rng, sizes, positive_fraction, n)

    # rows without image: the missing second view of one-view patients (or, failing that, a patient
    # whose single row has no image)
    n_missing = drawing.n_missing(n)
    singles = [i for i, s in enumerate(sizes) if s == 1]
    phantom_of = (
        set(int(i) for i in rng.choice(singles, size=min(n_missing, len(singles)), replace=False)) if singles else set()
    )
    lone = n_missing - len(phantom_of)
    lone_after = sorted(int(x) for x in rng.integers(len(sizes), size=lone))

    # (patient-ish entries) in sheet order: ("p", i) real patient, ("x", None) row-only patient
    entries: list[tuple[str, int]] = []
    k = 0
    for i in range(len(sizes)):
        entries.append(("p", i))
        while k < len(lone_after) and lone_after[k] == i:
            entries.append(("x", -1))
            k += 1

    patients: list[ObliquePatient] = []
    rows_spec: list[tuple[int, int, int, str, int, bool]] = []  # patient, gender, age, view, label, has_image
    prev: tuple[int, int] | None = None
    for kind, i in entries:
        pi = len(patients)
        if kind == "p":
            positive = any(labels[i])
        else:
            positive = bool(rng.random() < positive_fraction)
        gender, age = _new_key(rng, {prev} if prev else set(), positive)
        prev = (gender, age)
        prng = np.random.default_rng([seed, _STREAM_PATIENT, pi])
        anat = _oblique_anatomy(prng, positive or age > 55)
        degen_levels: tuple[int, ...] = ()
        degen_sev = 0.0
        if positive:
            k_levels = int(prng.choice(3, p=[0.5, 0.35, 0.15])) + 1
            degen_levels = tuple(sorted(int(x) for x in prng.choice(5, size=k_levels, replace=False, p=LEVEL_WEIGHTS)))
            degen_sev = float(prng.uniform(0.3, 1.0))
            discs = list(anat.discs)
            for lv in degen_levels:  # disc degeneration: the same disc in both views
                discs[lv] *= 1.0 - 0.25 * degen_sev * float(prng.uniform(0.6, 1.0))
            anat = dataclasses.replace(anat, discs=tuple(discs))
        patients.append(ObliquePatient(pi, gender, age, anat, degen_levels, degen_sev))
        if kind == "p":
            views = ["L", "R"] if rng.random() < 0.8 else ["R", "L"]
            if sizes[i] == 1:
                views = [str(rng.choice(["L", "R"]))]
            for v, y in zip(views, labels[i]):
                rows_spec.append((pi, gender, age, v, y, True))
            if i in phantom_of:
                other = "R" if views[0] == "L" else "L"
                rows_spec.append((pi, gender, age, other, int(rng.random() < 0.4), False))
        else:
            rows_spec.append((pi, gender, age, str(rng.choice(["L", "R"])), int(positive), False))

    image_rows = [r for r, spec in enumerate(rows_spec) if spec[5]]
    n_annot = round(annotated_fraction * len(image_rows))
    annotated = set(int(x) for x in rng.choice(image_rows, size=n_annot, replace=False)) if n_annot else set()
    unannotated = [r for r in image_rows if r not in annotated]
    special: dict[int, str] = {}
    if n >= 20 and len(unannotated) >= 2:
        a, b = (int(x) for x in rng.choice(unannotated, size=2, replace=False))
        special = {a: "empty", b: "other"}
    rows = []
    for r, (pi, gender, age, v, y, has) in enumerate(rows_spec):
        kind = "rect" if r in annotated else special.get(r, "none")
        rows.append(
            ObliqueRow(
                number=r + 1,
                patient=pi,
                gender=gender,
                age=age,
                view=v,
                label=y,
                has_image=has,
                json_kind=kind if has else "none",
            )
        )
    return patients, rows


# --------------------------------------------------------------------------------------------------
# Geometry of one view (canonical = left oblique orientation)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Foramen:
    """One intervertebral foramen (level 0 = C2-3 .. 4 = C6-7) in canonical pixels."""

    level: int
    severity: float  # 0 = open
    centre: np.ndarray  # (2,)
    outline: np.ndarray  # (K, 2) the foramen as drawn (narrowed when severity > 0)
    base: np.ndarray  # (K, 2) the same foramen without encroachment (its "normal" size)
    osteophyte: np.ndarray | None  # polygon of the dense bone bulging into it
    facet_spur: np.ndarray | None
    area_ratio: float  # area(outline) / area(normal foramen of the same patient-scale)


@dataclass(frozen=True)
class ObliqueView:
    height: int
    width: int
    spine: drawing.Spine  # C2-C7 in canonical orientation (anterior = image-left)
    foramina: tuple[Foramen, ...]
    box: tuple[float, float, float, float]  # canonical ROI box
    mm_per_px: float
    mirrored: bool  # right oblique: the canonical picture flipped horizontally

    def to_image(self, pts: np.ndarray) -> np.ndarray:
        """Canonical pixel coordinates -> coordinates in the written image."""
        p = np.array(pts, dtype=np.float64, copy=True)
        if self.mirrored:
            p[..., 0] = (self.width - 1) - p[..., 0]
        return p

    @property
    def image_box(self) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = self.box
        if self.mirrored:
            x0, x1 = (self.width - 1) - x1, (self.width - 1) - x0
        return (x0, y0, x1, y1)


def _poly_area(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _ang_gauss(theta: np.ndarray, centre: float, sigma: float) -> np.ndarray:
    d = np.angle(np.exp(1j * (theta - centre)))
    return np.exp(-0.5 * (d / sigma) ** 2)


def _foramen_params(rng: np.random.Generator, severity: float) -> dict[str, float]:
    """Shape of one foramen; severity 0 = open and regular."""
    s = severity
    prm = {
        "scale": float(rng.uniform(0.9, 1.1)),
        "aspect": float(rng.uniform(0.92, 1.08)),
        "rot": float(rng.uniform(-0.28, 0.05)),
        "ant": float(rng.uniform(0.0, 0.09)),  # slight kidney shape (normal uncinate process)
        "ant_at": float(math.pi - rng.uniform(0.2, 0.5)),
        "ant_w": float(rng.uniform(0.45, 0.65)),
        "post": float(rng.uniform(0.0, 0.05)),
        "post_at": float(rng.uniform(0.2, 0.8)),
        "shrink": 1.0,
        "flatten": 1.0,
    }
    if s > 0:
        prm["ant"] = 0.13 + s * float(rng.uniform(0.3, 0.45))
        prm["ant_w"] = float(rng.uniform(0.5, 0.7))
        if rng.random() < 0.5:
            prm["post"] = float(rng.uniform(0.0, 0.04)) + s * float(rng.uniform(0.12, 0.3))
        prm["shrink"] = 1.0 - 0.2 * s * float(rng.uniform(0.8, 1.2))
        prm["flatten"] = 1.0 - 0.15 * s * float(rng.uniform(0.6, 1.2))
    return prm


def _foramen(level: int, severity: float, spine: drawing.Spine, rng: np.random.Generator) -> Foramen:
    """Foramen between body `level` and `level + 1`, just posterior to the disc, bounded above and below
    by the pedicles (see `_pedicle_centre`)."""
    u = spine.u
    prm = _foramen_params(rng, severity)
    d0, p0 = spine.axes(level)
    d1, p1 = spine.axes(level + 1)
    d = (d0 + d1) / np.linalg.norm(d0 + d1)
    p = (p0 + p1) / np.linalg.norm(p0 + p1)
    wall = (spine.corners[level][2] + spine.corners[level + 1][1]) / 2  # posterior disc margin
    rx = 0.32 * u * prm["scale"] / math.sqrt(prm["aspect"])
    ry = 0.48 * u * prm["scale"] * math.sqrt(prm["aspect"])
    centre = wall + p * (0.12 * u + rx) - d * 0.12 * u
    theta = np.linspace(0.0, 2 * math.pi, 56, endpoint=False)
    radial = (
        1.0
        - prm["ant"] * _ang_gauss(theta, prm["ant_at"], prm["ant_w"])
        - prm["post"] * _ang_gauss(theta, prm["post_at"], 0.5)
    )
    cr, sr = math.cos(prm["rot"]), math.sin(prm["rot"])

    def place(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        xr, yr = x * cr - y * sr, x * sr + y * cr
        return centre + np.outer(xr, p) + np.outer(yr, d)

    ex, ey = np.cos(theta) * rx, np.sin(theta) * ry
    base = place(ex, ey)
    sx, sy = prm["shrink"], prm["shrink"] * prm["flatten"]
    outline = place(ex * radial * sx, ey * radial * sy + (1 - sy) * ry * 0.3)
    normal_area = math.pi * rx * ry * (1 - 0.045)  # ~ area of an open foramen of this size
    osteophyte = facet = None
    if severity > 0:
        # the dense uncovertebral spur: the band of the base ellipse it pushes into, a little beyond it
        sel = _ang_gauss(theta, prm["ant_at"], prm["ant_w"]) > 0.2
        idx = np.flatnonzero(sel)
        order = idx[np.argsort(np.angle(np.exp(1j * (theta[idx] - prm["ant_at"]))))]
        outer = place(ex[order] * 1.18, ey[order] * 1.1)
        inner = outline[order][::-1]
        osteophyte = np.concatenate([outer, inner])
        if prm["post"] > 0.1:
            sel = _ang_gauss(theta, prm["post_at"], 0.5) > 0.1
            idx = np.flatnonzero(sel)
            order = idx[np.argsort(np.angle(np.exp(1j * (theta[idx] - prm["post_at"]))))]
            facet = np.concatenate([place(ex[order] * 1.1, ey[order] * 1.06), outline[order][::-1]])
    return Foramen(
        level=level,
        severity=float(severity),
        centre=centre,
        outline=outline,
        base=base,
        osteophyte=osteophyte,
        facet_spur=facet,
        area_ratio=_poly_area(outline) / normal_area,
    )


def _level_severities(rng: np.random.Generator, patient: ObliquePatient, label: int) -> list[float]:
    sev = [0.0] * 5
    if not label:
        return sev
    levels = list(patient.degen_levels)
    if len(levels) > 1 and rng.random() < 0.35:  # this side shows only some of the degenerate levels
        levels = [int(x) for x in rng.choice(levels, size=int(rng.integers(1, len(levels))), replace=False)]
    top = float(np.clip(patient.degen_severity * rng.uniform(0.85, 1.15), 0.3, 1.0))
    for j, lv in enumerate(sorted(levels, key=lambda v: -LEVEL_WEIGHTS[v])):
        sev[lv] = top if j == 0 else float(np.clip(top * rng.uniform(0.6, 1.0), 0.3, 1.0))
    return sev


def _shift_view_parts(
    spine: drawing.Spine, foramina: list[Foramen], shift: np.ndarray
) -> tuple[drawing.Spine, list[Foramen]]:
    sp = drawing.shift_spine(spine, shift)
    out = []
    for f in foramina:
        out.append(
            dataclasses.replace(
                f,
                centre=f.centre + shift,
                outline=f.outline + shift,
                base=f.base + shift,
                osteophyte=None if f.osteophyte is None else f.osteophyte + shift,
                facet_spur=None if f.facet_spur is None else f.facet_spur + shift,
            )
        )
    return sp, out


def _roi_points(spine: drawing.Spine, foramina: Sequence[Foramen]) -> np.ndarray:
    return np.concatenate([spine.dens, *spine.outlines, *(f.base for f in foramina)])


def sample_oblique_view(rng: np.random.Generator, patient: ObliquePatient, row: ObliqueRow) -> ObliqueView:
    """Image size, scale, pose and foramina of one oblique view (drawn from the row's geometry stream)."""
    anat = patient.anatomy
    h = int(rng.integers(500, 1201))
    w = int(np.clip(round(h * rng.uniform(0.72, 1.08)), 500, 1200))
    length = drawing.spine_length_units(anat)
    u = min(rng.uniform(0.46, 0.62) * h / length, w / 8.0)
    tilt = math.radians(rng.normal(4.0, 5.0))
    curve_scale = rng.uniform(0.85, 1.15)
    spine = drawing.build_spine(anat, u, np.zeros(2), tilt, curve_scale, rng)
    sev = _level_severities(rng, patient, row.label)
    foramina = [_foramen(k, sev[k], spine, rng) for k in range(5)]
    # place the spine + posterior elements (they reach ~1.6 u behind the bodies) in the image
    pts = _roi_points(spine, foramina)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    hi = hi + np.array([0.9 * u, 0.0])  # pillars and laminae behind the foramina
    centre = np.array([w * (0.5 + rng.normal(0, 0.05)), h * (0.5 + rng.normal(0, 0.05))])
    spine, foramina = _shift_view_parts(spine, foramina, centre - (lo + hi) / 2)
    pts = _roi_points(spine, foramina)
    margin = 0.35 * u + 4
    size = np.array([w, h], dtype=np.float64)
    shift = np.maximum(0, margin - pts.min(axis=0)) - np.maximum(0, pts.max(axis=0) - (size - 1 - margin))
    if np.any(shift):
        spine, foramina = _shift_view_parts(spine, foramina, shift)
        pts = _roi_points(spine, foramina)
    m = 0.18 * u
    box = (
        float(max(0.0, pts[:, 0].min() - m)),
        float(max(0.0, pts[:, 1].min() - m)),
        float(min(w - 1.0, pts[:, 0].max() + m)),
        float(min(h - 1.0, pts[:, 1].max() + m)),
    )
    mm = 15.5 * 0.78 * rng.normal(1, 0.06) / (np.mean(anat.depths[1:5]) * u)
    return ObliqueView(h, w, spine, tuple(foramina), box, float(mm), mirrored=row.view == "R")


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def _pedicle_centre(spine: drawing.Spine, i: int) -> np.ndarray:
    d, p = spine.axes(i)
    c = spine.corners[i]
    return c[1] + p * 0.43 * spine.u + d * 0.36 * spine.u


def _ellipse(centre: np.ndarray, a: np.ndarray, b: np.ndarray, n: int = 28) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)[:, None]
    return centre + np.cos(t) * a + np.sin(t) * b


def _draw_posterior_oblique(att: np.ndarray, view: ObliqueView, rng: np.random.Generator) -> None:
    """Pedicles, foramina, articular pillars with facet joints, laminae, C1 and the contralateral pedicles
    over the bodies: one layer, later shapes overwriting earlier ones, blurred once and added."""
    sp, u = view.spine, view.spine.u
    mu = rng.uniform(0.2, 0.3)
    fill: list[tuple[np.ndarray, float]] = []
    lines: list[tuple[np.ndarray, float, int, bool]] = []  # polyline, value, thickness, closed
    rim = max(1, int(round(0.055 * u)))

    # laminae: faint shingles behind the pillars
    for i in range(6):
        d, p = sp.axes(i)
        c = sp.corners[i]
        a = c[1] + p * 1.35 * u - d * 0.05 * u
        q = np.array([a, a + p * 0.75 * u + d * 0.35 * u, a + p * 0.65 * u + d * 1.25 * u, a + d * 1.0 * u])
        ol, _ = drawing.rounded_outline(q, 0.15 * u, (0.04, 0.04, 0.04, 0.04))
        fill.append((ol, mu * rng.uniform(0.45, 0.6)))
    # the foraminal zone: uncovertebral region and pedicles, from the posterior walls backwards
    left, right = [], []
    for i in range(6):
        d, p = sp.axes(i)
        c = sp.corners[i]
        for q in (c[1], c[2]):
            left.append(q - p * 0.05 * u)
            right.append(q + p * 0.95 * u)
    top_d, top_p = sp.axes(0)
    fill.append((np.array([*left, *right[::-1]]), mu))
    # articular pillars (lateral masses), one per level, overlapping like shingles; facet joint lines
    for i in range(6):
        d, p = sp.axes(i)
        c = sp.corners[i]
        hgt = np.linalg.norm(c[2] - c[1])
        a = c[1] + p * 0.78 * u - d * 0.1 * u
        wd = u * rng.uniform(0.6, 0.75)
        q = np.array([a, a + p * wd + d * 0.12 * u, a + p * wd * 0.95 + d * (hgt + 0.35 * u), a + d * (hgt + 0.2 * u)])
        ol, _ = drawing.rounded_outline(q, 0.18 * u, (0.05, 0.06, 0.05, 0.02))
        fill.append((ol, mu * rng.uniform(1.05, 1.25)))
        lines.append((ol, mu * 1.35, rim, True))
        if i < 5:
            j0 = a + d * (hgt + 0.16 * u) + p * 0.05 * u
            lines.append(
                (np.array([j0, j0 + p * wd * 0.9 + d * 0.14 * u]), mu * 0.55, max(1, int(round(0.06 * u))), False)
            )
    # C1 lateral mass above C2, the C2 pars
    dens_top = sp.dens[np.argmin(sp.dens[:, 1])]
    c1 = dens_top + top_p * 0.55 * u + top_d * 0.25 * u
    c1_ring = _ellipse(c1, top_p * rng.uniform(0.8, 1.0) * u, top_d * rng.uniform(0.26, 0.34) * u)
    fill.append((c1_ring, mu * 0.8))
    lines.append((c1_ring, mu * 1.35, rim, True))
    # pedicles: oval rings between the foramina
    for i in range(6):
        d, p = sp.axes(i)
        pc = _pedicle_centre(sp, i)
        ring = _ellipse(pc, p * 0.22 * u, d * 0.17 * u, 20)
        fill.append((ring, mu * 1.2))
        lines.append((ring, mu * 1.9, rim, True))
    # osteophytes (drawn over the rest), then the foramina cut out, then their cortical margins
    spurs = [
        (poly, mu * (1.9 + 0.9 * f.severity))
        for f in view.foramina
        for poly in (f.osteophyte, f.facet_spur)
        if poly is not None
    ]
    holes = [f.outline for f in view.foramina]
    # contralateral pedicles projected over the posterior half of each body: faint rings
    over: list[np.ndarray] = []
    for i in range(1, 6):
        d, p = sp.axes(i)
        c = sp.corners[i]
        cen = (c[1] + c[2]) / 2 - p * 0.3 * u - d * 0.05 * u
        over.append(_ellipse(cen, p * 0.2 * u, d * 0.16 * u, 18))

    allpts = np.concatenate([s for s, _ in fill])
    box = drawing.pixel_bounds(allpts, 0.3 * u + 4, att.shape)
    if box is None:
        return
    x0, y0, x1, y1 = box
    off = np.array([x0, y0], dtype=np.float64)
    layer: np.ndarray = np.zeros((y1 - y0, x1 - x0), np.float32)
    for poly, value in fill:
        cv2.fillPoly(layer, [drawing.fixed(poly, off)], float(value), cv2.LINE_8, drawing.SHIFT)
    for poly, value, th, closed in lines:
        cv2.polylines(layer, [drawing.fixed(poly, off)], closed, float(value), th, cv2.LINE_8, drawing.SHIFT)
    for poly, value in spurs:
        cv2.fillPoly(layer, [drawing.fixed(poly, off)], float(value), cv2.LINE_8, drawing.SHIFT)
    for poly in holes:
        cv2.fillPoly(layer, [drawing.fixed(poly, off)], 0.0, cv2.LINE_8, drawing.SHIFT)
    for f in view.foramina:
        cv2.polylines(
            layer,
            [drawing.fixed(f.outline, off)],
            True,
            float(mu * (1.45 + 0.2 * f.severity)),
            rim,
            cv2.LINE_8,
            drawing.SHIFT,
        )
    for poly in over:
        cv2.polylines(layer, [drawing.fixed(poly, off)], True, float(mu * 0.55), rim, cv2.LINE_8, drawing.SHIFT)
    tex = (
        1.0
        + 0.12 * drawing.lowres_noise(rng, layer.shape, max(2.0, 0.08 * u))
        + 0.06 * drawing.lowres_noise(rng, layer.shape, max(2.0, 0.4 * u))
    )
    layer = cv2.GaussianBlur(layer * tex, (0, 0), max(0.7, 0.045 * u))
    att[y0:y1, x0:x1] += layer


def _draw_lower(att: np.ndarray, view: ObliqueView, rng: np.random.Generator) -> None:
    """T1 body below C7, the clavicle crossing the lower neck and the first rib."""
    sp, u = view.spine, view.spine.u
    d, p = sp.axes(5)
    c7 = sp.corners[5]
    top = (c7[3] + c7[2]) / 2 + d * 0.32 * u
    wdt = np.linalg.norm(c7[2] - c7[3]) * 1.05
    q = np.array(
        [top - p * wdt / 2, top + p * wdt / 2, top + p * wdt / 2 + d * 1.1 * u, top - p * wdt / 2 + d * 1.1 * u]
    )
    ol, _ = drawing.rounded_outline(q, 0.14 * u, (0.0, -0.02, 0.02, -0.04))
    mu_t1 = rng.uniform(0.18, 0.28)
    drawing.stamp(att, [ol], mu_t1, sigma=0.05 * u)
    drawing.stamp(att, [ol], mu_t1 * 0.8, sigma=0.03 * u, thickness=max(1, int(0.06 * u)))
    # clavicle: a gently S-shaped band from low anterior (sternal end, thick) to higher posterior
    # (acromial end, flat and fainter)
    cen = (c7[0] + c7[2]) / 2
    y_off = rng.uniform(1.2, 2.6) * u
    a = cen + np.array([-rng.uniform(3.0, 4.5) * u, y_off + rng.uniform(1.0, 2.0) * u])
    b = cen + np.array([rng.uniform(6.0, 9.0) * u, y_off - rng.uniform(0.2, 1.4) * u])
    t = np.linspace(0.0, 1.0, 32)[:, None]
    along = b - a
    nrm = np.array([-along[1], along[0]]) / np.linalg.norm(along)
    axis = a + t * along + nrm * (rng.uniform(0.3, 0.6) * u * np.sin(2 * np.pi * t))
    half = u * (rng.uniform(0.3, 0.38) - 0.1 * t + 0.12 * np.clip((t - 0.8) / 0.2, 0, 1) ** 2)
    upper, lower = axis + nrm * half, axis - nrm * half
    mu_c = rng.uniform(0.12, 0.22)
    drawing.stamp(att, [np.concatenate([upper, lower[::-1]])], mu_c, sigma=0.1 * u)
    for edge in (upper[:26], lower[:26]):
        drawing.stamp(att, [edge], mu_c * 0.6, sigma=0.05 * u, thickness=max(1, int(0.07 * u)))
    # first rib: an arc from T1 curving laterally and down
    t = np.linspace(math.radians(200), math.radians(330), 24)[:, None]
    rc = top + p * 0.8 * u + d * 2.2 * u
    arc = rc + np.hstack([np.cos(t) * 3.2 * u, -np.sin(t) * 1.8 * u]) * np.array([1.0, -1.0])
    drawing.stamp(att, [arc], rng.uniform(0.08, 0.16), sigma=0.08 * u, thickness=max(2, int(0.3 * u)))


def _draw_mandible_oblique(att: np.ndarray, spine: drawing.Spine, jaw: np.ndarray, rng: np.random.Generator) -> None:
    """The far half of the mandible, projected lower and more anterior in an oblique view."""
    u = spine.u
    ang = jaw + np.array([rng.uniform(-1.4, -0.6) * u, rng.uniform(0.4, 1.2) * u])
    border = drawing.bezier(ang, ang + np.array([-1.8 * u, 0.5 * u]), ang + np.array([-4.5 * u, 0.2 * u]), 12)
    ramus = drawing.bezier(ang, ang + np.array([0.35 * u, -1.0 * u]), ang + np.array([0.1 * u, -2.8 * u]), 10)
    bone = np.concatenate([ramus[::-1], border[1:]])
    inner = bone + np.array([-0.3 * u, -0.4 * u])
    mu = rng.uniform(0.06, 0.13)
    drawing.stamp(att, [np.concatenate([bone, inner[::-1]])], mu, sigma=0.12 * u)
    drawing.stamp(att, [bone], mu * 1.3, sigma=0.05 * u, thickness=max(1, int(0.08 * u)))


def _collimate(
    img: np.ndarray, rng: np.random.Generator, box: tuple[float, float, float, float], u: float
) -> np.ndarray:
    h, w = img.shape
    x0b, y0b, x1b, y1b = box
    x0 = int(rng.uniform(0, max(1.0, min(x0b - u, w * 0.12))))
    y0 = int(rng.uniform(0, max(1.0, min(y0b - u, h * 0.08))))
    x1 = w - int(rng.uniform(0, max(1.0, min(w - x1b - u, w * 0.12))))
    y1 = h - int(rng.uniform(0, max(1.0, min(h - y1b - u, h * 0.08))))
    out = img * np.float32(rng.uniform(0.05, 0.3))
    out[y0:y1, x0:x1] = img[y0:y1, x0:x1]
    return out


def render_oblique(view: ObliqueView, rng: np.random.Generator) -> np.ndarray:
    """Float32 image in [0, 1] (bright = bone) of one view in its written orientation (right obliques
    mirrored), before overlays and output mode."""
    h, w, sp, u = view.height, view.width, view.spine, view.spine.u
    lview = drawing.View(h, w, sp, view.mm_per_px)
    jaw = drawing.jaw_angle(rng, sp)
    low = drawing.soft_tissue(rng, lview, jaw, 4)
    att = cv2.resize(low, (w, h), interpolation=cv2.INTER_LINEAR)
    drawing.draw_head_bones(att, sp, jaw, rng)
    if rng.random() < 0.8:
        _draw_mandible_oblique(att, sp, jaw, rng)
    _draw_lower(att, view, rng)
    _draw_posterior_oblique(att, view, rng)
    texture = drawing.bone_texture(rng, sp, (h, w))
    mu_body, mu_rim = rng.uniform(0.22, 0.32), rng.uniform(0.2, 0.32)
    rim_px = max(1.0, 0.06 * u * rng.uniform(0.8, 1.2))
    for i in range(6):
        drawing.draw_vertebra(att, texture, sp, i, mu_body * rng.uniform(0.93, 1.07), mu_rim, rim_px, rng)
    img: np.ndarray = 1.0 - cv2.exp(-att)
    img += rng.uniform(0.012, 0.035) * (0.4 + img) * drawing.grain(rng, (h, w))
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.6, 1.0) * max(1.0, u / 70))
    lo, hi = rng.uniform(-0.06, 0.06), rng.uniform(0.9, 1.02)
    img = cv2.pow(np.clip((img - lo) * (1.0 / (hi - lo)), 0, 1), rng.uniform(0.75, 1.3))
    img *= 1.0 + rng.uniform(-0.06, 0.06) * np.linspace(-1, 1, h, dtype=np.float32)[:, None]
    img = np.clip(img, 0, 1).astype(np.float32)
    if rng.random() < 0.1:
        img = _collimate(img, rng, view.box, u)
    if view.mirrored:
        img = np.ascontiguousarray(img[:, ::-1])
    return img


# --------------------------------------------------------------------------------------------------
# Overlays, files
# --------------------------------------------------------------------------------------------------

_TEXTS = (
    "C-SPINE OBL",
    "OBLIQUE",
    "RADIOLOGY DEPT",
    "CITY GENERAL HOSP",
    "kVp 72  mAs 20",
    "SID 180cm",
    "DR-2",
    "ERECT",
)


def _overlay(rng: np.random.Generator, h: int, w: int, view: str, mm_per_px: float, style: drawing.Style) -> np.ndarray:
    """Burned-in side marker ("L"/"R", ~55 %), some text and rulers (uint8 mask, 255 = burned in)."""
    m = np.zeros((h, w), np.uint8)
    scale = max(h, w) / 900
    font = int(rng.choice([cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX]))
    if rng.random() < 0.55:
        s = view if rng.random() < 0.8 else {"L": "LPO", "R": "RPO"}[view]
        fs = scale * rng.uniform(1.4, 2.4)
        thick = max(2, int(round(fs * 2.0)))
        (tw, th), _ = cv2.getTextSize(s, font, fs, thick)
        x = int(rng.choice([int(rng.integers(8, max(9, w // 12))), w - tw - int(rng.integers(8, max(9, w // 12)))]))
        y = int(rng.integers(th + 8, th + 8 + max(1, h // 8)))
        if rng.random() < 0.3:  # marker in a box
            cv2.rectangle(m, (x - 6, y - th - 6), (x + tw + 6, y + 6), 255, max(1, thick // 2), cv2.LINE_AA)
        cv2.putText(m, s, (x, y), font, fs, 255, thick, cv2.LINE_AA)
    if style.text:
        y_next = h - int(rng.integers(8, max(9, h // 12)))
        for _ in range(int(rng.integers(1, 3))):
            if rng.random() < 0.4:
                s = f"{rng.integers(2008, 2023)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}"
            else:
                s = str(rng.choice(_TEXTS))
            fs = scale * rng.uniform(0.5, 0.9)
            thick = max(1, int(round(fs * 1.6)))
            (tw, th), _ = cv2.getTextSize(s, font, fs, thick)
            x = int(rng.choice([8, max(8, w - tw - 8)]))
            y = int(max(th + 5, y_next))
            y_next = y - th - 10  # stacked upwards, never on top of each other
            cv2.putText(m, s, (x, y), font, fs, 255, thick, cv2.LINE_AA)
    if style.ruler:
        drawing.draw_ruler(m, rng, mm_per_px)
    return m


def _labelme(
    row: ObliqueRow, view: ObliqueView, rect: tuple[float, float, float, float] | None, rng: np.random.Generator
) -> dict[str, Any]:
    shapes: list[dict[str, Any]] = []
    if row.json_kind == "rect" and rect is not None:
        x0, y0, x1, y1 = (round(v, 2) for v in rect)
        corners = [[[x0, y0], [x1, y1]], [[x1, y1], [x0, y0]], [[x0, y1], [x1, y0]], [[x1, y0], [x0, y1]]]
        pts = corners[int(rng.choice(4, p=[0.7, 0.1, 0.1, 0.1]))]
        shapes.append({"label": ROI_LABEL, "points": pts, "group_id": None, "shape_type": "rectangle", "flags": {}})
    elif row.json_kind == "other":  # a stray annotation that is not the ROI
        fc = view.to_image(view.foramina[3].centre)
        shapes.append(
            {
                "label": "C5-6 foramen",
                "points": [[round(float(fc[0]), 2), round(float(fc[1]), 2)]],
                "group_id": None,
                "shape_type": "point",
                "flags": {},
            }
        )
    return {
        "version": "5.0.1",
        "flags": {},
        "shapes": shapes,
        "imagePath": f"..\\datasets-PNG\\{row.file_id}.png",
        "imageData": None,
        "imageHeight": view.height,
        "imageWidth": view.width,
    }


def _annotator_rect(view: ObliqueView, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """The clinician's rectangle: the ROI box with a few pixels of hand jitter, inside the image."""
    u = view.spine.u
    x0, y0, x1, y1 = np.array(view.image_box) + rng.normal(0, 0.05 * u, 4)
    x0, x1 = np.clip([x0, x1], 0, view.width - 1)
    y0, y1 = np.clip([y0, y1], 0, view.height - 1)
    return float(x0), float(y0), float(x1), float(y1)


def write_sheet(path: Path, rows: Sequence[ObliqueRow], levels: Sequence[str], mm: Sequence[float]) -> None:
    """datasets.xlsx: super-header (merged groups) on row 1, column names on row 2, one row per image."""
    from openpyxl import Workbook

    wb = Workbook()
    ws = wb.active
    ws.title = "Sheet1"
    ws.cell(row=1, column=1, value=SUPER_HEADER[0])
    ws.cell(row=1, column=4, value=SUPER_HEADER[1])
    ws.merge_cells(start_row=1, start_column=1, end_row=1, end_column=3)
    ws.merge_cells(start_row=1, start_column=4, end_row=1, end_column=len(SHEET_COLUMNS))
    for j, name in enumerate(SHEET_COLUMNS, start=1):
        ws.cell(row=2, column=j, value=name)
    for r, (row, lv, px) in enumerate(zip(rows, levels, mm), start=3):
        record = [row.number, row.gender, row.age, row.view, row.label, lv or None, round(px, 4)]
        for j, v in enumerate(record, start=1):
            ws.cell(row=r, column=j, value=v)
    wb.save(path)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageInfo:
    """Ground truth of one written image (coordinates in the written image, right views mirrored)."""

    file_id: str
    number: int
    patient: int
    view: str
    label: int
    severity: float  # the worst foramen (0 for normal views)
    level_severity: tuple[float, ...]  # per foramen C2-3..C6-7
    foramen_area_ratio: tuple[float, ...]  # drawn area / open area, per foramen
    width: int
    height: int
    box: tuple[float, float, float, float]  # the ROI (bodies + foramina + margin), for every image
    rect: tuple[float, float, float, float] | None  # the rectangle written to the JSON (annotated only)
    json_kind: str
    foramen_centres: tuple[tuple[float, float], ...]
    body_centres: tuple[tuple[float, float], ...]  # C2..C7
    pedicle_centres: tuple[tuple[float, float], ...]  # C2..C7
    u: float  # pixels per body height


def _views(n: int, seed: int, positive_fraction: float, annotated_fraction: float):
    patients, rows = _plan(n, seed, positive_fraction, annotated_fraction)
    for row in rows:
        grng = np.random.default_rng([seed, _STREAM_GEOM, row.number])
        view = sample_oblique_view(grng, patients[row.patient], row)
        rect = _annotator_rect(view, grng)
        yield patients, rows, row, view, rect, grng


def _info(row: ObliqueRow, view: ObliqueView, rect: tuple[float, float, float, float]) -> ImageInfo:
    sp = view.spine

    def pts(a: np.ndarray) -> tuple[tuple[float, float], ...]:
        return tuple((float(x), float(y)) for x, y in view.to_image(a))

    return ImageInfo(
        file_id=row.file_id,
        number=row.number,
        patient=row.patient,
        view=row.view,
        label=row.label,
        severity=max(f.severity for f in view.foramina),
        level_severity=tuple(f.severity for f in view.foramina),
        foramen_area_ratio=tuple(f.area_ratio for f in view.foramina),
        width=view.width,
        height=view.height,
        box=view.image_box,
        rect=rect if row.annotated else None,
        json_kind=row.json_kind,
        foramen_centres=pts(np.array([f.centre for f in view.foramina])),
        body_centres=pts(sp.corners.mean(axis=1)),
        pedicle_centres=pts(np.array([_pedicle_centre(sp, i) for i in range(6)])),
        u=float(sp.u),
    )


def describe_oblique(
    n: int = 200, seed: int = 0, positive_fraction: float = 0.35, annotated_fraction: float = 0.5
) -> list[ImageInfo]:
    """Ground truth of the images `synthesize_oblique` writes with the same arguments (no rendering)."""
    _validate(n, seed, positive_fraction, annotated_fraction)
    return [
        _info(row, view, rect)
        for _, _, row, view, rect, _ in _views(int(n), int(seed), float(positive_fraction), float(annotated_fraction))
        if row.has_image
    ]


def synthesize_oblique(
    out: Path,
    n: int = 200,
    seed: int = 0,
    positive_fraction: float = 0.35,
    annotated_fraction: float = 0.5,
    progress: bool = False,
) -> SynthResult:
    """Write a synthetic oblique-view data set of `n` images under `out` (docs/stenosis-data.md).

    About `positive_fraction` of the images show foraminal stenosis (exactly round(fraction * n), at
    least one of each class when n >= 10); `n_healthy` in the result counts the normal images. About
    `annotated_fraction` of the images get a LabelMe JSON with the ``cspine`` rectangle; of the others,
    two (when n >= 20) get a JSON without it, the rest none. Same arguments give byte-identical PNG and
    JSON files. Raises ValueError on bad arguments and FileExistsError when the PNG or JSON folder holds
    files this data set would not write."""
    _validate(n, seed, positive_fraction, annotated_fraction)
    n, seed = int(n), int(seed)
    out = Path(out)
    png_dir, json_dir = out / "datasets-PNG", out / "datasets-JSON"
    _, rows = _plan(n, seed, float(positive_fraction), float(annotated_fraction))
    img_rows = [r for r in rows if r.has_image]
    drawing.check_no_foreign_files(png_dir, {f"{r.file_id}.png" for r in img_rows})
    drawing.check_no_foreign_files(json_dir, {f"{r.file_id}.json" for r in img_rows if r.json_kind != "none"})
    png_dir.mkdir(parents=True, exist_ok=True)
    json_dir.mkdir(parents=True, exist_ok=True)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="synthesizing oblique views", unit="img")
    levels: list[str] = []
    mms: list[float] = []
    try:
        for _, _, row, view, rect, grng in _views(n, seed, float(positive_fraction), float(annotated_fraction)):
            levels.append(", ".join(FORAMINA[f.level] for f in view.foramina if f.severity > 0))
            mms.append(view.mm_per_px)
            if not row.has_image:
                continue
            rng = np.random.default_rng([seed, _STREAM_RENDER, row.number])
            style = drawing.sample_style(rng)
            img = render_oblique(view, rng)
            ov = _overlay(rng, view.height, view.width, row.view, view.mm_per_px, style)
            drawing.write_png(png_dir / f"{row.file_id}.png", drawing.encode(img, ov, style), style.mode)
            if row.json_kind != "none":
                doc = _labelme(row, view, rect, grng)
                (json_dir / f"{row.file_id}.json").write_text(json.dumps(doc, indent=2), encoding="utf-8")
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    write_sheet(out / "datasets.xlsx", rows, levels, mms)
    n_normal = sum(1 for r in img_rows if r.label == 0)
    return SynthResult(
        root=out, n_images=n, n_rows=len(rows), n_healthy=n_normal, n_patients=len({r.patient for r in rows})
    )
