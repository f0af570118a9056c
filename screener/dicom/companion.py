"""Companion objects for viewers that cannot render the SR (optional, off by default).

``[report] companion`` picks one kind; per screened image the node then writes, in the
source study, in a series of its own:

- ``secondary-capture``: a Secondary Capture image (``highdicom.sc.SCImage``), the source
  image as the node decoded it (8-bit, windowed) with the ROI box and one line per finding
  burned in, e.g. ``AI: foraminal stenosis R likely, 87% - NOT FOR DIAGNOSIS``.
  Burned In Annotation YES; Source Image Sequence names the source image and Source
  Instance Sequence the SR (purpose "Source report").
- ``gsps``: a Grayscale Softcopy Presentation State
  (``highdicom.pr.GrayscaleSoftcopyPresentationState``) that references the source image and
  draws the ROI box (POLYLINE, pixel units) and the same text on a graphic layer. Each graphic
  carries the finding's Tracking UID from the SR. (The GSPS IOD has no attribute that can
  reference an SR; the Tracking UIDs and the Content Description link it.)

IHE AI Results allows such objects only in addition to the SR: the SR stays the source of
truth, the companions are built from the same findings after it. UIDs are derived
(`derive_uid`) from the SR's SOP Instance UID and the source image, so the same SR gives the
same companions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DA, DT, TM

from screener.dicom.sr import Finding, derive_uid, finding_tracking_uid
from screener.logs import get_logger

log = get_logger(__name__)

COMPANION_KINDS = ("none", "secondary-capture", "gsps")
SECONDARY_CAPTURE_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE = "1.2.840.10008.5.1.4.1.1.11.1"
# The SOP classes the node may send besides the SR (sender contexts, conformance statement).
COMPANION_SOP_CLASSES = (SECONDARY_CAPTURE_IMAGE_STORAGE, GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE)

SC_SERIES_NUMBER = 9002
GSPS_SERIES_NUMBER = 9003
SC_SERIES_DESCRIPTION = "AI screening overlay (NOT FOR DIAGNOSIS)"
GSPS_SERIES_DESCRIPTION = "AI screening annotations (NOT FOR DIAGNOSIS)"
WARNING = "NOT FOR DIAGNOSIS"

FINDING_WORDS = {"spondylosis": "cervical spondylosis", "stenosis": "foraminal stenosis"}


@dataclass(frozen=True)
class Companion:
    """One companion object and the source image it belongs to."""

    dataset: pydicom.Dataset
    source_sop_instance_uid: str


def finding_line(f: Finding) -> str:
    """The one-line text for a finding: ``AI: foraminal stenosis R likely, 87% - NOT FOR DIAGNOSIS``."""
    words = FINDING_WORDS.get(f.engine.task, f.engine.finding_code.meaning.lower())
    side = f" {f.laterality}" if f.laterality else ""
    call = "likely" if f.present else "unlikely"
    return f"AI: {words}{side} {call}, {round(float(f.probability) * 100):d}% - {WARNING}"


def _by_source(findings: Sequence[Finding]) -> list[tuple[pydicom.Dataset, list[Finding]]]:
    groups: dict[str, tuple[pydicom.Dataset, list[Finding]]] = {}
    for f in findings:
        uid = str(f.source.SOPInstanceUID)
        groups.setdefault(uid, (f.source, []))[1].append(f)
    return list(groups.values())


def _clip_box(roi: Sequence[float], rows: int, cols: int) -> tuple[int, int, int, int] | None:
    x0, y0, x1, y1 = (float(v) for v in roi)
    x0, x1 = sorted((min(max(x0, 0.0), cols), min(max(x1, 0.0), cols)))
    y0, y1 = sorted((min(max(y0, 0.0), rows), min(max(y1, 0.0), rows)))
    if x1 - x0 < 1 or y1 - y0 < 1:
        return None
    return int(round(x0)), int(round(y0)), int(round(x1)) - 1, int(round(y1)) - 1


# --------------------------------------------------------------------------- secondary capture


def burn_in(gray8: np.ndarray, findings: Sequence[Finding]) -> np.ndarray:
    """The image with each finding's ROI box and a text banner burned in (pure; 8-bit gray)."""
    import cv2

    img = np.array(gray8, dtype=np.uint8, copy=True)
    rows, cols = img.shape
    thick = max(1, round(min(rows, cols) / 256))
    for f in findings:
        if f.roi is None:
            continue
        box = _clip_box(f.roi, rows, cols)
        if box is None:
            continue
        x0, y0, x1, y1 = box
        cv2.rectangle(img, (x0, y0), (x1, y1), 0, thick + 2)  # dark outline: visible on bright bone
        cv2.rectangle(img, (x0, y0), (x1, y1), 255, thick)
    lines = [finding_line(f) for f in findings]
    font = cv2.FONT_HERSHEY_SIMPLEX
    # Scale the text so that the longest line fits the width.
    (w1, h1), base1 = cv2.getTextSize(max(lines, key=len), font, 1.0, 1)
    scale = max(0.25, min(2.0, (cols - 8) / max(w1, 1)))
    text_thick = max(1, round(scale * 1.5))
    line_h = int(round((h1 + base1) * scale)) + 4
    banner = line_h * len(lines) + 4
    img[: min(banner, rows), :] = 0
    for i, line in enumerate(lines):
        y = 2 + line_h * (i + 1) - int(round(base1 * scale)) - 2
        cv2.putText(img, line, (4, y), font, scale, 255, text_thick, cv2.LINE_AA)
    return img


def secondary_capture(
    source: pydicom.Dataset,
    findings: Sequence[Finding],
    gray8: np.ndarray,
    sr: pydicom.Dataset,
    *,
    instance_number: int,
    manufacturer: str,
    software_version: str,
    when: datetime,
) -> pydicom.Dataset:
    """One Secondary Capture image: the decoded source with the findings burned in."""
    sr_uid = str(sr.SOPInstanceUID)
    pixels = burn_in(gray8, findings)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.MONOCHROME2,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=derive_uid("cspine-companion-sc-series", str(sr.SeriesInstanceUID)),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=derive_uid("cspine-companion-sc", sr_uid, str(source.SOPInstanceUID)),
        instance_number=instance_number,
        manufacturer=manufacturer,
        patient_orientation=("A", "F"),  # placeholder: highdicom takes single letters only; replaced below
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    # The source's own value (may be compound, e.g. "AL"), or empty (type 2) when it has none.
    sc.PatientOrientation = list(source.get("PatientOrientation") or [])
    sc.SeriesDescription = SC_SERIES_DESCRIPTION
    sc.BodyPartExamined = source.get("BodyPartExamined") or "CSPINE"  # unpaired: no Laterality (2C)
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ConversionType = "WSD"
    sc.DerivationDescription = "AI screening findings burned in; the SR of this study is the source of truth"
    sc.ImageComments = "; ".join(finding_line(f) for f in findings)[:10240]
    sc.SoftwareVersions = software_version
    sc.ManufacturerModelName = "cspine-screener"
    day, clock = DA(when.strftime("%Y%m%d")), TM(when.strftime("%H%M%S"))
    sc.SeriesDate = sc.ContentDate = sc.InstanceCreationDate = sc.DateOfSecondaryCapture = day
    sc.SeriesTime = sc.ContentTime = sc.InstanceCreationTime = sc.TimeOfSecondaryCapture = clock
    for item in sc.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = DT(when)
    src = pydicom.Dataset()
    src.ReferencedSOPClassUID = source.SOPClassUID
    src.ReferencedSOPInstanceUID = source.SOPInstanceUID
    src.PurposeOfReferenceCodeSequence = [_code_item(codes.DCM.SourceImageForImageProcessingOperation)]
    sc.SourceImageSequence = [src]
    ref = pydicom.Dataset()
    ref.ReferencedSOPClassUID = sr.SOPClassUID
    ref.ReferencedSOPInstanceUID = sr.SOPInstanceUID
    ref.PurposeOfReferenceCodeSequence = [_code_item(codes.DCM.SourceReport)]
    sc.SourceInstanceSequence = [ref]
    return sc


def _code_item(code: Code) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


# --------------------------------------------------------------------------- GSPS


def presentation_state(
    source: pydicom.Dataset,
    findings: Sequence[Finding],
    sr: pydicom.Dataset,
    *,
    instance_number: int,
    manufacturer: str,
    software_version: str,
    when: datetime,
) -> pydicom.Dataset:
    """One GSPS for the source image: ROI boxes and the finding lines as graphic annotations."""
    rows, cols = int(source.Rows), int(source.Columns)
    layer = hd.pr.GraphicLayer(layer_name="AI", order=1, description="AI screening findings (NOT FOR DIAGNOSIS)")
    graphics = []
    texts = []
    line_h = max(12.0, rows / 24.0)
    for i, f in enumerate(findings):
        tracking_uid = finding_tracking_uid(f)
        if f.roi is not None and (box := _clip_box(f.roi, rows, cols)) is not None:
            x0, y0, x1, y1 = (float(v) for v in box)
            graphics.append(
                hd.pr.GraphicObject(
                    graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                    graphic_data=np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32),
                    units=hd.pr.AnnotationUnitsValues.PIXEL,
                    tracking_id=f"{f.engine.task} ROI",
                    tracking_uid=derive_uid("cspine-companion-roi", tracking_uid),
                )
            )
        top = 1.0 + i * line_h
        texts.append(
            hd.pr.TextObject(
                text_value=finding_line(f),
                units=hd.pr.AnnotationUnitsValues.PIXEL,
                bounding_box=(1.0, top, float(cols - 1), min(float(rows - 1), top + line_h)),
                tracking_id=f"{f.engine.task} finding",
                tracking_uid=tracking_uid,
            )
        )
    annotation = hd.pr.GraphicAnnotation(
        referenced_images=[source],
        graphic_layer=layer,
        graphic_objects=graphics or None,
        text_objects=texts,
    )
    sr_uid = str(sr.SOPInstanceUID)
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[source],
        series_instance_uid=derive_uid("cspine-companion-gsps-series", str(sr.SeriesInstanceUID)),
        series_number=GSPS_SERIES_NUMBER,
        sop_instance_uid=derive_uid("cspine-companion-gsps", sr_uid, str(source.SOPInstanceUID)),
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name="cspine-screener",
        software_versions=software_version,
        device_serial_number="0",
        content_label="AI_SCREENING",
        content_description="AI screening findings from the study SR (NOT FOR DIAGNOSIS)",
        graphic_annotations=[annotation],
        graphic_layers=[layer],
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    gsps.SeriesDescription = GSPS_SERIES_DESCRIPTION
    gsps.BodyPartExamined = source.get("BodyPartExamined") or "CSPINE"  # unpaired: no Laterality (2C)
    day, clock = DA(when.strftime("%Y%m%d")), TM(when.strftime("%H%M%S"))
    gsps.SeriesDate = gsps.PresentationCreationDate = gsps.InstanceCreationDate = day
    gsps.SeriesTime = gsps.PresentationCreationTime = gsps.InstanceCreationTime = clock
    for item in gsps.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = DT(when)
    return gsps


# --------------------------------------------------------------------------- build


def build_companions(
    kind: str,
    findings: Sequence[Finding],
    sr: pydicom.Dataset,
    *,
    pixels: Callable[[pydicom.Dataset], np.ndarray] | Mapping[str, np.ndarray] | None = None,
    manufacturer: str = "cspine-screener",
    software_version: str,
    when: datetime | None = None,
) -> list[Companion]:
    """The companion objects of `kind` ("none" | "secondary-capture" | "gsps") for the SR's findings.

    `pixels` gives the decoded 8-bit image of a source (needed for Secondary Capture): a mapping
    SOP Instance UID -> array, or a function of the source header. The time stamps default to the
    SR's content date and time, so the same SR gives the same bytes.
    """
    if kind not in COMPANION_KINDS:
        raise ValueError(f"companion kind must be one of {', '.join(COMPANION_KINDS)}, got {kind!r}")
    if kind == "none" or not findings:
        return []
    if when is None:
        when = datetime.strptime(f"{sr.ContentDate}{str(sr.ContentTime)[:6]}", "%Y%m%d%H%M%S")
    out: list[Companion] = []
    for n, (source, group) in enumerate(_by_source(findings), start=1):
        uid = str(source.SOPInstanceUID)
        common = dict(instance_number=n, manufacturer=manufacturer, software_version=software_version, when=when)
        if kind == "secondary-capture":
            if pixels is None:
                raise ValueError("secondary-capture companions need the decoded source pixels")
            gray = pixels[uid] if isinstance(pixels, Mapping) else pixels(source)
            ds = secondary_capture(source, group, gray, sr, **common)  # type: ignore[arg-type]
        else:
            ds = presentation_state(source, group, sr, **common)  # type: ignore[arg-type]
        out.append(Companion(ds, uid))
    return out


def companion_to_bytes(ds: pydicom.Dataset) -> bytes:
    """Part 10 file bytes, Explicit VR Little Endian."""
    import io

    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def read_gray8(path: str | Path) -> np.ndarray:
    """The source image as the node decodes it (first frame, 8-bit, windowed)."""
    from screener.dicom.image import dataset_to_gray8

    return dataset_to_gray8(pydicom.dcmread(str(path)))


def companion_files(
    kind: str,
    findings: Sequence[Finding],
    sr: pydicom.Dataset,
    sources: Mapping[str, str | Path],
    *,
    software_version: str,
) -> list[tuple[str, bytes]]:
    """(file name, Part 10 bytes) of the study's companions, for the node and replay to write and queue.

    `sources` maps each source SOP Instance UID to its file (re-read for the pixels of a Secondary
    Capture). Never raises: the SR is the result, a companion that cannot be built is logged and
    left out.
    """
    if kind == "none" or not findings:
        return []
    try:
        companions = build_companions(
            kind,
            findings,
            sr,
            pixels=lambda header: read_gray8(sources[str(header.SOPInstanceUID)]),
            software_version=software_version,
        )
        prefix = "sc" if kind == "secondary-capture" else "gsps"
        return [(f"{prefix}-{c.dataset.SOPInstanceUID}.dcm", companion_to_bytes(c.dataset)) for c in companions]
    except Exception as exc:  # noqa: BLE001 - untrusted pixels must not cost the SR
        log.warning("companion_not_built", kind=kind, sr_uid=str(sr.SOPInstanceUID), error=exc.__class__.__name__)
        return []
