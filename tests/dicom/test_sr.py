"""The study SR: structure, codes, references, determinism, and the DICOM validators."""

from __future__ import annotations

import copy
import io
import shutil
import subprocess
from datetime import datetime

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from screener.dicom.sr import (
    ABSENT,
    FINDING_CODES,
    PRESENT,
    PRIVATE_SCHEME,
    PROCESSING_ALGORITHM,
    SERIES_DESCRIPTION,
    SERIES_DESCRIPTION_UNVALIDATED,
    EngineInfo,
    Finding,
    SRReference,
    build_sr,
    derive_uid,
    sr_to_bytes,
    summarize,
)

DX = "1.2.840.10008.5.1.4.1.1.1.1"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
STUDY = "1.2.826.0.1.3680043.8.498.1001"
WHEN = datetime(2025, 3, 14, 9, 26, 53)
DEVICE_UID = "1.2.826.0.1.3680043.8.498.77"

SPONDYLOSIS = EngineInfo(
    task="spondylosis",
    name="cspine-spondylosis",
    version="2025.03.1",
    threshold=0.4213,
    validated=False,
    demo=False,
    backend="onnx-int8",
    finding_code=FINDING_CODES["spondylosis"],
)
STENOSIS = EngineInfo(
    task="stenosis",
    name="cspine-stenosis",
    version="2025.03.2",
    threshold=0.5,
    validated=False,
    demo=False,
    backend="onnx-fp32",
    finding_code=FINDING_CODES["stenosis"],
)


def make_source(
    n: int,
    view: str,
    laterality: str = "",
    study: str = STUDY,
    patient_id: str = "PID-0042",
    rows: int = 2048,
    cols: int = 1664,
) -> Dataset:
    """A DX For Presentation header with the modules highdicom copies from (no pixel data)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DX
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = DX
    ds.SOPInstanceUID = f"{study}.2.{n}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    # Patient
    ds.PatientName = "Testperson^Erika"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19560412"
    ds.PatientSex = "F"
    # General Study
    ds.StudyInstanceUID = study
    ds.StudyDate = "20250314"
    ds.StudyTime = "081500"
    ds.AccessionNumber = "ACC-7781"
    ds.ReferringPhysicianName = "Doctor^Who"
    ds.StudyID = "S7781"
    ds.StudyDescription = "XR CERVICAL SPINE"
    # Series (DX)
    ds.Modality = "DX"
    ds.SeriesInstanceUID = f"{study}.1.{n}"
    ds.SeriesNumber = n
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BodyPartExamined = "CSPINE"
    # Equipment
    ds.Manufacturer = "Acme Radiography"
    ds.ManufacturerModelName = "DR-1"
    # Image
    ds.InstanceNumber = 1
    ds.ContentDate = "20250314"
    ds.ContentTime = "081700"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientOrientation = ["P", "F"]
    ds.ViewPosition = view
    ds.ImageLaterality = laterality or "U"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    return ds


@pytest.fixture
def study_findings() -> list[Finding]:
    lateral = make_source(1, "LL")
    left = make_source(2, "LAO", "L")
    right = make_source(3, "RAO", "R")
    return [
        Finding(lateral, SPONDYLOSIS, probability=0.8731, present=True),
        Finding(left, STENOSIS, probability=0.1234, present=False, roi=(410.5, 620.0, 1022.0, 1480.25), laterality="L"),
        Finding(right, STENOSIS, probability=0.5, present=True, roi=(300.0, 500.0, 900.0, 1300.0), laterality="R"),
    ]


def build(findings, **kw):
    args = dict(software_version="0.1.0", device_uid=DEVICE_UID, content_datetime=WHEN)
    args.update(kw)
    return build_sr(findings, **args)


def reread(sr) -> Dataset:
    return pydicom.dcmread(io.BytesIO(sr_to_bytes(sr)))


def items(ds: Dataset):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from items(item)


def concept(item) -> tuple[str, str]:
    c = item.ConceptNameCodeSequence[0]
    return str(c.CodeValue), str(c.CodingSchemeDesignator)


# --------------------------------------------------------------------------- header


def test_sr_header(study_findings):
    ds = reread(build(study_findings))
    src = study_findings[0].source
    assert ds.SOPClassUID == COMPREHENSIVE_3D_SR
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.Modality == "SR"
    assert ds.StudyInstanceUID == STUDY
    for kw in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyID",
    ):
        assert ds.data_element(kw).value == src.data_element(kw).value, kw
    assert ds.SeriesInstanceUID not in {f.source.SeriesInstanceUID for f in study_findings}
    assert ds.SeriesNumber == 9001 and ds.InstanceNumber == 1
    assert ds.SeriesDescription == SERIES_DESCRIPTION_UNVALIDATED
    assert ds.VerificationFlag == "UNVERIFIED"
    assert ds.PreliminaryFlag == "PRELIMINARY"  # the fixture's engines are not validated
    assert ds.CompletionFlag == "COMPLETE"
    assert ds.Manufacturer == "cspine-screener" and ds.SoftwareVersions == "0.1.0"
    assert ds.ContentDate == "20250314" and ds.ContentTime.startswith("092653")
    assert ds.InstanceCreationDate == "20250314"
    schemes = {s.CodingSchemeDesignator: s for s in ds.CodingSchemeIdentificationSequence}
    assert schemes[PRIVATE_SCHEME].CodingSchemeName
    assert schemes[PRIVATE_SCHEME].CodingSchemeResponsibleOrganization == "cspine-screener"
    assert ds.SOPInstanceUID.startswith("2.25.") and ds.SeriesInstanceUID.startswith("2.25.")


def test_validated_engines_get_the_plain_series_description(study_findings):
    from dataclasses import replace

    validated = [replace(f, engine=replace(f.engine, validated=True)) for f in study_findings]
    assert build(validated).SeriesDescription == SERIES_DESCRIPTION
    mixed = [validated[0], study_findings[1]]
    assert build(mixed).SeriesDescription == SERIES_DESCRIPTION_UNVALIDATED


def test_every_source_is_referenced_and_listed_as_evidence(study_findings):
    ds = reread(build(study_findings))
    sources = {f.source.SOPInstanceUID for f in study_findings}
    referenced = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in items(ds) if i.ValueType == "IMAGE"}
    assert referenced == sources
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == sources
    assert "PertinentOtherEvidenceSequence" not in ds


def test_observer_is_the_device(study_findings):
    ds = reread(build(study_findings))
    root = list(ds.ContentSequence)
    by_concept = {concept(i): i for i in root}
    assert by_concept[("121005", "DCM")].ConceptCodeSequence[0].CodeValue == "121007"  # Observer Type: Device
    assert by_concept[("121012", "DCM")].UID == DEVICE_UID  # Device Observer UID
    assert by_concept[("121013", "DCM")].TextValue == "cspine-screener"  # Device Observer Name
    assert concept(ds) == ("126000", "DCM")  # Imaging Measurement Report


# --------------------------------------------------------------------------- content


def test_groups_content(study_findings):
    ds = reread(build(study_findings))
    rows = summarize(ds)
    assert len(rows) == 3
    for row, f in zip(rows, study_findings):
        assert row["source_sop_instance_uid"] == f.source.SOPInstanceUID
        assert row["finding_code"] == (f.engine.finding_code.value, PRIVATE_SCHEME)
        assert row["finding"] == f.engine.finding_code.meaning
        assert row["present"] is (f.probability >= f.engine.threshold)
        assert row["probability"] == pytest.approx(f.probability, abs=1e-5)
        assert row["laterality"] == f.laterality
        assert row["algorithm"] == f.engine.name and row["version"] == f.engine.version
    assert rows[0]["parameters"] == ["threshold=0.4213", "backend=onnx-int8", "validated=false", "demo=false"]
    assert rows[0]["roi"] is None
    assert rows[1]["roi"] == pytest.approx((410.5, 620.0, 1022.0, 1480.25))
    assert rows[2]["roi"] == pytest.approx((300.0, 500.0, 900.0, 1300.0))
    assert len({r["tracking_uid"] for r in rows}) == 3


def test_group_templates_codes_and_polyline(study_findings):
    ds = reread(build(study_findings))
    groups = [i for i in items(ds) if i.ValueType == "CONTAINER" and concept(i) == ("125007", "DCM")]
    assert len(groups) == 3
    templates = [
        g.ContentTemplateSequence[0].TemplateIdentifier if "ContentTemplateSequence" in g else None for g in groups
    ]
    assert templates[0] in ("1501", None)
    for g, f in zip(groups, study_findings):
        children = {concept(i): i for i in g.ContentSequence}
        site = children[("363698007", "SCT")]
        assert site.ConceptCodeSequence[0].CodeValue == "122494005"
        lat = [i for i in site.get("ContentSequence", []) if concept(i) == ("272741003", "SCT")]
        if f.laterality:
            assert lat[0].ConceptCodeSequence[0].CodeValue == {"L": "7771000", "R": "24028007"}[f.laterality]
        else:
            assert not lat
        num = children[("111012", "DCM")]
        unit = num.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0]
        assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("%", "UCUM")
        assert float(num.MeasuredValueSequence[0].NumericValue) == pytest.approx(100 * f.probability)
        evaluation = children[(f.engine.finding_code.value, PRIVATE_SCHEME)]
        expected = PRESENT if f.present else ABSENT
        assert evaluation.ConceptCodeSequence[0].CodeValue == expected.value
        assert evaluation.ConceptCodeSequence[0].CodingSchemeDesignator == "SCT"
        regions = [i for i in g.ContentSequence if i.ValueType == "SCOORD"]
        if f.roi is None:
            assert not regions
            assert children[("121112", "DCM")].ValueType == "IMAGE"  # Source of Measurement
        else:
            (region,) = regions
            assert region.GraphicType == "POLYLINE"
            pts = np.asarray(region.GraphicData, dtype=np.float64).reshape(-1, 2)
            x0, y0, x1, y1 = f.roi
            np.testing.assert_allclose(pts, [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]])
            (img,) = region.ContentSequence
            assert img.RelationshipType == "SELECTED FROM"
            assert img.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == f.source.SOPInstanceUID


def test_roi_outside_the_image_is_clipped():
    src = make_source(5, "LAO", "L", rows=100, cols=80)
    sr = build([Finding(src, STENOSIS, 0.9, True, roi=(-10.0, 20.0, 95.0, 130.0), laterality="L")])
    assert summarize(sr)[0]["roi"] == pytest.approx((0.0, 20.0, 80.0, 100.0))
    with pytest.raises(ValueError, match="empty"):
        build([Finding(src, STENOSIS, 0.9, True, roi=(90.0, 20.0, 95.0, 30.0), laterality="L")])


def test_one_image_two_engines_references_it_once():
    src = make_source(1, "LL")
    sr = reread(build([Finding(src, SPONDYLOSIS, 0.2, False), Finding(src, STENOSIS, 0.7, True)]))
    assert len(summarize(sr)) == 2
    refs = [
        r
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for se in s.ReferencedSeriesSequence
        for r in se.ReferencedSOPSequence
    ]
    assert len(refs) == 1


# --------------------------------------------------------------------------- determinism and UIDs


def test_same_inputs_give_identical_bytes(study_findings):
    a = sr_to_bytes(build(study_findings))
    b = sr_to_bytes(
        build(
            [
                Finding(pydicom.Dataset(f.source), f.engine, f.probability, f.present, f.roi, f.laterality)
                for f in study_findings
            ]
        )
    )
    assert a == b


def test_uids_follow_content(study_findings):
    base = build(study_findings)
    changed = list(study_findings)
    changed[0] = Finding(changed[0].source, SPONDYLOSIS, 0.8732, True)
    other = build(changed)
    assert other.SOPInstanceUID != base.SOPInstanceUID
    assert other.SeriesInstanceUID == base.SeriesInstanceUID  # same study, same series
    explicit = build(study_findings, sr_uid="1.2.3.4", series_uid="1.2.3.5")
    assert (explicit.SOPInstanceUID, explicit.SeriesInstanceUID) == ("1.2.3.4", "1.2.3.5")


def test_derive_uid():
    a = derive_uid(STUDY, "spondylosis 2025.03.1")
    assert a == derive_uid(STUDY, "spondylosis 2025.03.1")
    assert a != derive_uid(STUDY, "spondylosis 2025.03.2")
    assert a.startswith("2.25.") and len(a) <= 64
    assert pydicom.uid.UID(a).is_valid


# --------------------------------------------------------------------------- refusals


def test_findings_from_two_studies_are_refused(study_findings):
    other = make_source(9, "LL", study="1.2.826.0.1.3680043.8.498.2002")
    with pytest.raises(ValueError, match="studies"):
        build(study_findings + [Finding(other, SPONDYLOSIS, 0.1, False)])


def test_inconsistent_findings_are_refused(study_findings):
    src = study_findings[0].source
    with pytest.raises(ValueError, match="contradicts"):
        build([Finding(src, SPONDYLOSIS, 0.3, True)])
    with pytest.raises(ValueError, match="0..1"):
        build([Finding(src, SPONDYLOSIS, 1.3, True)])
    with pytest.raises(ValueError, match="laterality"):
        build([Finding(src, STENOSIS, 0.9, True, laterality="left")])
    with pytest.raises(ValueError, match="no findings"):
        build([])
    with pytest.raises(ValueError, match="Patient IDs"):
        build(
            [
                Finding(src, SPONDYLOSIS, 0.1, False),
                Finding(make_source(2, "LL", patient_id="OTHER"), SPONDYLOSIS, 0.1, False),
            ]
        )


# --------------------------------------------------------------------------- validators


@pytest.fixture
def sr_file(tmp_path, study_findings):
    path = tmp_path / "sr.dcm"
    path.write_bytes(sr_to_bytes(build(study_findings)))
    return path


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
def test_dciodvfy_reports_no_errors(sr_file):
    proc = subprocess.run(["dciodvfy", str(sr_file)], capture_output=True, text=True, timeout=60)
    lines = (proc.stderr + proc.stdout).splitlines()
    errors = [ln for ln in lines if ln.startswith("Error")]
    assert not errors, "\n".join(lines)
    # Explained warnings only (docs/sr-codes.md, deploy/CONFORMANCE.md): dciodvfy does not know the
    # private coding scheme, and its 2022 tables predate Device UID in the Contributing Equipment Sequence.
    assert not unexpected_dciodvfy_warnings(lines), "\n".join(lines)


@pytest.mark.skipif(shutil.which("dsrdump") is None, reason="dsrdump (dcmtk) is not installed")
def test_dsrdump_reads_the_content_tree(sr_file):
    proc = subprocess.run(["dsrdump", str(sr_file)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Imaging Measurement Report" in out
    assert "Cervical spondylosis" in out and "Cervical foraminal stenosis" in out
    assert "POLYLINE" in out
    assert "E:" not in proc.stderr


DCIODVFY_EXPLAINED = (
    f"Unrecognized defined term <{PRIVATE_SCHEME}>",
    "Attribute is not present in standard DICOM IOD - (0x0018,0x1002) UI Device UID",
    "Dicom dataset contains attributes not present in standard DICOM IOD - this is a Standard Extended SOP Class",
)


def unexpected_dciodvfy_warnings(lines: list[str]) -> list[str]:
    return [ln for ln in lines if ln.startswith("Warning") and not any(x in ln for x in DCIODVFY_EXPLAINED)]


def test_multiframe_source_references_its_first_frame():
    xa = make_source(7, "LL")
    xa.SOPClassUID = "1.2.840.10008.5.1.4.1.1.12.1"  # X-Ray Angiographic Image: multi-frame IOD
    xa.Modality = "XA"
    xa.NumberOfFrames = 3
    dx = make_source(8, "LAO", "L")
    dx.NumberOfFrames = 2
    sr = reread(
        build(
            [
                Finding(xa, STENOSIS, 0.9, True, roi=(10.0, 10.0, 50.0, 60.0), laterality="L"),
                Finding(dx, SPONDYLOSIS, 0.9, True),
            ]
        )
    )
    refs = [i.ReferencedSOPSequence[0] for i in items(sr) if i.ValueType == "IMAGE"]
    assert [int(r.ReferencedFrameNumber) for r in refs] == [1, 1]
    (region,) = [i for i in items(sr) if i.ValueType == "SCOORD"]
    assert region.PixelOriginInterpretation == "FRAME"


def test_engine_info_from_manifest():
    from types import SimpleNamespace

    m = SimpleNamespace(
        task="stenosis", version="2025.03.2", threshold=SimpleNamespace(value=0.37), validated=True, demo=True
    )
    info = EngineInfo.from_manifest(m, backend="tensorrt-fp16")
    assert info.finding_code == FINDING_CODES["stenosis"] and info.name == "cspine-stenosis"
    assert info.parameters() == ["threshold=0.37", "backend=tensorrt-fp16", "validated=true", "demo=true"]
    with pytest.raises(ValueError, match="no threshold"):
        EngineInfo.from_manifest(SimpleNamespace(task="roi", threshold=None), backend="onnx-fp32")


# --------------------------------------------------------------------------- IHE AI Results


def _validated(findings, validated=True, demo=False):
    from dataclasses import replace

    return [replace(f, engine=replace(f.engine, validated=validated, demo=demo)) for f in findings]


def test_preliminary_unless_every_engine_is_validated(study_findings):
    assert build(_validated(study_findings)).PreliminaryFlag == "FINAL"
    mixed = _validated(study_findings[:1]) + study_findings[1:]
    assert build(mixed).PreliminaryFlag == "PRELIMINARY"
    assert build(_validated(study_findings, demo=True)).PreliminaryFlag == "PRELIMINARY"  # a demo engine
    for fs in (study_findings, _validated(study_findings)):
        assert build(fs).VerificationFlag == "UNVERIFIED"  # no person verifies on this node


def test_algorithm_identification_has_family_and_manufacturer(study_findings):
    ds = reread(build(study_findings))
    groups = [i for i in items(ds) if i.ValueType == "CONTAINER" and concept(i) == ("125007", "DCM")]
    for g in groups:
        children = {concept(i): i for i in g.ContentSequence}
        family = children[("111000", "DCM")]
        assert family.RelationshipType == "HAS CONCEPT MOD"
        code = family.ConceptCodeSequence[0]
        assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == (
            "123110",
            "DCM",
            "Artificial Intelligence",
        )
        assert children[("122405", "DCM")].TextValue == "cspine-screener"  # Algorithm Manufacturer


def _algorithm_items(ds):
    return [
        item
        for item in ds.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodeValue == PROCESSING_ALGORITHM.value
    ]


def test_contributing_equipment_names_each_engine_version(study_findings):
    ds = reread(build(study_findings))
    algos = _algorithm_items(ds)
    assert [a.ManufacturerModelName for a in algos] == ["cspine-spondylosis", "cspine-stenosis"]
    for a, engine in zip(algos, (SPONDYLOSIS, STENOSIS)):
        purpose = a.PurposeOfReferenceCodeSequence[0]
        assert (purpose.CodingSchemeDesignator, purpose.CodeMeaning) == ("99IHE", "Processing Algorithm")
        assert a.Manufacturer == "cspine-screener"
        assert a.SoftwareVersions == engine.version
        assert a.DeviceUID == engine.device_uid and pydicom.uid.UID(a.DeviceUID).is_valid
        assert "NOT VALIDATED" in a.ContributionDescription
    schemes = {s.CodingSchemeDesignator for s in ds.CodingSchemeIdentificationSequence}
    assert {"99IHE", PRIVATE_SCHEME} <= schemes
    # highdicom's own items (source acquisition equipment, the library) are kept
    assert len(ds.ContributingEquipmentSequence) == len(algos) + 2


def test_device_uid_is_one_per_engine_version():
    from dataclasses import replace

    assert SPONDYLOSIS.device_uid == replace(SPONDYLOSIS).device_uid  # stable (restart, replay)
    assert SPONDYLOSIS.device_uid == replace(SPONDYLOSIS, backend="tensorrt-fp16").device_uid
    assert SPONDYLOSIS.device_uid != replace(SPONDYLOSIS, version="2025.04.1").device_uid
    assert SPONDYLOSIS.device_uid != replace(SPONDYLOSIS, manifest_sha256="ab" * 32).device_uid  # retrained


def test_engine_info_carries_the_manifest_digest():
    from dataclasses import replace

    from screener.dicom.samples import fake_manifest

    m = fake_manifest("spondylosis", "2025.03.1", threshold=0.42, validated=False, demo=False)
    a = EngineInfo.from_manifest(m, backend="onnx-fp32")
    assert (
        len(a.manifest_sha256) == 64 and a.manifest_sha256 == EngineInfo.from_manifest(m, "onnx-int8").manifest_sha256
    )
    # Retrained: new weights (backend hashes), same version string -> a new device.
    new_backends = [replace(b, sha256="1" * 64) for b in m.backends]
    b = EngineInfo.from_manifest(replace(m, backends=new_backends), backend="onnx-fp32")
    assert a.manifest_sha256 != b.manifest_sha256 and a.device_uid != b.device_uid


def test_tracking_uids_are_stable_per_finding(study_findings):
    base = summarize(build(study_findings))
    uids = [r["tracking_uid"] for r in base]
    assert len(set(uids)) == 3
    # The study reopens with a late image: the superseding SR keeps the earlier findings' UIDs.
    late = Finding(make_source(4, "LL"), SPONDYLOSIS, probability=0.1, present=False)
    prior = build(study_findings)
    ref = SRReference(STUDY, prior.SeriesInstanceUID, prior.SOPClassUID, prior.SOPInstanceUID)
    later = build(study_findings + [late], predecessors=[ref], instance_number=2)
    rows = summarize(later)
    assert [r["tracking_uid"] for r in rows[:3]] == uids
    assert rows[3]["tracking_uid"] not in uids
    assert later.SOPInstanceUID != prior.SOPInstanceUID
    # A retrained engine's call on the same image is a different finding.
    from dataclasses import replace

    retrained = [replace(study_findings[0], engine=replace(SPONDYLOSIS, version="2025.04.1"))]
    assert summarize(build(retrained))[0]["tracking_uid"] != uids[0]


def test_tracking_identifiers_name_task_side_and_image(study_findings):
    ds = reread(build(study_findings))
    texts = [i.TextValue for i in items(ds) if i.ValueType == "TEXT" and concept(i) == ("112039", "DCM")]
    assert texts == ["spondylosis, series 1 image 1", "stenosis L, series 2 image 1", "stenosis R, series 3 image 1"]


def test_superseding_sr_has_predecessor_documents(study_findings):
    prior = build(study_findings)
    ref = SRReference(STUDY, prior.SeriesInstanceUID, prior.SOPClassUID, prior.SOPInstanceUID)
    later = reread(build(study_findings, predecessors=[ref], instance_number=2))
    (study,) = later.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == STUDY
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == prior.SeriesInstanceUID
    (sop,) = series.ReferencedSOPSequence
    assert (sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID) == (COMPREHENSIVE_3D_SR, prior.SOPInstanceUID)
    assert later.SOPInstanceUID != prior.SOPInstanceUID and later.InstanceNumber == 2
    assert later.SeriesInstanceUID == prior.SeriesInstanceUID
    assert "PredecessorDocumentsSequence" not in reread(prior)


def test_malformed_header_dates_do_not_stop_the_sr():
    """Modalities send malformed dates: the SR is built without the bad value (never from it), and the
    source header is left as received."""
    import dataclasses

    from screener.dicom import samples

    images = samples.sample_images()
    findings = samples.sample_findings(images, samples.sample_engines())
    src = copy.deepcopy(images[0])
    with pytest.warns(UserWarning):
        src.PatientBirthDate = "19230405X"
    src.PatientSex = "Q"
    first = [dataclasses.replace(f, source=src) for f in findings if f.source.SOPInstanceUID == src.SOPInstanceUID]
    sr = build_sr(first, software_version="1", device_uid="1.2.3.4")
    assert not sr.get("PatientBirthDate") and not sr.get("PatientSex")
    assert sr.PatientID == src.PatientID and str(src.PatientBirthDate) == "19230405X"
