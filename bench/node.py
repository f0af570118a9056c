"""Node throughput: ingest rate, time to the last SR, end-to-end images/s, and in the same run
engines-only images/s on the same images.

    python -m bench.node [--n 64] [--per-study 4] [--engines engines/] [--backend auto]

Sends N synthetic 12-bit DX images (2048 x 2048, lateral) over loopback to an in-process node,
which screens them and sends one SR per study to a collecting SCP. The engines-only rate runs
the same engine on the same images, already decoded and preprocessed, in batches of
``batch_max_size``. Goal: end-to-end >= 0.8 x engines-only.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from screener import config, logs
from screener.dicom.image import dataset_to_gray8
from screener.engine import preprocessing as pp
from screener.node import Node, load_engines
from tests.support.dicom_factory import make_dx, make_study_ids
from tests.support.node_helpers import CollectingSCP, send_images


def present_engines(folder: Path) -> list[str]:
    """Every engine with a manifest in `folder` (the bench measures what is built)."""
    names = sorted(p.parent.name for p in Path(folder).glob("*/manifest.json"))
    if not names:
        raise SystemExit(f"no engines in {folder}: build them (make run builds demo engines)")
    return names


def _timed_predict(engine, x: np.ndarray, batch: int) -> tuple[float, np.ndarray]:
    engine.predict(x[: min(2, len(x))])  # warm-up
    t0 = time.perf_counter()
    out = [engine.predict(x[i : i + batch]) for i in range(0, len(x), batch)]
    return time.perf_counter() - t0, np.concatenate(out)


def routed_engines(images: list, rules) -> set[str]:
    """The engines the node's routing picks for these images."""
    from screener.dicom.image import header_attributes
    from screener.routing import route

    used: set[str] = set()
    for ds in images:
        r = route(header_attributes(ds), rules)
        used.update(r.engines if r else ())
    return used


def engines_only_seconds(engines: dict, grays: list[np.ndarray], batch: int, used: set[str] | None = None) -> float:
    """Seconds spent in engine.predict alone for every routed classifier (and the ROI engine where
    a classifier crops to its box), on inputs preprocessed beforehand (not timed)."""
    from screener.engine.roi import box_from_output

    total = 0.0
    boxes = None
    for name, eng in engines.items():
        m = eng.manifest
        if m.kind != "classifier" or (used is not None and name not in used):
            continue
        if m.preprocessing.needs_box and boxes is None:
            roi = engines["roi"]
            r = roi.manifest
            x = np.stack([pp.preprocess(g, r.preprocessing, r.normalization) for g in grays])
            seconds, out = _timed_predict(roi, x, batch)
            total += seconds
            boxes = [box_from_output(row, g.shape, r.preprocessing) for row, g in zip(out, grays)]
        x = np.stack(
            [
                pp.preprocess(
                    g,
                    m.preprocessing,
                    m.normalization,
                    boxes[i] if m.preprocessing.needs_box and boxes is not None else None,
                )
                for i, g in enumerate(grays)
            ]
        )
        seconds, _ = _timed_predict(eng, x, batch)
        total += seconds
    return total


def synthetic_images(n: int, per_study: int, size: int, tmp: Path) -> list:
    from trainer.synth import synthesize

    data = tmp / "synth"
    synthesize(data, n=min(n, 40), seed=3, healthy_fraction=0.3)
    pngs = sorted((data / "datasets-PNG").glob("*.png"))
    out, study = [], make_study_ids()
    for i in range(n):
        if i % per_study == 0:
            study = make_study_ids()
        g = pp.read_image_gray8(str(pngs[i % len(pngs)]))
        g = cv2.resize(g, (size, size), interpolation=cv2.INTER_LINEAR)
        out.append(make_dx(g, study, "LL", bits=12, instance_number=i % per_study + 1))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--per-study", type=int, default=4)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--engines", type=Path, default=Path("engines"))
    p.add_argument("--backend", default="auto")
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    logs.configure("console", "warning")
    base = config.load("config.toml")
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        print(f"making {args.n} DX images {args.size}x{args.size} (12-bit) ...", file=sys.stderr)
        images = synthetic_images(args.n, args.per_study, args.size, tmp)
        mb = sum(len(ds.PixelData) for ds in images) / 1e6
        scp = CollectingSCP().start()
        settings = dataclasses.replace(
            base,
            node=dataclasses.replace(base.node, port=0, host="127.0.0.1", var_dir=str(tmp / "var"), min_free_mb=1),
            schedule=dataclasses.replace(
                base.schedule, study_stable_s=0.5, batch_interval_s=0.2, batch_max_size=args.batch, send_backoff_s=0.5
            ),
            engines=dataclasses.replace(
                base.engines, dir=str(args.engines), backend=args.backend, enabled=present_engines(args.engines)
            ),
            destinations=[scp.destination],
        )
        engines = load_engines(settings)
        node = Node(settings, engines=engines)
        node.start()
        n_studies = len({ds.StudyInstanceUID for ds in images})
        try:
            t0 = time.perf_counter()
            statuses = send_images(images, node.port)
            t_ingest = time.perf_counter() - t0
            scp.wait_for(n_studies, timeout=3600)
            t_total = time.perf_counter() - t0
        finally:
            node.stop()
            scp.stop()
        assert all(s == 0 for s in statuses), statuses

        t_eng = engines_only_seconds(
            engines, [dataset_to_gray8(ds) for ds in images], args.batch, routed_engines(images, settings.routing)
        )
    e2e = args.n / t_total
    eng_rate = args.n / t_eng
    backends = ", ".join(f"{k}: {v.backend.name}" for k, v in engines.items())
    print(
        f"images: {args.n} x {args.size}x{args.size} 12-bit DX ({mb:.0f} MB pixel data), {n_studies} studies; "
        f"engines {backends}"
    )
    print(f"ingest (C-STORE, durable):      {args.n / t_ingest:8.2f} images/s ({mb / t_ingest:.1f} MB/s)")
    print(f"time to last SR:                {t_total:8.2f} s (includes study_stable_s = 0.5 s)")
    print(f"end-to-end:                     {e2e:8.2f} images/s")
    print(f"engines only (same images):     {eng_rate:8.2f} images/s")
    print(f"end-to-end / engines-only:      {e2e / eng_rate:8.2f}  (goal >= 0.8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
