"""Node throughput: ingest alone, end-to-end images/s, engines-only images/s and the rate of merely
reading the same files, in one run on the same images.

    python -m bench.node [--n 64] [--per-study 4] [--engines engines/ | --random 224] [--backend auto]
                         [--sender process|thread]

Sends N 12-bit DX images (2048 x 2048, lateral, sensor noise: bench/common.py) over loopback to an
in-process node, from a separate sender process, as a PACS sends (the sender's Python does not share
the node's interpreter lock; ``--sender thread`` sends from a thread of the bench process, as this
bench did before, for comparison). First with screening held back (``study_stable_s`` of an hour):
the ingest-alone rate. Then to a fresh node that screens them (decode worker pool, ``[pipeline]``)
and sends one SR per study to a collecting SCP: end-to-end images/s to the last SR. The engines-only
rate runs the same engine on the same images' model inputs, prepared beforehand, in batches of
``batch_max_size``. ``--random S`` builds a random-weight ResNet50 engine at S px instead of using
built engines. Goal: end-to-end >= 0.8 x the slower of ingest alone and engines alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
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


class SenderProcess:
    """A Python process that C-STOREs the files of a folder to the node when told to (started and
    imported beforehand, so the timing holds only the association and the transfers)."""

    def __init__(self, files: list[Path]) -> None:
        import subprocess

        code = (
            "import json, sys\n"
            "import pydicom\n"
            "from tests.support.node_helpers import send_images\n"
            "paths = json.loads(sys.stdin.readline())\n"
            "print('ready', flush=True)\n"
            "port = int(sys.stdin.readline())\n"
            "datasets = [pydicom.dcmread(p) for p in paths]\n"
            "print('loaded', flush=True)\n"
            "sys.stdin.readline()\n"
            "print(json.dumps(send_images(datasets, port)), flush=True)\n"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self._say(json.dumps([str(f) for f in files]))
        assert self._hear() == "ready"

    def _say(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def _hear(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def prepare(self, port: int) -> None:
        self._say(str(port))
        assert self._hear() == "loaded"

    def send(self) -> list[int]:
        self._say("go")
        statuses = json.loads(self._hear())
        self.proc.wait(60)
        return statuses


def run_node(
    settings, engines, images, var: Path, screen: bool, files: list[Path] | None = None
) -> tuple[float, float, dict[str, float]]:
    """(ingest seconds, seconds to the last SR or 0, stage seconds) of one node run on `images`."""
    scp = CollectingSCP().start()
    stable = 0.5 if screen else 3600.0
    settings = dataclasses.replace(
        settings,
        node=dataclasses.replace(settings.node, var_dir=str(var)),
        schedule=dataclasses.replace(settings.schedule, study_stable_s=stable),
        destinations=[scp.destination],
    )
    node = Node(settings, engines=engines)
    node.start()
    if screen:
        _ = node.screener.pool  # the node's pool starts with the node, before the first study
    n_studies = len({ds.StudyInstanceUID for ds in images})
    sender = SenderProcess(files) if files else None
    try:
        if sender is not None:
            sender.prepare(node.port)
        t0, c0 = time.perf_counter(), os.times()
        statuses = sender.send() if sender is not None else send_images(images, node.port)
        t_ingest, c1 = time.perf_counter() - t0, os.times()
        cpu_ingest = (c1.user - c0.user) + (c1.system - c0.system)
        t_total = 0.0
        if screen:
            scp.wait_for(n_studies, timeout=3600)
            t_total = time.perf_counter() - t0
    finally:
        node.stop()
        node.screener.close()
        scp.stop()
    assert all(s == 0 for s in statuses), statuses
    return t_ingest, t_total, {**node.screener.stage_seconds, "node_cpu_while_receiving": cpu_ingest}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--per-study", type=int, default=4)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--engines", type=Path, default=Path("engines"))
    p.add_argument("--random", type=int, default=0, help="use a random-weight ResNet50 engine at this size")
    p.add_argument("--backend", default="auto")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--sender", choices=("process", "thread"), default="process")
    args = p.parse_args()
    logs.configure("console", "warning")
    base = config.load("config.toml")
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        engines_dir = args.engines
        if args.random:
            from bench.common import random_engine

            engines_dir = tmp / "engines"
            random_engine(engines_dir, args.random)
        print(f"making {args.n} DX images {args.size}x{args.size} (12-bit) ...", file=sys.stderr)
        from bench.common import dx_images, write_files
        from bench.replay import read_rate

        images = dx_images(args.n, args.size, tmp, args.per_study)
        mb = sum(len(ds.PixelData) for ds in images) / 1e6
        files = write_files(images, tmp / "files")
        os.sync()  # the node's writes are not throttled behind the writeback of these files
        rate_read = read_rate(files)
        sent_from = files if args.sender == "process" else None
        settings = dataclasses.replace(
            base,
            node=dataclasses.replace(base.node, port=0, host="127.0.0.1", min_free_mb=1),
            schedule=dataclasses.replace(
                base.schedule, batch_interval_s=0.2, batch_max_size=args.batch, send_backoff_s=0.5
            ),
            engines=dataclasses.replace(
                base.engines, dir=str(engines_dir), backend=args.backend, enabled=present_engines(engines_dir)
            ),
        )
        engines = load_engines(settings)
        n_studies = len({ds.StudyInstanceUID for ds in images})
        print("ingest alone ...", file=sys.stderr)
        t_ingest_alone, _, alone = run_node(
            settings, engines, images, tmp / "var-ingest", screen=False, files=sent_from
        )
        print("ingest and screening ...", file=sys.stderr)
        t_ingest, t_total, stages = run_node(settings, engines, images, tmp / "var", screen=True, files=sent_from)
        t_eng = engines_only_seconds(
            engines, [dataset_to_gray8(ds) for ds in images], args.batch, routed_engines(images, settings.routing)
        )
    e2e = args.n / t_total
    eng_rate = args.n / t_eng
    ingest_alone = args.n / t_ingest_alone
    backends = ", ".join(f"{k}: {v.backend.name}" for k, v in engines.items())
    print(
        f"images: {args.n} x {args.size}x{args.size} 12-bit DX ({mb:.0f} MB pixel data), {n_studies} studies; "
        f"engines {backends}; sender: {args.sender}"
    )
    print(f"read the files only:            {rate_read:8.2f} files/s")
    print(
        f"ingest alone (no screening):    {ingest_alone:8.2f} images/s ({mb / t_ingest_alone:.1f} MB/s; "
        f"node CPU {alone['node_cpu_while_receiving'] / args.n * 1e3:.1f} ms per image)"
    )
    print("per image: " + ", ".join(f"{k} {v / args.n * 1e3:.1f} ms" for k, v in sorted(stages.items())))
    # (node_cpu_while_receiving: the node's CPU while the images arrived, screening included)
    print(f"end-to-end / min(ingest alone, engines only): {e2e / min(ingest_alone, eng_rate):8.2f}  (goal >= 0.8)")
    print(f"ingest (C-STORE, durable):      {args.n / t_ingest:8.2f} images/s ({mb / t_ingest:.1f} MB/s)")
    print(f"time to last SR:                {t_total:8.2f} s (includes study_stable_s = 0.5 s)")
    print(f"end-to-end:                     {e2e:8.2f} images/s")
    print(f"engines only (same images):     {eng_rate:8.2f} images/s")
    print(f"end-to-end / engines-only:      {e2e / eng_rate:8.2f}  (goal >= 0.8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
