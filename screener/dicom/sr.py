"""One DICOM Structured Report per screened study (TID 1500 in Comprehensive 3D SR).

The SR goes back into the source study (same Study Instance UID, patient and
study attributes copied from the first source as highdicom copies them) in its own series:

    Imaging Measurement Report (126000, DCM)                  TID 1500
      Language, Observer Type = Device (121007, DCM) + Device Observer UID/name/...
      Procedure reported = Imaging procedure (363679005, SCT)
      Imaging Measurements (126010, DCM)
        Measurement Group (125007, DCM), one per source image and engine:
          whole-image engine: TID 1501 (MeasurementsAndQualitativeEvaluations)
            Tracking Identifier / Tracking Unique Identifier      (stable per finding)
            Finding = <finding code>                             (121071, DCM)
            Algorithm Name / Version / Manufacturer / Parameters /
              Family = Artificial Intelligence (123110, DCM)      TID 4019
            Finding Site = Cervical spine (122494005, SCT) [+ Laterality]
            Source of Measurement = IMAGE <source SOP Instance>   (121112, DCM)
            Certainty of Finding (111012, DCM) = NN.NNN %          TID 300
            <finding code> = Present (52101004, SCT) | Absent (272519000, SCT)
          cropped engine (ROI): TID 1410 (PlanarROIMeasurementsAndQualitativeEvaluations)
            same items, with Image Region = SCOORD POLYLINE (closed rectangle,
            5 points, pixel coordinates) SELECTED FROM IMAGE <source SOP Instance>
            instead of the Source of Measurement item.

Header (IHE AI Results): Verification Flag UNVERIFIED (no person verifies here);
Preliminary Flag FINAL only when every engine is validated and none is a demo,
else PRELIMINARY; one Contributing Equipment item per engine version with IHE
AIR's "Processing Algorithm" purpose and a Device UID derived from the engine's
manifest (a retrained engine is a new device); the Predecessor Documents Sequence
names the SRs of the study that this one supersedes.

Codes and their reasons: docs/sr-codes.md. The findings use a private coding
scheme (99CSPINE), declared in the Coding Scheme Identification Sequence.

How it is built: `build_sr_reference` builds the SR with highdicom (`Comprehensive3DSR` around
highdicom's TID 1500 templates) and `sr_to_bytes_reference` writes it with pydicom's dcmwrite: they
define the SR. Both cost ~16 ms of CPU per finding, as much as the screening itself, so production
uses `build_sr`, which makes the same pydicom tree directly (`screener.dicom.sr_fast`: each dataset
and data element created once with its tag and VR, the header copied from the first source as
highdicom copies it, no deep copy or re-parse of the content tree), and `sr_to_bytes`, which writes
pydicom's bytes with a direct Explicit VR Little Endian encoder (`screener.dicom.sr_write`), together
~1-3 ms per finding. An input the fast builder does not handle (or refuses) goes to the reference,
which builds it or raises its own error; a dataset the encoder does not handle is written by
pydicom. tests/dicom/test_sr_fast.py checks that `sr_to_bytes(build_sr(...))` and
`sr_to_bytes_reference(build_sr_reference(...))` give the same bytes (or the same error) for every
finding set of tests/dicom/test_sr.py, headers with many character sets, missing, empty and
malformed attributes, headers read from files, and a seeded random sample; the validators
(dciodvfy, dsrdump, pixelmed) check the production output.

Determinism: for the same findings, `content_datetime` and software version the
bytes of `sr_to_bytes(build_sr(...))` are identical (UIDs are derived from the
content with `derive_uid`; highdicom's creation timestamps are replaced by
`content_datetime`).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    AlgorithmIdentification,
    Comprehensive3DSR,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TrackingIdentifier,
)
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DT

from screener.logs import get_logger

log = get_logger(__name__)

# --------------------------------------------------------------------------- codes

PRIVATE_SCHEME = "99CSPINE"
PRIVATE_SCHEME_NAME = "cspine-screener findings"

FINDING_CODES: dict[str, Code] = {
    "spondylosis": Code("CSP001", PRIVATE_SCHEME, "Cervical spondylosis"),
    "stenosis": Code("CSP002", PRIVATE_SCHEME, "Cervical foraminal stenosis"),
}

TITLE = codes.DCM.ImagingMeasurementReport  # 126000 DCM
PROCEDURE_REPORTED = codes.SCT.ImagingProcedure  # 363679005 SCT
OBSERVER_DEVICE = codes.DCM.Device  # 121007 DCM
FINDING_SITE = codes.SCT.CervicalSpine  # 122494005 SCT
LATERALITY = {"L": codes.SCT.Left, "R": codes.SCT.Right}  # 7771000 / 24028007 SCT
PRESENT = codes.SCT.Present  # 52101004 SCT
ABSENT = codes.SCT.Absent  # 272519000 SCT
CERTAINTY = codes.DCM.CertaintyOfFinding  # 111012 DCM
PERCENT = codes.UCUM.Percent  # "%" UCUM
ALGORITHM_FAMILY = codes.DCM.ArtificialIntelligence  # 123110 DCM, CID 7162; value of Algorithm Family (111000 DCM)
# IHE AI Results (Rev 1.1+, 6.5.3.1): the Purpose of Reference of the Contributing Equipment item that
# describes an algorithm. IHE gives a placeholder code in its own "99IHE" scheme until DICOM assigns one;
# highdicom's ContributingEquipment only takes CID 7005 codes, so the item is written with pydicom.
IHE_SCHEME = "99IHE"
IHE_SCHEME_NAME = "IHE placeholder codes"
PROCESSING_ALGORITHM = Code("Newcode1", IHE_SCHEME, "Processing Algorithm")

SERIES_DESCRIPTION = "AI screening: cervical spine"
SERIES_DESCRIPTION_UNVALIDATED = "AI screening: cervical spine (NOT FOR DIAGNOSIS - unvalidated)"  # LO: <= 64
PERCENT_DECIMALS = 3
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:cspine-screener:dicom-uid")


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class EngineInfo:
    """What the SR says about the engine that produced a finding (from its manifest)."""

    task: str
    name: str
    version: str
    threshold: float
    validated: bool
    demo: bool
    backend: str
    finding_code: Code
    # SHA-256 of the manifest (canonical JSON): changes with every rebuild or retraining.
    manifest_sha256: str = ""

    @property
    def device_uid(self) -> str:
        """The engine's Device UID (Contributing Equipment): one per engine version and manifest,
        the same after a restart or in a replay, a new one when the engine is retrained or rebuilt."""
        return derive_uid("cspine-engine-device", self.task, self.name, self.version, self.manifest_sha256)

    @classmethod
    def from_manifest(cls, manifest: Any, backend: str, name: str | None = None) -> EngineInfo:
        """From a `screener.engine.manifest.Manifest` (task, version, threshold.value, validated, demo)."""
        if manifest.threshold is None:
            raise ValueError(f"engine {manifest.task}: no threshold (not a classifier)")
        if manifest.task not in FINDING_CODES:
            raise ValueError(f"engine {manifest.task}: no finding code for this task")
        return cls(
            task=manifest.task,
            name=name or f"cspine-{manifest.task}",
            version=manifest.version,
            threshold=float(manifest.threshold.value),
            validated=bool(manifest.validated),
            demo=bool(manifest.demo),
            backend=backend,
            finding_code=FINDING_CODES[manifest.task],
            manifest_sha256=manifest_digest(manifest),
        )

    def parameters(self) -> list[str]:
        return [
            f"threshold={_fmt(self.threshold)}",
            f"backend={self.backend}",
            f"validated={'true' if self.validated else 'false'}",
            f"demo={'true' if self.demo else 'false'}",
        ]


@dataclass(frozen=True)
class Finding:
    """One engine's call on one source image.

    `source` is the source image's header (pixel data not needed). `roi` is the
    box (x0, y0, x1, y1) in source pixel coordinates for cropped engines, else
    None. `laterality` is 'L' / 'R' for oblique-view findings, else None.
    """

    source: pydicom.Dataset
    engine: EngineInfo
    probability: float
    present: bool
    roi: tuple[float, float, float, float] | None = None
    laterality: str | None = None


# --------------------------------------------------------------------------- helpers


def _fmt(x: float) -> str:
    return format(float(x), ".6g")


def manifest_digest(manifest: Any) -> str:
    """SHA-256 of the manifest's canonical JSON (sorted keys), or "" for an object without `to_dict`."""
    to_dict = getattr(manifest, "to_dict", None)
    if to_dict is None:
        return ""
    text = json.dumps(to_dict(), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fit_for_diagnosis(findings: Sequence[Finding]) -> bool:
    """True only when every engine is validated and none is a demo engine (PreliminaryFlag FINAL)."""
    return all(f.engine.validated and not f.engine.demo for f in findings)


def finding_tracking_uid(f: Finding, occurrence: int = 0) -> str:
    """A finding's Tracking Unique Identifier: derived from the study, the source image (and frame),
    the finding code, the engine's Device UID and the laterality. The same engine version on the
    same image gives the same UID in every SR (a superseding SR, a replay), so an assessment (IHE
    AIRA) can point at one finding; a retrained engine's finding is a new one."""
    frame = "1" if int(f.source.get("NumberOfFrames") or 1) > 1 else "-"
    parts = [
        str(f.source.StudyInstanceUID),
        str(f.source.SOPInstanceUID),
        frame,
        _code_key(f.engine.finding_code),
        f.engine.device_uid,
        f.laterality or "-",
    ]
    if occurrence:
        parts.append(str(occurrence))
    return derive_uid("cspine-finding", *parts)


def finding_tracking_identifier(f: Finding) -> str:
    """The human-readable Tracking Identifier: task, laterality and the source image's series and
    instance numbers (no patient data), e.g. "stenosis R, series 2 image 1"."""
    lat = f" {f.laterality}" if f.laterality else ""
    series, instance = f.source.get("SeriesNumber"), f.source.get("InstanceNumber")
    if series not in (None, "") and instance not in (None, ""):
        where = f"series {series} image {instance}"
    else:
        where = f"image ...{str(f.source.SOPInstanceUID)[-12:]}"
    return f"{f.engine.task}{lat}, {where}"


def derive_uid(*parts: str) -> str:
    """A deterministic UID "2.25.<decimal UUID>" (PS3.5 B.2) from `parts`.

    Name-based UUID (RFC 4122 version 5) of the parts joined with a separator
    that cannot occur in UIDs. (`pydicom.uid.generate_uid(prefix=None, ...)`
    ignores its entropy sources and is random, so it is not used here.)
    """
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    name = "\x1f".join(str(p) for p in parts)
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def _code_key(code: Any) -> str:
    return f"{code.value}^{code.scheme_designator}"


def _check_finding(i: int, f: Finding) -> None:
    where = f"finding {i}"
    for attr in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not f.source.get(attr):
            raise ValueError(f"{where}: source has no {attr}")
    p = float(f.probability)
    if not (math.isfinite(p) and 0.0 <= p <= 1.0):
        raise ValueError(f"{where}: probability {f.probability!r} is not in 0..1")
    thr = float(f.engine.threshold)
    if not (math.isfinite(thr) and 0.0 <= thr <= 1.0):
        raise ValueError(f"{where}: threshold {f.engine.threshold!r} is not in 0..1")
    if bool(f.present) != (p >= thr):
        raise ValueError(f"{where}: present={f.present} contradicts probability {p} at threshold {thr}")
    if f.laterality not in (None, "L", "R"):
        raise ValueError(f"{where}: laterality must be 'L', 'R' or None, got {f.laterality!r}")
    if f.roi is not None:
        if len(f.roi) != 4 or not all(math.isfinite(float(v)) for v in f.roi):
            raise ValueError(f"{where}: roi must be 4 finite numbers (x0, y0, x1, y1)")


def _multiframe_iod(sop_class_uid: str) -> bool:
    """Whether the IOD has Number of Frames (highdicom then wants a pixel origin)."""
    try:
        from highdicom._standard_utils import is_attribute_in_iod
    except ImportError:  # private helper moved: assume single-frame IOD
        return False
    try:
        return bool(is_attribute_in_iod("NumberOfFrames", sop_class_uid))
    except Exception:
        return False


def _roi_polyline(roi: Sequence[float], source: pydicom.Dataset) -> np.ndarray:
    """Closed rectangle (5 points, column/row) clipped to the image.

    The preprocessing box uses pixel-edge coordinates (a crop is
    ``gray[y0:y1, x0:x1]``), the same convention as DICOM SCOORD (the top left
    corner of the top left pixel is 0,0), so no half-pixel shift is needed.
    """
    x0, y0, x1, y1 = (float(v) for v in roi)
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    cols, rows = source.get("Columns"), source.get("Rows")
    if cols and rows:
        x0, x1 = min(max(x0, 0.0), float(cols)), min(max(x1, 0.0), float(cols))
        y0, y1 = min(max(y0, 0.0), float(rows)), min(max(y1, 0.0), float(rows))
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"roi {tuple(roi)} is empty inside the {cols}x{rows} image")
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)


def _finding_content_key(f: Finding) -> list[str]:
    e = f.engine
    roi = "-" if f.roi is None else ",".join(_fmt(v) for v in f.roi)
    return [
        str(f.source.SOPInstanceUID),
        e.task,
        e.name,
        e.version,
        e.manifest_sha256,
        e.backend,
        _fmt(e.threshold),
        str(e.validated),
        str(e.demo),
        _code_key(e.finding_code),
        repr(round(float(f.probability), 8)),
        str(bool(f.present)),
        roi,
        f.laterality or "-",
    ]


def _measurement_group(f: Finding, tracking_uid: str, manufacturer: str) -> Any:
    e = f.engine
    code = e.finding_code
    tracking = TrackingIdentifier(uid=tracking_uid, identifier=finding_tracking_identifier(f))
    algorithm = AlgorithmIdentification(
        name=e.name,
        version=e.version,
        parameters=e.parameters(),
        family=ALGORITHM_FAMILY,
        manufacturer=manufacturer,
    )
    site = FindingSite(anatomic_location=FINDING_SITE, laterality=LATERALITY[f.laterality] if f.laterality else None)
    percent = round(float(f.probability) * 100.0, PERCENT_DECIMALS)
    measurement = Measurement(name=CERTAINTY, value=percent, unit=PERCENT)
    evaluation = QualitativeEvaluation(name=code, value=PRESENT if f.present else ABSENT)
    common: dict[str, Any] = dict(
        tracking_identifier=tracking,
        finding_type=code,
        algorithm_id=algorithm,
        finding_sites=[site],
        measurements=[measurement],
        qualitative_evaluations=[evaluation],
    )
    sop_class, sop_uid = str(f.source.SOPClassUID), str(f.source.SOPInstanceUID)
    # The decoder uses the first frame of a multi-frame image: reference that frame.
    frames = [1] if int(f.source.get("NumberOfFrames") or 1) > 1 else None
    if f.roi is None:
        return MeasurementsAndQualitativeEvaluations(
            source_images=[SourceImageForMeasurementGroup(sop_class, sop_uid, frames)], **common
        )
    origin = "FRAME" if frames and _multiframe_iod(sop_class) else None
    region = ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=_roi_polyline(f.roi, f.source),
        source_image=SourceImageForRegion(sop_class, sop_uid, frames),
        pixel_origin_interpretation=origin,
    )
    return PlanarROIMeasurementsAndQualitativeEvaluations(referenced_region=region, **common)


# --------------------------------------------------------------------------- build


@dataclass(frozen=True)
class SRReference:
    """An earlier SR of the same study that this one supersedes (Predecessor Documents Sequence)."""

    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str


def add_predecessors(sr: pydicom.Dataset, predecessors: Sequence[SRReference]) -> None:
    """Fill the Predecessor Documents Sequence (0040,A360): a Hierarchical SOP Instance Reference
    per study (Study UID -> Referenced Series Sequence -> Referenced SOP Sequence)."""
    if not predecessors:
        return
    by_study: dict[str, dict[str, list[SRReference]]] = {}
    for ref in predecessors:
        by_study.setdefault(ref.study_uid, {}).setdefault(ref.series_uid, []).append(ref)
    items = []
    for study_uid, series in by_study.items():
        study_item = pydicom.Dataset()
        study_item.StudyInstanceUID = study_uid
        series_items = []
        for series_uid, refs in series.items():
            series_item = pydicom.Dataset()
            series_item.SeriesInstanceUID = series_uid
            sop_items = []
            for ref in refs:
                sop = pydicom.Dataset()
                sop.ReferencedSOPClassUID = ref.sop_class_uid
                sop.ReferencedSOPInstanceUID = ref.sop_instance_uid
                sop_items.append(sop)
            series_item.ReferencedSOPSequence = sop_items
            series_items.append(series_item)
        study_item.ReferencedSeriesSequence = series_items
        items.append(study_item)
    sr.PredecessorDocumentsSequence = items


def add_algorithm_equipment(
    sr: pydicom.Dataset, engines: Sequence[EngineInfo], manufacturer: str, when: datetime
) -> None:
    """Append one Contributing Equipment item per engine version, as IHE AI Results asks: purpose
    "Processing Algorithm", Manufacturer, Manufacturer's Model Name (engine name), Software Versions
    (engine version) and Device UID (`EngineInfo.device_uid`)."""
    seq = sr.get("ContributingEquipmentSequence")
    if seq is None:
        sr.ContributingEquipmentSequence = []
        seq = sr.ContributingEquipmentSequence
    for e in engines:
        purpose = pydicom.Dataset()
        purpose.CodeValue = PROCESSING_ALGORITHM.value
        purpose.CodingSchemeDesignator = PROCESSING_ALGORITHM.scheme_designator
        purpose.CodeMeaning = PROCESSING_ALGORITHM.meaning
        item = pydicom.Dataset()
        item.Manufacturer = manufacturer
        item.ManufacturerModelName = e.name
        item.DeviceUID = e.device_uid
        item.SoftwareVersions = e.version
        item.ContributionDateTime = DT(when)
        item.ContributionDescription = (
            f"AI engine {e.name} {e.version} ({e.backend}), "
            + ("validated" if e.validated else "NOT VALIDATED")
            + (", demo engine" if e.demo else "")
        )
        item.PurposeOfReferenceCodeSequence = [purpose]
        seq.append(item)


_CHECKED_VRS = {"DA": pydicom.valuerep.DA, "DT": pydicom.valuerep.DT, "TM": pydicom.valuerep.TM}


def _copyable_header(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The source header with the values highdicom would refuse to copy into the SR blanked: a
    malformed date or time (modalities send them, e.g. a birth date with a stray character) or a
    Patient's Sex outside M/F/O. These values are not used for screening; an SR without them is
    better than no SR. The source file itself is left as received."""
    bad = []
    for elem in ds:
        validate = _CHECKED_VRS.get(str(elem.VR))
        if validate is None or elem.value in (None, ""):
            continue
        values = elem.value if isinstance(elem.value, pydicom.multival.MultiValue) else [elem.value]
        try:
            for v in values:
                if validate(str(v)) is None:
                    raise ValueError("empty")
        except Exception:  # noqa: BLE001 - any value pydicom cannot read as its VR
            bad.append(elem.tag)
    sex = str(ds.get("PatientSex", "") or "")
    if sex and sex not in ("M", "F", "O"):
        bad.append(pydicom.tag.Tag("PatientSex"))
    if not bad:
        return ds
    clean = copy.deepcopy(ds)
    for tag in bad:
        clean[tag].value = None
        log.info("sr_header_value_dropped", keyword=pydicom.datadict.keyword_for_tag(tag))
    return clean


@dataclass(frozen=True)
class _Plan:
    """What both builders derive from the findings before building (after the checks)."""

    findings: list[Finding]
    study_uid: str
    when: datetime
    final: bool
    description: str
    sr_uid: str
    series_uid: str
    tracking_uids: list[str]
    engines: list[EngineInfo]


def _plan(
    findings: Sequence[Finding],
    predecessors: Sequence[SRReference],
    software_version: str,
    device_uid: str,
    sr_uid: str | None,
    series_uid: str | None,
    content_datetime: datetime | None,
) -> _Plan:
    findings = list(findings)
    if not findings:
        raise ValueError("no findings to report")
    for i, f in enumerate(findings):
        _check_finding(i, f)
    studies = {str(f.source.StudyInstanceUID) for f in findings}
    if len(studies) != 1:
        raise ValueError(f"findings span {len(studies)} studies; one SR is built per study")
    patients = {str(f.source.get("PatientID", "")) for f in findings}
    if len(patients) != 1:
        raise ValueError("findings of one study carry different Patient IDs")
    study_uid = studies.pop()

    when = content_datetime or datetime.now()
    unvalidated = any(not f.engine.validated for f in findings)
    description = SERIES_DESCRIPTION_UNVALIDATED if unvalidated else SERIES_DESCRIPTION

    keys = [_finding_content_key(f) for f in findings]
    if sr_uid is None:
        sr_uid = derive_uid(
            "cspine-sr",
            device_uid,
            study_uid,
            software_version,
            *("|".join(k) for k in keys),
            *(r.sop_instance_uid for r in predecessors),
        )
    if series_uid is None:
        series_uid = derive_uid("cspine-sr-series", device_uid, study_uid, description)

    tracking_uids = []
    seen_tracking: dict[str, int] = {}
    for f in findings:
        base = finding_tracking_uid(f)
        n = seen_tracking.get(base, 0)
        seen_tracking[base] = n + 1
        tracking_uids.append(finding_tracking_uid(f, n) if n else base)

    engines: dict[str, EngineInfo] = {}
    for f in findings:
        engines.setdefault(f.engine.device_uid, f.engine)
    return _Plan(
        findings=findings,
        study_uid=study_uid,
        when=when,
        final=fit_for_diagnosis(findings),
        description=description,
        sr_uid=sr_uid,
        series_uid=series_uid,
        tracking_uids=tracking_uids,
        engines=list(engines.values()),
    )


def _evidence(findings: Sequence[Finding]) -> list[pydicom.Dataset]:
    """Every referenced image's (copyable) header, once, in order of first use."""
    evidence: list[pydicom.Dataset] = []
    seen: set[str] = set()
    for f in findings:
        uid = str(f.source.SOPInstanceUID)
        if uid not in seen:
            seen.add(uid)
            evidence.append(_copyable_header(f.source))
    return evidence


def _coding_schemes(manufacturer: str) -> list[CodingSchemeIdentificationItem]:
    return [
        CodingSchemeIdentificationItem(
            designator=PRIVATE_SCHEME,
            name=PRIVATE_SCHEME_NAME,
            responsible_organization=manufacturer,
        ),
        CodingSchemeIdentificationItem(
            designator=IHE_SCHEME,
            name=IHE_SCHEME_NAME,
            responsible_organization="IHE International",
        ),
    ]


def build_sr(
    findings: Sequence[Finding],
    *,
    predecessors: Sequence[SRReference] = (),
    series_number: int = 9001,
    instance_number: int = 1,
    manufacturer: str = "cspine-screener",
    software_version: str,
    device_uid: str,
    device_name: str = "cspine-screener",
    model_name: str = "cspine-screener",
    sr_uid: str | None = None,
    series_uid: str | None = None,
    content_datetime: datetime | None = None,
) -> pydicom.Dataset:
    """The study's SR: one measurement group per finding (see module doc).

    The same dataset as `build_sr_reference` (highdicom), built directly by `screener.dicom.sr_fast`;
    an input that module does not handle is built (or refused) by the reference.

    Raises ValueError when there are no findings, they span more than one study or
    patient, or a finding is inconsistent (probability out of 0..1, `present`
    contradicting the threshold, bad laterality or ROI).
    `sr_uid` / `series_uid` default to UIDs derived from the content (`derive_uid`),
    so a replay of the same results gives the same SR. `predecessors` are the SRs of this study
    that this one supersedes (a late image reopened the study); the caller passes the next
    `instance_number`.
    """
    from screener.dicom import sr_fast

    plan = _plan(findings, predecessors, software_version, device_uid, sr_uid, series_uid, content_datetime)
    try:
        groups = [sr_fast.measurement_group(f, uid, manufacturer) for f, uid in zip(plan.findings, plan.tracking_uids)]
        content = sr_fast.report_content(groups, device_uid, device_name, manufacturer, model_name)
        sr = sr_fast.header(
            _evidence(plan.findings),
            content,
            series_instance_uid=plan.series_uid,
            series_number=series_number,
            sop_instance_uid=plan.sr_uid,
            instance_number=instance_number,
            manufacturer=manufacturer,
            is_final=plan.final,
            series_description=plan.description,
            manufacturer_model_name=model_name,
            software_versions=software_version,
            when=plan.when,
            coding_schemes=_coding_schemes(manufacturer),
        )
    except Exception as exc:  # noqa: BLE001 - the reference builds it, or raises its own error
        log.info("sr_built_by_reference", reason=exc.__class__.__name__)
        return build_sr_reference(
            findings,
            predecessors=predecessors,
            series_number=series_number,
            instance_number=instance_number,
            manufacturer=manufacturer,
            software_version=software_version,
            device_uid=device_uid,
            device_name=device_name,
            model_name=model_name,
            sr_uid=sr_uid,
            series_uid=series_uid,
            content_datetime=plan.when,
        )
    add_algorithm_equipment(sr, plan.engines, manufacturer, plan.when)
    add_predecessors(sr, predecessors)
    return sr


def build_sr_reference(
    findings: Sequence[Finding],
    *,
    predecessors: Sequence[SRReference] = (),
    series_number: int = 9001,
    instance_number: int = 1,
    manufacturer: str = "cspine-screener",
    software_version: str,
    device_uid: str,
    device_name: str = "cspine-screener",
    model_name: str = "cspine-screener",
    sr_uid: str | None = None,
    series_uid: str | None = None,
    content_datetime: datetime | None = None,
) -> Comprehensive3DSR:
    """`build_sr` with highdicom: the definition of the SR's dataset, and the test oracle of `build_sr`
    (same arguments, same bytes from `sr_to_bytes`, same errors)."""
    plan = _plan(findings, predecessors, software_version, device_uid, sr_uid, series_uid, content_datetime)
    when = plan.when
    groups = [_measurement_group(f, uid, manufacturer) for f, uid in zip(plan.findings, plan.tracking_uids)]

    observer = ObserverContext(
        observer_type=OBSERVER_DEVICE,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device_uid, name=device_name, manufacturer_name=manufacturer, model_name=model_name
        ),
    )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=groups,
        title=TITLE,
    )

    sr = Comprehensive3DSR(
        evidence=_evidence(plan.findings),
        content=report,
        series_instance_uid=plan.series_uid,
        series_number=series_number,
        sop_instance_uid=plan.sr_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        is_complete=True,
        is_final=plan.final,
        is_verified=False,
        series_description=plan.description,
        manufacturer_model_name=model_name,
        software_versions=software_version,
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
        coding_schemes=_coding_schemes(manufacturer),
    )
    # Replace highdicom's "now" stamps so the same inputs give the same bytes.
    sr.InstanceCreationDate = sr.ContentDate
    sr.InstanceCreationTime = sr.ContentTime
    for item in sr.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = DT(when)
    add_algorithm_equipment(sr, plan.engines, manufacturer, when)
    add_predecessors(sr, predecessors)
    return sr


def sr_to_bytes(sr: pydicom.Dataset) -> bytes:
    """Part 10 file bytes, Explicit VR Little Endian (for the outbox / folder writer): the bytes of
    `sr_to_bytes_reference` (pydicom's dcmwrite), written by `screener.dicom.sr_write` where it can."""
    from screener.dicom.sr_write import part10_bytes

    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    data = part10_bytes(sr)
    return sr_to_bytes_reference(sr) if data is None else data


def sr_to_bytes_reference(sr: pydicom.Dataset) -> bytes:
    """`sr_to_bytes` with pydicom's writer (``save_as(..., enforce_file_format=True)``)."""
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# --------------------------------------------------------------------------- read back

_MEASUREMENT_GROUP = ("125007", "DCM")
_TRACKING_UID = ("112040", "DCM")
_FINDING_SITE = ("363698007", "SCT")
_LATERALITY = ("272741003", "SCT")
_ALGORITHM_NAME = ("111001", "DCM")
_ALGORITHM_VERSION = ("111003", "DCM")
_ALGORITHM_PARAMETERS = ("111002", "DCM")
_FINDING = ("121071", "DCM")


def _concept(item: pydicom.Dataset) -> tuple[str, str]:
    seq = item.get("ConceptNameCodeSequence")
    if not seq:
        return ("", "")
    return (str(seq[0].CodeValue), str(seq[0].CodingSchemeDesignator))


def _code_value(item: pydicom.Dataset) -> tuple[str, str, str]:
    c = item.ConceptCodeSequence[0]
    return (str(c.CodeValue), str(c.CodingSchemeDesignator), str(c.CodeMeaning))


def _walk(items: Sequence[pydicom.Dataset]):
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def summarize(sr: pydicom.Dataset) -> list[dict[str, Any]]:
    """Read the findings back from an SR built by `build_sr` (also after a file round trip).

    One dict per measurement group, in document order: source_sop_instance_uid,
    finding (code meaning), finding_code (value, scheme), present (bool),
    probability (0..1, from the percent value), laterality ('L'/'R'/None),
    roi ((x0, y0, x1, y1) or None), algorithm, version, parameters, tracking_uid.
    """
    finding_codes = {(c.value, c.scheme_designator) for c in FINDING_CODES.values()}
    out: list[dict[str, Any]] = []
    for group in _walk(sr.get("ContentSequence", [])):
        if group.get("ValueType") != "CONTAINER" or _concept(group) != _MEASUREMENT_GROUP:
            continue
        row: dict[str, Any] = {
            "source_sop_instance_uid": None,
            "finding": None,
            "finding_code": None,
            "present": None,
            "probability": None,
            "laterality": None,
            "roi": None,
            "algorithm": None,
            "version": None,
            "parameters": [],
            "tracking_uid": None,
        }
        finding_type: tuple[str, str] | None = None
        for item in group.get("ContentSequence", []):
            concept, vtype = _concept(item), item.get("ValueType")
            if vtype == "CODE" and concept == _FINDING:
                finding_type = _code_value(item)[:2]
        for item in _walk(group.get("ContentSequence", [])):
            concept, vtype = _concept(item), item.get("ValueType")
            if vtype == "IMAGE":
                row["source_sop_instance_uid"] = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            elif vtype == "UIDREF" and concept == _TRACKING_UID:
                row["tracking_uid"] = str(item.UID)
            elif vtype == "NUM" and concept == (CERTAINTY.value, CERTAINTY.scheme_designator):
                row["probability"] = float(item.MeasuredValueSequence[0].NumericValue) / 100.0
            elif vtype == "CODE" and concept == _LATERALITY:
                side = _code_value(item)[:2]
                row["laterality"] = next(
                    (k for k, c in LATERALITY.items() if (c.value, c.scheme_designator) == side), None
                )
            elif vtype == "CODE" and (concept in finding_codes or concept == finding_type):
                value = _code_value(item)
                row["finding_code"] = concept
                row["present"] = (value[0], value[1]) == (PRESENT.value, PRESENT.scheme_designator)
                row["finding"] = str(item.ConceptNameCodeSequence[0].CodeMeaning)
            elif vtype == "TEXT" and concept == _ALGORITHM_NAME:
                row["algorithm"] = str(item.TextValue)
            elif vtype == "TEXT" and concept == _ALGORITHM_VERSION:
                row["version"] = str(item.TextValue)
            elif vtype == "TEXT" and concept == _ALGORITHM_PARAMETERS:
                row["parameters"].append(str(item.TextValue))
            elif vtype == "SCOORD":
                pts = np.asarray(item.GraphicData, dtype=np.float64).reshape(-1, 2)
                row["roi"] = (
                    float(pts[:, 0].min()),
                    float(pts[:, 1].min()),
                    float(pts[:, 0].max()),
                    float(pts[:, 1].max()),
                )
        out.append(row)
    return out
