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
from PIL import Image

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
LEVELS: tuple[str, ...] = ("C2", "C3", "C4", "C5", "C6", "C7")
DISCS: tuple[str, ...] = ("C2-3", "C3-4", "C4-5", "C5-6", "C6-7")

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

MISSING_ROW_FRACTION = 37 / 5000
MAX_ROWS = 9999  # the Number must fit in four digits
MODE_WEIGHTS = {"L": 0.67, "RGB": 0.10, "RGBA": 0.10, "I;16": 0.10, "LA": 0.03}

# Generator streams: (seed, stream, index) -> independent, reproducible draws.
_STREAM_PLAN, _STREAM_PATIENT, _STREAM_ROW = 1, 2, 3


# --------------------------------------------------------------------------------------------------
# Public result
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthResult:
    """What `synthesize` wrote. `n_healthy` counts images (not rows) with disease code 2."""

    root: Path
    n_images: int
    n_rows: int
    n_healthy: int
    n_patients: int


# --------------------------------------------------------------------------------------------------
# Plan: patients and sheet rows
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lesion:
    """Degenerative change at one disc level (0 = C2-3 ... 4 = C6-7), lengths in body-height units."""

    disc: int
    narrowing: float  # multiplies the disc height (1.0 = none)
    spur_upper_ant: float  # osteophyte length at the upper body's anterior-inferior corner
    spur_lower_ant: float  # ... at the lower body's anterior-superior corner
    spur_upper_post: float
    spur_lower_post: float
    sclerosis: float  # 0 = none; else relative brightness of the two endplates bordering the disc


@dataclass(frozen=True)
class Anatomy:
    """Patient-level spine shape in units of the mean C3-C7 body height."""

    heights: tuple[float, ...]  # C2..C7 body heights
    depths: tuple[float, ...]  # C2..C7 antero-posterior body depths
    discs: tuple[float, ...]  # C2-3..C6-7 disc heights (after narrowing)
    wedge: tuple[float, ...]  # relative anterior shortening per body
    corner_radius: float
    dens: tuple[float, float]  # height, width
    curvature: int  # sheet code 1..5
    curve_deg: float  # magnitude of the curve (sign per class)
    severity: float  # 0 for healthy
    lesions: tuple[Lesion, ...]


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
    if n + _n_missing(int(n)) > MAX_ROWS:
        raise ValueError(f"n={n} is too large: the 4-digit Number allows at most {MAX_ROWS} sheet rows")
    if (
        isinstance(healthy_fraction, bool)
        or not isinstance(healthy_fraction, (int, float, np.floating))
        or not 0.0 < float(healthy_fraction) < 1.0
    ):
        raise ValueError(f"healthy_fraction must be strictly between 0 and 1, got {healthy_fraction!r}")


def _n_missing(n: int) -> int:
    """Rows without an image: ~0.75 % of rows like CSXA (37 of 5000), at least one when n >= 50."""
    if n < 50:
        return 0
    return max(1, round(n * MISSING_ROW_FRACTION / (1 - MISSING_ROW_FRACTION)))


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


def _sample_lesions(rng: np.random.Generator, severity: float) -> tuple[Lesion, ...]:
    n_levels = int(rng.choice(4, p=[0.3, 0.35, 0.22, 0.13])) + 1
    discs = rng.choice(5, size=n_levels, replace=False, p=[0.08, 0.17, 0.27, 0.31, 0.17])
    lesions = []
    for d in sorted(int(x) for x in discs):
        s = severity * rng.uniform(0.85, 1.1)

        def spur(p: float, scale: float, s: float = s) -> float:
            return float(scale * (0.1 + s * rng.uniform(0.28, 0.5))) if rng.random() < p else 0.0

        up, low = spur(0.85, 1.0), spur(0.75, 1.0)
        if up == 0.0 and low == 0.0:
            up = float(0.1 + s * 0.35)
        lesions.append(
            Lesion(
                disc=d,
                narrowing=float(1.0 - (0.18 + 0.5 * s) * rng.uniform(0.85, 1.15)) if rng.random() < 0.8 else 1.0,
                spur_upper_ant=up,
                spur_lower_ant=low,
                spur_upper_post=spur(0.35, 0.55),
                spur_lower_post=spur(0.35, 0.55),
                sclerosis=float((0.4 + 0.6 * s) * rng.uniform(0.8, 1.2)) if rng.random() < 0.7 else 0.0,
            )
        )
    return tuple(lesions)


def _sample_anatomy(rng: np.random.Generator, healthy: bool) -> Anatomy:
    """Body sizes, disc heights, curve and (for spondylosis) lesions of one patient."""
    c2_height = rng.uniform(1.25, 1.42)
    heights = [c2_height] + list(np.array([0.97, 0.97, 0.99, 1.01, 1.06]) * rng.normal(1, 0.035, 5))
    base_depth = rng.uniform(1.2, 1.4)
    depths = [base_depth * rng.uniform(1.0, 1.1)] + list(
        base_depth * np.linspace(1.0, 1.12, 5) * rng.normal(1, 0.03, 5)
    )
    disc_base = rng.uniform(0.26, 0.34)
    discs = disc_base * np.array([0.8, 0.95, 1.0, 1.02, 1.0]) * rng.normal(1, 0.05, 5)
    if healthy:
        curvature = int(rng.choice([1, 2, 3, 4, 5], p=[0.72, 0.18, 0.05, 0.05, 0.0]))
        severity, lesions = 0.0, ()
    else:
        curvature = int(rng.choice([1, 2, 3, 4, 5], p=[0.45, 0.27, 0.1, 0.08, 0.1]))
        severity = float(rng.uniform(0.3, 1.0))
        lesions = _sample_lesions(rng, severity)
        for les in lesions:
            discs[les.disc] *= les.narrowing
    curve_deg = {
        1: rng.uniform(12, 38),
        2: rng.uniform(-4, 4),
        3: rng.uniform(8, 16),
        4: rng.uniform(8, 16),
        5: rng.uniform(-22, -8),
    }[curvature]
    return Anatomy(
        heights=tuple(float(h) for h in heights),
        depths=tuple(float(d) for d in depths),
        discs=tuple(float(d) for d in discs),
        wedge=tuple(float(w) for w in rng.uniform(0.0, 0.06, 6)),
        corner_radius=float(rng.uniform(0.1, 0.16)),
        dens=(float(rng.uniform(0.8, 1.0)), float(rng.uniform(0.5, 0.62))),
        curvature=curvature,
        curve_deg=float(curve_deg),
        severity=severity,
        lesions=lesions,
    )


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
        anatomy = _sample_anatomy(np.random.default_rng([seed, _STREAM_PATIENT, i]), ok)
        patients.append(Patient(i, gender, age, ok, size, anatomy))

    extra = np.zeros(len(patients), dtype=int)
    for p in rng.integers(len(patients), size=_n_missing(n)):
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


@dataclass(frozen=True)
class Spine:
    """Pixel geometry of C2-C7 in one image (corner order TL, TR, BR, BL; left = anterior)."""

    corners: np.ndarray  # (6, 4, 2) sharp quadrilateral corners
    outlines: tuple[np.ndarray, ...]  # 6 closed rounded outlines
    corner_points: np.ndarray  # (6, 4, 2) keypoints on the rounded corners
    dens: np.ndarray  # outline of the odontoid peg
    phis: np.ndarray  # (6,) axis angle of each body (radians, 0 = vertical, + = heading posterior)
    spurs: tuple[tuple[int, np.ndarray], ...]  # (body index, polygon) osteophytes
    sclerosis: tuple[tuple[int, int, float], ...]  # (body index, 0 top / 1 bottom endplate, strength)
    u: float  # pixels per body-height unit

    @property
    def keypoints(self) -> np.ndarray:
        """(23, 2) keypoints in KEYPOINT_LABELS order."""
        c2 = self.corner_points[0]
        pts = [self.corners[0].mean(axis=0), c2[3], c2[2]]
        for v in range(1, 6):
            cp = self.corner_points[v]
            pts += [cp[0], cp[1], cp[3], cp[2]]
        return np.array(pts, dtype=np.float64)

    def axes(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(down, posterior) unit vectors of body i."""
        phi = self.phis[i]
        return np.array([math.sin(phi), math.cos(phi)]), np.array([math.cos(phi), -math.sin(phi)])


@dataclass(frozen=True)
class View:
    """One image of a patient: size, pixel geometry and scale (mm per pixel)."""

    height: int
    width: int
    spine: Spine
    mm_per_px: float


def _bezier(a: np.ndarray, c: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * a + 2 * (1 - t) * t * c + t**2 * b


def rounded_outline(
    corners: np.ndarray, radius: float, bulge: Sequence[float], n_arc: int = 7, n_edge: int = 6
) -> tuple[np.ndarray, np.ndarray]:
    """Closed outline of a quadrilateral (TL, TR, BR, BL) with rounded corners.

    Each corner becomes a quadratic Bezier arc; its mid-point (returned as the corner keypoint, (4, 2))
    lies on the outline. `bulge[k]` bows edge k (TL-TR, TR-BR, BR-BL, BL-TL) outward (> 0) or inward,
    as a fraction of the edge length."""
    pts: list[np.ndarray] = []
    kps = np.empty((4, 2))
    cut = np.empty((4, 2, 2))  # per corner: point on incoming edge, point on outgoing edge
    for k in range(4):
        c, prv, nxt = corners[k], corners[k - 1], corners[(k + 1) % 4]
        a = c + (prv - c) * min(radius / max(np.linalg.norm(prv - c), 1e-9), 0.45)
        b = c + (nxt - c) * min(radius / max(np.linalg.norm(nxt - c), 1e-9), 0.45)
        cut[k] = a, b
        kps[k] = 0.25 * a + 0.5 * c + 0.25 * b
    s = np.linspace(0.0, 1.0, n_edge + 2)[1:-1, None]
    for k in range(4):
        a, b = cut[k]
        pts.append(_bezier(a, corners[k], b, n_arc))
        start, end = b, cut[(k + 1) % 4][0]
        e = end - start
        normal = np.array([e[1], -e[0]])  # outward for clockwise (image) order
        pts.append(start + e * s + normal * bulge[k] * np.sin(np.pi * s))
    return np.concatenate(pts), kps


def _spur_polygon(
    k: np.ndarray, out: np.ndarray, toward: np.ndarray, length: float, u: float, rng: np.random.Generator
) -> np.ndarray:
    """Beak-like osteophyte at corner keypoint `k`: it flares out of the wall (`-toward` side), passes
    outside the corner along `out` and hooks `toward` the disc, ending in a blunt tip."""
    a, b = rng.uniform(0.7, 1.0), rng.uniform(0.45, 0.9)
    w_wall = u * rng.uniform(0.25, 0.4) + 0.5 * length
    w_plate = u * rng.uniform(0.08, 0.15) + 0.1 * length
    base_wall = k - toward * w_wall
    base_plate = k - out * w_plate
    tip = k + out * length * a + toward * length * b
    tip_w = max(0.03 * u, 0.14 * length)
    outer = _bezier(base_wall, k + out * length * a * 1.05 - toward * 0.15 * w_wall, tip + out * tip_w * 0.5, 10)
    inner = _bezier(tip - out * tip_w * 0.5, k + out * length * a * 0.55 + toward * length * b * 0.15, base_plate, 10)
    return np.concatenate([outer, inner])


def _curve_phis(curvature: int, curve_deg: float, tilt: float) -> np.ndarray:
    """Axis angle of C2..C7; increasing angle downwards = lordosis (apex anterior)."""
    t = np.linspace(0.0, 1.0, 6)
    c = math.radians(curve_deg)
    if curvature == 3:  # upper lordotic, lower kyphotic (inferred meaning of "Sigmoid1")
        prof = c * np.sin(np.pi * t)
    elif curvature == 4:
        prof = -c * np.sin(np.pi * t)
    else:
        prof = c * (t - 0.5)
    return tilt + prof


def build_spine(
    anat: Anatomy, u: float, origin: np.ndarray, tilt: float, curve_scale: float, rng: np.random.Generator
) -> Spine:
    """Stack C2..C7 along the curve from the top centre of the C2 body (`origin`, pixels)."""
    phis = _curve_phis(anat.curvature, anat.curve_deg * curve_scale, tilt)
    corners = np.empty((6, 4, 2))
    top = origin.astype(np.float64)
    for i in range(6):
        d = np.array([math.sin(phis[i]), math.cos(phis[i])])
        p = np.array([math.cos(phis[i]), -math.sin(phis[i])])
        h, w, wd = anat.heights[i] * u, anat.depths[i] * u, anat.wedge[i]
        bottom = top + d * h
        corners[i] = (
            top - p * w / 2 + d * h * wd / 2,
            top + p * w / 2,
            bottom + p * w / 2,
            bottom - p * w / 2 - d * h * wd / 2,
        )
        if i < 5:
            dn = np.array([math.sin(phis[i + 1]), math.cos(phis[i + 1])])
            mid = (d + dn) / np.linalg.norm(d + dn)
            top = bottom + mid * anat.discs[i] * u
    outlines, cps = [], np.empty((6, 4, 2))
    for i in range(6):
        bulge = (rng.uniform(-0.02, 0.02), rng.uniform(-0.03, 0.0), rng.uniform(0.0, 0.03), rng.uniform(-0.06, -0.02))
        ol, kp = rounded_outline(corners[i], anat.corner_radius * u, bulge)
        outlines.append(ol)
        cps[i] = kp
    # odontoid peg on top of C2, slightly posterior, rounded tip
    d0 = np.array([math.sin(phis[0]), math.cos(phis[0])])
    p0 = np.array([math.cos(phis[0]), -math.sin(phis[0])])
    tl, tr = corners[0][0], corners[0][1]
    base = (tl + tr) / 2 + p0 * 0.06 * u
    dh, dw = anat.dens[0] * u, anat.dens[1] * u
    lean = rng.uniform(-0.1, 0.05) * u
    dens_q = np.array(
        [
            tl + (tr - tl) * 0.12 + d0 * 0.35 * u,
            base - d0 * dh - p0 * dw * 0.42 + p0 * lean,
            base - d0 * dh + p0 * dw * 0.42 + p0 * lean,
            tr - (tr - tl) * 0.1 + d0 * 0.35 * u,
        ]
    )
    dens, _ = rounded_outline(dens_q, dw * 0.42, (0.1, -0.06, 0.0, -0.08))

    spurs: list[tuple[int, np.ndarray]] = []
    scler: list[tuple[int, int, float]] = []
    for les in anat.lesions:
        up, lo = les.disc, les.disc + 1
        d_up = np.array([math.sin(phis[up]), math.cos(phis[up])])
        d_lo = np.array([math.sin(phis[lo]), math.cos(phis[lo])])
        p_up = np.array([math.cos(phis[up]), -math.sin(phis[up])])
        p_lo = np.array([math.cos(phis[lo]), -math.sin(phis[lo])])
        for length, body, corner, out, toward in (
            (les.spur_upper_ant, up, 3, -p_up, d_up),
            (les.spur_lower_ant, lo, 0, -p_lo, -d_lo),
            (les.spur_upper_post, up, 2, p_up, d_up),
            (les.spur_lower_post, lo, 1, p_lo, -d_lo),
        ):
            if length > 0:
                spurs.append((body, _spur_polygon(cps[body][corner], out, toward, length * u, u, rng)))
        if les.sclerosis > 0:
            scler += [(up, 1, les.sclerosis), (lo, 0, les.sclerosis * rng.uniform(0.7, 1.1))]
    return Spine(corners, tuple(outlines), cps, dens, phis, tuple(spurs), tuple(scler), u)


def _spine_length_units(anat: Anatomy) -> float:
    return anat.dens[0] + sum(anat.heights) + sum(anat.discs)


def sample_view(rng: np.random.Generator, anat: Anatomy) -> View:
    """Image size, scale, position and pose of one radiograph of a patient."""
    h = int(rng.integers(460, 1201))
    w = int(np.clip(round(h * rng.uniform(0.7, 1.25)), 400, 1200))
    if rng.random() < 0.08:  # some small images, under 500 px on a side
        h, w = int(rng.integers(400, 520)), int(rng.integers(400, 560))
    length = _spine_length_units(anat)
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
        spine = _shift_spine(spine, shift)
    mm = 15.5 * rng.normal(1, 0.06) / (np.mean(anat.depths[1:5]) * u)
    return View(h, w, spine, float(mm))


def _shift_spine(s: Spine, shift: np.ndarray) -> Spine:
    return Spine(
        s.corners + shift,
        tuple(o + shift for o in s.outlines),
        s.corner_points + shift,
        s.dens + shift,
        s.phis,
        tuple((i, p + shift) for i, p in s.spurs),
        s.sclerosis,
        s.u,
    )


# --------------------------------------------------------------------------------------------------
# Rendering (attenuation map A; image = 1 - exp(-A))
# --------------------------------------------------------------------------------------------------

_SHIFT = 4  # sub-pixel bits for cv2 drawing
_SCALE = 1 << _SHIFT


def _fixed(pts: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
    p = pts if offset is None else pts - offset
    return np.round(p * _SCALE).astype(np.int32).reshape(-1, 1, 2)


def _roi(pts: np.ndarray, margin: float, shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    x0 = max(int(math.floor(pts[:, 0].min() - margin)), 0)
    y0 = max(int(math.floor(pts[:, 1].min() - margin)), 0)
    x1 = min(int(math.ceil(pts[:, 0].max() + margin)) + 1, shape[1])
    y1 = min(int(math.ceil(pts[:, 1].max() + margin)) + 1, shape[0])
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def _stamp(att: np.ndarray, polys: Sequence[np.ndarray], value: float, sigma: float = 0.0, thickness: int = 0) -> None:
    """Add `value` inside the filled polygons (or along polylines when thickness > 0), in place."""
    allpts = np.concatenate(polys)
    box = _roi(allpts, 3 * sigma + thickness + 2, att.shape)
    if box is None:
        return
    x0, y0, x1, y1 = box
    off = np.array([x0, y0], dtype=np.float64)
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    fixed = [_fixed(p, off) for p in polys]
    if thickness > 0:
        cv2.polylines(mask, fixed, False, 255, thickness, cv2.LINE_AA, _SHIFT)
    else:
        cv2.fillPoly(mask, fixed, 255, cv2.LINE_AA, _SHIFT)
    m = mask.astype(np.float32) * np.float32(value / 255.0)
    if sigma > 0:
        m = cv2.GaussianBlur(m, (0, 0), sigma)
    att[y0:y1, x0:x1] += m


def _bone_texture(rng: np.random.Generator, spine: Spine, shape: tuple[int, int]) -> np.ndarray:
    """Multiplicative cancellous-bone texture (~1 +- 0.15), computed only over the vertebral column."""
    texture = np.ones(shape, np.float32)
    pts = np.concatenate([spine.dens, *spine.outlines, *(p for _, p in spine.spurs)])
    box = _roi(pts, 0.5 * spine.u, shape)
    if box is None:
        return texture
    x0, y0, x1, y1 = box
    sub = (y1 - y0, x1 - x0)
    u = spine.u
    texture[y0:y1, x0:x1] += 0.14 * _lowres_noise(rng, sub, max(2.0, 0.07 * u)) + 0.08 * _lowres_noise(
        rng, sub, max(2.0, 0.4 * u)
    )
    return texture


def _draw_vertebra(
    att: np.ndarray,
    texture: np.ndarray,
    spine: Spine,
    i: int,
    mu_body: float,
    mu_rim: float,
    rim_px: float,
    rng: np.random.Generator,
) -> None:
    """Body (+ dens for C2, + osteophytes) with cancellous fill, cortical rim and sclerotic endplates."""
    polys = [spine.outlines[i]] + ([spine.dens] if i == 0 else []) + [p for b, p in spine.spurs if b == i]
    box = _roi(np.concatenate(polys), rim_px * 3 + 4 + 0.3 * spine.u, att.shape)
    if box is None:
        return
    x0, y0, x1, y1 = box
    off = np.array([x0, y0], dtype=np.float64)
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    for poly in polys:  # one call per polygon: overlapping polygons must not cancel (even-odd fill)
        cv2.fillPoly(mask, [_fixed(poly, off)], 255, cv2.LINE_AA, _SHIFT)
    k = max(3, int(round(rim_px)) * 2 + 1)
    inner = cv2.erode(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    body = mask.astype(np.float32) / 255.0
    rim = (mask - inner).astype(np.float32) / 255.0
    subcortical = cv2.GaussianBlur(rim, (0, 0), max(1.0, 0.12 * spine.u)) * body
    if i == 0:  # faint sclerotic line at the C2 body/dens junction (synchondrosis remnant)
        c = spine.corners[0]
        line = np.zeros_like(mask)
        a, b = c[0] + (c[3] - c[0]) * 0.2, c[1] + (c[2] - c[1]) * 0.15
        cv2.polylines(
            line,
            [_fixed(np.array([a, (a + b) / 2 - (c[3] - c[0]) * 0.05, b]), off)],
            False,
            255,
            max(1, int(rim_px * 0.6)),
            cv2.LINE_AA,
            _SHIFT,
        )
        rim += 0.3 * line.astype(np.float32) / 255.0 * body
    scl = np.zeros_like(body)
    for b, edge, strength in spine.sclerosis:
        if b != i:
            continue
        c = spine.corners[i]
        p0, p1 = (c[0], c[1]) if edge == 0 else (c[3], c[2])
        inward = ((c[3] + c[2]) / 2 - (c[0] + c[1]) / 2) * (1 if edge == 0 else -1)
        inward = inward / np.linalg.norm(inward)
        width = spine.u * (0.07 + 0.09 * min(strength, 1.2)) * rng.uniform(0.85, 1.15)
        lm = np.zeros_like(mask)
        seg = np.array([p0 + inward * width * 0.5, p1 + inward * width * 0.5])
        cv2.polylines(lm, [_fixed(seg, off)], False, 255, max(2, int(round(width))), cv2.LINE_AA, _SHIFT)
        lm = cv2.GaussianBlur(lm.astype(np.float32) / 255.0, (0, 0), max(0.6, width * 0.25))
        scl = np.maximum(scl, lm * strength)
    tex = texture[y0:y1, x0:x1]
    a = body * mu_body * tex + rim * mu_rim + subcortical * mu_rim * 0.35 + scl * body * mu_rim * 0.8
    a = cv2.GaussianBlur(a, (0, 0), max(0.5, rim_px * 0.3))
    att[y0:y1, x0:x1] += a


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
                _bezier(root - d * half, mid - d * half * 0.5, tip - d * 0.1 * u, 8),
                _bezier(tip + d * 0.12 * u, mid + d * half * 0.4, root + d * half, 8),
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
    box = _roi(np.concatenate([s for s, _ in shapes]), 3 * sigma + 2, att.shape)
    if box is None:
        return
    x0, y0, x1, y1 = box
    off = np.array([x0, y0], dtype=np.float64)
    layer = np.zeros((y1 - y0, x1 - x0), np.float32)
    edge = max(1, int(0.06 * u))
    for poly, value in shapes:  # shapes overlap (pillars): later ones are drawn over earlier ones
        fixed = _fixed(poly, off)
        cv2.fillPoly(layer, [fixed], value, cv2.LINE_8, _SHIFT)
        cv2.polylines(layer, [fixed], True, value * 1.35, edge, cv2.LINE_8, _SHIFT)
    att[y0:y1, x0:x1] += cv2.GaussianBlur(layer, (0, 0), max(0.7, sigma))


def _lowres_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Smooth noise in [-1, 1]-ish with features about `cell` pixels wide."""
    gh, gw = max(2, int(shape[0] / cell) + 2), max(2, int(shape[1] / cell) + 2)
    g = rng.standard_normal((gh, gw)).astype(np.float32)
    return cv2.resize(g, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def _grain(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Zero-mean white noise of unit variance (uniform bytes: fast; the later blur makes it Gaussian-like)."""
    raw = np.frombuffer(rng.bytes(shape[0] * shape[1]), np.uint8).reshape(shape).astype(np.float32)
    return (raw - np.float32(127.5)) * np.float32(1.0 / 73.9)


def _ellipsoid(X: np.ndarray, Y: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """Projected thickness (0..1) of an ellipsoid: the soft-tissue building block."""
    return np.sqrt(np.clip(1.0 - ((X - cx) / rx) ** 2 - ((Y - cy) / ry) ** 2, 0.0, None))


def _jaw_angle(rng: np.random.Generator, spine: Spine) -> np.ndarray:
    """Position of the mandibular angle, in front of C2/C3; the face and mandible hang from it."""
    c2, u = spine.corners[0], spine.u
    return (c2[3] + c2[0]) / 2 + np.array([-rng.uniform(1.0, 1.8) * u, rng.uniform(-0.2, 0.8) * u])


def _soft_tissue(rng: np.random.Generator, view: View, jaw: np.ndarray, f: int) -> np.ndarray:
    """Low-resolution attenuation of air, neck, head, jaw, shoulders and airway (downsampled by f)."""
    sp, u = view.spine, view.spine.u
    hl, wl = -(-view.height // f), -(-view.width // f)
    ys = (np.arange(hl, dtype=np.float32) + 0.5) * f
    xs = (np.arange(wl, dtype=np.float32) + 0.5) * f
    centres = sp.corners.mean(axis=1)
    coef = np.polyfit(centres[:, 1], centres[:, 0], 2 if rng.random() < 0.7 else 1)
    xc = np.polyval(coef, np.clip(ys, centres[0, 1] - 3 * u, centres[5, 1] + 3 * u)).astype(np.float32)[:, None]
    X, Y = xs[None, :], ys[:, None]
    top = float(sp.dens[:, 1].min())
    x_top = float(centres[0, 0])
    # neck: a cylinder following the spine, slightly wider towards the shoulders
    ant, post = rng.uniform(3.0, 3.8) * u, rng.uniform(4.8, 6.2) * u
    widen = 1.0 + 0.08 * np.clip((Y - centres[3, 1]) / (4 * u), -1, 2)
    mid = xc + (post - ant) / 2
    r = (ant + post) / 2 * widen
    neck = np.sqrt(np.clip(1.0 - ((X - mid) / r) ** 2, 0, None))
    ry = rng.uniform(7.0, 9.0) * u
    head = _ellipsoid(
        X, Y, x_top + rng.uniform(0.5, 2.0) * u, top + rng.uniform(-0.3, 0.6) * u - ry, rng.uniform(8.0, 11.0) * u, ry
    )
    fy = rng.uniform(2.4, 3.0) * u
    face = _ellipsoid(
        X, Y, float(jaw[0]) - rng.uniform(3.0, 3.8) * u, float(jaw[1]) + 0.35 * u - fy, rng.uniform(3.6, 4.4) * u, fy
    )
    y_sh = float(centres[5, 1]) + rng.uniform(-0.5, 2.5) * u
    shoulders = _ellipsoid(
        X, Y, float(mid[-1, 0]) + rng.uniform(0, 2) * u, y_sh + 5.5 * u, rng.uniform(7.0, 10.0) * u, 6.0 * u
    )
    mu_t = rng.uniform(0.6, 0.9)
    a = mu_t * (neck + 0.85 * np.maximum(head, face**2)) + rng.uniform(0.1, 1.0) * shoulders
    # airway: darker band in front of the bodies (pharynx above, trachea below), a smooth curve
    walls = np.array(
        [(sp.corners[i][0] + sp.corners[i][3]) / 2 - sp.axes(i)[1] * u * (0.75 + 0.55 * i / 5) for i in range(6)]
    )
    depth = rng.uniform(0.9, 1.2)
    yy = np.linspace(walls[0, 1] - 4 * u, walls[5, 1] + 4 * u, 40)
    fit = np.polyfit(walls[:, 1], walls[:, 0] - (walls[:, 0] - centres[:, 0]) * (1 - depth), 2)
    pts = np.stack([np.polyval(fit, yy), yy], axis=1)
    m = np.zeros((hl, wl), np.uint8)
    width = max(1, int(rng.uniform(0.5, 0.9) * u / f))
    cv2.polylines(m, [_fixed(pts / f)], False, 255, width, cv2.LINE_AA, _SHIFT)
    m = cv2.GaussianBlur(m.astype(np.float32) / 255.0, (0, 0), max(0.8, 0.2 * u / f))
    a -= m * rng.uniform(0.15, 0.35) * mu_t * np.clip(neck * 2, 0, 1)
    a = cv2.GaussianBlur(a.astype(np.float32), (0, 0), max(0.8, 0.15 * u / f))
    a += rng.uniform(0.01, 0.05) + 0.02 * (Y / view.height)
    a *= 1.0 + 0.06 * _lowres_noise(rng, (hl, wl), 5 * u / f)
    return np.clip(a, 0, None).astype(np.float32)


def _draw_head_bones(att: np.ndarray, spine: Spine, angle: np.ndarray, rng: np.random.Generator) -> None:
    """Faint mandible (ramus, angle and inferior border), hyoid and occiput."""
    u = spine.u
    border = _bezier(angle, angle + np.array([-2.0 * u, 0.3 * u]), angle + np.array([-5.0 * u, -0.4 * u]), 12)
    ramus = _bezier(angle, angle + np.array([0.45 * u, -1.0 * u]), angle + np.array([0.2 * u, -3.4 * u]), 10)
    mu = rng.uniform(0.08, 0.16)
    bone = np.concatenate([ramus[::-1], border[1:]])
    inner = bone + np.array([-0.35 * u, -0.45 * u])
    _stamp(att, [np.concatenate([bone, inner[::-1]])], mu, sigma=0.12 * u)
    _stamp(att, [bone], mu * 1.2, sigma=0.05 * u, thickness=max(1, int(0.09 * u)))
    if rng.random() < 0.6:  # hyoid in front of C3
        c3 = spine.corners[1]
        hy = (c3[0] + c3[3]) / 2 + np.array([-rng.uniform(1.6, 2.1) * u, rng.uniform(0.0, 0.8) * u])
        t = np.linspace(0, 2 * np.pi, 16)[:, None]
        _stamp(att, [hy + np.hstack([np.cos(t) * 0.35 * u, np.sin(t) * 0.12 * u])], mu * 1.5, sigma=0.06 * u)
    # skull base: part of a large ellipse above and behind the dens
    tip = spine.dens[np.argmin(spine.dens[:, 1])]
    centre = tip + np.array([rng.uniform(0.5, 1.5) * u, -rng.uniform(3.5, 4.5) * u])
    t = np.linspace(math.radians(-5), math.radians(75), 24)[:, None]
    rx, ry = rng.uniform(4.0, 5.5) * u, rng.uniform(3.2, 4.0) * u
    arc = centre + np.hstack([np.cos(t) * rx, np.sin(t) * ry])
    _stamp(att, [arc], rng.uniform(0.15, 0.3), sigma=0.25 * u, thickness=max(2, int(0.6 * u)))
    _stamp(att, [arc], rng.uniform(0.08, 0.15), sigma=0.06 * u, thickness=max(1, int(0.1 * u)))


def render(view: View, rng: np.random.Generator) -> np.ndarray:
    """Float32 image in [0, 1] (bright = bone) of one view, before overlays and output mode."""
    h, w, sp, u = view.height, view.width, view.spine, view.spine.u
    f = 4
    jaw = _jaw_angle(rng, sp)
    low = _soft_tissue(rng, view, jaw, f)
    att = cv2.resize(low, (w, h), interpolation=cv2.INTER_LINEAR)
    if rng.random() < 0.85:
        _draw_head_bones(att, sp, jaw, rng)
    _draw_posterior(att, sp, rng.uniform(0.12, 0.22), rng)
    texture = _bone_texture(rng, sp, (h, w))
    mu_body, mu_rim = rng.uniform(0.28, 0.42), rng.uniform(0.28, 0.45)
    rim_px = max(1.0, 0.06 * u * rng.uniform(0.8, 1.2))
    for i in range(6):
        _draw_vertebra(att, texture, sp, i, mu_body * rng.uniform(0.93, 1.07), mu_rim, rim_px, rng)
    img = 1.0 - cv2.exp(-att)
    # film grain (signal dependent), then the unsharpness of the system blurs image and grain alike
    img += rng.uniform(0.012, 0.04) * (0.4 + img) * _grain(rng, (h, w))
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


def _draw_ruler(m: np.ndarray, rng: np.random.Generator, mm_per_px: float) -> None:
    """Burn a ruler (line, 5 mm ticks, every 2nd long, cm numbers) along one edge of mask `m`."""
    h, w = m.shape
    scale = max(h, w) / 900
    step = 5.0 / mm_per_px  # a tick every 5 mm
    side = int(rng.integers(4))
    along = w if side in (0, 1) else h
    across = h if side in (0, 1) else w
    start = rng.uniform(0.05, 0.3) * along
    n_ticks = int(min(rng.uniform(0.4, 0.65) * along, along - start - 5) // step)
    base = rng.uniform(8, 40)
    pos = base if side in (0, 2) else across - base
    sign = 1 if side in (0, 2) else -1
    th = max(1, int(round(scale)))
    segs = [((start, pos), (start + n_ticks * step, pos))]
    for t in range(n_ticks + 1):
        length = (14 if t % 2 == 0 else 7) * scale
        a = start + t * step
        segs.append(((a, pos), (a, pos + sign * length)))
    for (a0, b0), (a1, b1) in segs:
        p0 = (int(a0), int(b0)) if side in (0, 1) else (int(b0), int(a0))
        p1 = (int(a1), int(b1)) if side in (0, 1) else (int(b1), int(a1))
        cv2.line(m, p0, p1, 255, th, cv2.LINE_AA)
    for t in range(0, n_ticks + 1, 4):
        a = start + t * step
        if side in (0, 1):
            q = (int(a) - 4, int(pos + sign * 26 * scale))
        else:
            q = (int(pos + sign * 30 * scale) - 6, int(a) + 4)
        cv2.putText(m, str(t // 2), q, cv2.FONT_HERSHEY_PLAIN, 0.8 * scale, 255, 1, cv2.LINE_AA)


def _overlay(rng: np.random.Generator, h: int, w: int, mm_per_px: float, text: bool, ruler: bool) -> np.ndarray:
    """uint8 mask of burned-in text and/or a ruler (255 = fully burned in)."""
    m = np.zeros((h, w), np.uint8)
    if text:
        _draw_text(m, rng)
    if ruler:
        _draw_ruler(m, rng, mm_per_px)
    return m


@dataclass(frozen=True)
class Style:
    """How one image is stored: PNG mode, polarity and burned-in extras."""

    mode: str  # "L", "LA", "RGB", "RGBA", "I;16"
    inverted: bool
    text: bool
    ruler: bool
    bits16: int  # 16 or 12 (value range of I;16 images)
    colour: tuple[float, float, float]  # overlay colour (B, G, R) in colour modes
    collimated: bool


def sample_style(rng: np.random.Generator) -> Style:
    """Mode per MODE_WEIGHTS; ~8 % inverted, ~20 % text, ~15 % ruler, ~10 % collimator borders."""
    modes = list(MODE_WEIGHTS)
    mode = str(rng.choice(modes, p=list(MODE_WEIGHTS.values())))
    colour = (1.0, 1.0, 1.0) if rng.random() < 0.5 else (0.1, 0.95, 1.0)  # white or yellow
    return Style(
        mode=mode,
        inverted=bool(rng.random() < 0.08),
        text=bool(rng.random() < 0.2),
        ruler=bool(rng.random() < 0.15),
        bits16=int(rng.choice([12, 16])),
        colour=colour,
        collimated=bool(rng.random() < 0.1),
    )


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


def encode(img: np.ndarray, overlay: np.ndarray, style: Style) -> np.ndarray:
    """Final pixel array (cv2 channel order for colour) in the style's mode; PIL builds "LA"."""
    g = img
    ov = overlay.astype(np.float32) / 255.0
    if style.mode in ("RGB", "RGBA"):
        chans = [np.maximum(g, ov * c) if not style.inverted else np.minimum(1 - g, 1 - ov * c) for c in style.colour]
        bgr = np.stack(chans, axis=-1)
        out = np.round(bgr * 255).astype(np.uint8)
        if style.mode == "RGBA":
            out = np.concatenate([out, np.full(out.shape[:2] + (1,), 255, np.uint8)], axis=-1)
        return out
    g = np.maximum(g, ov * 0.97)
    if style.inverted:
        g = 1.0 - g
    if style.mode == "I;16":
        top = 65535 if style.bits16 == 16 else 4095
        return np.round(g * top).astype(np.uint16)
    out = np.round(g * 255).astype(np.uint8)
    if style.mode == "LA":
        return np.stack([out, np.full_like(out, 255)], axis=-1)
    return out


def write_png(path: Path, pixels: np.ndarray, mode: str) -> None:
    """cv2 writes L, I;16 (uint16), RGB and RGBA (from BGR/BGRA); PIL writes the 2-channel LA."""
    if mode == "LA":
        Image.fromarray(pixels).save(path, format="PNG", compress_level=3)
        return
    if not cv2.imwrite(str(path), pixels):
        raise OSError(f"{path}: cv2.imwrite failed")


def labelme(view: View, file_id: str, rng: np.random.Generator, duplicate_label: bool) -> dict[str, Any]:
    """LabelMe document with the 23 keypoints (plus a displaced second "C3 top right" if asked)."""
    kp = view.spine.keypoints + rng.normal(0, 0.012 * view.spine.u, (23, 2))
    kp = np.clip(kp, 0.0, [view.width - 1.0, view.height - 1.0])
    shapes = []
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


def _check_no_foreign_files(folder: Path, expected: set[str]) -> None:
    """Refuse a folder holding files this run would not write (never deletes anything).

    Files with this run's names (e.g. from an interrupted run with the same arguments) are overwritten."""
    if not folder.is_dir():
        return
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in expected)
    if foreign:
        raise FileExistsError(
            f"{folder} holds {len(foreign)} file(s) this data set would not write "
            f"(e.g. {', '.join(foreign[:3])}): use an empty folder"
        )


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
    _check_no_foreign_files(png_dir, {f"{i}.png" for i in ids})
    _check_no_foreign_files(json_dir, {f"{i}.json" for i in ids})
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
