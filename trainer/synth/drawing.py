"""What the lateral and oblique generators share: the anatomy model, the spine's pixel geometry,
the attenuation-map drawing primitives, the film style and encoding, and file helpers.

Lengths in the anatomy are in units of the mean C3-C7 body height; `build_spine` turns them into
pixels. Drawing adds attenuation to a float map in place (`stamp`, `draw_vertebra`, ...); `encode`
maps ``1 - exp(-A)`` plus overlays to the stored pixel mode. Everything draws from the
``numpy.random.Generator`` it is given, so the generators stay byte-reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

LEVELS: tuple[str, ...] = ("C2", "C3", "C4", "C5", "C6", "C7")


DISCS: tuple[str, ...] = ("C2-3", "C3-4", "C4-5", "C5-6", "C6-7")


MISSING_ROW_FRACTION = 37 / 5000


MAX_ROWS = 9999  # the Number must fit in four digits


MODE_WEIGHTS = {"L": 0.67, "RGB": 0.10, "RGBA": 0.10, "I;16": 0.10, "LA": 0.03}


@dataclass(frozen=True)
class SynthResult:
    """What `synthesize` wrote. `n_healthy` counts images (not rows) with disease code 2."""

    root: Path
    n_images: int
    n_rows: int
    n_healthy: int
    n_patients: int


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


def n_missing(n: int) -> int:
    """Rows without an image: ~0.75 % of rows like CSXA (37 of 5000), at least one when n >= 50."""
    if n < 50:
        return 0
    return max(1, round(n * MISSING_ROW_FRACTION / (1 - MISSING_ROW_FRACTION)))


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


def sample_anatomy(rng: np.random.Generator, healthy: bool) -> Anatomy:
    """Body sizes, disc heights, curve and (for spondylosis) lesions of one patient."""
    c2_height = rng.uniform(1.25, 1.42)
    heights = [c2_height] + list(np.array([0.97, 0.97, 0.99, 1.01, 1.06]) * rng.normal(1, 0.035, 5))
    base_depth = rng.uniform(1.2, 1.4)
    depths = [base_depth * rng.uniform(1.0, 1.1)] + list(
        base_depth * np.linspace(1.0, 1.12, 5) * rng.normal(1, 0.03, 5)
    )
    disc_base = rng.uniform(0.26, 0.34)
    discs = disc_base * np.array([0.8, 0.95, 1.0, 1.02, 1.0]) * rng.normal(1, 0.05, 5)
    lesions: tuple[Lesion, ...]
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


def bezier(a: np.ndarray, c: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
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
        a = c + (prv - c) * min(radius / max(float(np.linalg.norm(prv - c)), 1e-9), 0.45)
        b = c + (nxt - c) * min(radius / max(float(np.linalg.norm(nxt - c)), 1e-9), 0.45)
        cut[k] = a, b
        kps[k] = 0.25 * a + 0.5 * c + 0.25 * b
    s = np.linspace(0.0, 1.0, n_edge + 2)[1:-1, None]
    for k in range(4):
        a, b = cut[k]
        pts.append(bezier(a, corners[k], b, n_arc))
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
    outer = bezier(base_wall, k + out * length * a * 1.05 - toward * 0.15 * w_wall, tip + out * tip_w * 0.5, 10)
    inner = bezier(tip - out * tip_w * 0.5, k + out * length * a * 0.55 + toward * length * b * 0.15, base_plate, 10)
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


def spine_length_units(anat: Anatomy) -> float:
    return anat.dens[0] + sum(anat.heights) + sum(anat.discs)


def shift_spine(s: Spine, shift: np.ndarray) -> Spine:
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


SHIFT = 4  # sub-pixel bits for cv2 drawing


SCALE = 1 << SHIFT


def fixed(pts: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
    p = pts if offset is None else pts - offset
    return np.round(p * SCALE).astype(np.int32).reshape(-1, 1, 2)


def pixel_bounds(pts: np.ndarray, margin: float, shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    x0 = max(int(math.floor(pts[:, 0].min() - margin)), 0)
    y0 = max(int(math.floor(pts[:, 1].min() - margin)), 0)
    x1 = min(int(math.ceil(pts[:, 0].max() + margin)) + 1, shape[1])
    y1 = min(int(math.ceil(pts[:, 1].max() + margin)) + 1, shape[0])
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def stamp(att: np.ndarray, polys: Sequence[np.ndarray], value: float, sigma: float = 0.0, thickness: int = 0) -> None:
    """Add `value` inside the filled polygons (or along polylines when thickness > 0), in place."""
    allpts = np.concatenate(polys)
    box = pixel_bounds(allpts, 3 * sigma + thickness + 2, att.shape)
    if box is None:
        return
    x0, y0, x1, y1 = box
    off = np.array([x0, y0], dtype=np.float64)
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    outlines = [fixed(p, off) for p in polys]
    if thickness > 0:
        cv2.polylines(mask, outlines, False, 255, thickness, cv2.LINE_AA, SHIFT)
    else:
        cv2.fillPoly(mask, outlines, 255, cv2.LINE_AA, SHIFT)
    m: np.ndarray = mask.astype(np.float32) * np.float32(value / 255.0)
    if sigma > 0:
        m = cv2.GaussianBlur(m, (0, 0), sigma)
    att[y0:y1, x0:x1] += m


def bone_texture(rng: np.random.Generator, spine: Spine, shape: tuple[int, int]) -> np.ndarray:
    """Multiplicative cancellous-bone texture (~1 +- 0.15), computed only over the vertebral column."""
    texture = np.ones(shape, np.float32)
    pts = np.concatenate([spine.dens, *spine.outlines, *(p for _, p in spine.spurs)])
    box = pixel_bounds(pts, 0.5 * spine.u, shape)
    if box is None:
        return texture
    x0, y0, x1, y1 = box
    sub = (y1 - y0, x1 - x0)
    u = spine.u
    texture[y0:y1, x0:x1] += 0.14 * lowres_noise(rng, sub, max(2.0, 0.07 * u)) + 0.08 * lowres_noise(
        rng, sub, max(2.0, 0.4 * u)
    )
    return texture


def draw_vertebra(
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
    box = pixel_bounds(np.concatenate(polys), rim_px * 3 + 4 + 0.3 * spine.u, att.shape)
    if box is None:
        return
    x0, y0, x1, y1 = box
    off = np.array([x0, y0], dtype=np.float64)
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    for poly in polys:  # one call per polygon: overlapping polygons must not cancel (even-odd fill)
        cv2.fillPoly(mask, [fixed(poly, off)], 255, cv2.LINE_AA, SHIFT)
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
            [fixed(np.array([a, (a + b) / 2 - (c[3] - c[0]) * 0.05, b]), off)],
            False,
            255,
            max(1, int(rim_px * 0.6)),
            cv2.LINE_AA,
            SHIFT,
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
        lm: np.ndarray = np.zeros_like(mask)
        seg = np.array([p0 + inward * width * 0.5, p1 + inward * width * 0.5])
        cv2.polylines(lm, [fixed(seg, off)], False, 255, max(2, int(round(width))), cv2.LINE_AA, SHIFT)
        lm = cv2.GaussianBlur(lm.astype(np.float32) / 255.0, (0, 0), max(0.6, width * 0.25))
        scl = np.maximum(scl, lm * strength)
    tex = texture[y0:y1, x0:x1]
    a = body * mu_body * tex + rim * mu_rim + subcortical * mu_rim * 0.35 + scl * body * mu_rim * 0.8
    a = cv2.GaussianBlur(a, (0, 0), max(0.5, rim_px * 0.3))
    att[y0:y1, x0:x1] += a


def lowres_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Smooth noise in [-1, 1]-ish with features about `cell` pixels wide."""
    gh, gw = max(2, int(shape[0] / cell) + 2), max(2, int(shape[1] / cell) + 2)
    g = rng.standard_normal((gh, gw)).astype(np.float32)
    return cv2.resize(g, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def grain(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Zero-mean white noise of unit variance (uniform bytes: fast; the later blur makes it Gaussian-like)."""
    raw = np.frombuffer(rng.bytes(shape[0] * shape[1]), np.uint8).reshape(shape).astype(np.float32)
    return (raw - np.float32(127.5)) * np.float32(1.0 / 73.9)


def _ellipsoid(X: np.ndarray, Y: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """Projected thickness (0..1) of an ellipsoid: the soft-tissue building block."""
    return np.sqrt(np.clip(1.0 - ((X - cx) / rx) ** 2 - ((Y - cy) / ry) ** 2, 0.0, None))


def jaw_angle(rng: np.random.Generator, spine: Spine) -> np.ndarray:
    """Position of the mandibular angle, in front of C2/C3; the face and mandible hang from it."""
    c2, u = spine.corners[0], spine.u
    return (c2[3] + c2[0]) / 2 + np.array([-rng.uniform(1.0, 1.8) * u, rng.uniform(-0.2, 0.8) * u])


def soft_tissue(rng: np.random.Generator, view: View, jaw: np.ndarray, f: int) -> np.ndarray:
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
    m: np.ndarray = np.zeros((hl, wl), np.uint8)
    width = max(1, int(rng.uniform(0.5, 0.9) * u / f))
    cv2.polylines(m, [fixed(pts / f)], False, 255, width, cv2.LINE_AA, SHIFT)
    m = cv2.GaussianBlur(m.astype(np.float32) / 255.0, (0, 0), max(0.8, 0.2 * u / f))
    a -= m * rng.uniform(0.15, 0.35) * mu_t * np.clip(neck * 2, 0, 1)
    a = cv2.GaussianBlur(a.astype(np.float32), (0, 0), max(0.8, 0.15 * u / f))
    a += rng.uniform(0.01, 0.05) + 0.02 * (Y / view.height)
    a *= 1.0 + 0.06 * lowres_noise(rng, (hl, wl), 5 * u / f)
    return np.clip(a, 0, None).astype(np.float32)


def draw_head_bones(att: np.ndarray, spine: Spine, angle: np.ndarray, rng: np.random.Generator) -> None:
    """Faint mandible (ramus, angle and inferior border), hyoid and occiput."""
    u = spine.u
    border = bezier(angle, angle + np.array([-2.0 * u, 0.3 * u]), angle + np.array([-5.0 * u, -0.4 * u]), 12)
    ramus = bezier(angle, angle + np.array([0.45 * u, -1.0 * u]), angle + np.array([0.2 * u, -3.4 * u]), 10)
    mu = rng.uniform(0.08, 0.16)
    bone = np.concatenate([ramus[::-1], border[1:]])
    inner = bone + np.array([-0.35 * u, -0.45 * u])
    stamp(att, [np.concatenate([bone, inner[::-1]])], mu, sigma=0.12 * u)
    stamp(att, [bone], mu * 1.2, sigma=0.05 * u, thickness=max(1, int(0.09 * u)))
    if rng.random() < 0.6:  # hyoid in front of C3
        c3 = spine.corners[1]
        hy = (c3[0] + c3[3]) / 2 + np.array([-rng.uniform(1.6, 2.1) * u, rng.uniform(0.0, 0.8) * u])
        t = np.linspace(0, 2 * np.pi, 16)[:, None]
        stamp(att, [hy + np.hstack([np.cos(t) * 0.35 * u, np.sin(t) * 0.12 * u])], mu * 1.5, sigma=0.06 * u)
    # skull base: part of a large ellipse above and behind the dens
    tip = spine.dens[np.argmin(spine.dens[:, 1])]
    centre = tip + np.array([rng.uniform(0.5, 1.5) * u, -rng.uniform(3.5, 4.5) * u])
    t = np.linspace(math.radians(-5), math.radians(75), 24)[:, None]
    rx, ry = rng.uniform(4.0, 5.5) * u, rng.uniform(3.2, 4.0) * u
    arc = centre + np.hstack([np.cos(t) * rx, np.sin(t) * ry])
    stamp(att, [arc], rng.uniform(0.15, 0.3), sigma=0.25 * u, thickness=max(2, int(0.6 * u)))
    stamp(att, [arc], rng.uniform(0.08, 0.15), sigma=0.06 * u, thickness=max(1, int(0.1 * u)))


def draw_ruler(m: np.ndarray, rng: np.random.Generator, mm_per_px: float) -> None:
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


def check_no_foreign_files(folder: Path, expected: set[str]) -> None:
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
