"""`screener demo`: send a small synthetic study to the running node, as a modality would.

A lateral (ViewPosition LL) and two obliques (LAO with laterality L, RAO with laterality R) of one
synthetic patient, DX For Presentation, 12 bits, tagged like an X-ray room tags them, so that the
node's routing sends the lateral to the spondylosis engine and the obliques to ROI + stenosis. The
pixels come from the trainer's synthetic generator when it is installed, else from a simple
drawing. The patient is synthetic ("DEMO^SYNTHETIC"); the status page must not show the name.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from screener.config import Settings
from screener.errors import UserError

DX_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
VIEWS = (("LL", "", "lateral"), ("LAO", "L", "left oblique"), ("RAO", "R", "right oblique"))
FINISHED = ("reported", "sent", "skipped", "failed")


@dataclass(frozen=True)
class DemoResult:
    study_uid: str
    sent: int
    state: str  # the study's state when we stopped waiting ('' when not known)
    sr_file: str


def _synthetic_pixels() -> list[np.ndarray]:
    """Three 8-bit gray images: lateral, left oblique, right oblique."""
    try:
        import cv2

        from trainer.synth import synthesize
        from trainer.synth_oblique import describe_oblique, synthesize_oblique

        with tempfile.TemporaryDirectory(prefix="screener-demo-") as tmp:
            root = Path(tmp)
            synthesize(root / "lat", n=1, seed=11, healthy_fraction=0.3)
            synthesize_oblique(root / "obl", n=2, seed=11, positive_fraction=0.5, annotated_fraction=0.5)
            lat = sorted((root / "lat" / "datasets-PNG").glob("*.png"))[0]
            views = {i.view: i.file_id for i in describe_oblique(2, 11, 0.5, 0.5)}
            paths = [lat] + [root / "obl" / "datasets-PNG" / f"{views[v]}.png" for v in ("L", "R")]
            images = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in paths]
            if all(im is not None for im in images):
                return [_fit(np.asarray(im)) for im in images]
    except Exception:  # noqa: BLE001 - the trainer's extras are optional on a node
        pass
    return [_drawn(flip) for flip in (False, False, True)]


def _fit(gray: np.ndarray, max_side: int = 1024) -> np.ndarray:
    import cv2

    scale = max_side / max(gray.shape)
    if scale < 1:
        gray = cv2.resize(gray, (int(gray.shape[1] * scale), int(gray.shape[0] * scale)), interpolation=cv2.INTER_AREA)
    return gray.astype(np.uint8)


def _drawn(flip: bool) -> np.ndarray:
    """A plain stand-in radiograph: seven vertebral bodies on soft tissue."""
    img = np.full((640, 512), 40, np.uint8)
    img[:, 140:420] = 90
    for k in range(7):
        y = 60 + k * 78
        img[y : y + 58, 220:320] = 200
    return img[:, ::-1].copy() if flip else img


def synthetic_dx(
    gray8: np.ndarray, study: dict[str, str], view_position: str, laterality: str, series: int, instance: int
) -> Dataset:
    """One DX For Presentation image (12 bits stored) tagged as an X-ray room would."""
    maxv = 4095
    values = np.rint(gray8.astype(np.float64) * (maxv / 255.0)).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX_PRESENTATION
    ds.SOPClassUID = DX_PRESENTATION
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    today = time.strftime("%Y%m%d")
    ds.PatientName = "DEMO^SYNTHETIC"
    ds.PatientID = "DEMO-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study["StudyInstanceUID"]
    ds.StudyDate = today
    ds.ContentDate = today
    ds.StudyTime = time.strftime("%H%M%S")
    ds.ContentTime = ds.StudyTime
    ds.AccessionNumber = study["AccessionNumber"]
    ds.StudyID = "DEMO"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "XR CERVICAL SPINE 3 VIEWS"
    ds.Modality = "DX"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series
    ds.SeriesDescription = {"LL": "C-SPINE LAT", "LAO": "C-SPINE LAO", "RAO": "C-SPINE RAO"}[view_position]
    ds.BodyPartExamined = "CSPINE"
    ds.ViewPosition = view_position
    if laterality:
        ds.ImageLaterality = laterality
    ds.Manufacturer = "cspine-screener demo"
    ds.InstanceNumber = instance
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientOrientation = ["A", "F"] if view_position == "LL" else ["P", "F"]
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = values.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.PixelSpacing = ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.DetectorType = "SCINTILLATOR"
    ds.PixelData = values.tobytes()
    return ds


def demo_study() -> list[Dataset]:
    study = {"StudyInstanceUID": generate_uid(), "AccessionNumber": f"DEMO{int(time.time()) % 10**8:08d}"}
    return [
        synthetic_dx(px, study, vp, lat, series=i + 1, instance=1)
        for i, (px, (vp, lat, _)) in enumerate(zip(_synthetic_pixels(), VIEWS))
    ]


def send(datasets: list[Dataset], host: str, port: int, called: str, calling: str, timeout_s: float = 30.0) -> None:
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout_s
    ae.add_requested_context(DX_PRESENTATION, ExplicitVRLittleEndian)
    assoc = ae.associate(host, port, ae_title=called)
    if not assoc.is_established:
        why = "rejected it" if assoc.is_rejected else "did not answer"
        raise UserError(
            f"the DICOM node at {host}:{port} {why} (called AE {called}, calling AE {calling}); "
            "is it running (`make run` or `screener serve`), and does it accept this calling AE title?"
        )
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = int(status.Status) if status is not None and "Status" in status else -1
            if code != 0:
                raise UserError(
                    f"the node answered C-STORE with status 0x{code & 0xFFFF:04X}" if code >= 0 else "no answer"
                )
    finally:
        if assoc.is_established:
            assoc.release()


def run(
    settings: Settings,
    host: str | None = None,
    port: int | None = None,
    calling: str = "DEMO",
    wait_s: float = 120.0,
    complete: bool = True,
    out=sys.stdout,
    config_path: Path | None = None,
) -> DemoResult:
    """Send the demo study, complete it at once (when the node's var_dir is on this machine), wait
    up to `wait_s` for its result and print where to look at it."""
    from screener.store import DB_NAME, Store

    host = host or ("127.0.0.1" if settings.node.host in ("0.0.0.0", "::", "") else settings.node.host)
    port = port or settings.node.port
    called = settings.node.ae_title
    images = demo_study()
    uid = str(images[0].StudyInstanceUID)
    send(images, host, port, called, calling)
    views = ", ".join(f"{what} ({vp})" for vp, _, what in VIEWS)
    print(f"demo: sent 3 images ({views}) of study {uid} to {called}@{host}:{port}", file=out)

    var = Path(settings.node.var_dir)
    state, sr_file = "", ""
    if (var / DB_NAME).is_file():
        store = Store.open(var, recover=False)
        try:
            if complete and store.force_complete(uid):
                print("demo: marked the study complete (no wait for schedule.study_stable_s)", file=out)
            deadline = time.monotonic() + wait_s
            if wait_s > 0:
                print("demo: waiting for the node to screen it ...", file=out, flush=True)
            while True:
                st = store.get_study(uid)
                state = st.state if st else ""
                if state in FINISHED or time.monotonic() >= deadline:
                    break
                time.sleep(0.5)
            st = store.get_study(uid)
            if st is not None and st.sr_path:
                sr_file = str(store.abs_path(st.sr_path))
        finally:
            store.close()
        print(f"demo: the study is {state or 'unknown'}", file=out)
    else:
        print(f"demo: no node state in {var} on this machine: look at the node's own page", file=out)

    http = settings.http
    web_host = "127.0.0.1" if http.host in ("0.0.0.0", "::", "") else http.host
    print("see the result:", file=out)
    if http.enabled:
        print(f"  status page:  http://{web_host}:{http.port}/studies/{uid}", file=out)
    where = f" --config {config_path}" if config_path else (f" --var {var}" if str(var) != "var" else "")
    print(f"  command line: screener status{where}", file=out)
    if sr_file:
        print(f"  SR file:      {sr_file}   (dsrdump it, or open it in a DICOM viewer)", file=out)
    elif state not in FINISHED:
        print(f"  SR file:      under {var / 'sr' / uid}/ once screened", file=out)
    return DemoResult(uid, len(images), state, sr_file)
