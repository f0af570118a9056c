"""Where the time goes: per-image milliseconds of each stage of the node's data path, serial,
one process, for native (uncompressed), JPEG 2000 and JPEG-LS encodings of the same images.

    python -m bench.stages [--n 16] [--size 2048] [--engines DIR] [--backend auto] [--batch 32]

Stages: file read (bytes from the page cache), DICOM parse (pydicom, whole file), pixel
decode (first frame), 12-to-8-bit window (``dataset_to_gray8`` minus the decode), the
worker's preprocessing (crop/resize for each routed engine, uint8), normalize (batch),
ROI engine and classifier engine (batch ``--batch``, per image), SR (one per study, per
image) and database (record the result and the state of each instance in a fresh
store, per image). Each stage is timed over every image; the table gives the mean.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.pixels import pixel_array

from bench.common import ENCODINGS, dx_images, encode, log, write_files
from screener import logs
from screener.dicom.image import dataset_to_gray8
from screener.engine import preprocessing as pp
from screener.engine.runtime import load_engine

AFTER = "worker prepare_file"  # the pipelined path's whole worker step (read .. crop/resize, uint8)

STAGES = (
    "file read",
    "DICOM parse",
    "pixel decode",
    "12->8-bit window",
    "crop/resize (uint8)",
    "normalize",
    "ROI engine",
    "classifier engine",
    "SR",
    "database",
)


def measure(paths: list[Path], engines: dict, batch: int, tmp: Path) -> dict[str, float]:
    """Mean seconds per image of each stage over `paths`."""
    t: dict[str, float] = dict.fromkeys(STAGES, 0.0)
    grays, headers = [], []
    for p in paths:
        t0 = time.perf_counter()
        data = p.read_bytes()
        t1 = time.perf_counter()
        ds = pydicom.dcmread(io.BytesIO(data))
        t2 = time.perf_counter()
        pixel_array(ds, index=0)
        t3 = time.perf_counter()
        gray = dataset_to_gray8(ds)
        t4 = time.perf_counter()
        t["file read"] += t1 - t0
        t["DICOM parse"] += t2 - t1
        t["pixel decode"] += t3 - t2
        t["12->8-bit window"] += max(0.0, (t4 - t3) - (t3 - t2))  # dataset_to_gray8 decodes again
        grays.append(gray)
        del ds.PixelData
        headers.append(ds)
    classifiers = {n: e for n, e in engines.items() if e.manifest.kind == "classifier"}
    roi = engines.get("roi")
    boxes: list[Any] = [None] * len(grays)
    if roi is not None and any(e.manifest.preprocessing.needs_box for e in classifiers.values()):
        from screener.engine.roi import box_from_output

        r = roi.manifest
        t0 = time.perf_counter()
        imgs = [pp.prepare(g, r.preprocessing) for g in grays]
        t1 = time.perf_counter()
        x = pp.normalize_batch(np.stack(imgs), r.normalization)
        t2 = time.perf_counter()
        roi.predict(x[:2])
        t3 = time.perf_counter()
        out = np.concatenate([roi.predict(x[i : i + batch]) for i in range(0, len(x), batch)])
        t4 = time.perf_counter()
        t["crop/resize (uint8)"] += t1 - t0
        t["normalize"] += t2 - t1
        t["ROI engine"] += t4 - t3
        boxes = [box_from_output(row, g.shape, r.preprocessing) for row, g in zip(out, grays)]
    results = []
    for name, eng in classifiers.items():
        m = eng.manifest
        t0 = time.perf_counter()
        imgs = [pp.prepare(g, m.preprocessing, b if m.preprocessing.needs_box else None) for g, b in zip(grays, boxes)]
        t1 = time.perf_counter()
        x = pp.normalize_batch(np.stack(imgs), m.normalization)
        t2 = time.perf_counter()
        eng.predict(x[:2])  # warm-up
        t3 = time.perf_counter()
        probs = np.concatenate([eng.predict(x[i : i + batch]) for i in range(0, len(x), batch)]).reshape(-1)
        t4 = time.perf_counter()
        t["crop/resize (uint8)"] += t1 - t0
        t["normalize"] += t2 - t1
        t["classifier engine"] += t4 - t3
        results.append((name, eng, probs))
    t["SR"], t["database"] = sr_and_db_seconds(headers, results, tmp)
    t[AFTER] = prepare_file_seconds(paths, engines)
    return {k: v / len(paths) for k, v in t.items()}


def prepare_file_seconds(paths: list[Path], engines: dict) -> float:
    """Total seconds of the worker step (screener.pipeline.prepare.prepare_file) over `paths`, in-process."""
    from screener import config
    from screener.pipeline.prepare import EngineSpec, Job, Plan, prepare_file

    rules = tuple(config.load("config.toml").routing)
    plan = Plan(rules, tuple(EngineSpec(n, e.manifest.kind, e.manifest.preprocessing) for n, e in engines.items()))
    prepare_file(Job(str(paths[0]), plan))  # imports
    t0 = time.perf_counter()
    for p in paths:
        prep = prepare_file(Job(str(p), plan))
        if prep.outcome.state != "screened" and prep.outcome.failed:
            raise SystemExit(f"{p.name}: {prep.outcome.failed}")
    return time.perf_counter() - t0


def sr_and_db_seconds(headers: list, results: list, tmp: Path) -> tuple[float, float]:
    """Total seconds to build and encode one SR per study, and to record every result in a store."""
    by_study: dict[str, list] = {}
    for i, h in enumerate(headers):
        by_study.setdefault(str(h.StudyInstanceUID), []).append(i)
    studies = list(by_study.values())
    for warm_up in (True, False):  # the first SR imports highdicom: not a per-image cost
        t0 = time.perf_counter()
        for idxs in studies[:1] if warm_up else studies:
            _one_sr(idxs, headers, results)
    t_sr = time.perf_counter() - t0
    return t_sr, _db_seconds(headers, results, tmp)


def _one_sr(idxs: list[int], headers: list, results: list) -> None:
    from screener.dicom.sr import EngineInfo, Finding, build_sr, derive_uid, sr_to_bytes

    findings = []
    for _name, eng, probs in results:
        info = EngineInfo.from_manifest(eng.manifest, eng.backend.name)
        findings += [Finding(headers[i], info, float(probs[i]), bool(probs[i] >= 0.5)) for i in idxs]
    if findings:
        sr_to_bytes(build_sr(findings, software_version="bench", device_uid=derive_uid("bench")))


def _db_seconds(headers: list, results: list, tmp: Path) -> float:
    from screener.store import Store

    store = Store.open(tmp / f"var-{time.monotonic_ns()}")
    try:
        for h in headers:
            store.store_instance(
                b"DICM", str(h.SOPClassUID), str(h.SOPInstanceUID), str(h.StudyInstanceUID),
                str(h.SeriesInstanceUID), "1.2.840.10008.1.2.1", "BENCH", "127.0.0.1",
            )  # fmt: skip
        t0 = time.perf_counter()
        for i, h in enumerate(headers):
            for name, eng, probs in results:
                p = float(probs[i])
                store.record_result(
                    str(h.SOPInstanceUID), name, eng.manifest.version, eng.backend.name, p,
                    "present" if p >= 0.5 else "absent", 0.5,
                )  # fmt: skip
            store.set_instance_state(str(h.SOPInstanceUID), "screened", "")
        t_db = time.perf_counter() - t0
    finally:
        store.close()
    return t_db


def format_table(rows: dict[str, dict[str, float]]) -> str:
    encs = list(rows)
    head = f"{'stage (ms per image)':<24}" + "".join(f"{e:>12}" for e in encs)
    lines = [head, "-" * len(head)]
    for s in STAGES:
        lines.append(f"{s:<24}" + "".join(f"{rows[e][s] * 1e3:>12.2f}" for e in encs))
    data_path = ("file read", "DICOM parse", "pixel decode", "12->8-bit window", "crop/resize (uint8)", "normalize")
    lines.append(
        f"{'data path total':<24}" + "".join(f"{sum(rows[e][s] for s in data_path) * 1e3:>12.2f}" for e in encs)
    )
    lines.append(f"{'all stages':<24}" + "".join(f"{sum(rows[e][s] for s in STAGES) * 1e3:>12.2f}" for e in encs))
    lines.append(f"{'after: ' + AFTER:<24}" + "".join(f"{rows[e][AFTER] * 1e3:>12.2f}" for e in encs))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--engines", type=Path, required=True, help="folder of engine folders (<dir>/<task>/manifest.json)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--encodings", nargs="+", default=list(ENCODINGS), choices=ENCODINGS)
    args = p.parse_args(argv)
    logs.configure("console", "warning")
    engines = {f.parent.name: load_engine(f.parent, args.backend) for f in sorted(args.engines.glob("*/manifest.json"))}
    if not engines:
        raise SystemExit(f"no engines under {args.engines}")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        log(f"making {args.n} DX images {args.size}x{args.size} (12-bit) ...")
        images = dx_images(args.n, args.size, tmp)
        for enc in args.encodings:
            log(f"encoding {enc} ...")
            paths = write_files([encode(ds, enc) for ds in images], tmp / enc)
            mb = sum(q.stat().st_size for q in paths) / len(paths) / 1e6
            log(f"measuring {enc} ({mb:.1f} MB per file) ...")
            rows[f"{enc}"] = measure(paths, engines, args.batch, tmp)
    print(f"{args.n} images {args.size}x{args.size} 12-bit DX; engines " + ", ".join(
        f"{k}: {v.backend.name} {v.manifest.input_size}px {v.manifest.preprocessing.name}" for k, v in engines.items()
    ))  # fmt: skip
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
