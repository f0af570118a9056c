"""Golden samples of what the node sends (docs/samples/), as an IHE Evidence Creator shows them.

``python -m screener.dicom.samples [--out docs/samples]`` writes, from fixed inputs only:

- ``study/``: a small synthetic cervical-spine study (a lateral and two oblique DX images,
  256 x 256, 8 bit; synthetic pixels, a made-up patient);
- ``sr.dcm``: the SR the node builds for it (`screener.dicom.sr.build_sr` with the node's
  device UID for the default AE title), from fixed engine results: fake engine manifests with
  fixed versions and thresholds and fixed probabilities and ROI boxes (no engine runs, so the
  bytes are stable);
- ``sr-dsrdump.txt``, ``sr.html`` and ``sr-dcmdump.txt``: DCMTK's ``dsrdump`` and ``dsr2html``
  renderings of the content tree and ``dcmdump`` of the whole object (when DCMTK is installed);
- ``companion/``: the Secondary Capture images and GSPS objects of ``[report] companion``
  for the same SR, and ``sc-*.png`` renderings of the Secondary Capture pixels.

The same inputs give the same bytes (UIDs included): ``tests/dicom/test_samples.py``
regenerates them and compares. Regenerate after changing the SR or the companions.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from screener import __version__
from screener.dicom.companion import build_companions, companion_to_bytes
from screener.dicom.image import dataset_to_gray8
from screener.dicom.sr import EngineInfo, Finding, build_sr, derive_uid, sr_to_bytes

DEFAULT_OUT = Path("docs/samples")
WHEN = datetime(2026, 1, 15, 10, 30, 0)
SIZE = 256
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
NODE_AE_TITLE = "CSPINE"  # config.toml's default: the node's Device Observer UID derives from it
STUDY_UID = derive_uid("cspine-screener sample", "study")

# (file stem, view position, laterality, series number)
IMAGES = (("lateral", "LL", "", 1), ("oblique-L", "LAO", "L", 2), ("oblique-R", "RAO", "R", 3))
# Fixed engine results: (image stem, task, probability, roi (x0, y0, x1, y1) or None)
RESULTS = (
    ("lateral", "spondylosis", 0.8731, None),
    ("oblique-L", "stenosis", 0.1234, (70.0, 96.0, 150.0, 200.0)),
    ("oblique-R", "stenosis", 0.8712, (100.5, 90.0, 186.0, 196.0)),
)
ENGINES = {"spondylosis": ("2026.01.1", 0.4213), "stenosis": ("2026.01.2", 0.5)}


def node_device_uid(ae_title: str = NODE_AE_TITLE) -> str:
    """The node's Device Observer UID (as screener.node.Node derives it)."""
    return derive_uid("cspine-screener device", ae_title)


def _fake_sha256(*parts: str) -> str:
    import hashlib

    return hashlib.sha256(" ".join(("sample",) + parts).encode()).hexdigest()


def fake_manifest(task: str, version: str, threshold: float, validated: bool = False, demo: bool = False):
    """A complete engine manifest with fixed content and fake backend hashes (no engine file)."""
    from screener.engine.manifest import Backend, Manifest, Threshold
    from screener.engine.preprocessing import IMAGENET, RECIPES

    recipe = RECIPES["crop"] if task == "stenosis" else RECIPES["original"]
    return Manifest(
        task=task,
        version=version,
        created="2026-01-01T00:00:00+00:00",
        kind="classifier",
        input_size=224,
        input_name="input",
        output_name="probability",
        preprocessing=recipe,
        normalization=IMAGENET,
        class_names=["normal", task],
        threshold=Threshold(value=threshold, method="fixed for the samples"),
        metrics={},
        data={"fingerprint": f"sample-{task}"},
        training={"note": "not trained: a fixed manifest for the golden samples"},
        backends=[Backend(name="onnx-fp32", file="model.onnx", sha256=_fake_sha256(task, version), precision="fp32")],
        validated=validated,
        demo=demo,
        software_version=__version__,
    )


def sample_engines(validated: bool = False, demo: bool = False) -> dict[str, EngineInfo]:
    return {
        task: EngineInfo.from_manifest(fake_manifest(task, version, thr, validated, demo), backend="onnx-fp32")
        for task, (version, thr) in ENGINES.items()
    }


def _pixels(view: str, seed: int) -> np.ndarray:
    """A synthetic radiograph-like 8-bit image: soft tissue gradient and a column of vertebrae."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    img = 40.0 + 50.0 * np.exp(-(((x - SIZE / 2) / (SIZE / 3)) ** 2))
    shift = {"LL": 0.0, "LAO": -14.0, "RAO": 14.0}[view]
    for k in range(6):  # C2..C7
        cy = 40 + k * 34
        cx = SIZE / 2 + shift + 6.0 * np.sin(k / 2.0)
        body = ((x - cx) / 26.0) ** 2 + ((y - cy) / 13.0) ** 2 <= 1.0
        img[body] = 170.0 + 8.0 * k
        if view != "LL":  # the foramen: a darker oval beside each body
            hole = ((x - cx - (30 if view == "RAO" else -30)) / 9.0) ** 2 + ((y - cy - 15) / 7.0) ** 2 <= 1.0
            img[hole] = 70.0
    rng = np.random.default_rng(seed)
    img += rng.normal(0.0, 4.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def sample_images() -> list[Dataset]:
    """The synthetic study: DX For Presentation, 8 bit, fixed UIDs and a made-up patient."""
    out = []
    for n, (stem, view, lat, series) in enumerate(IMAGES, start=1):
        pixels = _pixels(view, seed=n)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = UID(DX_FOR_PRESENTATION)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = DX_FOR_PRESENTATION
        ds.SOPInstanceUID = UID(derive_uid("cspine-screener sample", "image", stem))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientName = "Sample^Synthetic"
        ds.PatientID = "SAMPLE-0001"
        ds.PatientBirthDate = "19600101"
        ds.PatientSex = "O"
        ds.StudyInstanceUID = STUDY_UID
        ds.StudyDate = WHEN.strftime("%Y%m%d")
        ds.StudyTime = "101500"
        ds.AccessionNumber = "SAMPLE-ACC-1"
        ds.ReferringPhysicianName = ""
        ds.StudyID = "SAMPLE1"
        ds.StudyDescription = "XR CERVICAL SPINE (synthetic sample)"
        ds.Modality = "DX"
        ds.SeriesInstanceUID = derive_uid("cspine-screener sample", "series", stem)
        ds.SeriesNumber = series
        ds.SeriesDescription = f"C-SPINE {view}"
        ds.BodyPartExamined = "CSPINE"
        ds.ViewPosition = view
        ds.ImageLaterality = lat or "U"
        ds.Manufacturer = "cspine-screener samples"
        ds.InstanceNumber = 1
        ds.ContentDate = ds.StudyDate
        ds.ContentTime = "101600"
        ds.AcquisitionDateTime = f"{ds.StudyDate}101600"
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PatientOrientation = ["A", "F"] if view == "LL" else ["L" if lat == "L" else "R", "F"]
        ds.BurnedInAnnotation = "NO"
        ds.LossyImageCompression = "00"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelIntensityRelationship = "LIN"
        ds.PixelIntensityRelationshipSign = 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
        ds.WindowCenter, ds.WindowWidth = 128, 256
        ds.PresentationLUTShape = "IDENTITY"
        ds.ImagerPixelSpacing = [0.6, 0.6]
        ds.DetectorType = "SCINTILLATOR"
        ds.PositionerType = ""
        ds.AcquisitionContextSequence = []
        region = Dataset()
        region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "122494005", "SCT", "Cervical spine"
        ds.AnatomicRegionSequence = [region]
        ds.PixelData = pixels.tobytes()
        out.append(ds)
    return out


def _header(ds: Dataset) -> Dataset:
    """A copy without pixel data (what the node keeps of a screened image)."""
    header = Dataset({tag: elem for tag, elem in ds.items() if tag != 0x7FE00010})
    header.file_meta = ds.file_meta
    return header


def sample_findings(images: Sequence[Dataset], engines: dict[str, EngineInfo]) -> list[Finding]:
    by_stem = {stem: ds for (stem, *_), ds in zip(IMAGES, images)}
    lat = {stem: (la or None) for stem, _, la, _ in IMAGES}
    findings = []
    for stem, task, p, roi in RESULTS:
        header = _header(by_stem[stem])
        e = engines[task]
        findings.append(
            Finding(header, e, p, p >= e.threshold, roi=roi, laterality=lat[stem] if roi is not None else None)
        )
    return findings


def build_sample_sr(findings: Sequence[Finding], **kw) -> pydicom.Dataset:
    return build_sr(findings, software_version=__version__, device_uid=node_device_uid(), content_datetime=WHEN, **kw)


def _run(cmd: list[str], out: Path) -> bool:
    if shutil.which(cmd[0]) is None:
        print(f"{cmd[0]} not found (DCMTK): {out.name} not written", file=sys.stderr)
        return False
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        print(f"{' '.join(cmd[:1])} failed: {proc.stderr.strip()}", file=sys.stderr)
        return False
    if cmd[0] in ("dsrdump", "dcmdump"):
        out.write_text(proc.stdout, encoding="utf-8")
    return True


def write_samples(out: Path = DEFAULT_OUT, renderings: bool = True) -> list[Path]:
    """Write every sample under `out`; returns the files written."""
    import cv2

    out = Path(out)
    (out / "study").mkdir(parents=True, exist_ok=True)
    (out / "companion").mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    images = sample_images()
    for (stem, *_), ds in zip(IMAGES, images):
        path = out / "study" / f"{stem}.dcm"
        ds.save_as(str(path), enforce_file_format=True)
        written.append(path)
    findings = sample_findings(images, sample_engines())
    sr = build_sample_sr(findings)
    sr_path = out / "sr.dcm"
    sr_path.write_bytes(sr_to_bytes(sr))
    written.append(sr_path)
    # The node's own decoder (modality LUT, window, bits stored) gives the Secondary Capture pixels.
    gray = {str(ds.SOPInstanceUID): dataset_to_gray8(ds) for ds in images}
    stems = {str(ds.SOPInstanceUID): stem for (stem, *_), ds in zip(IMAGES, images)}
    for kind, prefix in (("secondary-capture", "sc"), ("gsps", "gsps")):
        for c in build_companions(kind, findings, sr, pixels=gray, software_version=__version__):
            path = out / "companion" / f"{prefix}-{stems[c.source_sop_instance_uid]}.dcm"
            path.write_bytes(companion_to_bytes(c.dataset))
            written.append(path)
            if kind == "secondary-capture":
                png = path.with_suffix(".png")
                px = np.frombuffer(c.dataset.PixelData, np.uint8).reshape(int(c.dataset.Rows), int(c.dataset.Columns))
                ok, buf = cv2.imencode(".png", px)
                if ok:
                    png.write_bytes(buf.tobytes())
                    written.append(png)
    if renderings:
        if _run(["dsrdump", str(sr_path)], out / "sr-dsrdump.txt"):
            written.append(out / "sr-dsrdump.txt")
        if _run(["dsr2html", str(sr_path), str(out / "sr.html")], out / "sr.html"):
            written.append(out / "sr.html")
        if _run(["dcmdump", str(sr_path)], out / "sr-dcmdump.txt"):  # the header: flags, equipment, codes
            written.append(out / "sr-dcmdump.txt")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m screener.dicom.samples", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: docs/samples)")
    ap.add_argument("--no-renderings", action="store_true", help="skip the dsrdump / dsr2html renderings")
    args = ap.parse_args(argv)
    for path in write_samples(args.out, renderings=not args.no_renderings):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
