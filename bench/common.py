"""Shared bench helpers: realistic 12-bit DX files and production-size engine folders.

``dx_images`` makes N DX data sets (lateral, 12-bit, windowed) from the synthetic
radiographs of ``trainer.synth``, resized to ``size`` and given sensor noise in the
12-bit domain so that, as on a real detector, most of the 4096 stored values occur
(an 8-bit image scaled to 12 bits would hold only 256 and make the 12-to-8-bit step
look cheaper than it is).

``random_engine`` writes an engine folder (manifest + hashed backend files) for a
ResNet50 with random weights at a given input size: ONNX fp32, ONNX int8 (random
calibration: right for speed, meaningless for accuracy) and the ``torch`` program.
Good for throughput; never for screening.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pydicom

from screener.engine import preprocessing as pp

ENCODINGS = ("native", "jpeg2000", "jpegls")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def dx_images(n: int, size: int, tmp: Path, per_study: int = 4, seed: int = 0) -> list[pydicom.Dataset]:
    """N 12-bit DX data sets (`per_study` images per study) from synthetic radiographs."""
    from tests.support.dicom_factory import make_dx, make_study_ids
    from trainer.synth import synthesize

    data = tmp / "synth"
    synthesize(data, n=min(n, 24), seed=3, healthy_fraction=0.3)
    pngs = sorted((data / "datasets-PNG").glob("*.png"))
    rng = np.random.default_rng(seed)
    bases = []
    for png in pngs:
        g = cv2.resize(pp.read_image_gray8(str(png)), (size, size), interpolation=cv2.INTER_LINEAR)
        bases.append(g.astype(np.float32) * (4095.0 / 255.0))
    out, study = [], make_study_ids()
    for i in range(n):
        if i % per_study == 0:
            study = make_study_ids()
        ds = make_dx(np.zeros((size, size), np.uint8), study, "LL", bits=12, instance_number=i % per_study + 1)
        noise = rng.normal(0.0, 12.0, size=(size, size)).astype(np.float32)
        values = np.clip(np.rint(bases[i % len(bases)] + noise), 0, 4095).astype(np.uint16)
        ds.PixelData = values.tobytes()
        out.append(ds)
    return out


def encode(ds: pydicom.Dataset, encoding: str) -> pydicom.Dataset:
    """A lossless JPEG 2000 or JPEG-LS copy of a native data set (pydicom's encoders)."""
    from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

    if encoding == "native":
        return ds
    import copy as copy_mod

    copy = copy_mod.deepcopy(ds)
    uid = {"jpeg2000": JPEG2000Lossless, "jpegls": JPEGLSLossless}[encoding]
    copy.compress(uid, encoding_plugin="pylibjpeg" if encoding == "jpeg2000" else "pyjpegls")
    return copy


def write_files(images: Sequence[pydicom.Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(images):
        p = folder / f"{i:05d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def random_engine(
    folder: Path,
    size: int,
    task: str = "spondylosis",
    recipe_name: str = "original",
    backends: Sequence[str] = ("onnx-fp32", "onnx-int8", "torch"),
    seed: int = 0,
) -> Path:
    """Write `folder`/`task` with a random-weight ResNet50 engine at `size` px; returns the folder."""
    import torch

    from screener.engine import manifest as mf
    from trainer import export
    from trainer.model import ProbabilityHead, build_classifier

    torch.manual_seed(seed)
    model, _ = build_classifier(None)
    model.train()
    with torch.no_grad():  # BatchNorm statistics from one random batch keep activations in range
        model(torch.randn(4, 3, 64, 64))
    head = ProbabilityHead(model).eval()
    out = Path(folder) / task
    out.mkdir(parents=True, exist_ok=True)
    records = []
    if "onnx-fp32" in backends or "onnx-int8" in backends:
        log(f"[{size}px] exporting ONNX fp32 ...")
        fp32 = export.export_onnx(head, out / "model.onnx", size)
        records.append(export.backend_record("onnx-fp32", fp32, out, "fp32"))
        if "onnx-int8" in backends:
            log(f"[{size}px] quantizing int8 (random calibration) ...")
            calib = np.random.default_rng(1).normal(size=(8, 3, size, size)).astype(np.float32)
            int8 = export.quantize_int8(fp32, out / "model.int8.onnx", calib)
            records.append(export.backend_record("onnx-int8", int8, out, "int8", kept=True))
    if "torch" in backends:
        log(f"[{size}px] writing the torch.export program ...")
        pt2 = export.export_torch_program(head, out / "model.pt2", size)
        records.append(export.backend_record("torch", pt2, out, "fp32"))
    rcp = pp.recipe(recipe_name, size)
    man = mf.Manifest(
        task=task,
        version=f"bench-random-{size}",
        created="2026-01-01T00:00:00+00:00",
        kind="classifier",
        input_size=size,
        input_name="image",
        output_name="probability",
        preprocessing=rcp,
        normalization=pp.IMAGENET,
        class_names=["healthy", task],
        threshold=mf.Threshold(0.5, "fixed"),
        metrics={},
        data={},
        training={},
        backends=records,
        demo=True,
        notes=["random weights: for throughput benchmarks only"],
    )
    mf.write(man, out)
    return out
